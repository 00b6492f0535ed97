"""Rectified SpaAttn [D276]: fast path vs a per-row loop reference, known answers, error vs plain block top-k."""

import math

import pytest
import torch

from attnlab.core.reference import reference_attention
from attnlab.mechanisms.routing.moba import block_means
from attnlab.mechanisms.routing.rectified import pooled_logits, rectified_attention
from attnlab.testing import grads, max_err, qkv

pytestmark = pytest.mark.usefixtures("one_thread")
SCALE = 8**-0.5


def loop_reference(q, k, v, block, top_k, ipar, gapr, min_gain, causal):
    """Row by row from the definition: exact critical keys + pooled non-critical blocks in one normalizer."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    nb = math.ceil(Tk / block)
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h * Hkv // H], v[b, h * Hkv // H]
            spans = [(m * block, min(Tk, (m + 1) * block)) for m in range(nb)]
            kbar = [kh[lo:hi].mean(0) for lo, hi in spans]
            vbar = [vh[lo:hi].mean(0) for lo, hi in spans]
            for i in range(Tq):
                qi = q[b, h, i]
                a = [SCALE * qi @ kbar[m] + math.log(hi - lo) for m, (lo, hi) in enumerate(spans)]
                own = i // block
                if causal:
                    past = sorted(range(own), key=lambda m: -a[m].item())[: top_k - 1]
                    crit, seen = {own, *past}, set(range(own))
                else:
                    crit, seen = set(sorted(range(nb), key=lambda m: -a[m].item())[:top_k]), set(range(nb))
                keys = [t for m in crit for t in range(*spans[m]) if not causal or t <= i]
                terms = [(SCALE * qi @ kh[t], vh[t]) for t in keys]
                pooled = [m for m in seen if m not in crit]
                zc = sum(torch.exp(s) for s, _ in terms)
                zp = sum(math.exp(a[m].item()) for m in pooled)
                num, den = sum(torch.exp(s) * x for s, x in terms), zc
                for m in pooled:
                    share = math.exp(a[m].item()) / (zc.item() + zp)  # a decision: not differentiated
                    if gapr and share >= min_gain:
                        num, den = num + torch.exp(a[m]) * vbar[m], den + torch.exp(a[m])
                    elif ipar:
                        den = den + torch.exp(a[m])
                out[b, h, i] = num / den
    return out


@pytest.mark.parametrize("causal,ipar,gapr,min_gain", [(True, True, True, 0.0), (True, True, True, 0.02),
                                                        (True, True, False, 0.0), (False, True, True, 0.0),
                                                        (False, False, True, 0.05), (True, False, False, 0.0)])
def test_matches_loop_reference_outputs_and_grads(causal, ipar, gapr, min_gain):
    q, k, v = qkv(1, 2, 1, 22, D=8)
    kw = dict(block=4, top_k=2, ipar=ipar, gapr=gapr, min_gain=min_gain, causal=causal)
    out = rectified_attention(q, k, v, scale=SCALE, q_offset=0, **kw)
    ref = loop_reference(q, k, v, 4, 2, ipar, gapr, min_gain, causal)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-11


@pytest.mark.parametrize("causal", [True, False])
def test_all_blocks_selected_is_dense(causal):
    q, k, v = qkv(2, 4, 2, 30, D=8, requires_grad=False)
    out = rectified_attention(q, k, v, scale=SCALE, q_offset=0, block=4, top_k=8, causal=causal)
    rule = torch.ones(30, 30, dtype=torch.bool).tril() if causal else torch.ones(30, 30, dtype=torch.bool)
    assert max_err(out, reference_attention(q, k, v, mask=rule.view(1, 1, 30, 30))) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_constant_blocks_are_exact_even_when_sparse(causal):
    """Equal keys and values inside each block: pooling is exact, so top_k=1 equals dense; plain top-k does not."""
    q, k, v = qkv(1, 2, 2, 32, D=8, requires_grad=False)
    k, v = k[:, :, ::4].repeat_interleave(4, 2), v[:, :, ::4].repeat_interleave(4, 2)
    if causal:  # the own block is read causally (exact); pooled blocks are whole past blocks
        rule = torch.ones(32, 32, dtype=torch.bool).tril()
    else:
        rule = torch.ones(32, 32, dtype=torch.bool)
    dense = reference_attention(q, k, v, mask=rule.view(1, 1, 32, 32))
    out = rectified_attention(q, k, v, scale=SCALE, q_offset=0, block=4, top_k=1, causal=causal)
    plain = rectified_attention(q, k, v, scale=SCALE, q_offset=0, block=4, top_k=1, causal=causal, ipar=False,
                                gapr=False)
    assert max_err(out, dense) < 1e-12
    assert max_err(plain, dense) > 1e-2


def test_rectification_lowers_error_on_structured_inputs():
    """Smooth (locally correlated) keys: rectified top-k is closer to dense than plain top-k at equal density."""
    g = torch.Generator().manual_seed(0)
    T, D = 128, 16
    walk = torch.randn(1, 2, T, D, generator=g, dtype=torch.float64).cumsum(2) * 0.3
    k = walk + 0.05 * torch.randn(1, 2, T, D, generator=g, dtype=torch.float64)
    v = walk.flip(-1) + 0.05 * torch.randn(1, 2, T, D, generator=g, dtype=torch.float64)
    q = torch.randn(1, 2, T, D, generator=g, dtype=torch.float64)
    dense = reference_attention(q, k, v, mask=torch.ones(T, T, dtype=torch.bool).tril().view(1, 1, T, T))
    kw = dict(scale=D**-0.5, q_offset=0, block=8, top_k=3, causal=True)
    rect = (rectified_attention(q, k, v, **kw) - dense).norm() / dense.norm()
    plain = (rectified_attention(q, k, v, ipar=False, gapr=False, **kw) - dense).norm() / dense.norm()
    assert rect < 0.7 * plain


def test_pooled_logit_is_a_lower_bound_that_misses_a_sink_key():
    """``a_im = scale q.kbar_m + log n_m`` <= the block's exact log-mass (Jensen), equal for equal keys; so a block
    holding one dominant key (an attention sink, as on SmolLM2's token 0) ranks below a block of ordinary keys with
    less exact mass, and plain top-k drops it (measured on SmolLM2: block 0 picked for ~9% of queries at top_k 2)."""
    g = torch.Generator().manual_seed(1)
    D, block = 16, 8
    q = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64)
    u = q[0, 0, 0] / q.norm()
    k = 0.3 * torch.randn(1, 1, 3 * block, D, generator=g, dtype=torch.float64)
    k[0, 0, 0] = 6.0 * u  # block 0: one sink key aligned with q, 7 ordinary keys
    k[0, 0, block:2 * block] += 1.0 * u  # block 1: every key mildly aligned
    scale = D**-0.5
    exact = torch.stack([(scale * k[0, 0, m * block:(m + 1) * block] @ q[0, 0, 0]).logsumexp(0) for m in range(3)])
    a = pooled_logits(q, block_means(k, block), torch.full((3,), float(block), dtype=q.dtype), scale)[0, 0, 0]
    assert (a <= exact + 1e-12).all()
    assert exact[0] > exact[1] and a[0] < a[1]  # the sink block holds more mass but ranks lower
    same = k[:, :, :block].mean(2, keepdim=True).expand(1, 1, block, D)
    a_same = pooled_logits(q, block_means(same, block), torch.full((1,), float(block), dtype=q.dtype), scale)
    assert abs(float(a_same) - float((scale * same[0, 0] @ q[0, 0, 0]).logsumexp(0))) < 1e-12
    # end to end: the last query (own block 2, one past block to pick) reads block 1, not the sink's block 0
    v = torch.randn(1, 1, 3 * block, D, generator=g, dtype=torch.float64)
    qs = torch.cat([torch.randn(1, 1, 3 * block - 1, D, generator=g, dtype=torch.float64), q], 2)
    out = rectified_attention(qs, k, v, scale=scale, q_offset=0, block=block, top_k=2, ipar=False, gapr=False)
    w = (scale * k[0, 0, block:] @ q[0, 0, 0]).softmax(0)
    assert max_err(out[0, 0, -1], w @ v[0, 0, block:]) < 1e-12


def test_bad_options_fail_clearly():
    q, k, v = qkv(1, 2, 2, 16, D=8)
    for bad, msg in [({"block": 0}, "block"), ({"top_k": 0}, "top_k"), ({"min_gain": 2.0}, "min_gain")]:
        with pytest.raises(ValueError, match=msg):
            rectified_attention(q, k, v, scale=1.0, q_offset=0, **(dict(block=4, top_k=2) | bad))
