"""Structured logs: one JSON object per line, or plain text for humans.

Each RPC is logged once, by the server interceptor, with its method, the IDs
it concerns, its duration, its gRPC code and a request ID. Request bodies are
logged only at debug level, and then with every field the CSI proto marks
``csi_secret`` replaced by ``***`` (the option is read from the descriptors,
so a new secret field in the proto is redacted without code changes).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from csi_driver.gen import csi_pb2
from fusefs.jsonlog import JsonFormatter, TextFormatter, configure  # one log format for both processes

__all__ = ["JsonFormatter", "TextFormatter", "configure", "redacted"]

REDACTED = "***"


def redacted(message: Message) -> dict[str, Any]:
    """The message as a dict, with csi_secret fields (at any depth) masked."""
    return _redact(message, json_format.MessageToDict(message, preserving_proto_field_name=True))


def _redact(message: Message, data: dict[str, Any]) -> dict[str, Any]:
    for field, value in message.ListFields():
        if field.name not in data:
            continue
        if field.GetOptions().Extensions[csi_pb2.csi_secret]:
            data[field.name] = REDACTED if not isinstance(data[field.name], dict) else {
                k: REDACTED for k in data[field.name]
            }
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if _repeated(field):
                data[field.name] = [_redact(m, d) for m, d in zip(value, data[field.name])]
            else:
                data[field.name] = _redact(value, data[field.name])
    return data


def _repeated(field) -> bool:  # type: ignore[no-untyped-def]
    """protobuf 7 dropped ``label`` in favour of ``is_repeated``."""
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED
