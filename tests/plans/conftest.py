"""Fixtures for the plans tests: a tiny random Llama (fast, exact checks) and SmolLM2 loaded once."""

import pytest
import torch


@pytest.fixture(scope="session")
def smol():
    from attnlab.models.hf import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer Llama with 4 query / 2 key-value heads (GQA), random weights, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_vocab(smol):
    """A 2-layer random Llama with SmolLM2's vocabulary (for the profiling code, which builds prompts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smol
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval(), tok
