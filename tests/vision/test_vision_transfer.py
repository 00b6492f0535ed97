"""V124 attention transfer (maps, distillation, copy), V292's attention diversification loss and V210's APLA
on ViTs built here: known answers and gradients reaching exactly what each method trains."""

from __future__ import annotations

import copy

import pytest
import torch

from attnlab.vision import build_vit
from attnlab.vision.apla import apla
from attnlab.vision.attn_transfer import attention_maps, copy_logits, distillation_loss
from attnlab.vision.robust import diversification_loss

IMG = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def vit(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_vit(image_size=8, patch=2, dim=16, heads=2, depth=2, classes=3, **kw).double()


def test_maps_are_the_models_own_attention():
    """The maps reproduce the model: recomputing the forward from them gives the model's logits, and each row
    is a distribution over the tokens."""
    m = vit(0)
    maps = attention_maps(m, IMG)
    assert len(maps) == 2 and maps[0].shape == (3, 2, 16, 16)
    assert torch.allclose(maps[0].sum(-1), torch.ones(3, 2, 16, dtype=torch.float64))
    assert torch.allclose(copy_logits(m, maps, IMG), m(IMG), atol=1e-12)
    with pytest.raises(TypeError, match="dense softmax"):
        attention_maps(vit(0, mixer="window"), IMG)


def test_distillation_loss_known_answers_and_gradients():
    t = vit(0)
    s = vit(1)
    tm = [a.detach() for a in attention_maps(t, IMG)]
    assert float(distillation_loss(tm, tm)) == pytest.approx(0.0, abs=1e-10)
    loss = distillation_loss(attention_maps(s, IMG), tm)
    assert float(loss.detach()) > 1e-4
    loss.backward()
    qk = [b.mixer.q_proj.weight.grad for b in s.blocks]
    assert all(g is not None and g.abs().max() > 0 for g in qk)  # the student's queries learn from the maps
    assert all(p.grad is None for p in t.parameters())
    with pytest.raises(ValueError, match="maps"):
        distillation_loss(tm[:1], tm)


def test_attention_copy_trains_no_queries_or_keys():
    t, s = vit(0), vit(1)
    tm = [a.detach() for a in attention_maps(t, IMG)]
    copy_logits(s, tm, IMG).sum().backward()
    for b in s.blocks:
        assert b.mixer.q_proj.weight.grad is None and b.mixer.k_proj.weight.grad is None
        assert b.mixer.v_proj.weight.grad.abs().max() > 0
    # a student with its own weights and the teacher's maps differs from the student alone
    assert not torch.allclose(copy_logits(s, tm, IMG), s(IMG))


def test_diversification_loss_known_answers():
    same = torch.softmax(torch.randn(1, 1, 1, 5), -1).expand(2, 3, 4, 5)
    assert float(diversification_loss(same)) == pytest.approx(1.0)
    onehot = torch.eye(4)[None, None]  # disjoint rows
    assert float(diversification_loss(onehot)) == pytest.approx(0.0)
    two = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])  # cos = 1 / sqrt(2) both ways
    assert float(diversification_loss([two, onehot])) == pytest.approx((2**-0.5 + 0.0) / 2)
    with pytest.raises(ValueError, match="N >= 2"):
        diversification_loss(torch.ones(1, 1, 1, 3))
    maps = attention_maps(vit(0), IMG)
    loss = diversification_loss(maps)
    assert 0 < float(loss.detach()) < 1
    loss.backward()


def test_apla_trains_only_the_chosen_projection_columns():
    m = vit(0)
    before = copy.deepcopy(m.state_dict())
    params = apla(m, fraction=0.25, seed=3)
    assert len(params) == 2 + 2  # two o_proj weights, the head's weight and bias
    opt = torch.optim.SGD(params, lr=0.1)
    torch.nn.functional.cross_entropy(m(IMG), torch.tensor([0, 1, 2])).backward()
    opt.step()
    after = m.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"blocks.0.mixer.o_proj.weight", "blocks.1.mixer.o_proj.weight", "head.weight", "head.bias"}
    for i in range(2):
        proj = m.blocks[i].mixer.o_proj
        moved = (after[f"blocks.{i}.mixer.o_proj.weight"] != before[f"blocks.{i}.mixer.o_proj.weight"]).any(0)
        assert int(proj.apla_columns.sum()) == 4  # 0.25 of 16 columns
        assert not moved[~proj.apla_columns].any() and moved[proj.apla_columns].all()


def test_apla_errors():
    with pytest.raises(ValueError, match="fraction"):
        apla(vit(0), fraction=1.5)
    with pytest.raises(TypeError, match="o_proj"):
        apla(vit(0, mixer="lka"))


def test_forward_with_maps_equals_the_model():
    from attnlab.vision.attn_transfer import forward_with_maps

    m = vit(0)
    logits, maps = forward_with_maps(m, IMG)
    assert torch.allclose(logits, m(IMG), atol=1e-12) and len(maps) == 2


# ---- DCAL (V89) -----------------------------------------------------------------------------------------
def _mha_layer():
    from attnlab.mechanisms.registry import build

    torch.manual_seed(5)
    return build("mha", dim=16, heads=2, kv_heads=1, causal=False, rope=False, pattern=None).double()


def test_pwca_reference_gradients_and_duplicate_keys():
    from attnlab.testing import grads, max_err
    from attnlab.vision.dcal import pair_cross_attention, pair_cross_attention_ref

    layer = _mha_layer()
    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(2, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    out, ref = pair_cross_attention(layer, x1, x2), pair_cross_attention_ref(layer, x1, x2)
    assert max_err(out, ref) < 1e-10
    params = (x1, x2, *layer.parameters())
    assert max_err(grads(out, params), grads(ref, params)) < 1e-9
    # the distractor being the image itself duplicates every key: the softmax average is unchanged
    assert torch.allclose(pair_cross_attention(layer, x1, x1), layer(x1), atol=1e-12)
    assert not torch.allclose(out, layer(x1))


def test_glca_rollout_and_selection():
    from attnlab.vision.dcal import attention_rollout, global_local_cross_attention, token_scores

    eye = torch.eye(5)[None, None].expand(2, 3, 5, 5)
    assert torch.allclose(attention_rollout([eye, eye]), torch.eye(5).expand(2, 5, 5))
    a = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    r = attention_rollout([a, a.flip(-1)], residual=0.3)
    assert torch.allclose(r.sum(-1), torch.ones(2, 5))
    assert torch.allclose(attention_rollout([a], residual=0.0), a.mean(1))
    layer = _mha_layer()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    scores = torch.randn(2, 9)
    out, idx = global_local_cross_attention(layer, x, scores, 3)
    assert torch.equal(idx, scores.topk(3).indices)
    full = layer(x)  # a selected query attends to all keys: its row of plain self-attention
    assert torch.allclose(out, full.gather(1, idx[..., None].expand(-1, -1, 16)), atol=1e-12)
    assert token_scores(r, cls=True).shape == (2, 5)
    assert torch.allclose(token_scores(r, cls=False), r.mean(1))
    with pytest.raises(ValueError, match="top"):
        global_local_cross_attention(layer, x, scores, 10)
    with pytest.raises(ValueError, match="residual"):
        attention_rollout([a], residual=2)
