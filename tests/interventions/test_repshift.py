"""Representation Shift (I232) on tiny random models: the score equals the norm of the change between the model's
own hidden states; the attention and MLP sublayer changes add up to the block's; keep 1.0 is dense decoding (as
SpecPrefill's scorer and as a KV keep score); a pruned cache decodes as the full sequence with the dropped prompt
keys masked for the new tokens; the scoring uses no attention weights and leaves the model's SDPA in place."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import tiny  # noqa: E402

from attnlab.interventions import repshift as RS  # noqa: E402
from attnlab.interventions import specprefill as SP  # noqa: E402
from attnlab.models import hf  # noqa: E402
from attnlab.plans.evaluate import dense_generate  # noqa: E402

T = 36
IDS = torch.randint(1, 97, (1, T), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny(request.param)


def test_score_equals_the_hidden_state_change(model):
    hs = model(input_ids=IDS, output_hidden_states=True, use_cache=False).hidden_states  # hs[l] enters layer l
    delta = (hs[1] - hs[0])[0].float()
    torch.testing.assert_close(RS.shift_scores(model, IDS, RS.RepShift(0)), delta.norm(dim=-1))
    torch.testing.assert_close(RS.shift_scores(model, IDS, RS.RepShift(0, distance="l1")), delta.abs().sum(-1))
    cos = torch.nn.functional.cosine_similarity(hs[0][0].float(), hs[1][0].float(), dim=-1)
    torch.testing.assert_close(RS.shift_scores(model, IDS, RS.RepShift(0, distance="cos")), 1 - cos)


def test_attention_and_mlp_changes_add_up_to_the_block():
    model = tiny("llama")  # pre-norm residual layers: h_out = h_in + attn + mlp
    parts = {}
    for site in RS.SITES:
        rec = RS.ShiftRecorder(model, 1, site)
        with torch.no_grad(), rec.attached():
            model(input_ids=IDS, use_cache=False)
        parts[site] = rec.delta()
    torch.testing.assert_close(parts["attn"] + parts["mlp"], parts["block"], rtol=1e-5, atol=1e-5)


def test_keep_all_equals_dense(model):
    want = dense_generate(model, IDS, 6, native=False)["tokens"].tolist()
    cfg = SP.SpecPrefill(keep=1.0, draft_layers=1, chunk=4, keep_last=4)
    assert RS.prefill_generate(model, None, IDS, 6, cfg)["tokens"].tolist() == want
    assert RS.kv_generate(model, None, IDS, 6, RS.RepShiftKV(keep=1.0))["tokens"].tolist() == want


def _rule_reference(rule: torch.Tensor):
    """Uncached float64 attention where query ``i`` sees key ``j`` iff ``rule[i, j]``."""

    def fn(module, q, k, v, mask, scaling, layer_idx):
        H, Hkv, Tq, Tk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
        k = k.double().repeat_interleave(H // Hkv, 1)
        v = v.double().repeat_interleave(H // Hkv, 1)
        s = q.double() @ k.transpose(-1, -2) * scaling
        w = torch.softmax(s.masked_fill(~rule[Tk - Tq:Tk, :Tk], float("-inf")), -1)
        return (w @ v).to(q.dtype)

    return fn


def test_pruned_cache_decodes_as_the_masked_full_sequence():
    model = tiny("llama")
    n = 5
    got = RS.kv_generate(model, None, IDS, n, RS.RepShiftKV(keep=0.5, keep_last=4, shift=RS.RepShift(1)))
    kept = got["kept"]
    assert kept.numel() == 18 and kept.tolist()[-4:] == list(range(T - 4, T))
    assert torch.equal(kept, SP.select_tokens(RS.shift_scores(model, IDS, RS.RepShift(1)), 0.5, 1, 4))
    # reference: prompt rows see the whole prompt (the dense prefill); new tokens see kept prompt keys + new ones
    N = T + n
    rule = torch.ones(N, N, dtype=torch.bool).tril()
    dropped = torch.ones(T, dtype=torch.bool)
    dropped[kept] = False
    rule[T:, :T] &= ~dropped
    seq = IDS
    with hf.attnlab_attention(model, _rule_reference(rule)):
        for _ in range(n):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert got["tokens"].tolist() == seq[:, T:].tolist()


def test_scoring_uses_no_attention_weights_and_keeps_sdpa(model, monkeypatch):
    names = []
    original = hf.add_hook
    monkeypatch.setattr(hf, "add_hook", lambda m, name, fn: names.append(name) or original(m, name, fn))
    seen = []
    spy = model.model.layers[0].register_forward_pre_hook(
        lambda mod, args: seen.append((model.config._attn_implementation, hasattr(model, "_attnlab_seam"))))
    try:
        RS.shift_scores(model, IDS, RS.RepShift(1, site="attn"))
        RS.prefill_generate(model, None, IDS, 3, SP.SpecPrefill(keep=0.5, draft_layers=2, chunk=4, keep_last=4))
        RS.kv_generate(model, None, IDS, 3, RS.RepShiftKV(keep=0.5))
    finally:
        spy.remove()
    assert not [n for n in names if n.endswith((".weights", ".scores"))]
    assert names == []  # not even the seam: plain forward hooks only
    assert seen and all(impl == "sdpa" and not seam for impl, seam in seen)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="site"):
        RS.RepShift(site="ffn")
    with pytest.raises(ValueError, match="cos"):
        RS.RepShift(site="mlp", distance="cos")
    model = tiny("llama")
    with pytest.raises(ValueError, match="layer"):
        RS.shift_scores(model, IDS, RS.RepShift(layer=7))
    cfg = SP.SpecPrefill(keep=0.5, draft_layers=1, chunk=4, keep_last=4)
    with pytest.raises(ValueError, match="draft"):
        RS.prefill_generate(model, None, IDS, 2, cfg, RS.RepShift(layer=1))
