"""Soft injection of task embeddings (I228): a task's few-shot information carried into zero-shot prompts through
the attention heads' outputs. ``attnlab eval --intervention zeroshot --intervention inject`` scores the three-way
comparison in one run: ``plain`` (the task's k-shot prompt), ``zeroshot`` (the same test item without its
demonstrations) and ``inject`` (zero-shot + injection).

* **Zero-shot prompt** (:func:`zero_shot_ids`): the in-context tasks' demonstrations removed from the prompt
  (``icl_cls``: the ``Review: ... / Label: ...`` blocks; ``icl_map``: the ``word -> label`` lines), the
  instruction and the query kept; equal token for token to the task generator's ``shots=0`` prompt of the same
  item (tested). Plain prompts only (``chat=False``, the runner's).
* **Task embedding** (:func:`task_embedding`, convention ``inject-embedding``): per (layer, head) the mean of the
  head's output ``z`` (hook point ``z``, before the output projection) at the last prompt token over the task's
  few-shot prompts, ``(L, H, Dv)``. Built once per task, from the validation split's k-shot prompts.
* **Soft injection** (:class:`SoftInjection`): at the zero-shot prompt's last position, ``z_h <- (1 - a_h) z_h +
  a_h e_h`` for every head, ``a_h`` in [0, 1]; every other position (and every generated token) untouched.
* **Soft head selection** (:func:`optimize_mixing`, convention ``inject-val``): ``a = sigmoid(logits)``; the logits
  start at ``logit(init)`` and take ``steps`` Adam steps (learning rate ``lr``) on the mean answer NLL of the
  validation items' zero-shot prompts (model frozen) -- the paper's "pre-optimized" parameters. The same
  validation items give the embedding (their k-shot prompts) and the objective (their zero-shot prompts), so the
  fitted NLL is in-sample; the test split is never seen. Identity-first: the injection is kept only if its
  validation NLL is strictly below the zero-shot prompt's without it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from ..inspect.capture import forward_kwargs
from ..models import hf
from . import fit as F
from .registry import Applied, Knob, Spec, register

#: the in-context formats :func:`zero_shot_ids` knows: (task, marker of the prompt, one demonstration)
_FORMATS = (
    ("icl_cls", re.compile(r"^Label each review as "), re.compile(r"Review: [^\n]*\nLabel: [^\n]*\n\n")),
    ("icl_map", re.compile(r"^Each word maps to one of the labels "), re.compile(r"^[^\n]* -> [^\n]*\n", re.M)),
)
_CUE = {"icl_cls": "Label:", "icl_map": ""}


def zero_shot_ids(tok: Any, ids: Sequence[int]) -> list[int]:
    """The prompt ``ids`` of an in-context task (``icl_cls``, ``icl_map``) without its demonstrations: the
    instruction, the query and the answer cue, encoded as the task generator does (its ``shots=0`` prompt).
    Other prompts raise ValueError."""
    ids = list(ids)
    bos = getattr(tok, "bos_token_id", None)
    head = [ids[0]] if ids and bos is not None and ids[0] == bos else []
    text = tok.decode(ids[len(head):], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    for task, marker, demo in _FORMATS:
        if marker.search(text):
            cue = _CUE[task]
            if not text.endswith(cue):
                break
            body = demo.sub("", text[: len(text) - len(cue)])
            enc = list(tok(body, add_special_tokens=False)["input_ids"])
            return head + enc + (list(tok(cue, add_special_tokens=False)["input_ids"]) if cue else [])
    raise ValueError("zero-shot prompts are built for the plain (chat=False) prompts of the in-context tasks "
                     f"{', '.join(t for t, _, _ in _FORMATS)}; this prompt is neither: {text[:80]!r}...")


@torch.no_grad()
def task_embedding(model: nn.Module, prompts: Sequence[Sequence[int]]) -> Tensor:
    """Convention ``inject-embedding``: mean over ``prompts`` of every head's output ``z`` at the last prompt
    token, ``(L, H, Dv)`` float32 (a ``z`` observer on every layer, one forward per prompt)."""
    if not prompts:
        raise ValueError("task_embedding needs at least one few-shot prompt")
    L = hf.geometry(model).num_layers
    acc: dict[int, Tensor] = {}

    def obs(z: Tensor, ctx: Any) -> None:  # z (B, H, Tq, Dv)
        last = z[0, :, -1].detach().double()
        acc[ctx.layer] = acc[ctx.layer] + last if ctx.layer in acc else last

    with hf.hooks(model, {"blocks.*.attn.z": obs}):
        for p in prompts:
            model(**forward_kwargs(model, torch.tensor([list(p)]), logits_rows=1))
    return (torch.stack([acc[i] for i in range(L)]) / len(prompts)).float()


class SoftInjection:
    """``z_h <- (1 - a_h) z_h + a_h e_h`` at absolute position ``position`` (the zero-shot prompt's last token) for
    every head; ``embedding`` ``(L, H, Dv)``, ``a`` ``(L, H)`` in [0, 1] (differentiable; layers whose ``a`` is
    all zero get no hook). ``position`` None: nothing is injected (set it before the forward pass)."""

    def __init__(self, embedding: Tensor, a: Tensor, position: int | None = None) -> None:
        if embedding.dim() != 3 or a.shape != embedding.shape[:2]:
            raise ValueError(f"inject: embedding (L, H, Dv) and a (L, H) must agree, got {tuple(embedding.shape)} "
                             f"and {tuple(a.shape)}")
        if bool(((a.detach() < 0) | (a.detach() > 1)).any()):
            raise ValueError("inject: the mixing parameters a must lie in [0, 1]")
        self.embedding, self.a, self.position = embedding, a, position

    def _z(self, z: Tensor, ctx: Any) -> Tensor | None:  # z (B, H, Tq, Dv)
        if self.position is None:
            return None
        i = self.position - int(ctx.q_offset or 0)
        if not 0 <= i < z.shape[2]:
            return None
        a = self.a[ctx.layer].to(device=z.device, dtype=z.dtype).view(1, -1, 1)
        e = self.embedding[ctx.layer].to(device=z.device, dtype=z.dtype).unsqueeze(0)
        out = z.clone()
        out[:, :, i] = (1 - a) * z[:, :, i] + a * e
        return out

    def hooks(self) -> dict[str, Any]:
        layers = [int(i) for i in torch.nonzero((self.a.detach() != 0).any(-1)).flatten()]
        return {f"blocks.{layer}.attn.z": self._z for layer in layers}

    def attach(self, model: nn.Module) -> AbstractContextManager:
        return hf.hooks(model, self.hooks())


def _logit(p: float) -> float:
    if not 0 < p < 1:
        raise ValueError(f"inject: init (the initial mixing parameter) must lie in (0, 1), got {p}")
    return math.log(p / (1 - p))


def injected_nll(model: nn.Module, pairs: Sequence[F.Pair], embedding: Tensor, a: Tensor) -> Tensor:
    """Mean answer NLL over zero-shot ``pairs`` with the injection at each prompt's last position (keeps the
    graph when ``a`` requires grad)."""
    inj = SoftInjection(embedding, a)
    total = torch.zeros((), dtype=torch.float64)
    with inj.attach(model):
        for prompt, target in pairs:
            inj.position = len(prompt) - 1
            lp = torch.log_softmax(F.target_logits(model, prompt, target).double(), -1)
            total = total + F.nll_of(lp, target)
    return total / len(pairs)


def optimize_mixing(model: nn.Module, pairs: Sequence[F.Pair], embedding: Tensor, *, steps: int = 20,
                    lr: float = 0.1, init: float = 0.05) -> tuple[Tensor, list[float]]:
    """Convention ``inject-val``: the mixing logits ``(L, H)`` by ``steps`` Adam steps on the answer NLL of the
    zero-shot ``pairs`` (model frozen), from ``logit(init)``. Returns ``a = sigmoid(logits)`` and the NLL before
    each step."""
    if steps < 0:
        raise ValueError(f"inject: steps must be >= 0, got {steps}")
    logits = torch.full(embedding.shape[:2], _logit(float(init)), requires_grad=True)
    opt = torch.optim.Adam([logits], lr=float(lr))
    seen: list[float] = []
    with F._frozen(model), torch.enable_grad():
        for _ in range(int(steps)):
            opt.zero_grad()
            loss = injected_nll(model, pairs, embedding, torch.sigmoid(logits))
            loss.backward()
            opt.step()
            seen.append(float(loss.detach()))
    return torch.sigmoid(logits.detach()), seen


def fit_inject(fc: F.FitContext, knobs: dict[str, Any]) -> F.Fitted:
    """The task embedding from the validation items' k-shot prompts, the mixing parameters on their zero-shot
    prompts; kept only if they lower the zero-shot validation NLL (identity-first)."""
    model, tok = fc.model, fc.tok
    emb = task_embedding(model, [list(s.ids) for s in fc.val])
    fc.tick("inject embedding")
    zs = [(zero_shot_ids(tok, p), t) for p, t in fc.pairs]
    a, curve = optimize_mixing(model, zs, emb, steps=int(knobs["steps"]), lr=float(knobs["lr"]),
                               init=float(knobs["init"]))
    fc.tick("inject mixing")
    with torch.no_grad():
        off = F.val_nll(model, zs)
        on = float(injected_nll(model, zs, emb, a))
    cands: list[tuple[Any, float]] = [({"inject": False}, off), ({"inject": True}, on)]
    i, grid = F._best(cands)
    kept = a if i == 1 else torch.zeros_like(a)
    trace = {"grid": grid, "curve": [round(x, 6) for x in curve], "few_shot_prompts": len(fc.val),
             "few_shot_tokens": [len(s.ids) for s in fc.val], "zero_shot_tokens": [len(p) for p, _ in zs]}
    return F.Fitted({"inject": i == 1, "mean_a": round(float(kept.mean()), 4),
                     "heads_over_half": int((kept > 0.5).sum())}, {"embedding": emb, "a": kept.float()}, trace)


# ---------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------
def _build_zeroshot(model: nn.Module, tok: Any, knobs: dict[str, Any], tensors: dict[str, Tensor]) -> Applied:
    return Applied("zeroshot", "prompt", dict(knobs), prompt=lambda ids: zero_shot_ids(tok, ids))


def _build_inject(model: nn.Module, tok: Any, knobs: dict[str, Any], tensors: dict[str, Tensor]) -> Applied:
    if "embedding" not in tensors or "a" not in tensors:
        raise ValueError("inject needs its task embedding and mixing parameters (fit on the validation split)")
    inj = SoftInjection(tensors["embedding"].float(), tensors["a"].float())

    def prompt(ids: list[int]) -> list[int]:
        out = zero_shot_ids(tok, ids)
        inj.position = len(out) - 1  # the arm transforms the prompt before attaching its hooks
        return out

    attach = inj.attach if bool((inj.a != 0).any()) else None  # the fit kept the plain zero-shot prompt
    return Applied("inject", "hooks", dict(knobs), attach=attach, prompt=prompt)


_ICL = ("icl_cls", "icl_map")

register(Spec(
    "zeroshot", "prompt", ("I228",),
    "the in-context task's prompt without its demonstrations (the zero-shot baseline of soft injection)",
    (), _ICL, _build_zeroshot, tasks=_ICL))

register(Spec(
    "inject", "hooks", ("I228",),
    "soft injection of task embeddings: zero-shot prompt; at its last token every head's output mixed with the "
    "task's mean few-shot output, z <- (1 - a) z + a e, a per head optimized on validation",
    (Knob("steps", "int", 20, "Adam steps on the mixing logits"),
     Knob("lr", "float", 0.1, "Adam learning rate"),
     Knob("init", "float", 0.05, "initial mixing parameter a of every head")),
    _ICL, _build_inject, fit_inject, lambda k: True, tasks=_ICL))


__all__ = ["SoftInjection", "fit_inject", "injected_nll", "optimize_mixing", "task_embedding", "zero_shot_ids"]
