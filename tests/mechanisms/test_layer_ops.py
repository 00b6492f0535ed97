"""The ops of layers whose weights are not a softmax of dot products (cog, relu_attn, gaam, neural_attn, mta,
sentinel, rcmha, lla): with their learned per-head tensors given as options (the catalogue test runs their
parameter-free defaults), the fast path equals the float64 reference in outputs and gradients (q, k, v and the
tensors), decodes token by token, and a tensor of the wrong shape fails naming the option. Known answers for the
defaults; each layer equals its op applied to its own projections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_checks import one_thread  # noqa: F401

import attnlab
from attnlab import ops
from attnlab.testing import grads, max_err, qkv

B, H, HKV, T, D = 2, 4, 2, 11, 6
TOL = 1e-10


def _tensors(name: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """Random per-head options of op ``name`` (float64, requiring grad), not near the defaults."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, pos=False):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5
        return (t.exp() if pos else t).requires_grad_(True)

    return {
        "gaam": lambda: {"offset": r(H, 2), "var_scale": r(H, 2, pos=True)},
        "neural_attn": lambda: {"w1": r(H, 5, 2 * D), "b1": r(H, 5), "w2": r(H, 5)},
        "mta": lambda: {"query_kernel": 2, "key_kernel": 3, "head_kernel": 2, "theta": r(H, 2, 3),
                        "head_mix": r(H // 2, 2, 2)},
        "sentinel": lambda: {"sink_key": r(H, D), "sink_value": r(B, H, T, D)},
        "rcmha": lambda: {"u": r(H, D), "w": r(H, D), "pos_proj": r(H * D, H * D)},
    }[name]()


TENSOR_OPS = ["gaam", "neural_attn", "mta", "sentinel", "rcmha"]


@pytest.mark.parametrize("name", TENSOR_OPS)
def test_tensor_options_fast_equals_reference(name):
    spec = ops.get(name)
    q, k, v = qkv(B, H, HKV, T, D=D, seed=1)
    opts = _tensors(name)
    tensors = tuple(t for t in opts.values() if isinstance(t, torch.Tensor))
    out = spec(q, k, v, **opts)
    ref = ops.reference(spec, q, k, v, **opts)
    assert ref.dtype == torch.float64 and max_err(out, ref) < TOL
    inputs = (q, k, v, *tensors)
    assert max_err(grads(out, inputs), grads(ref, inputs)) < TOL
    assert max_err(out, spec(q, k, v, **{n: x for n, x in opts.items() if not isinstance(x, torch.Tensor)})) > 1e-3


@pytest.mark.parametrize("name", TENSOR_OPS)
def test_tensor_options_decode(name):
    spec = ops.get(name)
    q, k, v = qkv(B, H, HKV, T, D=D, seed=2, requires_grad=False)
    opts = {n: x.detach() if isinstance(x, torch.Tensor) else x for n, x in _tensors(name).items()}
    full = spec(q, k, v, **opts)
    state, outs = ops.OpState(), []
    for s, e in [(0, 4)] + [(i, i + 1) for i in range(4, T)]:
        step = dict(opts)
        if name == "sentinel":  # the per-query sink value of these rows
            step["sink_value"] = opts["sink_value"][:, :, s:e]
        out, state = spec(q[:, :, s:e], k[:, :, :e], v[:, :, :e], q_offset=s, state=state, **step)
        outs.append(out)
    assert max_err(torch.cat(outs, 2), full) < TOL


@pytest.mark.parametrize("name,option", [("gaam", "offset"), ("neural_attn", "w2"), ("mta", "theta"),
                                         ("sentinel", "sink_key"), ("rcmha", "pos_proj")])
def test_wrong_tensor_shape_names_the_option(name, option):
    q, k, v = qkv(B, H, HKV, T, D=D, requires_grad=False)
    opts = _tensors(name)
    opts[option] = torch.zeros(3, 3, 3)
    with pytest.raises(ValueError, match=option):
        ops.get(name)(q, k, v, **opts)


def test_parameter_free_defaults_known_answers():
    q, k, v = qkv(1, 2, 2, 7, D=4, seed=3, requires_grad=False)
    s = q @ k.transpose(-1, -2) / 2
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    e = s.exp() * causal
    # sentinel: a null sink of score 0 ("softmax plus one")
    want = (e @ v) / (1 + e.sum(-1, keepdim=True))
    assert max_err(ops.get("sentinel")(q, k, v), want) < TOL
    # neural_attn: the additive score with identity weights, sum_c gelu(q_c + k_c) / sqrt(d)
    add = F.gelu(q[:, :, :, None] + k[:, :, None]).sum(-1) / 2
    assert max_err(ops.get("neural_attn")(q, k, v), torch.softmax(add.masked_fill(~causal, -torch.inf), -1) @ v) < TOL
    # relu_attn: relu(S) / (i + 1); cog: sign(S) softmax(|S|)
    n = torch.arange(1, 8, dtype=torch.float64).view(7, 1)
    assert max_err(ops.get("relu_attn")(q, k, v), (s.relu() * causal / n) @ v) < TOL
    cog = torch.sign(s) * torch.softmax(s.abs().masked_fill(~causal, -torch.inf), -1)
    assert max_err(ops.get("cog")(q, k, v), cog @ v) < TOL
    # mta: all sizes 1 is softmax attention; lla: ridge -> inf is softmax attention
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert max_err(ops.get("mta")(q, k, v), sdpa) < TOL
    assert max_err(ops.get("lla")(q, k, v, ridge=1e12), sdpa) < 1e-9
    # rcmha: u = w = 0 and W_R = I add q . sinusoid(i - j) per head
    from attnlab.mechanisms.layers.rcmha import sinusoid

    dist = (torch.arange(7.0)[:, None] - torch.arange(7.0)[None, :]).reshape(-1).double()
    p = sinusoid(dist, 8).view(7, 7, 2, 4).permute(2, 0, 1, 3)  # (H, i, j, d)
    rel = s + torch.einsum("bhid,hijd->bhij", q, p) / 2
    assert max_err(ops.get("rcmha")(q, k, v), torch.softmax(rel.masked_fill(~causal, -torch.inf), -1) @ v) < TOL


@pytest.mark.parametrize("name,opts", [("cog", {"chunk": 4}), ("relu_attn", {"chunk": 4}),
                                       ("gaam", {"chunk": 4, "gaussians": 2}), ("neural_attn", {"hidden": 8}),
                                       ("mta", {}), ("lla", {"mode": "parallel"})])
def test_layer_is_projections_plus_its_op(name, opts):
    torch.manual_seed(0)
    layer = attnlab.build(name, dim=16, heads=4, **opts).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    assert layer.op == name
    q, k, v = layer.project(x, 0)
    o = ops.get(name)(q, k, v, scale=layer.head_dim**-0.5, q_offset=0, **layer.op_options())
    assert max_err(layer(x), layer.out(o)) < TOL


def test_luong_concat_is_neural_attn_with_tanh():
    torch.manual_seed(0)
    layer = attnlab.build("luong", dim=16, heads=2, score="concat", chunk=4).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    assert layer.op == "neural_attn"
    assert max_err(layer(x), layer.reference(x)) < TOL
    bad = {"activation": "relu"}
    q, k, v = qkv(1, 2, 2, 5, D=4, requires_grad=False)
    with pytest.raises(ValueError, match="activation"):
        ops.get("neural_attn")(q, k, v, **bad)
