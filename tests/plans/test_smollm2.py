"""End to end on the embedded SmolLM2-135M (short contexts): real cache savings, exact decoding."""

import torch

from attnlab.plans.cache import dense_cache_bytes
from attnlab.plans.evaluate import dense_generate
from attnlab.plans.plan import HeadPlan, HeadPolicy
from attnlab.plans.runtime import greedy_generate, use_plan
from attnlab.plans.tasks import passkey


def test_streaming_plan_on_smollm2(smol):
    model, tok = smol
    s = passkey(tok, 256, seed=1)
    ids = torch.tensor([s.ids])
    rows = [[h == layer % 3 for h in range(3)] for layer in range(30)]  # 1 full kv head per layer
    plan = HeadPlan.from_mask(rows, HeadPolicy.stream(4, 32), q_per_kv=3, name="third")
    dense = dense_generate(model, ids, 6)
    res = greedy_generate(model, ids, plan, max_new_tokens=6)
    T = 256 + 5
    # bytes actually held: what the plan predicts, far below the dense cache
    assert res["kv_bytes"] == plan.kv_bytes(T, head_dim=64)
    assert dense["kv_bytes"] >= dense_cache_bytes(30, 3, T, 64)
    assert res["kv_bytes"] < 0.45 * dense["kv_bytes"]
    # the dense path answers the passkey at this length (the task is well-formed for this model)
    assert s.score(tok.decode(dense["tokens"][0])) == 1.0
    # decoding with the shrunken cache is exact: a cache-free forward under the same plan agrees
    full_ids = torch.cat([ids, res["tokens"][:, :-1]], 1)
    with torch.no_grad(), use_plan(model, plan):
        logits = model(input_ids=full_ids, use_cache=False).logits[0, 255:]
    assert logits.argmax(-1).tolist() == res["tokens"][0].tolist()
