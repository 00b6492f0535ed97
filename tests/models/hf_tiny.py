"""Tiny random transformers models for the seam tests (built here, nothing downloaded)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gemma3")
VOCAB = 97


def tiny(family: str, *, attn: str = "sdpa", **extra):
    """A 2-layer random model, float32, eval mode; 4 query heads over 2 key/value heads (GQA).

    mistral: a 4-token sliding window in every layer; gemma3: layer 0 slides over 4 tokens, layer 1 is full,
    and the score scale is ``query_pre_attn_scalar ** -0.5`` with ``query_pre_attn_scalar != head_dim``.
    """
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  attn_implementation=attn)
    common.update(extra)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**{"sliding_window": 4, **common}))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**{
            "head_dim": 8, "query_pre_attn_scalar": 32, "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"], **common}))
    else:
        raise KeyError(family)
    return model.eval()


def sliding_of(model, layer: int) -> int | None:
    """The sliding window of ``layer`` read from the config (not from attnlab's code)."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return cfg.sliding_window if types[layer] == "sliding_attention" else None
    return getattr(cfg, "sliding_window", None)


def model_rule(model, layer: int, Tq: int, Tk: int) -> torch.Tensor:
    """Bool (1, 1, Tq, Tk) of what the model's own attention allows in ``layer``: causal (queries are the last
    Tq positions) and, on sliding layers, the window (query i sees the last ``window`` positions, itself incl.)."""
    qpos = torch.arange(Tk - Tq, Tk).view(-1, 1)
    kpos = torch.arange(Tk).view(1, -1)
    allowed = kpos <= qpos
    w = sliding_of(model, layer)
    if w is not None:
        allowed &= qpos - kpos < w
    return allowed.view(1, 1, Tq, Tk)
