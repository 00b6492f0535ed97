"""HeadMask (L133): eval == plain MHA exactly; training forwards zero exactly n heads per layer (seen in the heads'
outputs entering W_O), drawn uniformly, varying by step and reproducible by seed; fast path == reference with the
mask (float64, outputs and gradients); impt masks the heads whose importance, recomputed by finite differences of
the definition and by ablation, is highest on a planted model; decode == full forward; bad options raise."""

import copy
import itertools

import pytest
import torch
from layer_checks import build64, check_decoding, check_reference, hidden, one_thread  # noqa: F401
from torch import nn

import attnlab
from attnlab.core.patterns import SlidingWindow
from attnlab.mechanisms.layers.headmask import head_importance, headmask_step
from attnlab.mechanisms.registry import get
from attnlab.models.lm import LMConfig, TransformerLM
from attnlab.testing import grads, max_err

OPTS = [dict(), dict(kv_heads=2, qk_norm=True, bias=True), dict(pattern=SlidingWindow(5), rope=False)]


def capture_heads(layer):
    """Record what enters W_O, as (B, T, H, d): the heads' outputs after masking (a hook, not the layer's code)."""
    seen = []
    H, d = layer.cfg.heads, layer.cfg.d
    handle = layer.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().unflatten(-1, (H, d))))
    return seen, handle


def zero_heads(z):
    """(B, T, H, d) -> (H,) bool: heads that are zero for every example and position."""
    return z.abs().amax(dim=(0, 1, 3)) == 0


def scale_head(layer, h, s):
    """Multiply head h's output by s before W_O (a pre-hook on o_proj: independent of the layer's masking)."""
    d = layer.cfg.d

    def hook(mod, args):
        scale = torch.ones(args[0].shape[-1], dtype=args[0].dtype)
        scale[h * d : (h + 1) * d] = s
        return (args[0] * scale,)

    return layer.o_proj.register_forward_pre_hook(hook)


def test_registered_with_its_paper():
    e = get("headmask")
    assert e.papers == ("L133",) and e.decodes
    assert {"mode", "n_mask", "seed"} <= set(e.as_dict()["config"])


@pytest.mark.parametrize("opts", OPTS)
def test_eval_is_plain_mha_exactly(opts):
    torch.manual_seed(0)
    hm = attnlab.build("headmask", dim=32, heads=4, n_mask=2, **opts)
    mha = attnlab.build("mha", dim=32, heads=4, **opts)
    assert hm.state_dict().keys() == mha.state_dict().keys()
    mha.load_state_dict(hm.state_dict())
    x = torch.randn(2, 11, 32)
    hm.eval()
    assert torch.equal(hm(x), mha(x)) and hm.last_mask is None
    hm0 = attnlab.build("headmask", dim=32, heads=4, n_mask=0, **opts).train()  # nothing to mask
    hm0.load_state_dict(hm.state_dict())
    assert torch.equal(hm0(x), mha(x)) and hm0.last_mask is None


@pytest.mark.parametrize("opts", OPTS)
def test_eval_matches_reference_and_decodes(opts):
    layer = build64("headmask", dim=32, heads=4, **opts).eval()
    check_reference(layer, hidden())
    check_decoding(layer, hidden())


def test_cached_calls_never_mask():
    """Decoding is inference: even in training mode a cache gives the unmasked (eval) outputs."""
    layer, x = build64("headmask", dim=32, heads=4, n_mask=3), hidden().detach()
    with torch.no_grad():
        full = layer.eval()(x)
        layer.train()
        cache = layer.init_cache(2)
        steps = [layer(x[:, :5], cache)] + [layer(x[:, t : t + 1], cache) for t in range(5, x.shape[1])]
    assert max_err(torch.cat(steps, dim=1), full) < 1e-10 and layer.last_mask is None


