"""``attnlab bench saliency`` [B17]: saliency known answers, the correlation metrics against independent
references, hook attention = a manual softmax(q k^T), the cross-attention model, the command and its
resume."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import tiny  # noqa: E402

from attnlab.bench import saliency as S  # noqa: E402
from attnlab.bench import seq2seq as Q  # noqa: E402
from attnlab.models import hf  # noqa: E402


def test_saliency_of_a_one_token_model_is_all_on_that_token():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 8, generator=g)

    def forward(x):  # the output reads position 3 only
        return x[:, 3] @ W.T

    emb = torch.randn(4, 7, 8, generator=g)
    sal, target = S.grad_x_input(forward, emb)
    expected = torch.zeros(4, 7)
    expected[:, 3] = 1.0
    torch.testing.assert_close(sal, expected)
    assert target.tolist() == (emb[:, 3] @ W.T).argmax(-1).tolist()
    # gradient x input by hand for a linear read of two positions: |x_j . w_y| normalized
    sal2, _ = S.grad_x_input(lambda x: (x[:, 1] + 2 * x[:, 5]) @ W.T, emb, torch.zeros(4, dtype=torch.long))
    raw = torch.stack([(emb[:, 1] * W[0]).sum(-1).abs(), 2 * (emb[:, 5] * W[0]).sum(-1).abs()], dim=1)
    torch.testing.assert_close(sal2[:, [1, 5]], raw / raw.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="scores"):
        S.grad_x_input(lambda x: x.sum((1, 2)), emb)


def test_alignment_of_identical_rows_is_one():
    g = torch.Generator().manual_seed(1)
    row = torch.softmax(torch.randn(12, generator=g), 0)
    assert float(S.pearson(row, row)) == pytest.approx(1.0)
    assert float(S.spearman(row, row)) == pytest.approx(1.0)
    assert float(S.overlap(row, row)) == pytest.approx(1.0)
    assert float(S.pearson(row, -row)) == pytest.approx(-1.0)
    assert torch.isnan(S.pearson(torch.ones(5), row[:5]))  # constant: undefined, not 0
    acc = S.Alignment(2, 3)
    for _ in range(3):
        r = torch.softmax(torch.randn(12, generator=g), 0)
        acc.add(r.expand(2, 3, 12), r)
    s = acc.summary()
    assert s["rows"] == 3 and s["best_r"] == pytest.approx(1.0) and s["all_mean_r"] == pytest.approx(1.0)
    assert s["all_mean_overlap"] == pytest.approx(1.0) and s["best_explained"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for row_ in s["pearson"] for v in row_)
    with pytest.raises(ValueError, match="must be"):
        acc.add(torch.zeros(3, 3, 12), r)


def test_correlations_match_numpy_and_scipy():
    np = pytest.importorskip("numpy")
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 4, (3, 9), generator=g).double()  # ties
    b = torch.randn(3, 9, generator=g).double()
    for i in range(3):
        assert float(S.pearson(a[i], b[i])) == pytest.approx(np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1])
        assert float(S.spearman(a[i], b[i])) == pytest.approx(stats.spearmanr(a[i].numpy(), b[i].numpy())[0])
        assert S.rankdata(a[i]).tolist() == (stats.rankdata(a[i].numpy()) - 1).tolist()


def test_hook_attention_equals_manual_softmax_and_decoder_rows():
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(3))
    T = ids.shape[1]
    names = [f"blocks.{layer}.attn.{p}" for layer in range(2) for p in ("q", "k", "weights")]
    _, store = hf.run_with_cache(model, ids, names, rows=(0, T))
    for layer in range(2):
        q, k = store[f"blocks.{layer}.attn.q"].double(), store[f"blocks.{layer}.attn.k"].double()
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scale = model.model.layers[layer].self_attn.scaling
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(
            store[f"blocks.{layer}.attn.weights"].double(), torch.softmax(scores, -1), atol=1e-5, rtol=1e-4
        )
    for p in model.parameters():
        p.requires_grad_(False)
    att, sal, target = S.decoder_rows(model, ids)
    assert att.shape == (2, 4, T) and sal.shape == (T,)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4))
    assert float(sal.sum()) == pytest.approx(1.0) and float(sal.min()) >= 0
    assert target == int(model(input_ids=ids).logits[0, -1].argmax())
    assert all(p.grad is None for p in model.parameters())


def test_seq2seq_cross_attention_rows_and_saliency():
    cfg = Q.Seq2SeqConfig(vocab=8, src_len=4, dim=16, heads=2, enc_layers=1, dec_layers=2)
    src, tgt_in, tgt = Q.make_batch(cfg, 3, torch.Generator().manual_seed(0))
    assert tgt_in[:, 0].eq(cfg.bos).all() and (tgt_in[:, 1:] == tgt[:, :-1]).all()
    assert Q.alignment_target(4).tolist() == [1, 0, 3, 2]
    torch.manual_seed(0)
    model = Q.TinySeq2Seq(cfg).eval()
    att, sal, pred = S.seq2seq_rows(model, src, tgt_in)
    assert att.shape == (3, 4, 2, 2, 4) and sal.shape == (3, 4, 4) and pred.shape == (3, 4)
    torch.testing.assert_close(att.sum(-1), torch.ones(3, 4, 2, 2))
    torch.testing.assert_close(sal.sum(-1), torch.ones(3, 4))
    assert all(c.weights is None for c in model.cross_layers)  # the recording is switched off again
    with pytest.raises(ValueError, match="even"):
        Q.Seq2SeqConfig(src_len=5)


def _args(tmp_path: Path, **over) -> argparse.Namespace:
    ns = dict(
        models=["seq2seq"],
        samples=2,
        length=None,
        tasks=["kv"],
        s2s_steps=3,
        seed=0,
        quick=True,
        threads=1,
        out=str(tmp_path),
        resume=None,
        executor="local",
        address=None,
        workers=1,
    )
    ns.update(over)
    return argparse.Namespace(**ns)


def test_command_writes_files_and_resumes(tmp_path, monkeypatch):
    assert S.run(_args(tmp_path)) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("saliency-")]
    for name in ("results.jsonl", "results.json", "results.md", "saliency_alignment.png"):
        assert (run_dir / name).is_file(), name
    (row,) = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert row["model"] == "seq2seq" and row["rows"] == 2 * 10 and len(row["pearson"]) == 2

    def boom(cfg):
        raise AssertionError("a finished model ran again")

    monkeypatch.setattr(S, "run_config", boom)
    assert S.run(_args(tmp_path, resume=str(run_dir))) == 0
    assert len((run_dir / "results.jsonl").read_text().splitlines()) == 1
