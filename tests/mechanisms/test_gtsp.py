"""GTSP [D66]: masks at 1 = the unmasked model; a pruned head / layer / node / weight removed = masked;
gradients reach every mask's logits; pruning keeps the requested ratio; the sparsity penalty lowers the gates."""

import pytest
import torch
import torch.nn.functional as F

from attnlab.mechanisms.gtsp import (
    GTSP,
    KINDS,
    GraphTransformer,
    GTConfig,
    head_importance,
    make_graphs,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed=0):
    torch.manual_seed(seed)
    model = GraphTransformer(GTConfig(dim=16, heads=4, layers=3)).double()
    x, adj, y = make_graphs(6, nodes=10, seed=seed)
    return model, x.double(), adj, y


def test_masks_at_one_are_the_unmasked_model():
    model, x, adj, _ = _setup()
    c = model.c
    ones_w = [{n: torch.ones_like(getattr(b, n).lin.weight) for n in ("q", "k", "v", "o", "f1", "f2")}
              for b in model.blocks]
    out = model(x, adj, torch.ones(6, 10, dtype=x.dtype), torch.ones(c.layers, c.heads, dtype=x.dtype),
                torch.ones(c.layers, dtype=x.dtype), ones_w)
    assert torch.equal(out, model(x, adj))


def test_removed_head_equals_masked_head():
    model, x, adj, _ = _setup()
    hg = torch.ones(3, 4, dtype=x.dtype)
    hg[1, 2] = 0
    hg[0, 0] = 0
    masked = model(x, adj, head_gate=hg)
    removed = model(x, adj, heads=[[1, 2, 3], [0, 1, 3], [0, 1, 2, 3]])
    assert (masked - removed).abs().max() < 1e-12
    assert (masked - model(x, adj)).abs().max() > 1e-6


def test_removed_layer_equals_masked_layer():
    model, x, adj, _ = _setup()
    lg = torch.tensor([1.0, 0.0, 1.0], dtype=x.dtype)
    masked = model(x, adj, layer_gate=lg)
    assert (masked - model(x, adj, layers=[0, 2])).abs().max() < 1e-12
    assert (masked - model(x, adj)).abs().max() > 1e-6


def test_removed_node_equals_masked_node():
    model, x, adj, _ = _setup()
    ng = torch.ones(6, 10, dtype=x.dtype)
    ng[:, 3] = 0
    masked = model(x, adj, node_gate=ng)
    keep = [i for i in range(10) if i != 3]
    removed = model(x[:, keep], adj[:, keep][:, :, keep])
    assert (masked - removed).abs().max() < 1e-12
    assert (masked - model(x, adj)).abs().max() > 1e-6


def test_removed_weights_equal_masked_weights():
    model, x, adj, _ = _setup()
    g = torch.Generator().manual_seed(1)
    gates = [{n: (torch.rand(getattr(b, n).lin.weight.shape, generator=g) > 0.5).double()
              for n in ("q", "k", "v", "o", "f1", "f2")} for b in model.blocks]
    masked = model(x, adj, weight_gate=gates)
    with torch.no_grad():  # materialise: zero the pruned entries, drop the masks
        for b, d in zip(model.blocks, gates):
            for n, m in d.items():
                getattr(b, n).lin.weight.mul_(m)
    assert (masked - model(x, adj)).abs().max() < 1e-12


def test_gradients_reach_every_mask_logit():
    model, x, adj, y = _setup()
    w = GTSP(model).double()
    out, pen = w(x, adj, noise=True)
    (F.cross_entropy(out, y) + 0.1 * pen).backward()
    assert float(w.node_scorer.weight.grad.abs().sum()) > 0
    assert bool((w.head_logits.grad != 0).all()) and bool((w.layer_logits.grad != 0).all())
    assert all(float(p.grad.abs().sum()) > 0 for d in w.weight_logits for p in d.values())
    assert head_importance(w, x, adj, y).shape == (3, 4)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_pruning_hits_the_requested_ratio(ratio):
    model, x, adj, _ = _setup()
    w = GTSP(model).double()
    with torch.no_grad():  # distinct logits so the ranking is defined
        w.head_logits.copy_(torch.randn(3, 4))
        w.node_scorer.weight.copy_(torch.randn(1, 8))
    w.prune({k: ratio for k in KINDS})
    g = w.gates(x)
    assert int(g["heads"].sum()) == round(ratio * 12)
    assert int(g["layers"].sum()) == max(1, round(ratio * 3))
    assert bool((g["nodes"].sum(1) == round(ratio * 10)).all())
    n = sum(t.numel() for d in g["weights"] for t in d.values())
    assert int(sum(t.sum() for d in g["weights"] for t in d.values())) == round(ratio * n)
    kept = w.head_logits.detach().flatten()[g["heads"].flatten().bool()]
    dropped = w.head_logits.detach().flatten()[~g["heads"].flatten().bool()]
    assert float(kept.min()) > float(dropped.max())  # the highest logits are kept


def test_bad_ratios_fail_naming_them():
    w = GTSP(_setup()[0])
    with pytest.raises(ValueError, match="kind"):
        w.prune({"neurons": 0.5})
    with pytest.raises(ValueError, match="heads"):
        w.prune({"heads": 0.0})
    with pytest.raises(ValueError, match="heads"):
        GTConfig(dim=10, heads=4)


def test_sparsity_penalty_lowers_the_gates():
    x, adj, y = make_graphs(64, nodes=8, seed=2)
    means = []
    for lam in (0.0, 1.0):
        torch.manual_seed(0)
        w = GTSP(GraphTransformer(GTConfig(dim=16, heads=2, layers=2)))
        train(w, x, adj, y, steps=15, lam=lam, lr=0.05, batch=16)
        means.append(float(torch.sigmoid(w.head_logits.detach()).mean() + torch.sigmoid(w.layer_logits.detach()).mean()))
    assert means[1] < means[0] - 0.05
