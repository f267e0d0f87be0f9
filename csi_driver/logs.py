"""Structured logs: one JSON object per line, or plain text for humans.

Each RPC is logged once, by the server interceptor, with its method, the IDs
it concerns, its duration, its gRPC code and a request ID. Request bodies are
logged only at debug level, and then with every field the CSI proto marks
``csi_secret`` replaced by ``***`` (the option is read from the descriptors,
so a new secret field in the proto is redacted without code changes).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from csi_driver.gen import csi_pb2

REDACTED = "***"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{time.strftime('%H:%M:%S')} {record.levelname[0]} {record.name}: {record.getMessage()}"
        line = f"{line} {extra}" if extra else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(fmt: str = "json", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level else "INFO")


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
