"""Episodic-memory measures (lag-CRP, contiguity, primacy / recency, the two-sided exponential fit): planted maps
with known answers, a brute-force CRP from the definition, the model path on a planted induction circuit and a
tiny eager Llama, and SmolLM2's top induction head."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import VOCAB, tiny  # noqa: E402

from attnlab.inspect.capture import record  # noqa: E402
from attnlab.inspect.episodic import (  # noqa: E402
    LagCRP,
    RepeatLayout,
    cmr_fit,
    episodic_scan,
    lag_crp,
    repeat_sequences,
)
from attnlab.inspect.metrics import ProbeSpec  # noqa: E402
from attnlab.inspect.probes import induction_probe  # noqa: E402
from tests.inspect.test_metrics import causal_uniform, one_hot_rows  # noqa: E402


def lag_head(T: int, lay: RepeatLayout, lag: int) -> torch.Tensor:
    """Repeat row i attends to position start + i + lag (wherever that is); other rows to themselves."""
    cols = list(range(T))
    for i in range(lay.length):
        cols[lay.start + lay.length + i] = max(0, lay.start + i + lag)
    return one_hot_rows(T, cols)


def brute_crp(w: torch.Tensor, lay: RepeatLayout, renormalize: bool, q0: int = 0):
    """CRP, opportunities and SPC of one head written from the definition, loop by loop. w: (B, Tq, Tk)."""
    n, s = lay.length, lay.start
    num = {L: 0.0 for L in range(-(n - 1), n)}
    den = {L: 0.0 for L in range(-(n - 1), n)}
    opp = {L: 0 for L in range(-(n - 1), n)}
    spc, tot = [0.0] * n, 0.0
    for b in range(w.shape[0]):
        for i in range(n):
            row = [float(w[b, s + n + i - q0, s + j]) for j in range(n)]
            weight = sum(row) if renormalize else 1.0  # a recall event weighted by its first-list mass
            tot += weight
            for j in range(n):
                num[j - i] += row[j]
                den[j - i] += weight
                opp[j - i] += 1
                spc[j] += row[j]
    crp = [num[L] / den[L] if den[L] > 1e-12 else float("nan") for L in range(-(n - 1), n)]
    return crp, [opp[L] for L in range(-(n - 1), n)], [x / tot for x in spc]


# ---------------------------------------------------------------------------------------------------------
# planted maps
# ---------------------------------------------------------------------------------------------------------
def test_forward_head_concentrates_at_plus_one():
    lay, T = RepeatLayout(1, 8), 18  # BOS, 8 + 8 tokens, a trailing token
    w = torch.stack([lag_head(T, lay, 1), lag_head(T, lay, -2), lag_head(T, lay, 0)]).unsqueeze(0).repeat(2, 1, 1, 1)
    c = lag_crp(w, lay)
    n = lay.length
    assert c.lags.tolist() == list(range(-(n - 1), n))
    assert c.crp.shape == (3, 2 * n - 1) and c.spc.shape == (3, n)
    # head 0: lag +1; its last repeat row lands on the first repeat token (outside the first presentation)
    assert float(c.at(1)[0]) == pytest.approx(1.0)
    others = torch.cat([c.crp[0, 1:n], c.crp[0, n + 1:]])
    assert float(others.abs().max()) == 0.0
    assert math.isnan(float(c.crp[0, 0]))  # lag -(n-1): only the last row has it, and it retrieves nothing
    assert c.peak_lag()[0] == 1 and c.peak_lag(3)[0] == 1
    assert float(c.asymmetry[0]) == pytest.approx(1.0)
    assert float(c.contiguity()[0]) == pytest.approx(0.5)  # (1 + 0) / 2 - 0 > 0
    assert float(c.first_copy_mass[0]) == pytest.approx((n - 1) / n)
    # head 1: lag -2 (backward, not contiguous); head 2: lag 0 (duplicate token)
    assert c.peak_lag()[1] == -2 and float(c.at(-2)[1]) == pytest.approx(1.0)
    assert math.isnan(float(c.asymmetry[1]))  # neither neighbour gets anything
    assert float(c.contiguity()[1]) < 0
    assert c.peak_lag()[2] == 0 and float(c.at(0)[2]) == pytest.approx(1.0)
    # serial positions: the +1 head never lands on item 0, the lag-0 head hits every item once
    assert float(c.primacy[0]) == 0.0 and float(c.recency[0]) == pytest.approx(n / (n - 1))
    assert float(c.primacy[2]) == pytest.approx(1.0) and float(c.recency[2]) == pytest.approx(1.0)


def test_rows_count_by_their_first_presentation_mass():
    """A +1 head whose last repeat row (no +1 key in the first presentation) leaks 1e-3 to lag -1: that row is
    weighted by its 1e-3, so CRP(-1) stays ~1e-4 (an unweighted mean of renormalised rows would make it a
    whole recall event at lag -1: 1 / (n - 1))."""
    lay, T = RepeatLayout(1, 8), 17
    n = lay.length
    w = lag_head(T, lay, 1)
    last = lay.start + 2 * n - 1
    w[last, lay.start + n - 2] = 1e-3
    w[last, lay.start + n] = 1 - 1e-3
    c = lag_crp(w.view(1, 1, T, T), lay)
    assert float(c.at(-1)[0]) == pytest.approx(1e-3 / (n - 2 + 1e-3))
    assert float(c.at(1)[0]) == pytest.approx(1.0) and float(c.asymmetry[0]) > 0.999
    assert float(c.first_copy_mass[0]) == pytest.approx((n - 1 + 1e-3) / n)


def test_uniform_head_is_flat_after_normalisation():
    lay, T = RepeatLayout(1, 10), 22
    causal = causal_uniform(T).view(1, 1, T, T)
    full = torch.full((1, 1, T, T), 1.0 / T)  # an encoder's uniform head
    for w in (causal, full):
        c = lag_crp(w, lay)
        assert torch.allclose(c.crp, torch.full_like(c.crp, 1 / lay.length), atol=1e-12)
        assert torch.allclose(c.spc, torch.full_like(c.spc, 1 / lay.length), atol=1e-12)
        assert float(c.primacy[0]) == pytest.approx(1.0) and float(c.contiguity()[0]) == pytest.approx(0.0, abs=1e-12)
        assert float(c.asymmetry[0]) == pytest.approx(0.0, abs=1e-12)
    # raw (unnormalised) weights: the causal uniform head favours early rows (more mass per key), which are the
    # rows with forward lags, so its raw curve is not flat -- the reason rows are renormalised by default
    raw = lag_crp(causal, lay, renormalize=False)
    assert raw.crp[0, -1] > raw.crp[0, 0] * 1.2
    assert float(raw.first_copy_mass[0]) == pytest.approx(
        sum(lay.length / (lay.start + lay.length + i + 1) for i in range(lay.length)) / lay.length)


@pytest.mark.parametrize("renormalize", [True, False])
def test_crp_matches_brute_force(renormalize):
    g = torch.Generator().manual_seed(3)
    lay, T, B, H = RepeatLayout(2, 6), 16, 3, 4
    logits = torch.randn(B, H, T, T, generator=g) * 2
    w = torch.softmax(logits.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf")), -1)
    w[1, 2, lay.start + lay.length + 3, lay.start:lay.start + lay.length] = 0  # one row with no first-copy mass
    c = lag_crp(w, lay, renormalize=renormalize)
    for h in range(H):
        crp, opp, spc = brute_crp(w[:, h], lay, renormalize)
        assert c.crp[h].tolist() == pytest.approx(crp, rel=1e-9, abs=1e-12)
        assert c.opportunities[h].tolist() == opp
        assert c.spc[h].tolist() == pytest.approx(spc, rel=1e-9, abs=1e-12)
    full_opp = [B * (lay.length - abs(L)) for L in range(-(lay.length - 1), lay.length)]
    assert c.opportunities[0].tolist() == full_opp  # n - |L| per sequence
    if renormalize:
        assert torch.allclose(c.spc.sum(-1), torch.ones(H, dtype=torch.float64))
    # rows given from the repeat on, with their offset, give the same answer
    q0 = lay.start + lay.length
    part = lag_crp(w[:, :, q0:], lay, q_offset=q0, renormalize=renormalize)
    assert torch.allclose(part.crp, c.crp, equal_nan=True)
    # default offset: bottom-aligned rows (the last Tq positions)
    tail = lag_crp(w[:, :, q0:], lay, renormalize=renormalize)
    assert torch.allclose(tail.crp, c.crp, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------
# the two-sided exponential fit
# ---------------------------------------------------------------------------------------------------------
def curve(n, b, af, ab, r):
    return torch.tensor([b + (af if L > 0 else ab) * r ** (abs(L) - 1) if L else 0.7
                         for L in range(-(n - 1), n)], dtype=torch.float64)


def test_fit_recovers_planted_curve_and_reports_quality():
    n, grid = 12, 100
    r_true = float(torch.linspace(0, 0.99, grid, dtype=torch.float64)[60])  # a grid value
    y = torch.stack([curve(n, 0.02, 0.5, 0.1, r_true), curve(n, 0.0, 1.0, 0.0, 0.0)])
    f = cmr_fit(y, max_lag=6, grid=grid)
    assert f.max_lag == 6 and f.r.shape == (2,)
    assert float(f.r[0]) == pytest.approx(r_true) and float(f.b[0]) == pytest.approx(0.02, abs=1e-10)
    assert float(f.a_fwd[0]) == pytest.approx(0.5, abs=1e-10) and float(f.a_bwd[0]) == pytest.approx(0.1, abs=1e-10)
    assert float(f.r2[0]) == pytest.approx(1.0) and float(f.rmse[0]) == pytest.approx(0.0, abs=1e-10)
    # a pure +1 spike is the r = 0 limit (lag 0, set to 0.7 above, is never fitted)
    assert float(f.r[1]) == 0.0 and float(f.a_fwd[1]) == pytest.approx(1.0) and float(f.r2[1]) == pytest.approx(1.0)
    lags = torch.arange(-(n - 1), n)
    fitted = f.curve(lags)
    keep = (lags != 0) & (lags.abs() <= 6)
    assert torch.allclose(fitted[:, keep], y[:, keep], atol=1e-9)


def test_fit_is_least_squares_and_r2_by_definition():
    g = torch.Generator().manual_seed(0)
    n, K, grid = 9, 4, 25
    y = curve(n, 0.05, 0.4, 0.15, 0.5) + 0.03 * torch.randn(2 * n - 1, generator=g, dtype=torch.float64)
    f = cmr_fit(y, max_lag=K, grid=grid)
    lags = [L for L in range(1, K + 1)] + [-L for L in range(1, K + 1)]
    ys = [float(y[L + n - 1]) for L in lags]
    best = None
    for r in torch.linspace(0, 0.99, grid, dtype=torch.float64).tolist():
        X = torch.tensor([[1.0, (L > 0) * r ** (abs(L) - 1), (L < 0) * r ** (abs(L) - 1)] for L in lags],
                         dtype=torch.float64)
        coef = torch.linalg.solve(X.T @ X, X.T @ torch.tensor(ys, dtype=torch.float64))  # normal equations
        sse = float(((X @ coef - torch.tensor(ys, dtype=torch.float64)) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, r, coef)
    sse, r, coef = best
    assert float(f.r) == pytest.approx(r)
    assert [float(f.b), float(f.a_fwd), float(f.a_bwd)] == pytest.approx(coef.tolist(), abs=1e-9)
    mean = sum(ys) / len(ys)
    assert float(f.r2) == pytest.approx(1 - sse / sum((v - mean) ** 2 for v in ys), rel=1e-9)
    assert 0.5 < float(f.r2) < 1.0
    assert float(f.rmse) == pytest.approx(math.sqrt(sse / len(ys)), rel=1e-9)


def test_fit_flat_curve_has_no_r2_and_lagcrp_input():
    lay, T = RepeatLayout(1, 6), 14
    c = lag_crp(causal_uniform(T).view(1, 1, T, T), lay)
    f = cmr_fit(c, max_lag=3)
    assert math.isnan(float(f.r2[0]))  # nothing to explain
    assert float(f.b[0]) == pytest.approx(1 / 6) and float(f.a_fwd[0]) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise():
    lay, T = RepeatLayout(1, 4), 10
    ok = causal_uniform(T).view(1, 1, T, T)
    with pytest.raises(ValueError, match="batch, heads, queries, keys"):
        lag_crp(ok[0], lay)
    with pytest.raises(ValueError, match="needs 13 positions"):
        lag_crp(ok, RepeatLayout(5, 4))
    with pytest.raises(ValueError, match="repeat queries"):
        lag_crp(ok[:, :, 7:], lay)  # row 5 (the first repeat query) is missing
    with pytest.raises(ValueError, match="do not fit"):
        lag_crp(ok, lay, q_offset=3)
    bad = ok.clone()
    bad[0, 0, 6, 0] = -0.5
    with pytest.raises(ValueError, match="non-negative"):
        lag_crp(bad, lay)
    with pytest.raises(ValueError, match="sum to at most 1"):
        lag_crp(ok * 2, lay)
    bad = ok.clone()
    bad[0, 0, 6, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lag_crp(bad, lay)
    with pytest.raises(ValueError, match="length must be >= 2"):
        RepeatLayout(0, 1)
    with pytest.raises(ValueError, match="start must be >= 0"):
        RepeatLayout(-1, 4)
    c = lag_crp(ok, lay)
    with pytest.raises(ValueError, match="outside"):
        c.at(4)
    with pytest.raises(ValueError, match="odd last dim"):
        cmr_fit(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="at least 2"):
        cmr_fit(c, max_lag=1)
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (1, 10))
    with pytest.raises(ValueError, match="do not repeat"):
        episodic_scan(model, input_ids=ids, layout=lay)
    with pytest.raises(ValueError, match="layout"):
        episodic_scan(model, input_ids=ids)
    with pytest.raises(ValueError, match="tokenizer"):
        episodic_scan(model)


# ---------------------------------------------------------------------------------------------------------
# on models
# ---------------------------------------------------------------------------------------------------------
def test_scan_on_planted_induction_circuit():
    from tests.inspect.test_causal import BOS, IND_HEAD, planted

    model = planted()
    n = 7
    seqs = []
    for seed in range(2):
        a = torch.randperm(BOS, generator=torch.Generator().manual_seed(seed))[:n]
        seqs.append(torch.cat([torch.tensor([BOS]), a, a]))
    ids = torch.stack(seqs)
    s = episodic_scan(model, input_ids=ids, layout=RepeatLayout(1, n), max_lag=3)
    assert s.crp.crp.shape == (2, 4, 2 * n - 1) and s.fit.r2.shape == (2, 4)
    assert s.top_induction() == (1, IND_HEAD)
    c = s.crp
    assert int(c.peak_lag()[1, IND_HEAD]) == 1 and float(c.at(1)[1, IND_HEAD]) > 0.99
    assert float(c.asymmetry[1, IND_HEAD]) > 0.99 and float(c.contiguity(3)[1, IND_HEAD]) > 0.45
    assert float(s.fit.a_fwd[1, IND_HEAD]) > 0.95 and float(s.fit.r2[1, IND_HEAD]) > 0.99
    info = s.head(1, IND_HEAD, max_lag=3)
    assert info["peak_lag"] == 1 and info["induction"] > 0.95


def test_scan_matches_eager_attentions_and_the_recorder():
    """The scan's CRP equals ``lag_crp`` of the model's own eager attention probabilities, and its induction
    score equals the atlas recorder's (chunked ``Recorder`` on the seam) on each sequence."""
    model = tiny("llama", attn="eager")
    g = torch.Generator().manual_seed(5)
    n = 6
    x = torch.stack([torch.randperm(VOCAB - 1, generator=g)[:n] + 1 for _ in range(3)])
    ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), x, x, torch.full((3, 1), 7)], 1)  # BOS, x, x, tail
    lay = RepeatLayout(1, n)
    s = episodic_scan(model, input_ids=ids, layout=lay, max_lag=3)
    with torch.no_grad():
        att = model(ids, output_attentions=True, use_cache=False).attentions
    for layer in range(2):
        ref = lag_crp(att[layer].float(), lay)
        assert torch.allclose(s.crp.crp[layer], ref.crp, atol=1e-5)
        assert torch.allclose(s.crp.first_copy_mass[layer], ref.first_copy_mass, atol=1e-5)
        rec = [record(model, ids[b:b + 1], spec=ProbeSpec(tokens=tuple(ids[b].tolist()))).stats[layer].finalize()
               ["induction"] for b in range(3)]
        assert torch.allclose(s.induction[layer], torch.stack(rec).mean(0).to(s.induction.dtype), atol=1e-5)


