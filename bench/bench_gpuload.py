"""gpuload vs safetensors, fastsafetensors and Run:ai on a generated file: CPU, cold and warm.

    sudo .venv/bin/python bench/bench_gpuload.py [--shape llama] [--rounds 3] [--settle 3]
        [--methods gpuload,safetensors] [--append bench/RESULTS.md]

Shapes (`--shape`, random bytes, written once to /var/tmp/gpuload-bench/<shape>.safetensors):
llama (default): ~2 GiB bf16, TinyLlama-1.1B geometry, 201 tensors; minilm: 133 MB fp32,
BERT-small geometry (MiniLM-L12-H384), 199 tensors, half of them LayerNorm/bias vectors of
1.5-6 KiB; bert-base: 219 MB fp16, BERT-base geometry, 199 tensors; small-llama: 300 MB
bf16, a 16-layer Llama with hidden 768, 147 tensors.

Every method is timed until every byte of every tensor has been touched (gpuload._bench.touch:
one byte per 4 KiB page, summed), in the same order each round. Cold: `sync; echo 3 >
/proc/sys/vm/drop_caches` (root) and `--settle` seconds before every single measurement.
Results: medians, ratios to gpuload, and the raw runs, printed as a Markdown section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpuload import _bench  # noqa: E402

ORDER = ["gpuload", "safetensors", "fastsafetensors", "runai-model-streamer", "gpuload(copy)"]


def llama_specs(hidden=2048, inter=5632, layers=22, vocab=32000, kv=256):
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (hidden,)),
                  (p + "self_attn.q_proj.weight", (hidden, hidden)),
                  (p + "self_attn.k_proj.weight", (kv, hidden)),
                  (p + "self_attn.v_proj.weight", (kv, hidden)),
                  (p + "self_attn.o_proj.weight", (hidden, hidden)),
                  (p + "post_attention_layernorm.weight", (hidden,)),
                  (p + "mlp.gate_proj.weight", (inter, hidden)),
                  (p + "mlp.up_proj.weight", (inter, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, inter))]
    return specs + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def bert_specs(hidden, inter, layers, vocab=30522, positions=512):
    specs = [("embeddings.word_embeddings.weight", (vocab, hidden)),
             ("embeddings.position_embeddings.weight", (positions, hidden)),
             ("embeddings.token_type_embeddings.weight", (2, hidden)),
             ("embeddings.LayerNorm.weight", (hidden,)), ("embeddings.LayerNorm.bias", (hidden,))]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            specs += [(p + f"attention.self.{n}.weight", (hidden, hidden)),
                      (p + f"attention.self.{n}.bias", (hidden,))]
        specs += [(p + "attention.output.dense.weight", (hidden, hidden)),
                  (p + "attention.output.dense.bias", (hidden,)),
                  (p + "attention.output.LayerNorm.weight", (hidden,)),
                  (p + "attention.output.LayerNorm.bias", (hidden,)),
                  (p + "intermediate.dense.weight", (inter, hidden)),
                  (p + "intermediate.dense.bias", (inter,)),
                  (p + "output.dense.weight", (hidden, inter)),
                  (p + "output.dense.bias", (hidden,)),
                  (p + "output.LayerNorm.weight", (hidden,)),
                  (p + "output.LayerNorm.bias", (hidden,))]
    return specs + [("pooler.dense.weight", (hidden, hidden)), ("pooler.dense.bias", (hidden,))]


# name: (tensor specs, safetensors dtype, bytes per element, what it stands for)
SHAPES = {
    "llama": (llama_specs, "BF16", 2, "TinyLlama-1.1B-shaped"),
    "minilm": (lambda: bert_specs(384, 1536, 12), "F32", 4, "MiniLM-L12-H384-shaped (BERT-small)"),
    "bert-base": (lambda: bert_specs(768, 3072, 12), "F16", 2, "BERT-base-shaped"),
    "small-llama": (lambda: llama_specs(hidden=768, inter=2048, layers=16), "BF16", 2,
                    "16-layer Llama, hidden 768"),
}


def make_file(path: Path, shape: str = "llama") -> None:
    """Random bytes, written in 64 MiB pieces (never the whole model in memory)."""
    specs, dtype, itemsize, _ = SHAPES[shape]
    hdr, off = {}, 0
    for name, dims in specs():
        n = int(np.prod(dims)) * itemsize
        hdr[name] = {"dtype": dtype, "shape": list(dims), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * ((-(8 + len(h))) % 8)
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        left = off
        while left:
            n = min(left, 64 << 20)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
    tmp.rename(path)


def cli_load(path: Path, *extra: str) -> dict:
    """`gpuload load --json` in a fresh process, page cache cold: its peak RSS is ours alone."""
    _bench.drop_caches()
    time.sleep(2)
    r = subprocess.run([sys.executable, "-m", "gpuload.cli", "load", str(path), "--json", *extra],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.platform()}, no GPU"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "safetensors", "fastsafetensors", "runai-model-streamer"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def table(res: dict, nbytes: int) -> list[str]:
    base = res["gpuload"]["median_s"]
    rows = ["| method | median s | GB/s | x gpuload | runs (s) |", "|---|---:|---:|---:|---|"]
    for m, r in res.items():
        rows.append(f"| {m} | {r['median_s']:.3f} | {nbytes / r['median_s'] / 1e9:.2f} | "
                    f"{r['median_s'] / base:.2f} | {', '.join(f'{x:.3f}' for x in r['runs_s'])} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama")
    ap.add_argument("--file", type=Path,
                    help="default: /var/tmp/gpuload-bench/llama-2g.safetensors for llama, "
                         "else /var/tmp/gpuload-bench/<shape>.safetensors")
    ap.add_argument("--methods", help="comma-separated subset of: " + ", ".join(ORDER))
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the host-memory runs (`gpuload load --json`)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--append", type=Path, help="Append the Markdown section to this file.")
    ap.add_argument("--json", type=Path, help="Write raw results here.")
    args = ap.parse_args()
    if args.file is None:
        name = "llama-2g" if args.shape == "llama" else args.shape
        args.file = Path(f"/var/tmp/gpuload-bench/{name}.safetensors")
    if os.geteuid() != 0:
        print("bench_gpuload: needs root to drop the page cache", file=sys.stderr)
        return 2
    args.file.parent.mkdir(parents=True, exist_ok=True)
    if not args.file.exists():
        print(f"writing {args.file} ...", file=sys.stderr)
        make_file(args.file, args.shape)
    nbytes = args.file.stat().st_size
    ok, missing = _bench.available()
    wanted = ORDER if args.methods is None else args.methods.split(",")
    unknown = set(wanted) - set(ORDER)
    if unknown:
        ap.error(f"unknown methods: {', '.join(sorted(unknown))}")
    methods = [m for m in ORDER if m in ok and m in wanted]
    missing = {m: why for m, why in missing.items() if m in wanted}
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    cold = _bench.run(str(args.file), "cpu", methods, rounds=args.rounds, cold=True,
                      settle=args.settle, log=log)
    warm = _bench.run(str(args.file), "cpu", methods, rounds=args.rounds, cold=False, log=log)
    mem = ({} if args.no_memory else
           {"default": cli_load(args.file), "copy": cli_load(args.file, "--copy")})
    elapsed = time.time() - t0
    cmd = "sudo .venv/bin/python bench/bench_gpuload.py " + " ".join(sys.argv[1:])
    specs, dtype, _, what = SHAPES[args.shape]
    lines = [
        "## gpuload" + ("" if args.shape == "llama" else f" ({args.shape})"), "",
        f"Date: {datetime.date.today()}. Machine: {machine()}. {versions()}.", "",
        f"Command: `{cmd.strip()}` ({args.rounds} rounds, {elapsed:.0f} s in all). File: "
        f"{nbytes / 2**30:.2f} GiB {dtype.lower()}, {what} ({len(specs())} tensors), on the local "
        f"ext4 virtio disk. Target: CPU. Time = until every byte of every tensor was touched "
        f"(one byte per 4 KiB page summed, same for every method); methods run in the same "
        f"order each round. Cold = `sync; echo 3 > /proc/sys/vm/drop_caches`, then "
        f"{args.settle:g} s settle, before every measurement.", "",
        "### Page cache cold", "", *table(cold, nbytes), "",
        "### Page cache warm", "", *table(warm, nbytes), "",
    ]
    if mem:
        lines += [
            "### Host memory (`gpuload load --json`, fresh process, cold)", "",
            "| mode | seconds | peak RSS (VmHWM) | anonymous RSS after |", "|---|---:|---:|---:|",
            *[f"| {m} | {r['seconds']:.3f} | {r['peak_rss_bytes'] / 2**20:.0f} MiB | "
              f"{r['rss_anon_bytes'] / 2**20:.0f} MiB |" for m, r in mem.items()], "",
        ]
    for m, why in missing.items():
        lines.append(f"- {m}: not run here ({why})")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"cold": cold, "warm": warm, "memory": mem,
                                         "bytes": nbytes, "missing": missing}, indent=1))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
