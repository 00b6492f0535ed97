import pytest
import torch
from layer_checks import build64, check_decoding, check_reference, hidden, one_thread  # noqa: F401

import attnlab
from attnlab.core.patterns import Causal
from attnlab.mechanisms.layers.moh import TwoPartAttention, routed_attention
from attnlab.testing import grads, max_err, qkv

CONFIGS = {
    "default": dict(),
    "chunked": dict(chunk=4, qk_norm=True),  # several chunks: the two-part kernel path
    "no-shared": dict(shared_heads=0, active_heads=3, chunk=5),
    "bidirectional": dict(causal=False, chunk=6),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_reference(name):
    layer = build64("moh", dim=32, heads=8, **CONFIGS[name])
    check_reference(layer, hidden())
    if layer.cfg.causal:
        check_decoding(layer, hidden())
    else:
        with pytest.raises(TypeError):
            layer.init_cache()


def test_gates_select_active_heads():
    layer = build64("moh", dim=32, heads=8, shared_heads=2, active_heads=5)
    g, selected, probs = layer.gates(hidden().detach())
    assert g.shape == (2, 21, 8)
    assert bool((selected.sum(-1) == 3).all())
    assert bool(((g != 0).sum(-1) == 5).all())  # shared always on + top-3 routed
    assert bool((g.sum(-1) <= 1 + 1e-12).all()) and bool((g >= 0).all())
    top = probs.topk(3, dim=-1).values[..., -1:]
    assert torch.equal(selected, probs >= top)


def test_balance_loss_formula_and_gradient():
    layer = build64("moh", dim=32, heads=8, balance_coef=0.5)
    x = hidden()
    _, aux = layer.forward_with_aux(x)
    _, selected, probs = layer.gates(x)
    n_tok = selected.shape[0] * selected.shape[1]
    expect = sum(
        float(selected[..., i].sum()) / n_tok * float(probs[..., i].detach().sum()) / n_tok for i in range(6)
    )
    assert abs(float(aux["moh_balance"].detach()) - 0.5 * expect) < 1e-12
    aux["moh_balance"].backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_unselected_queries_are_never_read():
    """The routed path gathers only selected queries: NaN queries elsewhere do not reach the output."""
    q, k, v = qkv(B=2, H=3, Tq=12, Tk=12, requires_grad=False)
    sel = torch.rand(2, 3, 12, generator=torch.Generator().manual_seed(0)) < 0.4
    sel[0, 1] = False  # a head nobody chose
    ref = attnlab.reference_attention(q, k, v, Causal()) * sel.unsqueeze(-1)
    q_nan = q.masked_fill(~sel.unsqueeze(-1), float("nan"))
    for chunk in (1, 4, 12):
        out = routed_attention(q_nan, k, v, sel, 0, True, chunk)
        assert max_err(out[sel], ref[sel]) < 1e-12
        assert bool((out[0, 1] == 0).all())


def test_routed_attention_with_offset_and_gradients():
    q, k, v = qkv(B=1, H=2, Tq=5, Tk=13)
    sel = torch.tensor([[[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]]], dtype=torch.bool)
    out = routed_attention(q, k, v, sel, 8, True, 2)
    ref = attnlab.reference_attention(q, k, v, Causal(), q_offset=8) * sel.unsqueeze(-1)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_two_part_attention_is_the_softmax_over_the_union():
    q, k, v = qkv(B=2, H=2, Tq=6, Tk=11)
    mask = torch.zeros(2, 2, 6, 4, dtype=torch.float64)
    mask[..., 2:] = float("-inf")  # some keys of part B hidden
    out = TwoPartAttention.apply(q, k[:, :, :7], v[:, :, :7], k[:, :, 7:], v[:, :, 7:], mask, 0.25)
    bias = torch.cat([torch.zeros(2, 2, 6, 7, dtype=torch.float64), mask], dim=-1)
    s = q @ k.transpose(-1, -2) * 0.25 + bias
    ref = torch.softmax(s, dim=-1) @ v
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_bad_configs():
    with pytest.raises(ValueError, match="active_heads"):
        attnlab.build("moh", dim=32, heads=8, shared_heads=2, active_heads=2)
    with pytest.raises(ValueError, match="shared_heads"):
        attnlab.build("moh", dim=32, heads=8, shared_heads=8)
