import pytest
import torch
from layer_checks import build64, check_decoding, check_reference, hidden, one_thread  # noqa: F401

import attnlab
from attnlab.core.patterns import SlidingWindow
from attnlab.testing import max_err


@pytest.mark.parametrize("opts", [dict(), dict(gate_hidden=8, kv_heads=2), dict(pattern=SlidingWindow(5))])
def test_matches_reference_and_decodes(opts):
    layer = build64("mae", dim=32, heads=4, **opts)
    check_reference(layer, hidden())
    check_decoding(layer, hidden())


def test_one_hot_responsibility_is_mha_without_that_head():
    """A gate that always picks expert 2 gives MHA with head 2 dropped, scaled by h / (h - 1)."""
    layer = build64("mae", dim=32, heads=4)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.bias.copy_(torch.tensor([-1e4, -1e4, 1e4, -1e4]))
        mha = build64("mha", dim=32, heads=4)
        mha.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("gate")})
        mha.o_proj.weight[:, 16:24] = 0  # head 2's slice of W_O
        x = hidden().detach()
        assert max_err(layer(x), mha(x) * 4 / 3) < 1e-12


def test_responsibilities_and_phases():
    layer = build64("mae", dim=32, heads=4, gate_hidden=6)
    r = layer.responsibilities(hidden().detach())
    assert max_err(r.sum(-1), torch.ones(2, 21)) < 1e-12
    layer.set_phase("gate")
    layer(hidden()).square().sum().backward()
    assert layer.gate[0].weight.grad is not None and layer.q_proj.weight.grad is None
    layer.zero_grad(set_to_none=True)
    layer.set_phase("experts")
    layer(hidden()).square().sum().backward()
    assert layer.gate[0].weight.grad is None and layer.q_proj.weight.grad is not None
    layer.set_phase("joint")
    assert all(p.requires_grad for p in layer.parameters())
    with pytest.raises(ValueError, match="phase"):
        layer.set_phase("both")


def test_needs_two_heads():
    with pytest.raises(ValueError, match="heads >= 2"):
        attnlab.build("mae", dim=32, heads=1)