def test_random_zeroes_exactly_n_heads_per_layer():
    torch.manual_seed(0)
    stack = nn.Sequential(attnlab.build("headmask", dim=32, heads=4, n_mask=1),
                          attnlab.build("headmask", dim=32, heads=4, n_mask=3, kv_heads=2)).train()
    hooks = [capture_heads(layer) for layer in stack]
    x = torch.randn(3, 9, 32)
    for _ in range(5):
        stack(x)
    for layer, n, (seen, handle) in zip(stack, (1, 3), hooks):
        assert len(seen) == 5
        for z in seen:
            zero = zero_heads(z)
            assert int(zero.sum()) == n  # exactly n heads ...
            assert all(torch.equal(zero_heads(z[i : i + 1]), zero) for i in range(3))  # ... the same in every example
            assert bool((z[:, :, ~zero].abs().amax(dim=(0, 1, 3)) > 0).all())
        assert torch.equal(zero_heads(seen[-1]), layer.last_mask)
        handle.remove()


@pytest.mark.parametrize("opts", OPTS)
def test_training_fast_path_matches_reference_with_its_mask(opts):
    layer, x = build64("headmask", dim=32, heads=4, n_mask=2, seed=1, **opts), hidden()
    params = tuple(p for p in layer.parameters() if p.requires_grad)
    y = layer(x)
    mask = layer.last_mask
    assert int(mask.sum()) == 2
    r = layer.reference(x, mask=mask)
    assert max_err(y, r) < 1e-10
    assert max_err(grads(y, (x, *params)), grads(r, (x, *params))) < 1e-9
    # independent: zeroing head i's output before W_O == zeroing W_O's columns of head i
    plain = copy.deepcopy(layer).eval()
    with torch.no_grad():
        for h in mask.nonzero().flatten().tolist():
            plain.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
    assert max_err(plain(x), y) < 1e-12
    # masked heads get no gradient into their query rows or W_O columns; kept heads do
    layer.zero_grad()
    layer.plan_mask(mask)  # the same heads again (a new forward would draw new ones)
    y = layer(x)
    assert torch.equal(layer.last_mask, mask)
    (y * torch.randn_like(y)).sum().backward()
    for h in range(4):
        gq = layer.q_proj.weight.grad[h * 8 : (h + 1) * 8].abs().max()
        go = layer.o_proj.weight.grad[:, h * 8 : (h + 1) * 8].abs().max()
        assert (gq == 0 and go == 0) if mask[h] else (gq > 0 and go > 0)


def _masks(layer, x, steps):
    out = []
    for _ in range(steps):
        layer(x)
        out.append(layer.last_mask.clone())
    return out


def test_random_varies_by_step_and_is_reproducible_by_seed():
    x = torch.randn(1, 5, 16)
    torch.manual_seed(0)
    a = attnlab.build("headmask", dim=16, heads=4, seed=3)
    b = attnlab.build("headmask", dim=16, heads=4, seed=3)  # other weights, same stream
    c = attnlab.build("headmask", dim=16, heads=4, seed=4)
    ma, mb, mc = (_masks(m, x, 20) for m in (a, b, c))
    assert all(torch.equal(p, q) for p, q in zip(ma, mb))
    assert not all(torch.equal(p, q) for p, q in zip(ma, mc))
    assert len({tuple(m.tolist()) for m in ma}) > 1  # varies across steps
    a.reset_rng()
    assert all(torch.equal(p, q) for p, q in zip(_masks(a, x, 20), ma))
    # seed=None: torch's global generator, reproducible with torch.manual_seed, independent across layers
    d, e = attnlab.build("headmask", dim=16, heads=4), attnlab.build("headmask", dim=16, heads=4)

    def run():
        md, me = [], []
        for _ in range(20):  # one training step of a two-layer model at a time
            md += _masks(d, x, 1)
            me += _masks(e, x, 1)
        return md, me

    torch.manual_seed(11)
    md, me = run()
    torch.manual_seed(11)
    md2, me2 = run()
    assert all(torch.equal(p, q) for p, q in zip(md + me, md2 + me2))
    assert not all(torch.equal(p, q) for p, q in zip(md, me))


