"""``hf.use(model, "native")``: each layer's own rule through attnlab's engines equals transformers' eager
attention (logits, padded batches, decoding with the model's own sliding cache), on tiny random models here and
on the embedded Gemma 3 in tests/models/test_gemma3.py."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import VOCAB, sliding_of, tiny
from transformers import DynamicCache

from attnlab.models import hf
from attnlab.testing import FLOOR

TOL = 20 * FLOOR[torch.float32]


def eager_logits(model, ids, attention_mask=None):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("family", ["gemma3", "mistral", "llama"])
def test_native_prefill_equals_eager(family):
    model = tiny(family)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    ref = eager_logits(model, ids)
    with torch.no_grad(), hf.use(model, "native"):
        out = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)


def test_native_sliding_layers_run_the_sparse_op(monkeypatch):
    """The sliding layer goes through the sliding_window op with the model's window; the full layer does not."""
    from attnlab import ops

    model = tiny("gemma3")
    seen = []
    spec = ops.get("sliding_window")
    original = type(spec).__call__

    def spy(self, q, k, v, **kw):
        if self.name == "sliding_window":
            seen.append((kw["window"], q.shape[2], k.shape[2]))
        return original(self, q, k, v, **kw)

    monkeypatch.setattr(type(spec), "__call__", spy)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hf.use(model, "native"):
        model(input_ids=ids, use_cache=False)
    assert seen == [(sliding_of(model, 0), 12, 12)]  # layer 0 slides (window 4); layer 1 is full


def test_native_padded_batch_equals_eager():
    model = tiny("gemma3")
    ids = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, :6] = 0  # left padding in the second row
    ref = eager_logits(model, ids, am)
    with torch.no_grad(), hf.use(model, "native"):
        out = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    keep = am.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=TOL, rtol=TOL)


def test_native_decode_keeps_only_the_window_and_equals_full_forward():
    model = tiny("gemma3")
    T, window = 30, sliding_of(model, 0)
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(5))
    ref = eager_logits(model, ids)
    with torch.no_grad(), hf.use(model, "native") as h:
        cache = h.new_cache()
        assert isinstance(cache, DynamicCache)
        steps = [model(input_ids=ids[:, :20], cache=cache, use_cache=True).logits[:, -1]]
        for t in range(20, T):
            steps.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1])
        # the sliding layer holds window - 1 keys, the full layer every position
        assert cache.layers[0].keys.shape[2] == window - 1
        assert cache.layers[1].keys.shape[2] == T
    got = torch.stack(steps[1:], dim=1)
    torch.testing.assert_close(got, ref[:, 20:], atol=TOL, rtol=TOL)
    torch.testing.assert_close(steps[0], ref[:, 19], atol=TOL, rtol=TOL)


def test_native_generate_matches_default_generate():
    model = tiny("gemma3")
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        with hf.use(model, "native"):
            got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_native_takes_no_options_and_restores_the_model():
    model = tiny("gemma3")
    with pytest.raises(ValueError, match="no options"):
        hf.use(model, "native", window=3)
    h = hf.use(model, "native")
    assert model.config._attn_implementation == hf.ATTN_NAME
    h.remove()
    assert model.config._attn_implementation == "sdpa"
