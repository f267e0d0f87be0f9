"""The one exception type that handlers raise to answer with a gRPC status.

Handlers never call ``context.abort`` themselves: they raise ``CSIError`` and
the server's interceptor turns it into the status, logs it once, and counts it.
That keeps the error path testable without a live gRPC context.
"""

from __future__ import annotations

import grpc


class CSIError(Exception):
    """A request failed with a specific gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.NOT_FOUND, message)


def already_exists(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.ALREADY_EXISTS, message)


def failed_precondition(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.FAILED_PRECONDITION, message)


def exhausted(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def out_of_range(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.OUT_OF_RANGE, message)


def aborted(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.ABORTED, message)


def internal(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.INTERNAL, message)


def unavailable(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.UNAVAILABLE, message)


def unimplemented(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.UNIMPLEMENTED, message)
