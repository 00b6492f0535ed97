import math

import pytest
import torch
from layer_checks import one_thread  # noqa: F401

from attnlab.models.lm import LMConfig, TransformerLM

MINE = ("mha", "moh", "mae", "mhe", "cascaded", "diff", "shared_diff")


def tiny(mechanisms, **kw) -> TransformerLM:
    torch.manual_seed(0)
    layers = 1 if isinstance(mechanisms, str) else len(mechanisms)
    return TransformerLM(LMConfig(vocab=32, dim=32, layers=kw.pop("layers", layers), heads=4,
                                  mechanisms=mechanisms, **kw))


def test_initial_loss_is_uniform_and_shapes():
    model = tiny("mha", layers=2)
    idx, tgt = torch.randint(0, 32, (2, 3, 12), generator=torch.Generator().manual_seed(0))
    logits, loss = model(idx, tgt)
    assert logits.shape == (3, 12, 32)
    assert abs(float(loss.detach()) - math.log(32)) < 0.2
    assert model(idx)[1] is None


def test_hybrid_stack_learns_a_sequence():
    model = tiny(("moh", "diff"), mechanism_options=({}, {"heads": 2}))
    seq = torch.arange(24).remainder(7).unsqueeze(0).repeat(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first


def test_generate_with_caches_equals_recompute():
    model = tiny(MINE, mechanism_options=({}, {}, {}, {}, {}, {"heads": 2}, {"heads": 2, "rank": 2})).eval()
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    a = model.generate(prompt, 8, temperature=0)
    b = model.generate(prompt, 8, temperature=0, use_cache=False)
    assert a.shape == (2, 13) and torch.equal(a, b)
    g = torch.Generator().manual_seed(3)
    s = model.generate(prompt, 4, temperature=1.0, top_k=5, generator=g)
    assert torch.equal(s[:, :5], prompt)


def test_aux_losses_are_added():
    model = tiny("moh", mechanism_options={"balance_coef": 10.0})
    idx = torch.randint(0, 32, (2, 10))
    logits, loss = model(idx, idx)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    _, aux = model.blocks[0].attn.forward_with_aux(model.blocks[0].norm1(model.embed(idx)))
    bal = float(aux["moh_balance"].detach())
    assert abs(float((loss - ce).detach()) - bal) < 1e-5 and bal > 0


def test_options_reach_layers_and_errors_are_clear():
    model = tiny(("mha", "diff"), mechanism_options={"kv_heads": 2, "depth": 3})
    assert model.blocks[0].attn.cfg.kv_heads == 2 and model.blocks[1].attn.cfg.depth == 3
    with pytest.raises(KeyError, match="unknown mechanism"):
        LMConfig(mechanisms="nope", layers=1)
    with pytest.raises(TypeError, match="fit none"):
        LMConfig(mechanisms=("mha", "diff"), layers=2, mechanism_options={"windw": 3})
    with pytest.raises(ValueError, match="layers"):
        LMConfig(mechanisms=("mha",), layers=2)
