"""FlexAttention glue: CPU forward against the reference (one compile), GPU forward+backward when present."""

import pytest
import torch

from attnlab import attention, reference_attention
from attnlab.core.patterns import Causal, Sinks, SlidingWindow
from attnlab.testing import grads, max_err, qkv, sdpa_error, tolerance

# defined here, not imported from conftest: a subdirectory's conftest.py can shadow the module name
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_flex_forward_cpu_matches_reference_with_gqa_and_offset():
    pat = Causal() & (Sinks(4) | SlidingWindow(16))
    q, k, v = qkv(B=1, H=4, Hkv=2, Tq=128, D=16, dtype=torch.float32, requires_grad=False)
    out = attention(q, k, v, pat, backend="flex")
    ref = reference_attention(q, k, v, pat)
    mask = pat.dense(128, 128).unsqueeze(0)
    assert max_err(out, ref) <= tolerance(torch.float32, sdpa_error(q, k, v, mask))


@requires_cuda
def test_flex_cuda_forward_backward_matches_reference():
    pat = SlidingWindow(64)
    q, k, v = qkv(B=1, H=4, Hkv=2, Tq=256, D=64, dtype=torch.float16, device="cuda")
    out = attention(q, k, v, pat)  # auto -> flex on CUDA
    ref = reference_attention(q, k, v, pat)
    mask = pat.dense(256, 256).unsqueeze(0).cuda()
    assert max_err(out, ref) <= tolerance(torch.float16, sdpa_error(q, k, v, mask))
    g, gr = grads(out, (q, k, v)), grads(ref, (q, k, v))
    assert max_err(g, gr) < 5e-2


@requires_cuda
def test_blocksparse_cuda_matches_reference():
    pat = SlidingWindow(32)
    q, k, v = qkv(B=1, H=4, Tq=200, D=32, device="cuda")
    out = attention(q, k, v, pat, backend="blocksparse")
    ref = reference_attention(q, k, v, pat)
    assert max_err(out, ref) < 1e-10
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-10
