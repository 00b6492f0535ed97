"""The linear forms as ops (``attnlab.ops.linear``): every mode equals the op's float64 parallel reference (outputs
and gradients), a chunked prefill then token-by-token decoding with the ``OpState`` equals the full form,
grouped-query keys work, and bad options or a free mask fail naming what is wrong."""

from __future__ import annotations

import pytest
import torch

from attnlab import ops
from attnlab.ops import OpState
from attnlab.testing import grads, max_err, qkv

CASES = [  # (op, options)
    ("linear", {}),
    ("linear", {"feature_map": "taylor"}),
    ("linear", {"feature_map": "relu", "normalize": False}),
    ("retention", {}),
    ("retention", {"decay": (0.9, 0.5, 1.0, 0.7)}),
    ("lightning", {"layer_idx": 1, "layers": 3}),
    ("cumulative_softmax", {"q_map": "silu"}),
    ("cumulative_softmax", {"q_map": "softmax"}),
]
T = 13


def _ids(case):
    return f"{case[0]}-" + "-".join(f"{k}={v}" for k, v in case[1].items())


def test_registered_as_recurrent_linear_ops() -> None:
    for name in ("linear", "retention", "lightning", "cumulative_softmax"):
        spec = ops.get(name)
        assert spec.family == "linear" and spec.cache == "recurrent" and spec.reference is not None
        assert "chunk" in spec.options and "mode" in spec.options


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("mode", ["parallel", "chunked", "recurrent"])
def test_every_mode_equals_the_float64_reference(case, mode) -> None:
    name, opts = case
    spec = ops.get(name)
    q, k, v = qkv(B=2, H=4, Hkv=2, Tq=T, D=4)
    out = spec(q, k, v, mode=mode, chunk=4, **opts)
    ref = spec.reference(q, k, v, **spec.resolve(opts))
    assert out.shape == (2, 4, T, 4)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-10


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_chunked_prefill_then_decoding_equals_the_full_form(case) -> None:
    name, opts = case
    spec = ops.get(name)
    q, k, v = qkv(B=2, H=4, Hkv=2, Tq=T, D=4, requires_grad=False)
    full = spec(q, k, v, mode="parallel", **opts)
    state = OpState()
    out, state = spec(q[:, :, :7], k[:, :, :7], v[:, :, :7], state=state, chunk=3, **opts)  # chunked prefill
    steps = [out]
    for t in range(7, T):
        o, state = spec(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state=state, q_offset=t, **opts)
        steps.append(o)
    assert max_err(torch.cat(steps, dim=2), full) < 1e-12
    assert state  # the memory is in the state, nothing else grows


def test_bidirectional_linear_sees_every_key() -> None:
    spec = ops.get("linear")
    q, k, v = qkv(B=1, H=2, Tq=T, D=4)
    out = spec(q, k, v, causal=False)
    assert max_err(out, spec.reference(q, k, v, causal=False)) < 1e-12
    v2 = v.detach().clone()
    v2[:, :, -1] += 1.0  # the last key changes the first query's output
    assert max_err(spec(q, k, v2, causal=False)[:, :, 0], out[:, :, 0]) > 1e-6
    with pytest.raises(ValueError, match="no option 'causal'"):  # causal only: no such knob
        ops.get("lightning")(q, k, v, causal=False)


def test_bad_options_and_masks_fail_naming_them() -> None:
    q, k, v = qkv(B=1, H=2, Tq=5, D=4, requires_grad=False)
    with pytest.raises(ValueError, match="option 'chunk_size' was renamed to 'chunk'"):
        ops.get("linear")(q, k, v, chunk_size=4)
    with pytest.raises(ValueError, match="feature_map"):
        ops.get("linear")(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="mode"):
        ops.get("retention")(q, k, v, mode="fast")
    with pytest.raises(ValueError, match="chunk"):
        ops.get("lightning")(q, k, v, chunk=0)
    with pytest.raises(ValueError, match="decay"):
        ops.get("retention")(q, k, v, decay=(0.5, 1.5))
    with pytest.raises(ValueError, match="q_map"):
        ops.get("cumulative_softmax")(q, k, v, q_map="tanh")
    with pytest.raises(ValueError, match="mask"):
        ops.get("linear")(q, k, v, mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))
