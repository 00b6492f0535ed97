"""Rectified SpaAttn vs plain block top-k on synthetic random-walk keys (docs/mechanisms/routing.md).

Usage: OMP_NUM_THREADS=1 python3 scripts/measurements/rectified_synthetic.py
"""

import torch

from attnlab.core.reference import reference_attention
from attnlab.mechanisms.routing.rectified import rectified_attention


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    T, D, H = 1024, 64, 4
    walk = torch.randn(1, H, T, D, generator=g).cumsum(2) * 0.15
    k = walk + 0.1 * torch.randn(1, H, T, D, generator=g)
    v = walk.flip(-1) + 0.1 * torch.randn(1, H, T, D, generator=g)
    q = torch.randn(1, H, T, D, generator=g)
    dense = reference_attention(q, k, v, mask=torch.ones(T, T, dtype=torch.bool).tril().view(1, 1, T, T)).float()
    for top_k in (2, 4, 8):
        kw = dict(scale=D**-0.5, q_offset=0, block=64, top_k=top_k, causal=True)

        def err(kw=kw, **o) -> float:
            return float((rectified_attention(q, k, v, **kw, **o) - dense).norm() / dense.norm())

        print(f"top_k={top_k} (of 16 blocks): plain {err(ipar=False, gapr=False):.4f}  ipar {err(gapr=False):.4f}  "
              f"ipar+gapr {err():.4f}  gapr(min_gain=0.01) {err(min_gain=0.01):.4f}")


if __name__ == "__main__":
    main()
