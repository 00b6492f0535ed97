"""A shared prompt for the seam tests: 24 tokens, the length the ops' ``example`` settings are made for (the
tiny models live in hf_tiny.py)."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import VOCAB


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
