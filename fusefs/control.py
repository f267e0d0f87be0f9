"""The control protocol between the fusefs daemon and one volume's session.

Transport: a unix stream socket, mode 0600, owned by root, one per session.
Framing: JSON lines. Each request is one line, each answer is one line, and
a connection may carry any number of request/answer pairs in order::

    -> {"id": 1, "cmd": "resize", "args": {"capacity": 1073741824}}
    <- {"id": 1, "ok": true, "result": {"capacity": 1073741824}}
    <- {"id": 2, "ok": false, "kind": "invalid", "error": "capacity must be >= 0"}

``kind`` is ``invalid`` (bad arguments: the client raises ValueError),
``unknown`` (no such command), ``busy`` (e.g. a freeze could not drain) or
``internal``. Commands and their arguments:

=============== =========================================== =======================
command         args                                        result
=============== =========================================== =======================
ping            -                                           {ready, volume_id, pid}
stats           -                                           see Session.stats
metrics         -                                           {text} (Prometheus)
resize          {capacity}                                  {capacity}
freeze          {timeout_seconds}                           {frozen, synced_files, auto_thaw_in_seconds}
thaw            -                                           {was_frozen}
set_limits      {bytes_per_second, ops_per_second}          {limits}
set_read_only   {read_only}                                 {read_only}
=============== =========================================== =======================

The session only starts listening once its FUSE mount is live, so a ping
that succeeds means "mounted and serving".
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fusefs.control")

#: Requests are tiny; anything longer is a broken or hostile client.
MAX_LINE = 64 * 1024
DEFAULT_TIMEOUT = 10.0


class ControlError(RuntimeError):
    """The session answered with an error (other than invalid arguments)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class InvalidRequest(ValueError):
    """Raised by a command handler for bad arguments (kind ``invalid``)."""


class Busy(RuntimeError):
    """Raised by a command handler when it cannot do it now (kind ``busy``)."""


Handler = Callable[[dict[str, Any]], Any]


class ControlServer:
    """Serves commands on a unix socket, one thread per connection.

    The socket is bound at construction (so that its 0600 mode is set while
    the process umask is still ours to choose) but only listens after
    :meth:`start`, which the session calls once the mount is live. Until then
    a connect() is refused, which is how clients tell "not ready".
    """

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._closed = False

    def start(self) -> None:
        self._sock.listen(16)
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            while True:
                line = stream.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE:
                    stream.write(_encode({"ok": False, "kind": "invalid", "error": "request too long"}))
                    stream.flush()
                    return
                stream.write(_encode(self.dispatch(line)))
                stream.flush()

    def dispatch(self, line: bytes) -> dict[str, Any]:
        """Decode one request line, run it, and build the answer."""
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as exc:
            return {"ok": False, "kind": "invalid", "error": f"bad request: {exc}"}
        rid = request.get("id")
        cmd = request.get("cmd")
        args = request.get("args") or {}
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return {"id": rid, "ok": False, "kind": "unknown", "error": f"unknown command {cmd!r}"}
        if not isinstance(args, dict):
            return {"id": rid, "ok": False, "kind": "invalid", "error": "args must be an object"}
        try:
            return {"id": rid, "ok": True, "result": handler(args)}
        except (InvalidRequest, ValueError, TypeError) as exc:
            return {"id": rid, "ok": False, "kind": "invalid", "error": str(exc)}
        except Busy as exc:
            return {"id": rid, "ok": False, "kind": "busy", "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - reported to the caller, logged here
            log.exception("control command %s failed", cmd)
            return {"id": rid, "ok": False, "kind": "internal", "error": f"{type(exc).__name__}: {exc}"}


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class SessionClient:
    """Talks to one session's control socket. Thread-safe; one connection per call.

    Every call has a timeout (``timeout`` seconds, default 10; ``freeze``
    allows for its drain and fsync on top). Connection failures raise
    ``OSError`` (``ConnectionRefusedError`` or ``FileNotFoundError`` before the
    session is ready), bad arguments raise ``ValueError``, any other error
    the session reports raises :class:`ControlError`.
    """

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._ids = iter(range(1, 2**62))
        self._lock = threading.Lock()

    def call(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        """Send one command and return its ``result``."""
        with self._lock:
            rid = next(self._ids)
        request = _encode({"id": rid, "cmd": cmd, "args": args})
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(self.timeout if timeout is None else timeout)
            sock.connect(self.socket_path)
            sock.sendall(request)
            answer = _read_line(sock)
        reply = json.loads(answer)
        if reply.get("ok"):
            return reply.get("result")
        kind, message = reply.get("kind", "internal"), reply.get("error", "unknown error")
        if kind == "invalid":
            raise ValueError(message)
        raise ControlError(kind, message)

    # One method per command -------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return self.call("ping")  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self.call("stats")  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return str(self.call("metrics")["text"])

    def resize(self, capacity: int) -> dict[str, Any]:
        return self.call("resize", capacity=int(capacity))  # type: ignore[no-any-return]

    def freeze(self, timeout_seconds: float) -> dict[str, Any]:
        # The session drains in-flight writes (up to 30 s) and fsyncs files.
        return self.call("freeze", timeout=self.timeout + 60, timeout_seconds=timeout_seconds)  # type: ignore[no-any-return]

    def thaw(self) -> dict[str, Any]:
        return self.call("thaw")  # type: ignore[no-any-return]

    def set_limits(self, bytes_per_second: int, ops_per_second: int) -> dict[str, Any]:
        return self.call("set_limits", bytes_per_second=int(bytes_per_second),  # type: ignore[no-any-return]
                         ops_per_second=int(ops_per_second))

    def set_read_only(self, read_only: bool) -> dict[str, Any]:
        return self.call("set_read_only", read_only=bool(read_only))  # type: ignore[no-any-return]


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the session closed the connection without answering")
        chunks.append(chunk)
        total += len(chunk)
        if chunk.endswith(b"\n") or b"\n" in chunk:
            break
        if total > 64 * MAX_LINE:
            raise ConnectionError("answer too long")
    return b"".join(chunks).split(b"\n", 1)[0]
