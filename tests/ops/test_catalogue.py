"""One parametrized test over every registered op (``attnlab.ops.names()``: ops added later are covered too).

For each op, with its ``example`` options on tiny inputs (batch 2, 4 query heads over 2 kv heads, 24 positions):
the fast path equals the float64 oracle (dense attention masked by ``weights_mask``, or the op's ``reference``)
in outputs and gradients; prefill then token by token with an ``OpState`` equals the full forward (ops that
decode); under ``dense_options`` it equals dense SDPA; a free mask is ANDed (or refused with a ValueError);
the delta correction (every sparse op) matches its plain form and decodes; unknown and renamed options fail
naming the option.
"""

import pytest
import torch
import torch.nn.functional as F

from attnlab import ops
from attnlab.core.reference import reference_attention
from attnlab.testing import grads, max_err, qkv, tolerance

B, H, HKV, T, D = 2, 4, 2, 24, 8
PREFILL = 9
TOL = tolerance(torch.float64, 0.0)
NAMES = ops.names()


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(seed=0, requires_grad=True):
    return qkv(B, H, HKV, T, D=D, seed=seed, requires_grad=requires_grad)


def _oracle(spec, q, k, v, opts, mask=None):
    """Float64 oracle written independently of the fast path: the op's selection as a dense mask where a mask
    describes the op, else the op's own plain reference."""
    if spec.weights_mask is not None and not opts.get("delta"):
        with torch.no_grad():
            wm = spec.weights_mask(q, k, q_offset=0, scale=D**-0.5, **spec.resolve(opts))
        return reference_attention(q, k, v, q_offset=0, mask=wm if mask is None else wm & mask)
    return ops.reference(spec, q, k, v, q_offset=0, mask=mask, **opts)


def _grads(out, inputs):
    """Gradients of a fixed random projection of ``out``; an output that does not depend on the inputs (no graph)
    has zero gradients."""
    if not out.requires_grad:
        return tuple(torch.zeros_like(t) for t in inputs)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads(out, inputs), inputs))


def _causal(spec, opts):
    return spec.causal_only or bool(spec.resolve(opts).get("causal", spec.decodes))


def _decode(spec, q, k, v, opts):
    """Prefill ``PREFILL`` positions (at least the op's ``prefill``), then one position per call, carrying one
    OpState."""
    state = ops.OpState()
    outs = []
    first = max(PREFILL, int(spec.resolve(opts).get("prefill") or 0))  # a fixed prefill lies in the first call
    for s, e in [(0, first)] + [(i, i + 1) for i in range(first, T)]:
        lo = 0 if spec.cache == "kv" else s  # recurrent ops see only this call's keys
        out, state = spec(q[:, :, s:e], k[:, :, lo:e], v[:, :, lo:e], q_offset=s, state=state, **opts)
        outs.append(out)
    return torch.cat(outs, 2)


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_equals_float64_reference(name):
    spec = ops.get(name)
    opts = dict(spec.example)
    q, k, v = _inputs()
    out = spec(q, k, v, **opts)
    ref = _oracle(spec, q, k, v, opts)
    assert out.shape == (B, H, T, D) and out.dtype == q.dtype
    assert max_err(out, ref) < TOL
    if spec.inference_only:  # documented: no gradient reaches q, k, v
        assert isinstance(spec.inference_only, str) and len(spec.inference_only) > 10
        assert all(float(g.abs().max()) == 0 for g in _grads(out, (q, k, v)))
        return
    assert max_err(_grads(out, (q, k, v)), _grads(ref, (q, k, v))) < TOL


@pytest.mark.parametrize("name", NAMES)
def test_decoding_token_by_token_equals_full_forward(name):
    spec = ops.get(name)
    opts = dict(spec.example)
    q, k, v = _inputs(seed=1, requires_grad=False)
    if not (spec.decodes and _causal(spec, opts)):
        assert not spec.decodes or not _causal(spec, opts)  # bidirectional / prompt-only ops: documented
        return
    assert max_err(_decode(spec, q, k, v, opts), spec(q, k, v, **opts)) < TOL


