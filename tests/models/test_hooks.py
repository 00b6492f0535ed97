"""Hook points blocks.{l}.attn.{q,k,v,scores,weights,z,out}: values equal direct computation, hooks compose."""

from __future__ import annotations

import sys

import pytest
import torch
from hf_tiny import FAMILIES, model_rule, tiny

from attnlab.core.patterns import Causal, SlidingWindow
from attnlab.models import hf
from attnlab.testing import FLOOR

T = 24
TOL = FLOOR[torch.float32]
LOGITS_TOL = 20 * FLOOR[torch.float32]  # two layers of fp32 rounding between attention outputs and logits


def attn_inputs(model, ids):
    """Each attention module's hidden-state input and rotary (cos, sin), read with plain torch hooks."""
    seen = {}
    handles = []
    for layer, module in hf.attention_modules(model):
        def pre(mod, args, kwargs, layer=layer):
            seen[layer] = (kwargs["hidden_states"], kwargs["position_embeddings"])
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def reference_weights(q, k, scale, rule):
    """float64 masked softmax of q.k, written here (GQA: kv head j serves query heads j*g .. j*g+g-1)."""
    g = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
    return torch.softmax(s.masked_fill(~rule, float("-inf")), -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_are_the_models_rotated_projections(family, prompt):
    model = tiny(family)
    inputs = attn_inputs(model, prompt)
    _, cache = hf.run_with_cache(model, prompt, ["blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v"])
    assert sorted(cache) == sorted(f"blocks.{l}.attn.{p}" for l in range(2) for p in "qkv")
    for layer, module in hf.attention_modules(model):
        h, (cos, sin) = inputs[layer]
        D = module.head_dim
        q = module.q_proj(h).view(2, T, -1, D).transpose(1, 2)
        k = module.k_proj(h).view(2, T, -1, D).transpose(1, 2)
        v = module.v_proj(h).view(2, T, -1, D).transpose(1, 2)
        if hasattr(module, "q_norm"):
            q, k = module.q_norm(q), module.k_norm(k)
        q, k = sys.modules[type(module).__module__].apply_rotary_pos_emb(q, k, cos, sin)
        for name, ref in (("q", q), ("k", k), ("v", v)):
            got = cache[f"blocks.{layer}.attn.{name}"]
            assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6), (family, layer, name)
        assert cache[f"blocks.{layer}.attn.k"].shape[1] == 2  # key/value heads, not repeated to 4


@pytest.mark.parametrize("family", FAMILIES)
def test_run_with_cache_values_equal_direct_computation(family, prompt):
    """weights == float64 masked softmax of the captured q.k under the model's rule; z == weights @ v;
    out == o_proj(z); logits unchanged although the layers now run from the chunked weights."""
    model = tiny(family)
    with torch.no_grad():
        own = model(prompt, use_cache=False).logits
    names = [f"blocks.*.attn.{p}" for p in ("q", "k", "v", "weights", "z", "out")]
    out, cache = hf.run_with_cache(model, prompt, names, rows=(0, T))
    _, summary = hf.run_with_cache(model, prompt, ["blocks.*.attn.weights"])
    assert (out.logits - own).abs().max() <= LOGITS_TOL
    for layer, module in hf.attention_modules(model):
        c = {p: cache[f"blocks.{layer}.attn.{p}"] for p in ("q", "k", "v", "weights", "z", "out")}
        w = reference_weights(c["q"], c["k"], module.scaling, model_rule(model, layer, T, T))
        assert c["weights"].shape == (2, 4, T, T)
        assert (c["weights"] - w).abs().max() <= TOL, (family, layer)
        z = w @ c["v"].double().repeat_interleave(2, 1)
        assert (c["z"] - z).abs().max() <= TOL
        o = module.o_proj(c["z"].transpose(1, 2).reshape(2, T, -1))
        assert torch.allclose(c["out"], o, atol=1e-6)
        s = summary[f"blocks.{layer}.attn.weights"]
        assert isinstance(s, hf.WeightsSummary) and s.received.shape == (2, 4, T) and s.entropy.shape == (2, 4, T)
        assert torch.allclose(s.received, c["weights"].sum(2), atol=1e-5)
        assert torch.equal(s.argmax, c["weights"].argmax(-1))
        ent = -(w * w.clamp_min(1e-30).log()).sum(-1)
        assert (s.entropy - ent).abs().max() <= 1e-4


