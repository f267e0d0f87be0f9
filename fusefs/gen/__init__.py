"""Generated gRPC stubs for proto/fusefs.proto (regenerate with `make proto`)."""
