"""Shared helpers for the scaler tests, and a tiny replica server.

Run as a script, it is the replica the e2e tests start as real processes:
    python tests/scaler_helpers.py --port N [--delay 0.08] [--die-flag PATH] [--weights-s S]
With `--weights-s` it sleeps S seconds before listening (a pretend weight load) and
reports S in its /healthz answer. It answers GET /healthz at once and any other request after `--delay` seconds; with
`--die-flag`, the first replica to claim that file (rename is atomic) exits before
answering, which is how the retry test kills a replica mid-request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve()


class StaticActuator:
    """A test double at the actuator interface: one fixed endpoint, always there. (trio and
    scaler are imported where used: this file also runs as the replica process.)"""

    def __init__(self, ep) -> None:
        self.ep = ep

    async def run(self, hooks, *, task_status=None):
        import trio

        hooks.ready(self.ep)
        (task_status or trio.TASK_STATUS_IGNORED).started()
        await trio.sleep_forever()

    def set_target(self, serving, standby):
        pass

    def fleet(self):
        from scaler import Fleet

        return Fleet(ready=1)

    def endpoint_failed(self, ep_id):
        pass

    def endpoint_answered(self, ep_id):
        pass

    def replicas(self):
        return []

    def start_records(self):
        return []

    def start_sums(self):
        return {}


def replica_cmd(delay: float = 0.08, die_flag: Path | None = None, weights_s: float = 0.0) -> str:
    cmd = f"{sys.executable} {HERE} --port {{port}} --delay {delay} --weights-s {weights_s}"
    if die_flag is not None:
        cmd += f" --die-flag {die_flag}"
    return cmd


def _serve(port: int, delay: float, die_flag: str | None, weights_s: float = 0.0) -> None:
    # A pretend weight load before listening, reported in the ready answer as the
    # replica contract says (docs/SCALER.md, "Replica contract").
    time.sleep(weights_s)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            if self.path != "/healthz":
                if die_flag and os.path.exists(die_flag):
                    try:
                        os.rename(die_flag, f"{die_flag}.{os.getpid()}")
                        os._exit(3)
                    except FileNotFoundError:
                        pass
                time.sleep(delay)
            out = b"ok pid=%d len=%d\n" % (os.getpid(), len(body))
            if self.path == "/healthz" and weights_s:
                out = json.dumps({"ok": True, "stages": {"weights": weights_s}}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay", type=float, default=0.08)
    ap.add_argument("--die-flag")
    ap.add_argument("--weights-s", type=float, default=0.0)
    a = ap.parse_args()
    _serve(a.port, a.delay, a.die_flag, a.weights_s)
