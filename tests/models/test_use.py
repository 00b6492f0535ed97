"""hf.use(): every registered op inside tiny Llama / Qwen2 / Mistral / Gemma 3 models, prefill and generate.

The op list is read from the registry at collection time, so ops registered later are covered too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hf_tiny import FAMILIES, VOCAB, model_rule, sliding_of, tiny

from attnlab import ops
from attnlab.core.patterns import Causal, SlidingWindow
from attnlab.models import hf
from attnlab.ops import OpSpec, OpState
from attnlab.testing import FLOOR

OPS = ops.names()
T = 24  # the prompt length; the ops' example settings are made for it
# Two layers of fp32 rounding, a norm and the head between attention outputs and logits.
LOGITS_TOL = 20 * FLOOR[torch.float32]


def causal_capable(spec: OpSpec) -> bool:
    """Ops a decoder can run: causal ones, ops with a causal option, and ops that decode."""
    return spec.causal_only or "causal" in spec.options or spec.decodes


CAUSAL_OPS = [n for n in OPS if causal_capable(ops.get(n))]


def dense_options(spec: OpSpec) -> dict | None:
    """The full-budget setting on top of the example (as the catalogue test runs it)."""
    return None if spec.dense_options is None else {**spec.example, **spec.dense_options}


#: ops a decoder generates with (image-grid ops attend a fixed grid and do not decode)
GENERATING = [n for n in CAUSAL_OPS if ops.get(n).decodes or ops.get(n).causal_only]


def settings(spec: OpSpec) -> list[tuple[str, dict]]:
    """``(label, options)`` to run: the op's small example and its full-budget options."""
    out = [("example", dict(spec.example))]
    dense = dense_options(spec)
    if dense is not None:
        out.append(("dense", dense))
    return out


def takes_free_mask(spec: OpSpec, opts: dict, *, causal: bool = True, state: bool = False) -> bool:
    """Whether the op honours a free bool mask (on a stateless call, or with a state when ``state``); ops that
    cannot raise ValueError, by the registry contract."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 8, generator=g) for _ in range(3))
    mask = torch.ones(1, 1, T, T, dtype=torch.bool)
    mask = mask.tril() if causal else mask
    mask[..., 0] = False
    if "causal" in spec.options:
        opts = {**opts, "causal": causal}
    try:
        spec(q, k[:, :1], v[:, :1], q_offset=0, mask=mask, state=OpState() if state else None, **opts)
    except ValueError:
        return False
    return True


def window_in_force(model, layer: int, length: int) -> bool:
    w = sliding_of(model, layer)
    return w is not None and w < length


def capture(model, ids, **kw):
    seen: dict[str, torch.Tensor] = {}

    def obs(value, ctx):
        seen[ctx.name] = value.detach().clone()
        seen[f"{ctx.name}.scale"] = ctx.scale

    names = {f"blocks.*.attn.{p}": obs for p in ("q", "k", "v", "z")}
    with torch.no_grad(), hf.hooks(model, names):
        out = model(ids, use_cache=False, **kw)
    return out, seen


@pytest.mark.parametrize("name", CAUSAL_OPS)
@pytest.mark.parametrize("family", FAMILIES)
def test_use_equals_op_on_captured_qkv(family, name, prompt):
    """What use() computes in each layer == the op applied to that layer's captured q/k/v, with the model's
    scale and, on sliding layers, the model's window as the free mask."""
    model = tiny(family)
    spec = ops.get(name)
    mods = dict(hf.attention_modules(model))
    windowed = any(window_in_force(model, layer, T) for layer in mods)
    for label, opts in settings(spec):
        if "causal" in spec.options:
            opts = {**opts, "causal": True}
        with hf.use(model, name, **opts):
            if windowed and not takes_free_mask(spec, opts):
                with pytest.raises(ValueError):
                    capture(model, prompt)
                continue
            _, seen = capture(model, prompt)
        for layer, module in mods.items():
            q, k, v, z = (seen[f"blocks.{layer}.attn.{p}"] for p in ("q", "k", "v", "z"))
            assert q.shape == (2, 4, T, q.shape[-1]) and k.shape == (2, 2, T, q.shape[-1])  # GQA, not repeated
            assert seen[f"blocks.{layer}.attn.z.scale"] == module.scaling
            mask = model_rule(model, layer, T, T) if window_in_force(model, layer, T) else None
            ref = spec(q, k, v, scale=module.scaling, q_offset=0, mask=mask, **opts)
            err = (z - ref).abs().max().item()
            assert err <= FLOOR[torch.float32], (family, name, label, layer, err)


