"""Probe: the recording start, i.e. the first lazy node of a prefix, which records the layers'
start-up lists, timed next to one later node that prefetches them (bench/RESULTS.md, "Start-up
lists: what EROFS read"). bench_images' own tables leave the recording start out.

    sudo .venv/bin/python bench/probe_recording_start.py

Prints one `SAMPLE <node> <s to first output> <MB by then>` line per start, for torch-serve
and debian-python, one round. Run it from two trees (each first on PYTHONPATH) to compare them.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE, os.path.join(os.path.dirname(HERE), "tests")]

import bench_images as B  # noqa: E402

_run = B._run_on_node


def _timed(bench, image, ref, cid, *a, **k):
    s = _run(bench, image, ref, cid, *a, **k)
    print("SAMPLE", cid, round(s.seconds_to_first_output, 2),
          round(s.bytes_to_first_output / 1e6, 1), flush=True)
    return s


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--rounds", "1", "--direct", "--images", "torch-serve,debian-python",
                "--variants", "p2pfs-prefetch"]
    B._run_on_node = _timed
    B.main()
