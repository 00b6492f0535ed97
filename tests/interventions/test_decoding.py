"""The cached generation loops equal independent uncached references: DeCoRe vs ``decore_generate``, DAGCD vs
eager attention + ``agcd_logits`` step by step, the lookback ratios read while decoding vs ``lookback_ratios`` on
the whole sequence (on a sliding-window model too, whose cache keeps only the window)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import samples, tiny  # noqa: E402

from attnlab.interventions import decoding as D  # noqa: E402
from attnlab.plans import calibrate as C  # noqa: E402

PROMPT = torch.tensor([list(samples(1, seed=11, length=24)[0].ids)])


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny(request.param)


def test_decore_with_caches_equals_the_uncached_reference(model):
    heads = [(1, 0), (0, 2), (1, 3)]
    with D.Base(model) as base:
        got = D.decore_greedy(model, PROMPT, 6, base.new_cache, heads=heads, alpha=2.0)
    want = C.decore_generate(model, PROMPT, heads, max_new_tokens=6, alpha=2.0)
    assert got.tolist() == want.tolist()


def _eager_rows(model, ids):
    """Transformers' eager attention (output_attentions): per layer (H, Tk) of the last query."""
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True)
    finally:
        model.set_attn_implementation(prev)
    return out.logits[0, -1], [a[0, :, -1] for a in out.attentions]


def test_dagcd_equals_eager_attention_and_agcd_step_by_step(model):
    heads = [(1, 0), (0, 3), (1, 2)]
    start, T = 1, PROMPT.shape[1]
    with D.Base(model) as base:
        got = D.dagcd_greedy(model, PROMPT, 5, base.new_cache, heads=heads, weight=3.0)[0].tolist()
    cur = PROMPT
    want = []
    for _ in range(5):
        logits, rows = _eager_rows(model, cur)
        att = sum(rows[layer][h, start:T] for layer, h in heads).view(1, -1)
        nxt = C.agcd_logits(logits.view(1, -1), att, PROMPT[:, start:T], 3.0).argmax(-1)
        want.append(int(nxt))
        cur = torch.cat([cur, nxt.view(1, 1)], 1)
    assert got == want
    with D.Base(model) as base:
        plain = D.greedy(model, PROMPT, 5, base.new_cache)[0].tolist()
    assert got != plain  # the weight moved tokens


def test_lookback_rows_while_decoding_equal_lookback_ratios_of_the_whole_sequence(model):
    L = 2
    gen = torch.Generator().manual_seed(0)
    with D.Base(model) as base, torch.no_grad():
        cache = base.new_cache()
        logits = model(input_ids=PROMPT, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        toks, feats, _ = D.sample_chunk(model, cache, logits, 6, PROMPT.shape[1], 1.0, gen)
    assert feats.shape == (6, L * 4)
    full = torch.cat([PROMPT, toks], 1)
    ref = C.lookback_ratios(model, full, PROMPT.shape[1])  # (L, H, 6), one uncached pass
    assert torch.allclose(feats, ref.permute(2, 0, 1).reshape(6, -1), atol=1e-5)


def test_lookback_guided_decoding_picks_the_detector_best_candidate(model):
    # a detector weighting one feature: the kept chunk is the candidate with the highest mean of that feature
    w = torch.zeros(8)
    w[5] = 1.0
    with D.Base(model) as base:
        got = D.lookback_generate(model, PROMPT, 3, base.new_cache, weights=w, chunk_len=3, candidates=4,
                                  temperature=1.5, seed=3)
        gen = torch.Generator().manual_seed(3)
        cands = []
        with torch.no_grad():
            cache = base.new_cache()
            logits = model(input_ids=PROMPT, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            import copy

            for _ in range(4):
                toks, f, _ = D.sample_chunk(model, copy.deepcopy(cache), logits, 3, PROMPT.shape[1], 1.5, gen)
                cands.append((float(f.mean(0)[5]), toks[0].tolist()))
    assert len({tuple(c) for _, c in cands}) > 1  # candidates differ
    assert got[0].tolist() == max(cands, key=lambda c: c[0])[1]


def test_observers_refuse_multi_row_calls(model):
    from attnlab.models import hf

    with pytest.raises(ValueError, match="one-token calls"), hf.hooks(model, D.LookbackRows(4, 2).hooks()):
        model(input_ids=PROMPT)
