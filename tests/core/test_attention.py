"""Every engine of attnlab.attention against the float64 reference: outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlab import attention, reference_attention
from attnlab.core import sparse
from attnlab.core.patterns import (
    Causal,
    Chunked,
    Dilated,
    Document,
    Full,
    GlobalTokens,
    PerHead,
    PrefixLM,
    Sinks,
    SlidingWindow,
    Strided,
)
from attnlab.core.score_mods import ALiBi, Bias, SoftCap, Temperature
from attnlab.testing import grads, max_err, qkv, sdpa_error, tolerance

BASIC = [
    Causal(),
    Full(),
    PrefixLM(5),
    SlidingWindow(5),
    SlidingWindow(4, causal=False),
    Causal() & (SlidingWindow(3) | Sinks(2)),
    GlobalTokens(2),
    Dilated(3, 4),
    Dilated(2, 3, causal=False),
    Strided(5),
    SlidingWindow(4) | Strided(4),
    Chunked(8),
    Chunked(6, causal=True),
    PerHead((Causal(), SlidingWindow(2), Chunked(5), Full())),
]


def _check(pattern, backend, *, B=2, H=4, Hkv=2, Tq=37, Tk=None, mod=None, q_offset=None, q_block=8):
    q, k, v = qkv(B=B, H=H, Hkv=Hkv, Tq=Tq, Tk=Tk, D=16)
    out = attention(q, k, v, pattern, mod, backend=backend, q_offset=q_offset, q_block=q_block)
    ref = reference_attention(q, k, v, pattern, mod, q_offset=q_offset)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert max_err(out, ref) < 1e-10
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-10


@pytest.mark.parametrize("backend", ["blocksparse", "dense_mask", "auto"])
@pytest.mark.parametrize("pattern", BASIC, ids=lambda p: type(p).__name__)
def test_backends_match_reference_float64(pattern, backend):
    _check(pattern, backend)


@pytest.mark.parametrize("pattern", [Causal(), SlidingWindow(6), Sinks(2) | SlidingWindow(3) & Causal()])
@pytest.mark.parametrize("Tq", [1, 5])
def test_decode_offsets_match_reference(pattern, Tq):
    # queries are the last Tq positions of a 37-long sequence (bottom-right alignment)
    _check(pattern, "auto", Tq=Tq, Tk=37)
    _check(pattern, "blocksparse", Tq=Tq, Tk=37, q_offset=3)


@pytest.mark.parametrize(
    "mod",
    [ALiBi(4), SoftCap(2.0), Temperature(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64))],
    ids=["alibi", "softcap", "temperature"],
)
@pytest.mark.parametrize("pattern", [Causal(), SlidingWindow(6), Full()], ids=["causal", "window", "full"])
def test_score_mods_every_engine(mod, pattern):
    for backend in ("auto", "blocksparse", "dense_mask"):
        _check(pattern, backend, mod=mod)


def test_bias_score_mod():
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(1, 4, 37, 37, generator=g, dtype=torch.float64)
    for backend in ("auto", "blocksparse", "dense_mask"):
        _check(SlidingWindow(9), backend, mod=Bias(bias))


def test_batch_and_head_varying_bias():
    bias = torch.randn(2, 4, 37, 37, dtype=torch.float64)
    _check(Causal(), "blocksparse", mod=Bias(bias))


def test_document_packing():
    pat = Document((10, 20, 7)) & Causal()
    for backend in ("blocksparse", "dense_mask"):
        _check(pat, backend)


def test_empty_rows_give_zeros_and_zero_grads():
    pat = Sinks(2) & SlidingWindow(3)  # rows from position 4 on see no key
    q, k, v = qkv(B=1, H=2, Tq=12, D=8)
    for backend in ("blocksparse", "dense_mask", "reference"):
        out = attention(q, k, v, pat, backend=backend, q_block=4)
        assert torch.isfinite(out).all()
        assert out[:, :, 4:].abs().max() == 0
        gq, gk, gv = grads(out, (q, k, v))
        assert torch.isfinite(gq).all() and gq[:, :, 4:].abs().max() == 0
        assert torch.isfinite(gk).all() and torch.isfinite(gv).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", [SlidingWindow(16), Causal(), Dilated(4, 3), Chunked(16)], ids=str)
def test_low_precision_within_twice_sdpa_error(dtype, pattern):
    q, k, v = qkv(B=1, H=4, Hkv=2, Tq=96, D=32, dtype=dtype, requires_grad=False)
    mask = pattern.dense(96, 96).unsqueeze(0)
    ref = reference_attention(q, k, v, pattern)
    err = max_err(attention(q, k, v, pattern, q_block=32), ref)
    assert err <= tolerance(dtype, sdpa_error(q, k, v, mask))


def test_full_and_causal_dispatch_to_sdpa_exactly():
    q, k, v = qkv(B=1, H=4, Hkv=2, Tq=64, D=16, dtype=torch.float32, requires_grad=False)
    ref_c = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref_f = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.equal(attention(q, k, v, Causal()), ref_c)
    assert torch.equal(attention(q, k, v), ref_f)


def test_return_weights_are_the_softmax_rows():
    q, k, v = qkv(B=1, H=2, Tq=9, D=8)
    out, w = attention(q, k, v, SlidingWindow(3), return_weights=True)
    assert w.shape == (1, 2, 9, 9)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 9, dtype=w.dtype))
    assert (w[..., ~SlidingWindow(3).dense(9, 9)[0]] == 0).all()
    torch.testing.assert_close(out, w @ v)


def test_static_plans_are_cached_and_skip_work():
    pat = SlidingWindow(16)
    p1 = sparse.plan_pattern(pat, 256, 256, 0, 32, torch.device("cpu"))
    p2 = sparse.plan_pattern(SlidingWindow(16), 256, 256, 0, 32, "cpu")
    assert p1 is p2
    tiles = p1.parts[0]
    assert tiles.span is not None  # contiguous windows run on views, not gathered copies
    assert tiles.pairs == pat.count(256, 256)
    assert p1.computed_pairs < 0.3 * 256 * 256


def test_renamed_group_option_fails_loudly():
    q, k, v = qkv(B=1, H=2, Tq=8, D=8, requires_grad=False)
    with pytest.raises(TypeError, match="'group' was renamed to 'q_block'"):
        attention(q, k, v, SlidingWindow(3), backend="blocksparse", group=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'groups'"):
        attention(q, k, v, groups=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 3),
    rep=st.integers(1, 3),
    Tq=st.integers(1, 40),
    extra=st.integers(0, 20),
    D=st.sampled_from([4, 8, 16]),
    which=st.integers(0, len(BASIC) - 1),
    q_block=st.sampled_from([1, 4, 7, 16, 64]),
)
def test_property_blocksparse_equals_reference(B, Hkv, rep, Tq, extra, D, which, q_block):
    pattern = BASIC[which]
    H = Hkv * rep
    if pattern.num_heads is not None:
        pattern = PerHead(tuple(pattern.patterns[i % len(pattern.patterns)] for i in range(H)))
    q, k, v = qkv(B=B, H=H, Hkv=Hkv, Tq=Tq, Tk=Tq + extra, D=D)
    out = attention(q, k, v, pattern, backend="blocksparse", q_block=q_block)
    ref = reference_attention(q, k, v, pattern)
    assert max_err(out, ref) < 1e-10
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-10


# ---- bad input gets a clear error naming the argument ------------------------------------------

def test_errors_name_the_argument():
    q, k, v = qkv(B=1, H=4, Hkv=2, Tq=8, D=8, requires_grad=False)
    with pytest.raises(ValueError, match=r"q must have shape \(batch, heads, seq, head_dim\)"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q[:, :3], k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        attention(q.float(), k, v)
    with pytest.raises(ValueError, match="one device"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="empty sequence"):
        attention(q[:, :, :0], k, v)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        SlidingWindow(0)
    with pytest.raises(ValueError, match="built for sequence length 10"):
        attention(q, k, v, Document((4, 6)))
    with pytest.raises(ValueError, match="per-head pattern has 2 heads"):
        attention(q, k, v, PerHead((Causal(), Full())))
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="fast")
    with pytest.raises(TypeError, match="pattern must be an attnlab Pattern"):
        attention(q, k, v, pattern="causal")
    with pytest.raises(TypeError, match="score_mod must be a ScoreMod"):
        attention(q, k, v, score_mod=lambda s, *a: s)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="serves full and causal attention only"):
        attention(q, k, v, SlidingWindow(3), backend="sdpa")


def test_flex_refuses_cpu_backward_clearly():
    q, k, v = qkv(B=1, H=2, Tq=16, D=8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="no backward"):
        attention(q, k, v, SlidingWindow(4), backend="flex")


# ---- every pattern of the zoo through every sparse engine ----------------------------------------

from pattern_zoo import pattern_zoo  # noqa: E402


@pytest.mark.parametrize("backend", ["blocksparse", "dense_mask"])
@pytest.mark.parametrize("name,pattern,n", pattern_zoo(), ids=[z[0] for z in pattern_zoo()])
def test_every_zoo_pattern_matches_reference(name, pattern, n, backend):
    H = pattern.num_heads or 2
    q, k, v = qkv(B=1, H=H, Hkv=1 if H % 2 else 2, Tq=n, D=8)
    out = attention(q, k, v, pattern, backend=backend, q_block=8)
    ref = reference_attention(q, k, v, pattern)
    assert max_err(out, ref) < 1e-10
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-10