def test_random_masks_are_uniform_over_subsets():
    layer = attnlab.build("headmask", dim=16, heads=4, n_mask=2, seed=0)
    counts = dict.fromkeys(itertools.combinations(range(4), 2), 0)
    for _ in range(3000):
        m = layer.draw_mask()
        assert int(m.sum()) == 2
        counts[tuple(m.nonzero().flatten().tolist())] += 1
    # 500 expected per subset, standard deviation ~20
    assert all(400 < c < 600 for c in counts.values()), counts


# ---- impt: importance on a planted model ------------------------------------------------------------------
class Planted(nn.Module):
    """Two impt layers in residual form and a readout; one head per layer scaled up so it dominates the loss."""

    def __init__(self, n_mask=1, second="impt", seed=None):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = attnlab.build("headmask", dim=16, heads=4, mode="impt", n_mask=n_mask, rope=False)
        self.l2 = attnlab.build("headmask", dim=16, heads=4, mode=second, n_mask=n_mask, seed=seed)
        self.readout = nn.Linear(16, 3, bias=False)
        self.double()
        with torch.no_grad():
            for layer, h in ((self.l1, 2), (self.l2, 0)):
                layer.v_proj.weight[h * 4 : (h + 1) * 4] *= 6
                layer.o_proj.weight[:, h * 4 : (h + 1) * 4] *= 6

    def forward(self, x):
        h = x + self.l1(x)
        return self.readout(h + self.l2(h))


def batch(B=3):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 7, 16, generator=g, dtype=torch.float64)
    return x, torch.randn(B, 7, 3, generator=g, dtype=torch.float64)


def loss_fn(model, b):
    x, y = b
    return ((model(x) - y) ** 2).mean()


def per_example_losses(model, b):
    x, y = b
    with torch.no_grad():
        return ((model(x) - y) ** 2).mean(dim=(1, 2))


def brute_importance(model, b, eps=1e-5):
    """I_h = sum_b |dL/dxi_{b,h}| by central differences of each example's loss in the head's gate xi_h
    (L = mean_b L_b, so dL/dxi_{b,h} = dL_b/dxi_h / B)."""
    out = {}
    for name in ("l1", "l2"):
        layer = getattr(model, name)
        imp = []
        for h in range(4):
            ls = []
            for s in (1 + eps, 1 - eps):
                handle = scale_head(layer, h, s)
                ls.append(per_example_losses(model, b))
                handle.remove()
            imp.append(((ls[0] - ls[1]) / (2 * eps)).abs().sum() / len(ls[0]))
        out[name] = torch.stack(imp)
    return out


def ablation(model, b):
    """Loss change when each head's output is zeroed, per layer (its size ranks the heads, as |.| in Michel's score)."""
    base = per_example_losses(model, b).mean()
    out = {}
    for name in ("l1", "l2"):
        deltas = []
        for h in range(4):
            handle = scale_head(getattr(model, name), h, 0.0)
            deltas.append(per_example_losses(model, b).mean() - base)
            handle.remove()
        out[name] = torch.stack(deltas)
    return out


def test_importance_is_michels_score():
    model = Planted().eval()
    b = batch()
    imp, ref = head_importance(model, b, loss_fn), brute_importance(model, b)
    assert all(p.grad is None for p in model.parameters())  # the importance pass leaves .grad alone
    for name in ("l1", "l2"):
        assert max_err(imp[name], ref[name]) < 1e-6 * float(ref[name].max())
    abl = ablation(model, b)
    assert int(abl["l1"].abs().argmax()) == int(imp["l1"].argmax()) == 2  # the planted heads lead both rankings
    assert int(abl["l2"].abs().argmax()) == int(imp["l2"].argmax()) == 0


