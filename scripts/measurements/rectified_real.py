"""Rectified SpaAttn vs plain block top-k on SmolLM2's own q/k/v (h6ssa2).

Prompt: the repo's docs (English prose + tables), first T tokens. Per layer: relative L2 error (over all heads
and positions) vs dense causal attention, for plain top-k / IPAR only / IPAR + GAPR, top_k 2/4/8, block 64.
  OMP_NUM_THREADS=1 python3 scripts/measurements/rectified_real.py [T] [layers...]
"""
import json
import pathlib
import sys
import time

import torch

torch.set_num_threads(1)
from attnlab.frontier.run import prefill_dense  # noqa: E402
from attnlab.mechanisms.routing.rectified import rectified_attention  # noqa: E402
from attnlab.models.hf import load_model  # noqa: E402

T = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
LAYERS = [int(x) for x in sys.argv[2:]] or [2, 10, 20, 28]
model, tok = load_model("smollm2")
text = "\n\n".join(p.read_text() for p in sorted(pathlib.Path("/work/main/docs").glob("*.md")))
ids = tok(text)["input_ids"][:T]
assert len(ids) == T, len(ids)
t0 = time.perf_counter()
_, _, cap, handle, _ = prefill_dense(model, ids, capture=True)
if handle is not None:
    handle.remove()
print(f"prefill+capture {time.perf_counter() - t0:.1f}s", flush=True)


def dense_causal(q, k, v, scale):
    """Plain causal softmax attention, grouped heads repeated (written here, independent of attnlab)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    n = q.shape[2]
    s = s.masked_fill(~torch.ones(n, k.shape[2], dtype=torch.bool).tril(k.shape[2] - n), float("-inf"))
    return s.softmax(-1) @ v


modes = {"plain": dict(ipar=False, gapr=False), "ipar": dict(gapr=False), "ipar+gapr": {},
         "gapr@0.01": dict(min_gain=0.01)}
rows = []
for layer in LAYERS:
    c = cap[layer]
    q, k, v = (c[p].double() for p in ("q", "k", "v"))
    ref = dense_causal(q, k, v, c["scale"])
    for top_k in (2, 4, 8):
        row = {"layer": layer, "top_k": top_k}
        for name, o in modes.items():
            out = rectified_attention(q, k, v, scale=c["scale"], q_offset=0, block=64, top_k=top_k, causal=True,
                                      **o)
            row[name] = float((out - ref).norm() / ref.norm())
        rows.append(row)
        print(json.dumps(row), flush=True)
print("| layer | top_k | plain top-k | IPAR only | IPAR + GAPR | GAPR min_gain 0.01 |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['layer']} | {r['top_k']} | {r['plain']:.3f} | {r['ipar']:.3f} | {r['ipar+gapr']:.3f} | "
          f"{r['gapr@0.01']:.3f} |")
for top_k in (2, 4, 8):
    sel = [r for r in rows if r["top_k"] == top_k]
    print(f"mean top_k={top_k}: " + " ".join(f"{m}={sum(r[m] for r in sel) / len(sel):.3f}" for m in modes))
