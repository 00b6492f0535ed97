"""SSA training comparison (h6ssa2) on MQAR with the quality benchmark's backbone and recipe.

Dense (`mha`) and SSA models train step-interleaved in one process (same batches, same init seed), so the
per-step time ratio SSA/dense is measured alternating under the same load. Usage:
  OMP_NUM_THREADS=1 [FT=N] python3 scripts/measurements/ssa_train.py STEPS T PAIRS [rate[:local_bias] ...]
FT=N: afterwards, a copy of each SSA model is fine-tuned densely for N more steps (eval mode = rate 1; the
backbone has no dropout or batch norm, so eval mode changes nothing else) and evaluated dense.
"""
import copy
import json
import os
import statistics
import sys
import time

import torch

torch.set_num_threads(1)
from attnlab.bench.tasks.backbone import Backbone, BackboneConfig, task_loss  # noqa: E402
from attnlab.bench.tasks.base import generator  # noqa: E402
from attnlab.bench.tasks.mechanisms import LayerSpec, build_layer  # noqa: E402
from attnlab.bench.tasks.mqar import MQAR, MQARConfig  # noqa: E402
from attnlab.bench.tasks.trainer import TrainConfig, evaluate, lr_at  # noqa: E402
from attnlab.mechanisms.routing.ssa import ensemble_probs, sub_model  # noqa: E402

STEPS, T, PAIRS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
RATES = [tuple(float(x) for x in (a + ":1").split(":")[:2]) for a in sys.argv[4:]] or [(0.25, 1.0)]
FT = int(os.environ.get("FT", "0"))
BLOCK, BS, LR = 16, 64, 1e-2
task = MQAR(MQARConfig(vocab=512, seq_len=T, num_pairs=PAIRS, test_size=500))
test = task.test_sets(0)["test"]
cfg_bb = BackboneConfig(dim=64, heads=2, layers=2)
tcfg = TrainConfig(lr=LR, batch_size=BS, max_steps=STEPS, budget_s=1e9)

specs = {"dense": LayerSpec("mha", {})}
for r, lb in RATES:
    specs[f"ssa{r}_bias{lb:g}"] = LayerSpec("ssa", {"rate": r, "block": BLOCK, "local_bias": lb})


def build(spec):
    torch.manual_seed(0)
    return Backbone(cfg_bb, lambda i: build_layer(spec, 64, 2, i, 2), vocab=task.vocab, num_classes=task.num_classes)


models = {k: build(s) for k, s in specs.items()}
opts = {k: torch.optim.AdamW(m.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.1) for k, m in models.items()}
times = {k: [] for k in models}
g = generator(7)
t_start = time.perf_counter()
for step in range(STEPS):
    b = task.sample(BS, g)
    for k, m in models.items():  # alternate: one step of each model per batch
        m.train()
        for pg in opts[k].param_groups:
            pg["lr"] = lr_at(step, tcfg)
        t0 = time.perf_counter()
        loss, _, _ = task_loss(m, task.kind, b.x, b.y, b.mask, score=False)
        opts[k].zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opts[k].step()
        times[k].append(time.perf_counter() - t0)
    if step % 50 == 0 or step == STEPS - 1:
        print(step, {k: round(float(v[-1]), 3) for k, v in times.items()}, f"{time.perf_counter() - t_start:.0f}s",
              flush=True)

res = {"task": f"mqar T={T} pairs={PAIRS} vocab=512", "steps": STEPS, "batch": BS, "lr": LR, "block": BLOCK,
       "train_s": time.perf_counter() - t_start, "models": {}}
for k, m in models.items():
    r = {"acc_dense_eval": evaluate(m, task, test),
         "median_step_s": statistics.median(times[k][5:])}
    if k != "dense":
        m.eval()
        r["step_ratio_vs_dense"] = statistics.median([a / d for a, d in zip(times[k][5:], times["dense"][5:])])
        with torch.no_grad():
            def fwd(mm):
                return mm.logits(mm(test.x)[0][test.mask])
            subs = []
            for s in range(4):
                with sub_model(m, 1000 + s):
                    subs.append(float((fwd(m).argmax(-1) == test.y[test.mask]).float().mean()))
            r["acc_one_submodel"] = subs[0]
            r["acc_submodels_each"] = subs
            r["acc_ensemble4"] = float((ensemble_probs(m, fwd, 4, seed=1000).argmax(-1)
                                        == test.y[test.mask]).float().mean())
        if FT:  # dense fine-tuning of a copy, continuing the schedule at the constant rate
            ft = copy.deepcopy(m)
            opt = torch.optim.AdamW(ft.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.1)
            opt.load_state_dict(opts[k].state_dict())
            gf = generator(11)
            for _ in range(FT):
                b = task.sample(BS, gf)
                ft.eval()  # SSA layers run dense (rate 1) in eval mode
                loss, _, _ = task_loss(ft, task.kind, b.x, b.y, b.mask, score=False)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(ft.parameters(), 1.0)
                opt.step()
            r[f"acc_after_dense_ft{FT}"] = evaluate(ft, task, test)
    res["models"][k] = r
print(json.dumps(res, indent=1))
