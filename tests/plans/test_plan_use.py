"""Plans through the seam: ``attnlab.models.hf.use(model, plan)`` on a tiny random Llama (GQA)."""

import torch
from transformers import GenerationConfig

from attnlab.core.reference import reference_attention
from attnlab.models import hf
from attnlab.plans import HeadPlan, HeadPolicy, PlanCache, PlanRunner, greedy_generate

T = 200
IDS = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(1))


def stream_plan():
    s = HeadPolicy.stream(2, 16)
    return HeadPlan(((HeadPolicy.full(), s), (s, HeadPolicy.drop())), q_per_kv=2, name="mix")


def reference_logits(model, plan, ids):
    """Every layer through the float64 oracle with the plan's per-head pattern (dropped heads: zero)."""
    class Oracle:
        def attend(self, layer, module, q, k, v, *, mask, scale, q_offset):
            out = reference_attention(q, k, v, plan.layer_pattern(layer), None, scale, q_offset).to(q.dtype)
            keep = torch.tensor([p.kind != "drop" for p in plan.policies[layer] for _ in range(plan.q_per_kv)])
            return out * keep.to(out.dtype).view(1, -1, 1, 1)

        def weights_mask(self, layer, q, k, *, q_offset):
            return None

        def new_cache(self, model):
            return None

    with torch.no_grad(), hf.use(model, Oracle()):
        return model(input_ids=ids, use_cache=False).logits


def test_use_with_a_plan_equals_the_per_head_reference_in_prefill_chunks_and_decode(tiny):
    plan = stream_plan()
    ref = reference_logits(tiny, plan, IDS)
    outs = []
    with torch.no_grad(), hf.use(tiny, plan) as h:
        assert isinstance(h.runner, PlanRunner)
        cache = h.new_cache()
        assert isinstance(cache, PlanCache)
        for a, b in ((0, 90), (90, 180)):
            outs.append(tiny(input_ids=IDS[:, a:b], cache=cache, use_cache=True).logits)
        for t in range(180, T):
            outs.append(tiny(input_ids=IDS[:, t:t + 1], cache=cache, use_cache=True).logits)
        free = tiny(input_ids=IDS, use_cache=False).logits  # no cache: the same policies over every key
    assert (torch.cat(outs, 1) - ref).abs().max() < 1e-4
    assert (free - ref).abs().max() < 1e-4
    with torch.no_grad():  # removed: the model is itself again
        assert (tiny(input_ids=IDS).logits - ref).abs().max() > 1e-2


def test_generate_under_use_decodes_with_the_plan_cache(tiny):
    s = HeadPolicy.stream(2, 16)
    plan = HeadPlan(((HeadPolicy.snap(24, 8, 3), s), (HeadPolicy.topk(2, 8), HeadPolicy.drop())), q_per_kv=2)
    ids = IDS[:, :120]
    mine = greedy_generate(tiny, ids, plan, max_new_tokens=6)
    with torch.no_grad(), hf.use(tiny, plan):
        eos = next(t for t in range(128) if t not in mine["tokens"][0].tolist())  # random weights: never stop early
        cfg = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        gen = tiny.generate(ids, generation_config=cfg)
    assert torch.equal(gen[:, 120:], mine["tokens"])


def test_weights_hooks_compose_with_a_compressed_plan_cache(tiny):
    """An observer of the weights under a plan sees the plan's own weights and changes nothing: during decoding
    the streaming heads' weights cover sinks + window only, the dropped heads' nothing."""
    plan = stream_plan()
    seen = {}

    def obs(w, ctx):
        seen[ctx.name] = w.detach().clone()

    with torch.no_grad(), hf.use(tiny, plan) as h:
        cache = h.new_cache()
        tiny(input_ids=IDS[:, :150], cache=cache, use_cache=True)
        plain = tiny(input_ids=IDS[:, 150:151], cache=cache, use_cache=True).logits
        cache = h.new_cache()
        tiny(input_ids=IDS[:, :150], cache=cache, use_cache=True)
        with hf.hooks(tiny, {"blocks.*.attn.weights": obs}):
            hooked = tiny(input_ids=IDS[:, 150:151], cache=cache, use_cache=True).logits
    assert (hooked - plain).abs().max() < 1e-5
    w1 = seen["blocks.1.attn.weights"][0, :, 0]  # layer 1: kv head 0 streams (2 sinks + 16), kv head 1 dropped
    assert ((w1[:2] > 0).sum(-1) == 2 + 16).all() and w1[2:].abs().max() == 0
    assert torch.allclose(w1[:2].sum(-1), torch.ones(2, dtype=w1.dtype))


def test_a_snap_plan_still_compresses_when_hooks_compute_the_prompt(tiny):
    """With a weights observer during the prompt (the hooks compute the layer from weights), the snap heads
    still record their window and evict at the first decode step: decoding equals the unhooked run."""
    plan = HeadPlan.uniform(2, 2, HeadPolicy.snap(24, 8, 3), 2)
    ids = IDS[:, :120]
    logits, held = [], []
    for hooked in (False, True):
        with torch.no_grad(), hf.use(tiny, plan) as h:
            cache = h.new_cache()
            with hf.hooks(tiny, {"blocks.*.attn.weights": (lambda w, ctx: None)} if hooked else {}):
                tiny(input_ids=ids, cache=cache, use_cache=True)
            logits.append(tiny(input_ids=IDS[:, 120:121], cache=cache, use_cache=True).logits)
            held.append(cache.held_positions())
    assert held == [4 * (24 + 8 + 1)] * 2
    assert (logits[0] - logits[1]).abs().max() < 1e-5
