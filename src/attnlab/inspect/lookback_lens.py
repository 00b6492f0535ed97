"""Lookback Lens (Chuang et al. 2024, A169) as a detector, trained and evaluated: AUROC of detecting planted
unsupported content from attention alone.

Data: the ``planted`` task of :mod:`attnlab.interventions.tasks` (a report of four facts in filler, then a
one-sentence summary that restates one fact -- supported -- or swaps its value for one the report never mentions
-- planted, unsupported; generated offline with the model's own tokenizer). Features, per sample: the mean over
the summary's tokens of every head's **lookback ratio** ``A(context) / (A(context) + A(new))`` (the paper's
definition; :func:`attnlab.plans.calibrate.lookback_ratios`, one teacher-forced pass), ``(L * H,)``. Detector:
L2-regularized logistic regression (:func:`attnlab.interventions.fit.logistic_fit`) trained on the ``val`` split,
evaluated on the disjoint ``test`` split.

Reported (conventions named):

* ``auroc`` -- AUROC of the detector's *unsupported* probability for the planted label (positive = planted),
  with a stratified bootstrap CI (:func:`attnlab.interventions.scoring.auroc_ci`);
* ``baseline_auroc`` -- the same for the untrained score ``1 - mean lookback ratio over all heads`` (less
  attention to the context = more likely unsupported), so the value of training a detector is visible;
* ``top_heads`` -- the heads with the largest absolute detector weights (features standardized by the train
  split's std, so weights compare).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LookbackLensResult:
    n_train: int
    n_test: int
    length: int
    train_accuracy: float
    auroc: float | None
    auroc_ci: tuple[float, float] | None
    baseline_auroc: float | None
    scores: tuple[float, ...]  # detector P(unsupported) on the test split
    labels: tuple[int, ...]  # 1 = planted (unsupported)
    top_heads: tuple[tuple[str, float], ...]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def lookback_lens_eval(model: nn.Module, tok: Any, *, n_train: int = 16, n_test: int = 16, length: int = 256,
                       seed: int = 0, top: int = 8) -> LookbackLensResult:
    """Train the detector on ``n_train`` planted samples of the val split, evaluate on ``n_test`` of the test split
    (both splits balanced by construction only in expectation: labels are drawn per sample)."""
    from ..interventions import tasks as T
    from ..interventions.fit import logistic_fit, planted_examples
    from ..interventions.scoring import auroc, auroc_ci
    from ..models.hf import geometry

    if n_train < 2 or n_test < 2:
        raise ValueError(f"need n_train, n_test >= 2, got {n_train}, {n_test}")
    with torch.no_grad():
        xtr, ytr = planted_examples(model, T.make(tok, "planted", length, n_train, seed, "val"))
        xte, yte = planted_examples(model, T.make(tok, "planted", length, n_test, seed, "test"))
    if int(ytr.sum()) in (0, len(ytr)):
        raise ValueError("the train split holds one label only; draw more samples (n_train)")
    sd = xtr.std(0).clamp_min(1e-6)
    w, b = logistic_fit(xtr / sd, ytr)
    p_sup_tr = torch.sigmoid((xtr / sd).double() @ w.double() + b)
    acc = float(((p_sup_tr > 0.5).double() == ytr.double()).double().mean())
    unsup = (1 - torch.sigmoid((xte / sd).double() @ w.double() + b)).tolist()
    planted = [int(1 - y) for y in yte.tolist()]  # planted_examples labels 1 = supported
    base = (1 - xte.double().mean(1)).tolist()
    H = geometry(model).num_heads
    order = w.abs().argsort(descending=True)[:top].tolist()
    heads = tuple((f"{i // H}.{i % H}", round(float(w[i]), 4)) for i in order)
    return LookbackLensResult(n_train, n_test, length, acc, auroc(unsup, planted), auroc_ci(unsup, planted),
                              auroc(base, planted), tuple(unsup), tuple(planted), heads)


__all__ = ["LookbackLensResult", "lookback_lens_eval"]