def test_repeat_sequences_uses_the_induction_probe(smollm2):
    _, tok = smollm2
    ids, lay = repeat_sequences(tok, length=12, batch=2, seed=4)
    assert ids.shape == (2, 1 + 24) and lay == RepeatLayout(1, 12)
    assert int(ids[0, 0]) == tok.bos_token_id  # SmolLM2 adds no BOS: one is put first
    for b in range(2):
        probe = induction_probe(tok, 12, 4 + b).input_ids[0]
        assert ids[b, 1:].tolist() == probe.tolist()
    no_bos, lay0 = repeat_sequences(tok, length=12, batch=1, seed=4, bos=False)
    assert lay0.start == 0 and no_bos[0].tolist() == ids[0, 1:].tolist()
    with pytest.raises(ValueError, match="length >= 2"):
        repeat_sequences(tok, length=1)


def test_smollm2_top_induction_head_peaks_at_plus_one(smollm2):
    model, tok = smollm2
    s = episodic_scan(model, tok, length=30, batch=2)
    # the atlas's own pipeline (induction probe + Recorder) names the same top induction head
    probe = induction_probe(tok)
    cap = record(model, probe.input_ids, spec=probe.spec)
    atlas_ind = torch.stack([cap.stats[layer].finalize()["induction"] for layer in range(len(cap.stats))])
    top = divmod(int(atlas_ind.argmax()), atlas_ind.shape[1])
    assert top == s.top_induction()
    c = s.crp
    assert int(c.peak_lag()[top]) == 1 and int(c.peak_lag(5)[top]) == 1
    assert float(c.at(1)[top]) > 0.5 and float(c.asymmetry[top]) > 0.8
    # every head the atlas would call an induction head (score >= 0.3) peaks at +1 within +-5
    strong = s.induction >= 0.3
    assert int(strong.sum()) >= 3
    assert bool((c.peak_lag(5)[strong] == 1).all())
    assert isinstance(c, LagCRP)
