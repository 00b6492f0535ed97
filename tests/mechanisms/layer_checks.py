"""Checks every layer of the catalogue meets: fast path == reference (float64, outputs and gradients) and
incremental decoding == full forward (token by token and in chunks)."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.testing import grads, max_err

TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes on shared 2-core machines: a second intra-op thread only adds contention (25x slower
    under load, measured), so these modules run single-threaded and restore the setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)  # float64 fast path vs float64 reference


def build64(name: str, seed: int = 0, **opts) -> torch.nn.Module:
    torch.manual_seed(seed)
    return attnlab.build(name, **opts).double()


def hidden(B: int = 2, T: int = 21, dim: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, dim, generator=g, dtype=torch.float64).requires_grad_(True)


def check_reference(layer: torch.nn.Module, x: torch.Tensor, tol: float = TOL) -> None:
    """Outputs and gradients (input and every parameter) of forward and reference agree."""
    params = [p for p in layer.parameters() if p.requires_grad]
    y, r = layer(x), layer.reference(x)
    assert y.shape == r.shape == x.shape
    assert max_err(y, r) < tol, f"output error {max_err(y, r)}"
    gy, gr = grads(y, (x, *params)), grads(r, (x, *params))
    for a, b in zip(gy, gr):
        assert (a is None) == (b is None)
    assert max_err(gy, gr) < tol * 100, f"gradient error {max_err(gy, gr)}"
    assert all(g is not None for g in gy[:1])


def check_decoding(layer: torch.nn.Module, x: torch.Tensor, prefill: int = 5, chunk: int = 3) -> None:
    """Prefill + one token at a time, and prefill + chunks, both equal the full forward."""
    x = x.detach()
    with torch.no_grad():
        full = layer(x)
        for step in (1, chunk):
            cache = layer.init_cache(x.shape[0])
            ys = [layer(x[:, :prefill], cache)]
            ys += [layer(x[:, i : i + step], cache) for i in range(prefill, x.shape[1], step)]
            err = max_err(torch.cat(ys, dim=1), full)
            assert err < TOL, f"decoding in steps of {step}: error {err}"
