"""The gpuload command line, run as a user runs it (a subprocess): output, --json keys,
one-line errors and exit codes, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from gpuload_helpers import raw_file


@pytest.fixture
def gpuload(capsys):
    """Run the CLI in this process (a subprocess pays torch's import each time); one test
    below runs the real console script to prove the same from the outside."""
    from gpuload.cli import main

    def run(*args: object) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def test_real_process_error_has_no_traceback(tmp_path):
    p = raw_file(tmp_path / "bad.safetensors", "{}", length=2**40)
    r = subprocess.run([sys.executable, "-m", "gpuload.cli", "load", str(p), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("gpuload: error: ") and r.stderr.count("\n") == 1


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64), "b": torch.zeros(64, dtype=torch.bfloat16)}, p)
    return p


def test_inspect(gpuload, model):
    r = gpuload("inspect", model)
    assert r.returncode == 0, r.stderr
    assert "w  F32" in r.stdout and "total: 2 tensors" in r.stdout
    j = json.loads(gpuload("inspect", model, "--json").stdout)
    assert j["tensors"] == 2 and j["bytes"] == 64 * 64 * 4 + 128
    assert j["dtypes"] == {"F32": 16384, "BF16": 128}
    assert {t["name"] for t in j["shards"][0]["tensors"]} == {"w", "b"}


def test_load_json_keys(gpuload, model):
    r = gpuload("load", model, "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert {"seconds", "bytes", "gbps", "peak_rss_bytes", "tensors"} <= set(j)
    assert j["tensors"] == 2 and j["bytes"] == 16384 + 128 and j["peak_rss_bytes"] > 0
    r = gpuload("load", model, "--copy", "--dtype", "bf16")
    assert r.returncode == 0 and "2 tensors" in r.stdout


@pytest.mark.parametrize("header,length,needle", [
    ('{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
     '"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', None, "overlap"),
    ('{"a":{"dtype":"U8","shape":[4]', None, "not valid JSON"),
    ("{}", 2**62, "exceeds"),
    ('{"a":{"dtype":"F32","shape":[9],"data_offsets":[0,36]}}', None, "run past"),
])
def test_malformed_is_one_line_exit_1(gpuload, tmp_path, header, length, needle):
    p = raw_file(tmp_path / "bad.safetensors", header, b"\0" * 6, length=length)
    for cmd in (["inspect", p], ["load", p], ["load", p, "--json"]):
        r = gpuload(*cmd)
        assert r.returncode == 1
        assert r.stderr.startswith("gpuload: error: ") and needle in r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert r.stdout == ""


def test_usage_and_missing(gpuload, tmp_path, model):
    r = gpuload("load", tmp_path / "nope.safetensors")
    assert r.returncode == 1 and "gpuload: error:" in r.stderr and "Traceback" not in r.stderr
    r = gpuload("frobnicate")
    assert r.returncode == 2 and r.stderr.startswith("gpuload: error: No such command")
    r = gpuload("load", model, "--threads", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = gpuload("load", model, "--device", "quantum")
    assert r.returncode == 1 and "gpuload: error:" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists")
def test_cuda_without_gpu(gpuload, model):
    r = gpuload("load", model, "--device", "cuda:0")
    assert r.returncode == 1 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr


def test_warm_local_path_is_a_noop(gpuload, model, tmp_path):
    r = gpuload("warm", model, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["p2pfs"] is False
    r = gpuload("warm", tmp_path / "missing")
    assert r.returncode == 1 and "no such file" in r.stderr


def test_bench_smoke(gpuload, model):
    r = gpuload("bench", model, "--rounds", "1", "--method", "gpuload", "--method",
                "safetensors", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert set(j["results"]) == {"gpuload", "safetensors"}
    r = gpuload("bench", model, "--method", "nope")
    assert r.returncode == 2


def test_inspect_prints_a_lone_surrogate_name_escaped(tmp_path):
    """Regression: a tensor name with a lone surrogate (valid JSON: "\\ud800") made the
    text output raise UnicodeEncodeError with a traceback. A real process: its stdout
    encoding is what matters."""
    p = raw_file(tmp_path / "s.safetensors",
                 '{"a\\ud800b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0")
    cmd = [sys.executable, "-m", "gpuload.cli", "inspect", str(p)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "a\\ud800b  U8" in r.stdout
    r = subprocess.run([*cmd, "--json"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r.stdout.decode("ascii")  # escaped, so any JSON reader takes it
    assert json.loads(r.stdout)["shards"][0]["tensors"][0]["name"] == "a\ud800b"


@pytest.mark.parametrize("layout", ["file", "index"])
def test_inspect_refuses_a_fifo_instead_of_hanging(tmp_path, model, layout):
    """Regression: opening a FIFO blocked until a writer came, i.e. forever."""
    import os

    if layout == "file":
        target = tmp_path / "fifo.safetensors"
        os.mkfifo(target)
    else:
        target = tmp_path / "ckpt"
        target.mkdir()
        os.mkfifo(target / "model.safetensors.index.json")
    for cmd in (["inspect", str(target)], ["load", str(target), "--json"]):
        r = subprocess.run([sys.executable, "-m", "gpuload.cli", *cmd], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith("gpuload: error: ") and "not a regular file" in r.stderr
        assert r.stderr.count("\n") == 1
