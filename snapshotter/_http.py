"""The snapshotter's HTTP endpoint: `/metrics` (Prometheus) and `/status` (one JSON
object: snapshots by kind, layers served remotely and pulled normally, conversions, the
image mirror). Threads of its own; nothing here touches containerd's calls."""

from __future__ import annotations

import json
import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds
        return None


class HttpEndpoint:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 status: Callable[[], dict[str, Any]]) -> None:
        metrics = make_wsgi_app(registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if path == "/status":
                body = json.dumps(status()).encode()
                start_response("200 OK", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(body)))])
                return [body]
            if path in ("/metrics", "/"):
                return metrics(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: /metrics or /status\n"]

        self._server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
        self.server_port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> "HttpEndpoint":
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
