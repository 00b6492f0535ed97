"""Attention Lens on the planted induction circuit: layer 1 head 0 writes the attended token's one-hot into the
block the unembedding reads, so a lens trained from a random start on that head recovers token t from z = e_t."""

from __future__ import annotations

import pytest
import torch

from attnlab.inspect.lens import AttentionLens, LensConfig, lens_data, lens_kl, train_lens
from tests.inspect.test_causal import BOS, IND_HEAD, NV, planted


@pytest.fixture(scope="module")
def model():
    return planted()


def test_lens_recovers_the_planted_token(model):
    torch.manual_seed(0)
    data = lens_data(model, [(1, IND_HEAD)], sequences=12, prompt=10, generate=10, seed=0, special=[BOS])
    z, logits = data.z[(1, IND_HEAD)], data.logits
    assert z.shape == (12 * 19, 32) and logits.shape == (12 * 19, NV)
    lens = AttentionLens(model, 1, IND_HEAD, init="random", seed=1)
    before = lens_kl(lens, z, logits)
    losses = train_lens(lens, z, logits, LensConfig(steps=300, lr=0.05, batch=64, init="random"))
    after = lens_kl(lens, z, logits)
    assert after < 0.5 * before and losses[-1] < losses[0]
    with torch.no_grad():
        top = lens(torch.eye(32)[:NV - 1]).argmax(-1)  # z = e_t: the head copied token t
    assert (top == torch.arange(NV - 1)).float().mean() >= 0.8
    # the o_proj initialization is the per-head logit lens: its top token for e_t is t before any training
    base = AttentionLens(model, 1, IND_HEAD)
    with torch.no_grad():
        assert base(torch.eye(32)[:NV - 1]).argmax(-1).tolist() == list(range(NV - 1))


def test_lens_errors(model):
    with pytest.raises(ValueError, match="not a head"):
        AttentionLens(model, 2, 0)
    with pytest.raises(ValueError, match="init"):
        AttentionLens(model, 1, 0, init="zeros")
    with pytest.raises(ValueError, match="z must be"):
        AttentionLens(model, 1, 0)(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="init"):
        LensConfig(init="nope")
    with pytest.raises(ValueError, match="differ"):
        train_lens(AttentionLens(model, 1, 0), torch.zeros(3, 32), torch.zeros(4, NV))


def test_report_on_the_planted_model(model):
    from attnlab.inspect.lens import attention_lens_report
    from tests.inspect.test_causal_cli import word_tokenizer

    tok = word_tokenizer([f"t{i}" for i in range(NV - 1)] + ["<s>"], bos="<s>")
    (r,) = attention_lens_report(model, tok, [(1, IND_HEAD)], cfg=LensConfig(steps=60, lr=0.02), sequences=6,
                                 prompt=8, generate=6, top=3, probe="t3 t5 t9 t2 t3")
    assert r["kl_init"] == pytest.approx(r["kl_logit_lens"])  # o_proj init = the per-head logit lens
    assert r["kl_lens"] < r["kl_logit_lens"] and r["kl_lens"] < r["kl_constant"] and r["positions"] == {"train": 58, "test": 20}  # 6 x 13 positions, a quarter held out
    # the probe's last token t3 occurred before, followed by t5: the induction head copies t5
    assert r["top_tokens"][0] == "t5" and r["logit_lens_top_tokens"][0] == "t5"
    with pytest.raises(ValueError, match="at least one"):
        attention_lens_report(model, tok, [])
