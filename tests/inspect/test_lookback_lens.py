"""The Lookback Lens detector's evaluation (A169): on planted features whose answer is known the detector is
perfect and names the informative head; its AUROC equals a pairwise count; on SmolLM2 the whole path runs on the
generated planted task (train split val, test split test, disjoint)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import tiny  # noqa: E402

from attnlab.inspect.lookback_lens import lookback_lens_eval  # noqa: E402
from attnlab.interventions import fit as F  # noqa: E402
from attnlab.interventions import tasks as T  # noqa: E402


def _pairwise(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def test_planted_features_give_a_perfect_detector_on_the_informative_head(monkeypatch):
    model = tiny("llama")  # 2 layers x 4 heads: 8 features
    splits = []

    def make(tok, task, length, n, seed, split):
        assert task == "planted"
        splits.append(split)
        return [(split, i) for i in range(n)]

    def examples(model, samples):
        g = torch.Generator().manual_seed(0 if samples[0][0] == "val" else 1)
        y = torch.tensor([float(i % 2) for _ in samples for i in [_[1]]])  # 1 = supported
        x = torch.rand(len(samples), 8, generator=g) * 0.1
        x[:, 5] += 0.5 * y  # head 1.1 looks back at the context when the summary is supported
        return x, y

    monkeypatch.setattr(T, "make", make)
    monkeypatch.setattr(F, "planted_examples", examples)
    r = lookback_lens_eval(model, None, n_train=12, n_test=10)
    assert splits == ["val", "test"]
    assert r.auroc == 1.0 and r.train_accuracy == 1.0 and r.top_heads[0][0] == "1.1"
    assert r.labels == tuple(1 - (i % 2) for i in range(10))  # positive = planted (unsupported)
    xte, _ = examples(model, [("test", i) for i in range(10)])
    assert r.baseline_auroc == pytest.approx(_pairwise((1 - xte.double().mean(1)).tolist(), r.labels))
    assert r.auroc == _pairwise(r.scores, r.labels)
    with pytest.raises(ValueError, match="n_train"):
        lookback_lens_eval(model, None, n_train=1, n_test=4)


@pytest.mark.slow
def test_smollm2_planted_detector_runs_and_counts(smollm2):
    model, tok = smollm2
    r = lookback_lens_eval(model, tok, n_train=8, n_test=8, length=256)
    assert len(r.scores) == 8 and set(r.labels) <= {0, 1}
    if r.auroc is not None:
        assert r.auroc == pytest.approx(_pairwise(r.scores, r.labels))
    assert 0.0 <= r.train_accuracy <= 1.0 and len(r.top_heads) == 8
