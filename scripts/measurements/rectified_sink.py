"""Diagnostic (h6ssa2): on SmolLM2 q/k/v, the dense attention mass on key block 0 (the sink block) and how often the
pooled-logit top-k (a_im = scale q.kbar_m + log n_m, the rectified op's selection rule) picks block 0."""
import pathlib
import sys

import torch

torch.set_num_threads(1)
from attnlab.frontier.run import prefill_dense  # noqa: E402
from attnlab.models.hf import load_model  # noqa: E402

T, B = 2048, 64
LAYERS = [int(x) for x in sys.argv[1:]] or [2, 10, 20, 28]
model, tok = load_model("smollm2")
text = "\n\n".join(p.read_text() for p in sorted(pathlib.Path("/work/main/docs").glob("*.md")))
ids = tok(text)["input_ids"][:T]
_, _, cap, handle, _ = prefill_dense(model, ids, capture=True)
if handle is not None:
    handle.remove()
for layer in LAYERS:
    c = cap[layer]
    q, k = c["q"].double(), c["k"].double()
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * c["scale"]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    w = s.softmax(-1)[:, :, B:]  # queries past block 0
    m0 = float(w[..., :B].sum(-1).mean())
    tok0 = float(w[..., 0].mean())
    kbar = k.view(1, k.shape[1], T // B, B, -1).mean(3)
    a = (q[:, :, B:] @ kbar.transpose(-1, -2)) * c["scale"] + torch.log(torch.tensor(float(B)))
    qb = (torch.arange(B, T) // B).view(-1, 1)
    a = a.masked_fill(torch.arange(T // B).view(1, -1) >= qb, float("-inf"))  # past whole blocks only
    for top_k in (2, 4, 8):
        picks = a.topk(top_k - 1, -1).indices  # own block is always read; top_k - 1 past blocks
        frac = float((picks == 0).any(-1).double().mean())
        print(f"layer {layer}: mass on block 0 {m0:.3f} (token 0 alone {tok0:.3f}); top_k={top_k}: block 0 "
              f"picked for {frac:.2f} of (head, query)", flush=True)