def test_bidirectional_model_runs_every_op_that_can_attend_both_ways():
    """A tiny BERT (bidirectional): ops with a causal option run with causal=False, both-ways ops run as they
    are, equal to the op on the captured q/k/v; causal-only ops are refused by name."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64)).eval()
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        own = model(ids).last_hidden_state
    ran = []
    for name in OPS:
        spec = ops.get(name)
        if spec.causal_only:
            with pytest.raises(ValueError, match=f"op {name!r} is causal only"):
                hf.use(model, name)
            continue
        for label, opts in settings(spec):
            with hf.use(model, name, **opts):
                out, seen = capture(model, ids)
            if label == "dense" and ("causal" in spec.options or not causal_capable(spec)):
                # full budget of an op that follows the model's direction: the model's own attention
                assert (out.last_hidden_state - own).abs().max() <= LOGITS_TOL, name
            if "causal" in spec.options:
                opts = {**opts, "causal": False}
            for layer in range(2):
                q, k, v, z = (seen[f"blocks.{layer}.attn.{p}"] for p in ("q", "k", "v", "z"))
                ref = spec(q, k, v, scale=seen[f"blocks.{layer}.attn.z.scale"], q_offset=0, **opts)
                assert (z - ref).abs().max() <= FLOOR[torch.float32], (name, label, layer)
        ran.append(name)
    assert "sdpa" in ran and model.config._attn_implementation == "sdpa"


def test_ops_that_attend_both_ways_are_refused_in_a_decoder():
    model = tiny("llama")
    for name in OPS:
        if not causal_capable(ops.get(name)):
            with pytest.raises(ValueError, match="this model is causal"):
                hf.use(model, name)
    assert "_attnlab_seam" not in model.__dict__


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_equals_model_attention(family, prompt):
    """Every op with a full-budget setting gives the logits of the model's own attention (sdpa and eager),
    unpadded and with a left-padded row (the padding reaches the op as its free mask)."""
    model = tiny(family)
    pad = torch.ones_like(prompt)
    pad[1, :3] = 0
    with torch.no_grad():
        own = model(prompt, use_cache=False).logits
        own_pad = model(prompt, attention_mask=pad, use_cache=False).logits
        model.set_attn_implementation("eager")
        eager = model(prompt, use_cache=False).logits
        model.set_attn_implementation("sdpa")
    assert (own - eager).abs().max() <= LOGITS_TOL
    covered = []
    for name in GENERATING:  # image-grid ops are dense *full* (not causal) under their full budget
        spec = ops.get(name)
        opts = dense_options(spec)
        if opts is None:
            continue
        masked = takes_free_mask(spec, opts)
        with torch.no_grad(), hf.use(model, name, **opts):
            if not masked and any(window_in_force(model, layer, T) for layer in range(2)):
                with pytest.raises(ValueError):
                    model(prompt, use_cache=False)
                continue
            got = model(prompt, use_cache=False).logits
            assert (got - own).abs().max() <= LOGITS_TOL, (family, name, (got - own).abs().max())
            if masked:
                got_pad = model(prompt, attention_mask=pad, use_cache=False).logits
                keep = pad.bool()
                assert (got_pad - own_pad)[keep].abs().max() <= LOGITS_TOL, (family, name)
        covered.append(name)
    assert "sdpa" in covered
    assert model.config._attn_implementation == "sdpa"  # restored after every use()


def greedy(model, ids, **kw):
    out = model.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("name", GENERATING)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_without(family, name, prompt):
    """model.generate under use(): for ops that decode, decoding with the op's cache (and state) == recomputing
    every step without a cache; with the full-budget setting == the model's own generate."""
    model = tiny(family)
    spec = ops.get(name)
    ids = prompt[:1]
    windowed = any(window_in_force(model, layer, T) for layer in range(2))
    with torch.no_grad():
        own_seq, own_scores = greedy(model, ids)
        for label, opts in settings(spec):
            if label == "example" and not spec.decodes:
                continue  # prefill-then-decode differs from the full forward by design (e.g. SnapKV)
            with hf.use(model, name, **opts):
                if windowed and not takes_free_mask(spec, opts, state=True):
                    with pytest.raises(ValueError):
                        greedy(model, ids)
                    continue
                seq, scores = greedy(model, ids)
                seq_nc, scores_nc = greedy(model, ids, use_cache=False)
            assert seq.shape == (1, T + 4)
            if spec.decodes:
                assert torch.equal(seq, seq_nc), (family, name, label)
                assert (scores - scores_nc).abs().max() <= LOGITS_TOL, (family, name, label)
            if label == "dense":
                assert torch.equal(seq, own_seq), (family, name)
                assert (scores - own_scores).abs().max() <= LOGITS_TOL, (family, name)


