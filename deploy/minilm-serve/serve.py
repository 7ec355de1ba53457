"""The reference replica: an all-MiniLM-L6-v2 embedding server over HTTP/1.1.

    python3 serve.py --port 8000 --model /models/all-MiniLM-L6-v2 [--host 127.0.0.1]
                     [--loader gpuload|safetensors] [--device cpu] [--drain-timeout 4]

GET /healthz   503 {"ok": false, "state": "loading"} until the weights are loaded and one
               warm-up forward pass ran; then 200 {"ok": true, "model": NAME, "loader": ...,
               "stages": {"weights": S, "server_init": S}}
POST /embed    {"texts": [str, ...]} -> {"embeddings": [[float x 384], ...], "dim": 384}
               at most 64 texts of at most 10,000 characters, body at most 1 MiB; anything
               else is a 400 {"error": ...}; 503 while loading.

The socket listens before the model loads, so a prober sees 503 rather than a refused
connection while the weights come in. Stages (seconds, also logged to stderr one line
each): `weights` is the weights file's load (gpuload.load_file, or safetensors' load_file as
the baseline) plus building the module over those tensors; `server_init` is everything
else from the process's start (as the kernel recorded it, so interpreter start-up and
`import torch` count) to ready. SIGTERM or SIGINT: stop accepting, let requests in flight
finish (up to --drain-timeout, 4 s by default), exit 0.

Needs only the standard library, torch, and gpuload or safetensors; minilm.py sits beside
this file.
"""

from __future__ import annotations

import signal
import threading

# Set by SIGTERM/SIGINT. Installed before torch is imported: a signal may come while it is
# (and as PID 1 of a container, a signal with no handler would be ignored, not fatal).
STOP = threading.Event()
if __name__ == "__main__":
    for _sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_sig, lambda *_: STOP.set())

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from http import HTTPStatus  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import minilm  # noqa: E402

MAX_BODY = 1 << 20
MAX_TEXTS = 64
MAX_CHARS = 10_000
MAX_CONNECTIONS = 256  # open connections (one thread each); more are answered 503 and closed
DRAIN_TIMEOUT = 4.0  # default seconds for requests in flight after SIGTERM (the contract: exit within 5)
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may sit idle


def log(event: str, **fields: Any) -> None:
    """One line to stderr: `minilm-serve EVENT key=value ...`."""
    parts = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"minilm-serve {event} {parts}".rstrip(), file=sys.stderr, flush=True)


def process_age() -> float:
    """Seconds since the kernel started this process (/proc/self/stat starttime against
    /proc/uptime; both count from boot)."""
    stat = Path("/proc/self/stat").read_text()
    start_ticks = int(stat.rpartition(")")[2].split()[19])  # field 22; the name may hold spaces
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def _touch(sd: dict[str, torch.Tensor]) -> None:
    """Read one byte of every page of every tensor. safetensors' load_file on CPU hands back
    tensors over a memory map, read only when first used; without this its file reads
    would land in the warm-up (server_init) and the weights stage of the two loaders would
    not compare. gpuload's tensors are already in memory: this costs it a few ms."""
    for t in sd.values():
        if t.numel():
            t.reshape(-1).view(torch.uint8)[::4096].sum()


class BadRequest(Exception):
    """The client's mistake: answered 400 with this message."""