def test_weights_slice_rows(prompt):
    model = tiny("llama")
    _, full = hf.run_with_cache(model, prompt, ["blocks.1.attn.weights", "blocks.1.attn.scores"], rows=(0, T))
    _, part = hf.run_with_cache(model, prompt, ["blocks.1.attn.weights"], rows=(3, 7))
    assert torch.equal(part["blocks.1.attn.weights"], full["blocks.1.attn.weights"][:, :, 3:7])
    with pytest.raises(ValueError, match="rows="):
        hf.run_with_cache(model, prompt, ["blocks.1.attn.scores"])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_z_intervention_equals_zeroing_o_proj_columns(family, prompt):
    model = tiny(family)
    layer, head = 1, 2
    module = dict(hf.attention_modules(model))[layer]
    D = module.head_dim

    def pre(mod, args):
        x = args[0].clone()
        x[..., head * D:(head + 1) * D] = 0
        return (x,)

    def zero(z, ctx):
        z = z.clone()
        z[:, head] = 0
        return z

    def zero_w(w, ctx):
        w = w.clone()
        w[:, head] = 0
        return w

    with torch.no_grad():
        base = model(prompt).logits
        h = module.o_proj.register_forward_pre_hook(pre)
        ref = model(prompt).logits
        h.remove()
        with hf.hooks(model, {f"blocks.{layer}.attn.z": zero}):
            got = model(prompt).logits
        with hf.hooks(model, {f"blocks.{layer}.attn.weights": zero_w}):
            via_weights = model(prompt).logits
    assert (ref - base).abs().max() > 1e-4  # the head mattered
    assert (got - ref).abs().max() <= TOL
    assert (via_weights - ref).abs().max() <= LOGITS_TOL


def test_observers_agree_and_interventions_compose_in_order(prompt):
    model = tiny("qwen2")
    first, second, after = {}, {}, {}

    def obs(store):
        def fn(value, ctx):
            store[ctx.name] = value.clone()
        return fn

    def double(z, ctx):
        return 2 * z

    def plus_one(z, ctx):
        return z + 1

    with torch.no_grad():
        with hf.hooks(model, {"blocks.*.attn.weights": [obs(first), obs(second)], "blocks.*.attn.z": obs(first)}):
            model(prompt)
        with hf.hooks(model, {"blocks.0.attn.z": [obs(first), double, plus_one, obs(after)]}):
            a = model(prompt).logits
        with hf.hooks(model, {"blocks.0.attn.z": [plus_one, double]}):
            b = model(prompt).logits
        with hf.hooks(model, {"blocks.0.attn.z": lambda z, c: 2 * z + 1}):
            c = model(prompt).logits
    assert first["blocks.0.attn.weights"] is not second["blocks.0.attn.weights"]
    assert torch.equal(first["blocks.0.attn.weights"], second["blocks.0.attn.weights"])
    assert torch.equal(after["blocks.0.attn.z"], 2 * first["blocks.0.attn.z"] + 1)
    assert torch.equal(a, c) and (a - b).abs().max() > 1e-4  # order matters: 2z+1 != 2(z+1)


