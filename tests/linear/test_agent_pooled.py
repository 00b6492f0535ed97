"""Agent attention, non-causal form (R55): pooled agents, agent biases, depthwise convolution. Fast path vs the
float64 formula (outputs and gradients, 1-D and 2-D), known answers, bad inputs."""

from __future__ import annotations

import pytest
import torch

from attnlab import ops
from attnlab.testing import grads, max_err, qkv

F64 = torch.float64
D = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).requires_grad_()


CASES = {
    "1d": dict(T=23, opts=lambda H, T: dict(agents=5, bias_agent=_rand(H, 5, T, seed=1),
                                            bias_query=_rand(H, T, 5, seed=2), dwc=_rand(H, D, 3, seed=3))),
    "2d": dict(T=30, opts=lambda H, T: dict(grid=(5, 6), agents=(2, 4), bias_agent=_rand(H, 8, T, seed=1),
                                            bias_query=_rand(H, T, 8, seed=2), dwc=_rand(H, D, 3, 5, seed=3))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_equals_float64_formula_with_biases_and_dwc(case):
    T = CASES[case]["T"]
    q, k, v = qkv(2, 4, 2, T, D=D, seed=4)
    opts = CASES[case]["opts"](4, T)
    params = (q, k, v, *(t for t in opts.values() if isinstance(t, torch.Tensor)))
    out = ops.get("agent_pooled")(q, k, v, **opts)
    ref = ops.reference("agent_pooled", q, k, v, **opts)
    assert out.shape == (2, 4, T, D)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, params), grads(ref, params)) < 1e-10
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    o32 = {n: t.detach().float() if isinstance(t, torch.Tensor) else t for n, t in opts.items()}
    assert max_err(ops.get("agent_pooled")(q32, k32, v32, **o32), ref) < 1e-5
    # each part matters
    for drop in ("bias_agent", "bias_query", "dwc"):
        less = {n: t for n, t in opts.items() if n != drop}
        assert max_err(ops.get("agent_pooled")(q, k, v, **less), out) > 1e-3, drop


def test_known_answers():
    op = ops.get("agent_pooled")
    q, k, v = qkv(1, 2, 2, 12, D=D, requires_grad=False, seed=5)
    # one agent = the mean query: every row reads the same softmax(mean(q) k^T) v
    one = op(q, k, v, agents=1)
    a = q.mean(2, keepdim=True)
    want = torch.softmax(a @ k.transpose(-1, -2) * D**-0.5, -1) @ v
    assert max_err(one, want.expand_as(one)) < 1e-12
    # an identity kernel (1 at the centre) adds v itself
    w = torch.zeros(2, D, 3, dtype=F64)
    w[:, :, 1] = 1
    assert max_err(op(q, k, v, agents=3, dwc=w) - op(q, k, v, agents=3), v) < 1e-12
    # agents pooled from the queries: moving one query moves its bin's agent, hence every row's output
    q2 = q.clone()
    q2[:, :, 0] += 1.0
    assert max_err(op(q2, k, v, agents=3)[:, :, 5:], op(q, k, v, agents=3)[:, :, 5:]) > 1e-4
    # cross-attention (q_len != kv_len) without dwc
    assert op(q[:, :, :7], k, v, agents=3).shape == (1, 2, 7, D)


def test_bad_inputs_fail_naming_them():
    op = ops.get("agent_pooled")
    q, k, v = qkv(1, 2, 1, 12, D=D, requires_grad=False)
    with pytest.raises(ValueError, match="mask"):
        op(q, k, v, mask=torch.ones(1, 1, 12, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="agents"):
        op(q, k, v, agents=13)
    with pytest.raises(ValueError, match="agents"):
        op(q, k, v, agents=0)
    with pytest.raises(ValueError, match="grid"):
        op(q, k, v, grid=(3, 5))
    with pytest.raises(ValueError, match="agents"):
        op(q, k, v, grid=(3, 4), agents=(4, 2))
    with pytest.raises(ValueError, match="bias_agent"):
        op(q, k, v, agents=3, bias_agent=torch.zeros(2, 4, 12, dtype=F64))
    with pytest.raises(ValueError, match="bias_query"):
        op(q, k, v, agents=3, bias_query=torch.zeros(2, 12, 2, dtype=F64))
    with pytest.raises(ValueError, match="dwc"):
        op(q, k, v, agents=3, dwc=torch.zeros(2, D, 4, dtype=F64))
    with pytest.raises(ValueError, match="dwc"):
        op(q, k, v, grid=(3, 4), agents=2, dwc=torch.zeros(2, D, 3, dtype=F64))
    with pytest.raises(ValueError, match="q_len == kv_len"):
        op(q[:, :, :6], k, v, agents=2, dwc=torch.zeros(2, D, 3, dtype=F64))