def _linear_op(q, k, v, *, scale, q_offset, mask=None, state=None):
    """A recurrent test op: out_t = scale * sum_{s<=t} (q_t . k_s) v_s, carrying S = sum k_s^T v_s."""
    if mask is not None:
        raise ValueError("the test linear op takes no free mask")
    B, H, T, D = q.shape
    g = H // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    out = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0.0) @ vv
    prev = None if state is None else state.get("S")
    if prev is not None:
        out = out + (q @ prev) * scale
    if state is None:
        return out
    S = kk.transpose(-1, -2) @ vv
    state["S"] = S if prev is None else prev + S
    return out, state


LINEAR = OpSpec("test_linear", _linear_op, "linear", (), "test: unnormalised causal linear attention",
                cache="recurrent")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_recurrent_op_keeps_state_not_keys(family, prompt):
    """A cache="recurrent" op gets only this call's keys and its OpState; the cache stores no keys."""
    model = tiny(family, sliding_window=64) if family == "gemma3" else tiny(family)
    ids = prompt[:1]
    calls: list[int] = []
    with torch.no_grad():
        with hf.use(model, LINEAR) as h, hf.add_hook(model, "blocks.0.attn.z", lambda z, c: calls.append(c.q_offset)):
            seq, scores = greedy(model, ids)
            seq_nc, scores_nc = greedy(model, ids, use_cache=False)
            cache = h.new_cache()
            assert isinstance(cache, hf.OpCache)
            model(ids, cache=cache)
            assert all(layer.keys.numel() == 0 for layer in cache.layers)  # nothing stored per position
            states = h.runner.states(cache)
            assert sorted(states) == [0, 1] and all(isinstance(s, OpState) and "S" in s for s in states.values())
        # a mixed model: layer 0 recurrent, layer 1 the model's own attention over its full cache
        with hf.use(model, {0: LINEAR}):
            mixed, _ = greedy(model, ids)
            mixed_nc, _ = greedy(model, ids, use_cache=False)
    assert calls[:4] == [0, T, T + 1, T + 2]  # prefill, then one query per step at its absolute position
    assert torch.equal(seq, seq_nc) and (scores - scores_nc).abs().max() <= LOGITS_TOL
    assert torch.equal(mixed, mixed_nc)


def test_per_layer_ops_and_nesting(prompt):
    model = tiny("llama")
    pattern = Causal() & SlidingWindow(2)
    with torch.no_grad():
        own = model(prompt).logits
        seen = {}
        with hf.use(model, {1: ("pattern", {"pattern": pattern})}):
            _, seen = capture(model, prompt)
            with hf.use(model, "sdpa"):  # nested: the inner one wins, leaving restores the outer one
                inner = model(prompt).logits
            _, again = capture(model, prompt)
        after = model(prompt).logits
    assert (inner - own).abs().max() <= LOGITS_TOL
    assert torch.equal(after, own)
    ref0 = ops.get("sdpa")(seen["blocks.0.attn.q"], seen["blocks.0.attn.k"], seen["blocks.0.attn.v"],
                           scale=seen["blocks.0.attn.z.scale"])
    ref1 = ops.get("pattern")(seen["blocks.1.attn.q"], seen["blocks.1.attn.k"], seen["blocks.1.attn.v"],
                              scale=seen["blocks.1.attn.z.scale"], pattern=pattern)
    assert (seen["blocks.0.attn.z"] - ref0).abs().max() <= FLOOR[torch.float32]
    assert (seen["blocks.1.attn.z"] - ref1).abs().max() <= FLOOR[torch.float32]
    assert torch.equal(again["blocks.1.attn.z"], seen["blocks.1.attn.z"])
    assert "_attnlab_seam" not in model.__dict__ and model.config._attn_implementation == "sdpa"