def test_scores_hooks(prompt):
    """scores == scale * q.k of the captured q, k (before the mask); adding a per-row constant to every score
    leaves the softmax, hence the logits, unchanged; a scores intervention reaches the weights."""
    model = tiny("llama")
    names = ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.scores", "blocks.0.attn.weights"]
    _, c = hf.run_with_cache(model, prompt, names, rows=(0, T))
    module = dict(hf.attention_modules(model))[0]
    s = c["blocks.0.attn.q"].double() @ c["blocks.0.attn.k"].double().repeat_interleave(2, 1).transpose(-1, -2)
    assert (c["blocks.0.attn.scores"] - s * module.scaling).abs().max() <= TOL

    def shift(sc, ctx):
        return sc + torch.arange(ctx.rows[0], ctx.rows[1], dtype=sc.dtype).view(1, 1, -1, 1)

    def only_first_key(sc, ctx):
        return sc.masked_fill(torch.arange(sc.shape[-1]) > 0, -1e30)

    with torch.no_grad():
        own = model(prompt).logits
        with hf.hooks(model, {"blocks.*.attn.scores": shift}):
            shifted = model(prompt).logits
    with hf.hooks(model, {"blocks.0.attn.scores": only_first_key}):
        _, forced = hf.run_with_cache(model, prompt, ["blocks.0.attn.weights"], rows=(0, T))
    assert (shifted - own).abs().max() <= LOGITS_TOL
    w = forced["blocks.0.attn.weights"]
    assert torch.allclose(w[..., 0], torch.ones_like(w[..., 0])) and bool((w[..., 1:] == 0).all())


def test_weights_under_an_op_are_the_ops_weights(prompt):
    """Under use(model, "pattern", ...) the weights hook sees zeros outside the pattern, and the layer output
    computed from those weights equals the op's own output."""
    model = tiny("llama")
    pattern = Causal() & SlidingWindow(3)
    with torch.no_grad(), hf.use(model, "pattern", pattern=pattern):
        op_logits = model(prompt).logits
        out, c = hf.run_with_cache(model, prompt, ["blocks.*.attn.weights"], rows=(0, T))
    allowed = pattern.dense(T, T, 0).reshape(T, T)  # one pattern for every head
    for layer in range(2):
        w = c[f"blocks.{layer}.attn.weights"]
        assert bool((w[:, :, ~allowed] == 0).all()) and torch.allclose(w.sum(-1), torch.ones(2, 4, T))
    assert (out.logits - op_logits).abs().max() <= LOGITS_TOL


def test_hooks_during_generate_and_on_a_padded_batch(prompt):
    model = tiny("mistral")  # sliding window 4: the model's own DynamicCache keeps 3 + 1 keys per layer
    kv_lens, offsets = [], []

    def obs(k, ctx):
        kv_lens.append(k.shape[2])
        offsets.append(ctx.q_offset)

    with torch.no_grad():
        own = model.generate(prompt[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        with hf.hooks(model, {"blocks.0.attn.k": obs, "blocks.*.attn.weights": lambda w, c: None}):
            got = model.generate(prompt[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(own, got)
    assert offsets == [0, T, T + 1, T + 2] and kv_lens == [T, 4, 4, 4]
    pad = torch.ones_like(prompt)
    pad[1, :5] = 0
    with torch.no_grad():
        ref = model(prompt, attention_mask=pad).logits
    out, c = hf.run_with_cache(model, prompt, ["blocks.0.attn.weights"], rows=(0, T), attention_mask=pad)
    assert (out.logits - ref)[pad.bool()].abs().max() <= LOGITS_TOL
    w = c["blocks.0.attn.weights"]
    assert bool((w[1, :, :, :5] == 0).all())  # no weight on padding keys


def test_bad_names_shapes_and_cleanup(prompt):
    model = tiny("llama")
    for bad in ("blocks.0.attn.x", "layers.0.attn.q", "blocks.2.attn.q"):
        with pytest.raises(ValueError, match="blocks"):
            hf.add_hook(model, bad, lambda v, c: None)
    assert "_attnlab_seam" not in model.__dict__
    with hf.add_hook(model, "blocks.0.attn.z", lambda z, c: z[:, :1]):
        with pytest.raises(ValueError, match="intervention must return a tensor of shape"):
            model(prompt)
    h = hf.add_hook(model, "blocks.0.attn.q", lambda q, c: None)
    assert model.config._attn_implementation == hf.ATTN_NAME
    h.remove()
    h.remove()  # idempotent
    assert model.config._attn_implementation == "sdpa" and "_attnlab_seam" not in model.__dict__
    assert all(not m._forward_pre_hooks and not m._forward_hooks for _, m in hf.attention_modules(model))