def parse_texts(body: bytes) -> list[str]:
    """The texts of an /embed body, checked against the bounds (BadRequest otherwise)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("texts"), list):
        raise BadRequest('body must be {"texts": [string, ...]}')
    texts = doc["texts"]
    if len(texts) > MAX_TEXTS:
        raise BadRequest(f"{len(texts)} texts: at most {MAX_TEXTS} per request")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BadRequest(f"texts[{i}] is {type(t).__name__}, not a string")
        if len(t) > MAX_CHARS:
            raise BadRequest(f"texts[{i}] has {len(t)} characters: at most {MAX_CHARS}")
    return texts


class Replica:
    """The model once loaded, and what the handlers need to know about it."""

    def __init__(self, model_dir: Path, loader: str, device: str) -> None:
        self.model_dir, self.loader, self.device = model_dir, loader, device
        self.model: minilm.MiniLM | None = None
        self.tokenizer: minilm.Tokenizer | None = None
        self.stages: dict[str, float] = {}
        self.ready = threading.Event()
        self.draining = threading.Event()  # SIGTERM came: answers close their connections
        self._forward = threading.Lock()  # one forward pass at a time: they share the cores
        self._busy = 0
        self._idle = threading.Condition()

    def load(self) -> None:
        path = self.model_dir / "model.safetensors"
        if self.loader == "gpuload":  # imported before the clock starts: that is server init
            from gpuload import load_file
        else:
            from safetensors.torch import load_file
        t0 = time.monotonic()
        sd = load_file(path if self.loader == "gpuload" else str(path), device=self.device)
        if self.device == "cpu":
            _touch(sd)
        model = minilm.MiniLM.from_state_dict(sd, minilm.BertConfig.from_dir(self.model_dir))
        weights = time.monotonic() - t0
        log("stage", name="weights", seconds=f"{weights:.3f}", loader=self.loader,
            bytes=path.stat().st_size)
        self.tokenizer = minilm.Tokenizer.from_dir(self.model_dir)
        self.model = model
        minilm.embed(model, self.tokenizer, ["warm-up"])
        server_init = max(0.0, process_age() - weights)
        log("stage", name="server_init", seconds=f"{server_init:.3f}")
        self.stages = {"weights": round(weights, 3), "server_init": round(server_init, 3)}
        self.ready.set()

    def health(self) -> dict[str, Any]:
        if not self.ready.is_set():
            return {"ok": False, "state": "loading"}
        return {"ok": True, "model": self.model_dir.resolve().name, "loader": self.loader,
                "stages": self.stages}

    def embed(self, texts: list[str]) -> list[list[float]]:
        assert self.model is not None and self.tokenizer is not None
        with self._forward:
            return minilm.embed(self.model, self.tokenizer, texts).tolist()

    # requests in flight, for the drain on SIGTERM
    def enter(self) -> None:
        with self._idle:
            self._busy += 1

    def leave(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "minilm-serve"
    timeout = IDLE_TIMEOUT
    replica: Replica  # set on the subclass `serve` makes

    def do_GET(self) -> None:
        if self.path != "/healthz":
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {self.path}"})
        doc = self.replica.health()
        self._json(HTTPStatus.OK if doc["ok"] else HTTPStatus.SERVICE_UNAVAILABLE, doc)

    def do_POST(self) -> None:
        if self.path != "/embed":
            self.close_connection = True  # the body is not read
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {self.path}"})
        self.replica.enter()
        try:
            self._embed()
        finally:
            self.replica.leave()

    def _embed(self) -> None:
        try:
            body = self._body()
            if not self.replica.ready.is_set():
                return self._json(HTTPStatus.SERVICE_UNAVAILABLE,
                                  {"error": "model is loading", "state": "loading"})
            texts = parse_texts(body)
        except BadRequest as exc:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        try:
            vectors = self.replica.embed(texts)
        except Exception as exc:  # noqa: BLE001 - ours, not the client's: 500, and keep serving
            log("error", what="embed", error=repr(exc))
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "embedding failed"})
        dim = self.replica.model.config.hidden_size if self.replica.model else 0
        self._json(HTTPStatus.OK, {"embeddings": vectors, "dim": dim})

    def _body(self) -> bytes:
        """The request body (Content-Length only); BadRequest, and the connection closed
        after the answer, when it is missing, chunked or too large."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest("chunked bodies are not accepted: send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise BadRequest("Content-Length is missing or not a number") from None
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            raise BadRequest(f"body of {length} bytes: at most {MAX_BODY}")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise BadRequest("body ended before Content-Length")
        return body

    def _json(self, status: HTTPStatus, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.replica.draining.is_set():
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unsupported method) as JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable line: still answer with a status line
            self.request_version = self.protocol_version
        try:
            self._json(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase})
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no line per request: stages and errors only


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on open connections and one-line error logs."""

    daemon_threads = True  # idle keep-alive connections do not hold the exit up
    _BUSY_BODY = b'{"error":"too many connections"}'
    _BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(self._BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        log("error", what="connection", peer=client_address[0], error=repr(exc))


def serve(host: str, port: int, replica: Replica, stop: threading.Event, *,
          drain_timeout: float = DRAIN_TIMEOUT) -> int:
    handler = type("ReplicaHandler", (Handler,), {"replica": replica})
    server = _Server((host, port), handler)
    log("listening", host=host, port=server.server_address[1], model=replica.model_dir,
        loader=replica.loader)
    failed: list[BaseException] = []

    def load() -> None:
        try:
            replica.load()
        except BaseException as exc:  # noqa: BLE001 - reported, then the process exits 1
            failed.append(exc)
            stop.set()

    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="http",
                     daemon=True).start()
    if not stop.is_set():
        threading.Thread(target=load, name="load", daemon=True).start()
    while not stop.wait(1.0):  # a timeout keeps the main thread responsive to signals
        pass
    replica.draining.set()
    server.shutdown()  # no new connections are accepted from here on
    drained = replica.wait_idle(drain_timeout)
    server.server_close()
    if failed:
        log("error", what="load", error=repr(failed[0]))
        return 1
    log("stopped", drained=drained)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", type=Path, required=True, help="the model directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--loader", choices=("gpuload", "safetensors"), default="gpuload")
    ap.add_argument("--device", default="cpu", help="torch device for the weights (default cpu)")
    ap.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT,
                    help=f"seconds requests in flight get after SIGTERM (default {DRAIN_TIMEOUT})")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    return serve(args.host, args.port, Replica(args.model, args.loader, args.device), STOP,
                 drain_timeout=args.drain_timeout)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # No interpreter finalisation: a forward pass (a request not drained in time) or the load
    # may still be running in a daemon thread, and tearing the interpreter down under a
    # running torch op aborts the process (SIGABRT) instead of exiting with CODE.
    os._exit(code)
