"""Keeping /dev/fuse descriptors alive outside the process that serves them.

A FUSE mount lives as long as some process holds a descriptor of its
connection. A *holder* is a minimal process that only keeps descriptors,
received over a unix socket with ``SCM_RIGHTS``, and hands duplicates back:
when a session dies, the holder's copies keep the mount (and the requests
the session had read but not answered) alive, and the next session takes
them and goes on serving the same connection.

Protocol: one request per connection, one line of ASCII, then one line back.

- ``PUT <key>\\n`` with the descriptors attached: keep them (replacing, and
  closing, what was kept under ``key``). Answer ``OK <count>``.
- ``GET <key>\\n``: answer ``OK <count>`` with duplicates attached, or
  ``ERR not found``.
- ``DROP <key>\\n``: close and forget them. Answer ``OK 0``.

Run one with ``python -m fusefs.kernel.handover --socket PATH``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import threading

log = logging.getLogger("fusefs.kernel.handover")

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_FDS = 64
TIMEOUT = 10.0


def _request(path: str, line: str, fds: list[int] | None = None) -> tuple[str, list[int]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        data = (line + "\n").encode()
        if fds:
            socket.send_fds(s, [data], fds)
        else:
            s.sendall(data)
        msg, got, _, _ = socket.recv_fds(s, 4096, MAX_FDS)
    text = msg.decode(errors="replace").strip()
    for fd in got:
        os.set_inheritable(fd, False)
    if not text.startswith("OK"):
        for fd in got:
            os.close(fd)
        raise OSError(f"holder at {path}: {text or 'no answer'}")
    return text, list(got)


def put(path: str, key: str, fds: list[int]) -> None:
    """Give the holder duplicates of ``fds`` to keep under ``key``."""
    _request(path, f"PUT {key}", fds)


def take(path: str, key: str) -> list[int]:
    """Duplicates of what the holder keeps under ``key`` (in the order given)."""
    return _request(path, f"GET {key}")[1]


def drop(path: str, key: str) -> None:
    _request(path, f"DROP {key}")


def answers(path: str) -> bool:
    """True when something accepts connections on ``path`` (a live holder)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


class Holder:
    """The holder's server: a dict of key -> descriptors, one thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.kept: dict[str, list[int]] = {}
        if answers(path):
            # Stealing the path would leave the other holder's descriptors,
            # and so its mounts, alive with no way to reach or drop them.
            raise OSError(f"another holder serves {path}")
        if os.path.lexists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(16)

    def serve_forever(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    self._one(conn)
                except OSError as exc:
                    log.warning("holder request failed: %s", exc)

    def _one(self, conn: socket.socket) -> None:
        msg, fds, _, _ = socket.recv_fds(conn, 4096, MAX_FDS)
        for fd in fds:
            os.set_inheritable(fd, False)  # kept for others, never for our children
        parts = msg.decode(errors="replace").split()
        if len(parts) != 2 or not KEY_RE.match(parts[1]) or parts[0] not in ("PUT", "GET", "DROP"):
            for fd in fds:
                os.close(fd)
            conn.sendall(b"ERR bad request\n")
            return
        verb, key = parts
        if verb == "PUT":
            for fd in self.kept.pop(key, []):
                os.close(fd)
            self.kept[key] = list(fds)
            conn.sendall(f"OK {len(fds)}\n".encode())
            return
        for fd in fds:
            os.close(fd)
        if verb == "GET":
            kept = self.kept.get(key)
            if kept is None:
                conn.sendall(b"ERR not found\n")
                return
            socket.send_fds(conn, [f"OK {len(kept)}\n".encode()], kept)
            return
        for fd in self.kept.pop(key, []):
            os.close(fd)
        conn.sendall(b"OK 0\n")

    def close(self) -> None:
        self.sock.close()
        for fds in self.kept.values():
            for fd in fds:
                os.close(fd)
        self.kept.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusefs.kernel.handover")
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        holder = Holder(args.socket)
    except OSError as exc:
        log.error("cannot serve %s: %s", args.socket, exc)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: holder.sock.shutdown(socket.SHUT_RDWR))
    thread = threading.Thread(target=holder.serve_forever, daemon=True)
    thread.start()
    print("ready", flush=True)
    thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
