"""HeadMask training (L133, Sun et al., "Alleviating the Inequality of Attention Heads for Neural Machine
Translation").

Multi-head attention whose training forwards zero ``n_mask`` heads of the layer for the whole batch, so the
model cannot lean on a few heads; evaluation masks nothing. With ``m_i = 0`` for the masked heads, 1 otherwise:

    O = sum_i m_i softmax(Q_i K_g^T / sqrt(d)) V_g W_O^i          (the heads' outputs zeroed before W_O)

The kept heads are not rescaled (no dropout-style ``H / (H - n)`` factor): the abstract names masking only and
no rescale is known to us from the paper, so eval-time outputs are plain MHA's (in expectation a random-mode
training forward sums ``(H - n) / H`` of the heads). Two ways of choosing the masked heads, one mask per layer per
batch (shared by the batch's examples):

* ``mode="random"``: ``n_mask`` heads drawn uniformly at random (every ``n_mask``-subset equally likely) at each
  training forward. ``seed=None`` draws from torch's global generator (reproducible with ``torch.manual_seed``,
  and independent across the layers of one model); an int gives the layer its own stream (layers built with the
  same seed draw the same heads: give each layer its own seed).
* ``mode="impt"``: the ``n_mask`` most important heads on the current batch, importance as Michel et al. (2019,
  "Are Sixteen Heads Really Better than One?"): a gate ``xi_h = 1`` multiplies head ``h``'s output and
  ``I_h = sum_b |dL/dxi_{b,h}| = sum_b |sum_{t,c} Att_h(x_b)[t, c] . dL/dAtt_h(x_b)[t, c]|``, the first-order
  change of the loss when the head is removed, absolute per example (Michel's ``E_x |.|``, summed over the batch).
  Michel's per-layer normalization is left out: it does not change the ranking within a layer.
  :func:`headmask_step` runs it: a first forward/backward (gradients w.r.t. the gates only) ranks the heads on
  the unmasked model, then the real forward/backward masks the top ``n_mask`` of every ``impt`` layer.

Cost: a ``random`` step costs what an MHA step costs. An ``impt`` step costs two forwards and two backwards;
the first backward stops at the lowest HeadMask layer and computes no weight gradients (measured: 1.8x an MHA step
on a 4-layer TransformerLM, CPU).

The layer is MHA (``mha``'s projections, op, cache and every option) plus the head mask; its parameters have
MHA's names, so an MHA state dict loads unchanged. A cache means decoding, which is inference: cached calls never
mask. The paper's text beyond the abstract was not at hand: the masking-by-zeroing, the batch-wide mask and
Michel's importance are this implementation's reading of it (see docs/mechanisms/layers.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...core.checks import nonneg_int
from ..heads import LayerCache, one_of
from ..registry import register
from .mha import MHAConfig, MultiHeadAttention

MODES = ("random", "impt")


@dataclass(frozen=True)
class HeadMaskConfig(MHAConfig):
    """MHA options plus mode: how the masked heads are chosen ("random" | "impt"); n_mask: heads zeroed per
    training forward (0 <= n_mask < heads); seed: the random mode's own stream (None: torch's global one)."""

    mode: str = "random"
    n_mask: int = 1
    seed: int | None = None

    def validate(self) -> None:
        super().validate()
        one_of("mode", self.mode, MODES)
        nonneg_int("n_mask", self.n_mask)
        if self.n_mask >= self.heads:
            raise ValueError(f"n_mask must be less than heads ({self.heads}): masking every head zeroes the "
                             f"layer, got {self.n_mask}")
        if self.seed is not None:
            nonneg_int("seed", self.seed)


@register(
    "headmask",
    family="layers",
    papers=("L133",),
    year=2020,
    summary="MHA trained with n heads per layer masked each batch: random heads or the most important ones",
    config=HeadMaskConfig,
)
class HeadMaskAttention(MultiHeadAttention):
    """(B, T, dim) -> (B, T, dim). Training forwards (no cache) zero ``n_mask`` heads' outputs (B, H, T, d)
    before ``W_O``; ``last_mask`` (H,) bool holds the heads the latest forward masked (None: none). Eval,
    decoding and ``n_mask = 0`` are exactly MHA."""

    def __init__(self, cfg: HeadMaskConfig) -> None:
        super().__init__(cfg)
        self._rng = None if cfg.seed is None else torch.Generator().manual_seed(cfg.seed)
        self.last_mask: Tensor | None = None
        self._planned: Tensor | None = None  # heads to mask, set by headmask_step (mode impt)
        self._probing = False  # importance pass: gates on every head, nothing masked
        self._gate: Tensor | None = None  # (B, H) ones whose gradient is the importance

    # ---- the mask ------------------------------------------------------------------------------------
    def draw_mask(self) -> Tensor:
        """A uniformly random set of ``n_mask`` heads, (H,) bool (True: masked), from the layer's stream."""
        H = self.cfg.heads
        mask = torch.zeros(H, dtype=torch.bool)
        mask[torch.randperm(H, generator=self._rng)[: self.cfg.n_mask]] = True
        return mask

    def reset_rng(self) -> None:
        """Restart the layer's own stream at ``seed`` (seed=None: the global generator, nothing to restart)."""
        if self.cfg.seed is not None:
            self._rng.manual_seed(self.cfg.seed)

    def plan_mask(self, mask: Tensor | None) -> None:
        """Mask these heads, (H,) bool with ``n_mask`` True, in every training forward until cleared with None
        (what :func:`headmask_step` does for ``impt`` layers; any mode takes a planned mask)."""
        if mask is not None:
            self._check_mask(mask)
            if int(mask.sum()) != self.cfg.n_mask:
                raise ValueError(f"headmask: a planned mask masks n_mask={self.cfg.n_mask} heads, "
                                 f"got {int(mask.sum())}")
            mask = mask.detach().cpu().clone()
        self._planned = mask

    def _check_mask(self, mask: Tensor) -> None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (self.cfg.heads,):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"headmask: a head mask is a bool tensor of shape ({self.cfg.heads},), got {shape}")

    def mask_heads(self, o: Tensor, train: bool) -> Tensor:
        """o (B, H, T, d) -> o with the masked heads zeroed (``train``: a training forward without a cache)."""
        self.last_mask = None
        if self._probing:
            if self._gate is not None:
                raise RuntimeError("headmask: the layer ran twice in one importance pass; the importance of a "
                                   "layer called more than once per loss is not defined here")
            self._gate = torch.ones(o.shape[:2], dtype=o.dtype, device=o.device, requires_grad=True)
            return o * self._gate[:, :, None, None]
        if not train or self.cfg.n_mask == 0:
            return o
        if self._planned is not None:
            mask = self._planned
        elif self.cfg.mode == "random":
            mask = self.draw_mask()
        else:
            raise RuntimeError("headmask (mode='impt') masks the heads ranked on the current batch: train with "
                               "headmask_step(model, batch, loss_fn), or call .eval() for unmasked outputs")
        self.last_mask = mask
        return o.masked_fill(mask.to(o.device)[None, :, None, None], 0.0)

    # ---- the layer -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        q, k, v, start = self.qkv_cached(x, cache)
        o = self.attend(q, k, v, start, None if cache is None else cache.state)
        return self.out(self.mask_heads(o, train=self.training and cache is None))

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The formula head by head with dense scores, leaving out the heads of ``mask`` (H,) bool (None: none,
        the eval-time layer): O = sum_{i not masked} softmax(Q_i K_g^T / sqrt(d)) V_g W_O^i (+ the W_O bias)."""
        if mask is not None:
            self._check_mask(mask)
        return super().reference(x, skip=mask)


# ---- training with HeadMask ----------------------------------------------------------------------------
@dataclass
class HeadMaskStep:
    """What :func:`headmask_step` did: the masked batch's loss (detached), the importance (H,) of every ``impt``
    layer on the batch, and the heads each HeadMask layer masked (sorted indices), by module name."""

    loss: Tensor
    importance: dict[str, Tensor]
    masked: dict[str, Tensor]


LossFn = Callable[[nn.Module, Any], Tensor]


def _layers(model: nn.Module) -> list[tuple[str, HeadMaskAttention]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, HeadMaskAttention)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no headmask layer")
    return found


def head_importance(model: nn.Module, batch: Any, loss_fn: LossFn) -> dict[str, Tensor]:
    """Michel et al.'s head importance of every HeadMask layer on ``batch``: ``{module name: I (H,)}`` with
    ``I_h = sum_b |sum_{t,c} Att_h(x_b)[t, c] dL/dAtt_h(x_b)[t, c]|``, L = ``loss_fn(model, batch)`` (a scalar,
    e.g. the batch's mean loss) on the unmasked model. One forward and one backward to the heads' gates;
    parameters' ``.grad`` are left untouched."""
    layers = _layers(model)
    for _, m in layers:
        m._probing, m._gate = True, None
    try:
        loss = loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
            raise ValueError("loss_fn(model, batch) must return a scalar tensor that depends on the model")
        missing = [n for n, m in layers if m._gate is None]
        if missing:
            raise RuntimeError(f"headmask layers {missing} did not run in loss_fn(model, batch)")
        gates = [m._gate for _, m in layers]
        g = torch.autograd.grad(loss, gates, allow_unused=True)
    finally:
        for _, m in layers:
            m._probing, m._gate = False, None
    return {n: (torch.zeros(m.cfg.heads) if gi is None else gi.detach().abs().sum(0)) for (n, m), gi in zip(layers, g)}


def headmask_step(model: nn.Module, batch: Any, loss_fn: LossFn) -> HeadMaskStep:
    """One HeadMask training step up to the optimizer: ``loss_fn(model, batch)`` (a scalar) is computed with the
    masks and back-propagated into the parameters' ``.grad``; call ``optimizer.step()`` after.

    ``impt`` layers first get their heads ranked by :func:`head_importance` on this batch (on the unmasked
    model: ``random`` layers draw nothing in that pass), and the top ``n_mask`` of each are masked in the real
    pass. ``random`` layers draw their mask in the real pass as in a plain training forward. Cost: with an
    ``impt`` layer, two forwards and two backwards (the first only to the gates); otherwise one of each."""
    if not model.training:
        raise RuntimeError("headmask_step trains: call model.train() first (eval mode masks nothing)")
    layers = _layers(model)
    impt = [(n, m) for n, m in layers if m.cfg.mode == "impt" and m.cfg.n_mask > 0]
    importance: dict[str, Tensor] = {}
    if impt:
        scores = head_importance(model, batch, loss_fn)
        for n, m in impt:
            importance[n] = scores[n]
            mask = torch.zeros(m.cfg.heads, dtype=torch.bool)
            mask[torch.topk(scores[n], m.cfg.n_mask).indices] = True
            m.plan_mask(mask)
    try:
        loss = loss_fn(model, batch)
        loss.backward()
    finally:
        for _, m in impt:
            m.plan_mask(None)
    masked = {n: m.last_mask.nonzero().flatten() for n, m in layers if m.last_mask is not None}
    return HeadMaskStep(loss.detach(), importance, masked)


__all__ = ["HeadMaskAttention", "HeadMaskConfig", "HeadMaskStep", "head_importance", "headmask_step"]
