"""The one exception that handlers raise to answer with a gRPC status.

Handlers never call ``context.abort`` themselves: they raise ``CSIError`` and
the server's interceptor turns it into the status, logs it once, and counts it.
That keeps the error path testable without a live gRPC context.

It is the same exception type the fusefs daemon uses (``fusefs.rpcerrors``,
the lower layer); the constructors below add the codes only CSI needs.
"""

from __future__ import annotations

import grpc

from fusefs.rpcerrors import RpcFailure as CSIError
from fusefs.rpcerrors import already_exists, failed_precondition, internal, invalid, not_found, unavailable

__all__ = ["CSIError", "aborted", "already_exists", "exhausted", "failed_precondition", "internal", "invalid",
           "not_found", "out_of_range", "unavailable", "unimplemented"]


def exhausted(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def out_of_range(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.OUT_OF_RANGE, message)


def aborted(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.ABORTED, message)


def unimplemented(message: str) -> CSIError:
    return CSIError(grpc.StatusCode.UNIMPLEMENTED, message)
