"""SpecPrefill (I117) on tiny random models: keep 1.0 is dense greedy decoding token for token; kept tokens sit at
their original positions (a sparse prefill equals the full sequence with the dropped keys masked out, checked by
an independent float64 attention callback); the importance equals the one read from the seam's own weights and
ranks a planted dominant key first; the chunk selection's known answers and errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import tiny  # noqa: E402

from attnlab.interventions import specprefill as SP  # noqa: E402
from attnlab.models import hf  # noqa: E402
from attnlab.plans.evaluate import dense_generate  # noqa: E402

T = 40
IDS = torch.randint(1, 97, (1, T), generator=torch.Generator().manual_seed(3))
SMALL = dict(draft_layers=1, queries=4, chunk=4, keep_last=4)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny(request.param)


def test_keep_all_equals_dense_greedy_token_for_token(model):
    want = dense_generate(model, IDS, 8, native=False)["tokens"]
    got = SP.generate(model, None, IDS, 8, SP.SpecPrefill(keep=1.0, **SMALL))
    assert got["tokens"].tolist() == want.tolist()
    assert got["kept"].tolist() == list(range(T)) and got["kept_fraction"] == 1.0
    assert got["ttft_s"] == pytest.approx(got["draft_s"] + got["prefill_s"])


def test_explicit_original_positions_equal_the_plain_forward(model):
    plain = model(input_ids=IDS, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    got = model(input_ids=IDS, position_ids=torch.arange(T).view(1, T), cache=cache, use_cache=True).logits
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def _masked_reference(allowed: torch.Tensor):
    """A float64 attention callback: causal AND key ``j`` allowed (``allowed`` (T,) bool), grouped heads repeated."""

    def fn(module, q, k, v, mask, scaling, layer_idx):
        H, Hkv, Tq, Tk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
        k = k.double().repeat_interleave(H // Hkv, 1)
        v = v.double().repeat_interleave(H // Hkv, 1)
        s = q.double() @ k.transpose(-1, -2) * scaling
        rule = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq) & allowed[:Tk].view(1, Tk)
        if mask is not None:  # the model's own extra rule (none for llama)
            rule = rule & mask[0, 0]
        w = torch.softmax(s.masked_fill(~rule, float("-inf")), -1)
        return (w @ v).to(q.dtype)

    return fn


def test_sparse_prefill_keeps_original_positions():
    model = tiny("llama")
    kept = torch.tensor([0, 1, 2, 7, 8, 9, 10, 20, 21, 33, 36, 37, 38, 39])
    nxt = torch.tensor([[5]])
    cache = DynamicCache(config=model.config)
    got = model(input_ids=IDS[:, kept], position_ids=kept.view(1, -1), cache=cache, use_cache=True).logits[0]
    assert cache.get_seq_length() == kept.numel()  # the cache holds only the kept tokens
    step = model(input_ids=nxt, position_ids=torch.tensor([[T]]), cache=cache, use_cache=True).logits[0, -1]
    allowed = torch.zeros(T + 1, dtype=torch.bool)
    allowed[kept] = True
    allowed[T] = True
    with hf.attnlab_attention(model, _masked_reference(allowed)):
        ref = model(input_ids=torch.cat([IDS, nxt], 1), use_cache=False).logits[0]
    torch.testing.assert_close(got, ref[kept], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step, ref[T], rtol=1e-4, atol=1e-4)
    # positions matter: the same tokens at positions 0..K-1 give other logits
    shifted = model(input_ids=IDS[:, kept], use_cache=False).logits[0]
    assert (shifted[-1] - ref[kept][-1]).abs().max() > 1e-3


def test_importance_equals_the_seams_own_weights(model):
    r, layers = 4, (0, 1)
    got = SP.attention_importance(model, IDS, layers, queries=r)
    _, store = hf.run_with_cache(model, IDS, [f"blocks.{x}.attn.weights" for x in layers], rows=(T - r, T))
    want = torch.stack([store[f"blocks.{x}.attn.weights"][0].amax(0).sum(0) for x in layers]).mean(0)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    assert not hasattr(model, "_attnlab_seam")  # the hooks are gone


def test_importance_ranks_a_planted_dominant_key_first():
    model = tiny("llama")
    needle = 13
    u = torch.randn(8, generator=torch.Generator().manual_seed(1))  # head_dim 8

    def plant_q(q, ctx):
        return u.view(1, 1, 1, -1).expand_as(q).clone()

    def plant_k(k, ctx):
        if k.shape[2] != T:  # only the draft's full pass (the sparse prefill sees kept keys)
            return None
        k = k.clone()
        k[:, :, needle] = 6.0 * u
        return k

    with hf.hooks(model, {"blocks.*.attn.q": plant_q, "blocks.*.attn.k": plant_k}):
        scores = SP.attention_importance(model, IDS, (0, 1), queries=4)
        got = SP.generate(model, None, IDS, 3, SP.SpecPrefill(keep=0.25, **{**SMALL, "draft_layers": 2}))
    assert int(scores.argmax()) == needle
    assert float(scores[needle]) > 3.5  # near all of every query row's mass, max over heads, 4 rows
    assert needle in got["kept"].tolist()
    assert got["kept"].tolist()[-4:] == list(range(T - 4, T))


def test_select_tokens_known_answer():
    s = torch.tensor([5.0, 5.0, 0.0, 0.0, 1.0, 3.0, 0.0, 9.0, 0.0, 0.0])
    # budget ceil(0.6 * 10) = 6: last 2 forced, then chunk means [5, 0, 2, 4.5, 0] -> chunk 0, chunk 3
    assert SP.select_tokens(s, 0.6, chunk=2, keep_last=2).tolist() == [0, 1, 6, 7, 8, 9]
    assert SP.select_tokens(s, 1.0, chunk=3, keep_last=0).tolist() == list(range(10))
    # token level: budget 3, no forced tokens: 7 (9.0), then 0 and 1 (5.0 each; the earlier first)
    assert SP.select_tokens(s, 0.3, chunk=1, keep_last=0).tolist() == [0, 1, 7]


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="keep"):
        SP.SpecPrefill(keep=0.0)
    with pytest.raises(ValueError, match="draft_layers"):
        SP.SpecPrefill(draft_layers=0)
    with pytest.raises(ValueError, match="chunk"):
        SP.select_tokens(torch.ones(4), 0.5, chunk=0)
    model = tiny("llama")
    with pytest.raises(ValueError, match="draft_layers"):
        SP.generate(model, None, IDS, 2, SP.SpecPrefill(draft_layers=5))
    with pytest.raises(RuntimeError), SP.truncated(model, 1):
        assert len(model.model.layers) == 1
        raise RuntimeError("inside")
    assert len(model.model.layers) == 2  # restored after an error


def test_default_draft_is_half_the_layers_and_scores_must_fit():
    model = tiny("llama")
    half = SP.draft_scores(model, IDS, SP.SpecPrefill(queries=4))
    torch.testing.assert_close(half, SP.attention_importance(model, IDS, (0,), queries=4))
    with pytest.raises(ValueError, match="scores must be"):
        SP.sparse_generate(model, IDS, torch.ones(T - 1), 2)
