"""``ops.sparse.sampled_dense`` (the dense rows of DELTA's correction and of decode-sparse ops' prompts) against a
float64 softmax written here, for a subset of rows and for a whole prompt (the SDPA causal fast path)."""

from __future__ import annotations

import pytest
import torch

from attnlab.ops.sparse import sampled_dense
from attnlab.testing import grads, max_err, qkv, sdpa_error, tolerance


def oracle(q, k, v, rows, q_offset):
    """Row r sees keys 0..q_offset + r; GQA by repeating the kv heads."""
    H, Hkv = q.shape[1], k.shape[1]
    k, v = (t.double().repeat_interleave(H // Hkv, 1) for t in (k, v))
    s = q.double()[:, :, rows] @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    keys = torch.arange(k.shape[2])
    s = s.masked_fill(keys.view(1, -1) > (rows + q_offset).view(-1, 1), float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["prompt", "rows", "decode"])
def test_sampled_dense_matches_the_oracle(dtype, case):
    Tq, Tk = (40, 40) if case != "decode" else (6, 40)
    q, k, v = qkv(B=2, H=4, Hkv=2, Tq=Tq, Tk=Tk, D=16, dtype=dtype)
    off = Tk - Tq
    rows = torch.arange(Tq) if case != "rows" else torch.tensor([0, 3, 17, 39])
    out = sampled_dense(q, k, v, rows, True, None, off)
    ref = oracle(q, k, v, rows, off)
    full_mask = torch.arange(Tk).view(1, -1) <= (torch.arange(Tq) + off).view(-1, 1)
    tol = tolerance(dtype, sdpa_error(q.detach(), k.detach(), v.detach(), full_mask))
    assert out.shape == ref.shape and max_err(out, ref) < tol
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 10 * tol
