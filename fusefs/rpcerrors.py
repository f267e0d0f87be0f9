"""The one exception the daemon's volume logic raises to answer with a gRPC code.

The volume manager knows nothing about gRPC contexts; it raises ``RpcFailure``
and the servicer turns it into a status, logs it once and counts it. That keeps
the logic testable without a live server.
"""

from __future__ import annotations

import grpc


class RpcFailure(Exception):
    """A request failed with a specific gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.NOT_FOUND, message)


def already_exists(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.ALREADY_EXISTS, message)


def failed_precondition(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, message)


def unavailable(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.UNAVAILABLE, message)


def internal(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INTERNAL, message)