@pytest.mark.parametrize("name", NAMES)
def test_dense_options_give_dense_attention(name):
    spec = ops.get(name)
    if spec.dense_options is None:
        assert spec.family not in ("dense", "pattern") or spec.reference is not None
        return
    opts = {**spec.example, **spec.dense_options}
    q, k, v = _inputs(seed=2, requires_grad=False)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=_causal(spec, opts), enable_gqa=True)
    assert max_err(spec(q, k, v, **opts), dense) < TOL
    if spec.family in ("pattern", "routing"):  # their example drops keys in a full forward
        assert max_err(spec(q, k, v, **spec.example), dense) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_free_mask_is_anded_or_refused(name):
    spec = ops.get(name)
    opts = dict(spec.example)
    q, k, v = _inputs(seed=3)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(B, 1, T, T, generator=g) < 0.7
    mask[1, :, :, :3] = False  # padding of the second sequence
    try:
        out = spec(q, k, v, mask=mask, **opts)
    except ValueError as e:
        assert "mask" in str(e)
        return
    ref = _oracle(spec, q, k, v, opts, mask=mask)
    assert max_err(out, ref) < TOL
    full = torch.ones(1, 1, T, T, dtype=torch.bool)
    assert max_err(spec(q, k, v, mask=full, **opts), spec(q, k, v, **opts)) < TOL


@pytest.mark.parametrize("name", [n for n in NAMES if "delta" in ops.get(n).options])
def test_delta_correction_option(name):
    spec = ops.get(name)
    opts = {**spec.example, "delta": 5}
    q, k, v = _inputs(seed=5)
    out = spec(q, k, v, **opts)
    ref = ops.reference(spec, q, k, v, q_offset=0, **opts)
    assert max_err(out, ref) < TOL
    assert max_err(_grads(out, (q, k, v)), _grads(ref, (q, k, v))) < TOL
    assert max_err(out, spec(q, k, v, **spec.example)) > 1e-4  # the correction moves the output
    every = spec(q, k, v, **{**spec.example, "delta": 1})  # every row sampled: dense attention exactly
    causal = spec.causal_only or bool(spec.resolve(spec.example).get("causal", spec.decodes))
    if name == "minference":  # the correction applies to the sparse prefill rows; later rows are dense anyway
        causal = True
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert max_err(every, dense) < TOL
    if spec.decodes and causal:
        qd, kd, vd = (t.detach() for t in (q, k, v))
        assert max_err(_decode(spec, qd, kd, vd, opts), out) < TOL


@pytest.mark.parametrize("name", NAMES)
def test_unknown_and_renamed_options_fail_naming_them(name):
    spec = ops.get(name)
    q, k, v = _inputs(requires_grad=False)
    with pytest.raises(ValueError, match="no_such_knob"):
        spec(q, k, v, no_such_knob=1, **spec.example)
    for old, new in spec.renamed.items():
        with pytest.raises(ValueError, match=f"{old}.*{new}"):
            spec(q, k, v, **{old: 1}, **spec.example)


def test_catalogue_has_the_seam_ops():
    want = {"sdpa", "pattern", "sliding_window", "neighborhood", "moba", "biformer", "routing_transformer", "hip",
            "dhsa", "dma", "superlinear", "minference", "delta_select", "recycled"}
    assert want <= set(NAMES)
    for name in want - {"sdpa"}:
        spec = ops.get(name)
        assert spec.options["delta"] == 0 and "D99" in spec.papers, name  # delta correction on every sparse op
        assert spec.renamed["delta_correction"] == "delta"


SPARSE = [n for n in NAMES if "delta" in ops.get(n).options]


@pytest.mark.parametrize("name", SPARSE)
def test_sparse_ops_check_the_free_mask(name):
    spec = ops.get(name)
    q, k, v = _inputs(requires_grad=False)
    with pytest.raises(ValueError, match="mask must be a bool"):
        spec(q, k, v, mask=torch.ones(T, T, dtype=torch.bool), **spec.example)
    with pytest.raises(ValueError, match="mask must be a bool"):
        spec(q, k, v, mask=torch.ones(1, 1, T, T), **spec.example)
    mask = torch.ones(1, 1, T, T, dtype=torch.bool)
    mask[..., 0] = False
    with pytest.raises(ValueError, match="mask"):  # the sampled dense rows would ignore it
        spec(q, k, v, mask=mask, delta=2, **spec.example)


def test_stateful_ops_refuse_a_free_mask_while_decoding():
    q, k, v = _inputs(requires_grad=False)
    mask = torch.ones(1, 1, 1, T, dtype=torch.bool)
    mask[..., 0] = False
    for name in ("dhsa", "minference", "delta_select", "recycled"):
        spec = ops.get(name)
        _, state = spec(q[:, :, : T - 1], k[:, :, : T - 1], v[:, :, : T - 1], state=ops.OpState(),
                        **spec.example)
        with pytest.raises(ValueError, match="free mask"):
            spec(q[:, :, -1:], k, v, mask=mask, state=state, **spec.example)