@pytest.mark.parametrize("n_mask", [1, 2])
def test_impt_step_masks_the_most_important_heads(n_mask):
    model, b = Planted(n_mask=n_mask).train(), batch()
    twin = copy.deepcopy(model).eval()
    ref = brute_importance(twin, b)
    res = headmask_step(model, b, loss_fn)
    for name in ("l1", "l2"):
        expect = sorted(torch.topk(ref[name], n_mask).indices.tolist())
        assert res.masked[name].tolist() == expect
        assert max_err(res.importance[name], ref[name]) < 1e-6 * float(ref[name].max())
    assert 2 in res.masked["l1"].tolist()  # the planted heads are among the masked
    assert 0 in res.masked["l2"].tolist()
    # the update is the masked loss's gradient alone: zero the same heads by hooks on the eval twin
    for name in ("l1", "l2"):
        for h in res.masked[name].tolist():
            scale_head(getattr(twin, name), h, 0.0)
    loss = loss_fn(twin, b)
    loss.backward()
    assert max_err(res.loss, loss) < 1e-14
    for p, q in zip(model.parameters(), twin.parameters()):
        assert max_err(p.grad, q.grad) < 1e-12
    assert model.l1._planned is None and model.l2._planned is None  # plans are cleared after the step


def test_random_layers_draw_only_in_the_real_pass():
    model, b = Planted(second="random", seed=5).train(), batch()
    res = headmask_step(model, b, loss_fn)
    fresh = attnlab.build("headmask", dim=16, heads=4, seed=5)
    assert res.masked["l2"].tolist() == fresh.draw_mask().nonzero().flatten().tolist()
    assert res.masked["l1"].tolist() == [2] and set(res.importance) == {"l1"}


def test_impt_in_a_small_lm():
    cfg = LMConfig(vocab=32, dim=32, layers=2, heads=4, mechanisms="headmask",
                   mechanism_options=dict(mode="impt", n_mask=1))
    torch.manual_seed(0)
    model = TransformerLM(cfg).train()
    idx = torch.randint(0, 32, (2, 9))
    res = headmask_step(model, (idx[:, :-1], idx[:, 1:]), lambda m, bt: m(bt[0], bt[1])[1])
    assert set(res.masked) == set(res.importance) == {"blocks.0.attn", "blocks.1.attn"}
    for name, heads in res.masked.items():
        assert heads.tolist() == [int(res.importance[name].argmax())]
    assert all(p.grad is not None for p in model.parameters())


def test_impt_needs_the_step_helper_in_training():
    model = Planted()
    x, _ = batch()
    with pytest.raises(RuntimeError, match="headmask_step"):
        model.train()(x)
    model.eval()(x)  # eval masks nothing and needs no importance
    with pytest.raises(RuntimeError, match="train"):
        headmask_step(model, batch(), loss_fn)


def test_step_errors():
    with pytest.raises(ValueError, match="no headmask layer"):
        headmask_step(nn.Linear(2, 2), None, loss_fn)
    model, b = Planted().train(), batch()
    with pytest.raises(RuntimeError, match="l2"):
        head_importance(model, b, lambda m, bt: m.l1(bt[0]).sum())
    with pytest.raises(ValueError, match="scalar"):
        head_importance(model, b, lambda m, bt: m(bt[0]))
    assert not model.l1._probing and model.l1._gate is None  # state restored after a failure


def test_plan_and_reference_masks_are_checked():
    layer = attnlab.build("headmask", dim=16, heads=4, n_mask=1)
    with pytest.raises(ValueError, match="shape"):
        layer.plan_mask(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        layer.plan_mask(torch.zeros(4))
    with pytest.raises(ValueError, match="n_mask=1"):
        layer.plan_mask(torch.tensor([True, True, False, False]))
    with pytest.raises(ValueError, match="shape"):
        layer.reference(torch.randn(1, 3, 16), mask=torch.zeros(5, dtype=torch.bool))
    layer.plan_mask(torch.tensor([False, False, True, False]))
    seen, _ = capture_heads(layer)
    layer(torch.randn(1, 3, 16))
    assert zero_heads(seen[0]).tolist() == [False, False, True, False]


@pytest.mark.parametrize("bad,match", [(dict(mode="dropout"), "mode"), (dict(n_mask=-1), "n_mask"),
                                       (dict(n_mask=4), "n_mask"), (dict(n_mask=True), "n_mask"),
                                       (dict(n_mask=1.0), "n_mask"), (dict(seed=-1), "seed"),
                                       (dict(seed="0"), "seed"), (dict(seed=True), "seed")])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        attnlab.build("headmask", dim=16, heads=4, **bad)
