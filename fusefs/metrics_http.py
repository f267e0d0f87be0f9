"""``/metrics`` and ``/healthz`` over plain HTTP (stdlib http.server).

``/metrics`` is the daemon's own series, gauges computed at scrape time,
and every session's filesystem metrics merged under one header per family.
``/healthz`` answers 200 while the daemon runs: it is a liveness probe, and a
volume problem must not get the daemon restarted (that would restart every
volume's session); volume health is in the metrics and in Stats.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("fusefs.metrics")


def parse_address(address: str) -> tuple[str, int]:
    """``:9809``, ``127.0.0.1:9809`` or ``[::1]:9809`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def start_metrics_server(address: str, render: Callable[[], str],
                         healthy: Callable[[], bool] | None = None) -> ThreadingHTTPServer:
    """Serve ``render()`` at /metrics and liveness at /healthz from a daemon thread.

    ``healthy`` (the CSI driver passes its Probe) turns /healthz into 503 when
    it answers False; without it /healthz is 200 while the process runs.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    self._reply(200, render(), "text/plain; version=0.0.4; charset=utf-8")
                except Exception as exc:  # noqa: BLE001 - a scrape error is a 500, not a crash
                    log.exception("rendering metrics failed")
                    self._reply(500, f"error: {exc}\n", "text/plain")
            elif path == "/healthz":
                ok = healthy is None or healthy()
                self._reply(200 if ok else 503, "ok\n" if ok else "not ready\n", "text/plain")
            else:
                self._reply(404, "not found\n", "text/plain")

        def _reply(self, code: int, body: str, content_type: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence access logs
            return

    host, port = parse_address(address)

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fusefs-metrics", daemon=True).start()
    log.info("metrics listening", extra={"fields": {"address": address}})
    return server
