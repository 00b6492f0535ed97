"""Shared fixtures: the embedded models, loaded once per session (SmolLM2 from the converted cache)."""

from __future__ import annotations

import pytest
import torch

from attnlab.models.hf import load_model


@pytest.fixture(scope="session")
def smollm2():
    torch.manual_seed(0)
    return load_model("smollm2")


@pytest.fixture(scope="session")
def minilm():
    return load_model("minilm")
