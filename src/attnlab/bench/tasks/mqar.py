"""Multi-query associative recall (MQAR), following Zoology's description of its generator.

A sequence of length ``T`` starts with ``N`` key-value pairs ``k1 v1 k2 v2 ... kN vN`` (keys distinct, drawn from
the first half of the vocabulary; values from the second half). The remaining ``T - 2N`` positions are filler
(token 0) in which every key is asked once: the queries sit in ``(T - 2N) / 2`` two-token slots, and slot ``j``
(counted from the end of the key-value block) is chosen with probability proportional to ``(j + 1) ** (a - 1)``
(a power law, ``a = 0.01``: most queries come soon after the context, some far). At a query position the model
must predict the value bound to that key. Chance is ``1 / N`` for a model that knows the answer is one of the
values in context.

    x:    k1 v1 k2 v2 ... kN vN  0  0 k2  0  0  0 k1  0 ...        (B, T)
    y:                                  v2          v1            (scored where mask is True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Batch, Task, distinct_tokens


@dataclass(frozen=True)
class MQARConfig:
    vocab: int = 8192
    seq_len: int = 64
    num_pairs: int = 16
    power_a: float = 0.01
    test_size: int = 1000
    val_size: int = 256

    def __post_init__(self) -> None:
        if self.seq_len < 4 * self.num_pairs:
            raise ValueError(f"seq_len={self.seq_len} must be >= 4 * num_pairs={4 * self.num_pairs}")
        if self.vocab // 2 - 1 < self.num_pairs:
            raise ValueError(f"vocab={self.vocab} too small for {self.num_pairs} distinct keys")
        if not 0 < self.power_a <= 1:
            raise ValueError("power_a must lie in (0, 1]")


def slot_weights(num_slots: int, power_a: float) -> torch.Tensor:
    """Unnormalized power-law weights (num_slots,) for query slots counted from the end of the context."""
    return (torch.arange(num_slots, dtype=torch.float64) + 1) ** (power_a - 1)


class MQAR(Task):
    name = "mqar"
    kind = "classify"

    cfg: MQARConfig

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        c = self.cfg
        T, N, half = c.seq_len, c.num_pairs, c.vocab // 2
        keys = distinct_tokens(n, N, 1, half, gen)  # 0 is the filler token
        values = torch.randint(half, c.vocab, (n, N), generator=gen)
        x = torch.zeros(n, T, dtype=torch.long)
        x[:, 0 : 2 * N : 2] = keys
        x[:, 1 : 2 * N : 2] = values
        num_slots = (T - 2 * N) // 2
        w = slot_weights(num_slots, c.power_a).expand(n, -1)
        slots = torch.multinomial(w, N, replacement=False, generator=gen)  # (n, N): the slot of key i
        pos = 2 * N + 2 * slots
        rows = torch.arange(n)[:, None]
        x[rows, pos] = keys
        y = torch.zeros(n, T, dtype=torch.long)
        y[rows, pos] = values
        mask = torch.zeros(n, T, dtype=torch.bool)
        mask[rows, pos] = True
        return Batch(x, y, mask)
