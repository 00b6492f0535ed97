"""Shared pieces of the interventions tests: a word-level tokenizer for the tiny random models, synthetic samples
(the split decides the seeds), one torch thread (the shared 2-core machine runs tiny models 50x faster so)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import VOCAB, tiny  # noqa: E402,F401

from attnlab.plans.tasks import Sample  # noqa: E402


class Tok:
    """Words -> ids in 1..VOCAB-1 (a fixed hash), ids decode to their numbers: enough for prompts, targets and
    PAUSE markers on a random model."""

    bos_token_id = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False, **kw):
        return {"input_ids": [sum(map(ord, w)) % (VOCAB - 1) + 1 for w in str(text).split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def samples(n: int, seed: int = 0, length: int = 40, task: str = "kv", new: int = 4) -> list[Sample]:
    """Random prompts; the answer is the number of the prompt's 6th token (sometimes produced)."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        ids = tuple(torch.randint(1, VOCAB, (length,), generator=g).tolist())
        out.append(Sample(task, ids, (str(ids[5]),), length, 0.5, new))
    return out


def fake_make(tok, task, length, n, seed=0, split="test"):
    """``data.make`` for the tests: the val split's seeds are ``seed + 1000`` (as the real one)."""
    return samples(n, seed + (1000 if split == "val" else 0), length, task)
