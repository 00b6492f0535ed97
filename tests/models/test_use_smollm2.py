"""On SmolLM2 (real weights, 9 query / 3 key-value heads, head_dim 64, RoPE): every op a decoder can run
generates 4 tokens from a 1,000-token prompt through hf.use() and model.generate.

To stay near a minute on two CPU cores the model keeps its first LAYERS decoder layers (the other 26 repeat the
same shapes; a full 30-layer prefill of 1,000 tokens costs about 5 s per op there)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnlab import ops
from attnlab.models import hf

LAYERS = 4
PROMPT = 1000
NEW = 4


@pytest.fixture(scope="module")
def smol_head():
    model, tok = hf.load_model("smollm2")
    model.model.layers = nn.ModuleList(list(model.model.layers)[:LAYERS])
    model.config.num_hidden_layers = LAYERS
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:LAYERS]
    text = ("The attention layer reads every earlier token; sparse methods pick the blocks that matter, "
            "cache policies keep what later tokens will need, and linear forms carry a running state. ")
    ids = tok(text * 60, return_tensors="pt").input_ids[:, :PROMPT]
    assert ids.shape == (1, PROMPT)
    return model, ids


def _options(spec) -> dict:
    """The op's defaults, except options without a usable default (e.g. pattern=None): from its example."""
    return {k: spec.example[k] for k, v in spec.options.items() if v is None and k in spec.example}


@pytest.mark.slow
def test_every_causal_op_generates_from_a_long_prompt(smol_head):
    model, ids = smol_head
    assert hf.geometry(model) == hf.ModelGeometry(LAYERS, 9, 3, 64, True)
    names = [n for n in ops.names() if (s := ops.get(n)).decodes or s.causal_only]
    with torch.no_grad():
        own = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        for name in names:
            spec = ops.get(name)
            with hf.use(model, name, **_options(spec)) as h:
                out = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                     output_scores=True, return_dict_in_generate=True)
                assert type(h.new_cache()).__name__ in ("DynamicCache", "OpCache")
            assert out.sequences.shape == (1, PROMPT + NEW), name
            assert torch.equal(out.sequences[:, :PROMPT], ids)
            assert all(bool(torch.isfinite(s).all()) for s in out.scores), name
            if name == "sdpa":
                assert torch.equal(out.sequences, own)  # the op is the model's own attention
    assert "sdpa" in names and model.config._attn_implementation == "sdpa"