def test_gemma3_window_scale_and_softcap(prompt):
    """Gemma 3: the sliding layer keeps its window as the op's free mask unless model_window=False; the scale is
    query_pre_attn_scalar ** -0.5; a logit softcap is refused."""
    model = tiny("gemma3")
    assert model.model.layers[0].self_attn.scaling == 32 ** -0.5 != 8 ** -0.5
    with hf.use(model, "sdpa", model_window=False):
        _, seen = capture(model, prompt)
    q, k, v, z = (seen[f"blocks.0.attn.{p}"] for p in ("q", "k", "v", "z"))
    plain = ops.get("sdpa")(q, k, v, scale=32 ** -0.5)
    windowed = ops.get("sdpa")(q, k, v, scale=32 ** -0.5, mask=model_rule(model, 0, T, T))
    assert (z - plain).abs().max() <= FLOOR[torch.float32]
    assert (z - windowed).abs().max() > 1e-3  # the window mattered
    pad = torch.ones_like(prompt)
    pad[1, :5] = 0
    with hf.use(model, "sdpa", model_window=False):
        _, seen = capture(model, prompt, attention_mask=pad)
    q, k, v, z = (seen[f"blocks.0.attn.{p}"] for p in ("q", "k", "v", "z"))
    rule = torch.ones(T, T, dtype=torch.bool).tril().view(1, 1, T, T) & pad.bool().view(2, 1, 1, T)
    ref = ops.get("sdpa")(q, k, v, scale=32 ** -0.5, mask=rule)  # causal + padding, no window
    assert (z - ref)[:, :, 5:].abs().max() <= FLOOR[torch.float32]  # rows of real tokens
    # transformers' Gemma 3 passes no softcap to the attention function (softcap None): use() runs; Gemma 2
    # passes its attn_logit_softcapping, which no op implements: refused, naming it
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    capped = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            attn_logit_softcapping=50.0, attn_implementation="eager")).eval()
    with hf.use(capped, "sdpa"), pytest.raises(NotImplementedError, match="softcap"):
        capped(prompt)
    assert capped.config._attn_implementation == "eager"


def test_kv_op_refuses_a_sliding_cache_that_dropped_keys(prompt):
    from transformers import DynamicCache

    model = tiny("mistral")
    with torch.no_grad(), hf.use(model, "sdpa") as h:
        cache = DynamicCache(config=model.config)  # keeps only the last window - 1 keys per layer
        model(prompt[:1], cache=cache)
        with pytest.raises(RuntimeError, match="new_cache"):
            model(prompt[:1, :1], cache=cache)
        full = h.new_cache()
        model(prompt[:1], cache=full)
        model(prompt[:1, :1], cache=full)
        assert full.get_seq_length() == T + 1


def test_bad_arguments_are_clear():
    model = tiny("llama")
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        hf.use(model, "nope")
    with pytest.raises(ValueError, match="no option 'windw'"):
        hf.use(model, "sdpa", windw=3)
    with pytest.raises(ValueError, match="layer 5"):
        hf.use(model, {5: "sdpa"})
    with pytest.raises(ValueError, match="options in the dict"):
        hf.use(model, {0: "sdpa"}, causal=True)
    with pytest.raises(TypeError, match="use\\(\\) takes"):
        hf.use(model, 3.0)
    assert "_attnlab_seam" not in model.__dict__


def test_import_sets_no_environment_variables():
    code = ("import os, json; before = dict(os.environ); import attnlab, attnlab.ops, attnlab.models.hf; "
            "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))")
    env = {k: v for k, v in os.environ.items() if k not in hf.OFFLINE_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_plan_through_use(prompt):
    """use(model, HeadPlan): the PlanRunner decodes with its PlanCache; an all-full plan is the model itself; a
    streaming plan's weights (read by a hook during cached decoding) stay on sinks + window, and the hook does
    not change the tokens."""
    from attnlab.plans.cache import PlanCache
    from attnlab.plans.plan import HeadPlan, HeadPolicy

    model = tiny("llama")
    ids = prompt[:1]
    full = HeadPlan.uniform(2, 2, HeadPolicy.full(), 2)
    s = HeadPolicy.stream(2, 4)
    stream = HeadPlan(((HeadPolicy.full(), s), (s, s)), q_per_kv=2)
    rows = []

    def obs(w, ctx):
        if ctx.layer == 1 and ctx.q_offset > 0:  # one decode row over every position so far
            rows.append(w[0, :, -1].clone())

    with torch.no_grad():
        own, own_scores = greedy(model, ids)
        with hf.use(model, full) as h:
            assert isinstance(h.new_cache(), PlanCache)
            seq, scores = greedy(model, ids)
        with hf.use(model, stream):
            plain, _ = greedy(model, ids)
            with hf.add_hook(model, "blocks.*.attn.weights", obs):
                hooked, _ = greedy(model, ids)
    assert torch.equal(seq, own) and (scores - own_scores).abs().max() <= LOGITS_TOL
    assert torch.equal(plain, hooked)
    assert len(rows) == 3
    for step, w in enumerate(rows):
        pos = T + step  # the decoding query's position
        allowed = torch.zeros(pos + 1, dtype=torch.bool)
        allowed[:2] = True
        allowed[pos - 3:] = True
        assert bool((w[:, ~allowed] == 0).all()) and torch.allclose(w.sum(-1), torch.ones(4))
