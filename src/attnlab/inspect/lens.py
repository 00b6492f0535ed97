"""Attention Lens (Sakarvadia et al., A226): a small learned lens per attention head, mapping the head's output to
the vocabulary, trained to match the model's own next-token distribution.

Lens form used here (named: the *o-proj-initialized linear lens*): for head ``(l, h)`` with output
``z (..., Dv)`` (the hook point ``blocks.{l}.attn.z``, before ``o_proj``),

    lens(z) = unembed(final_norm(z @ A + b)),   A: (Dv, d_model), b: (d_model,)

where ``final_norm`` and ``unembed`` are the model's own (frozen) final RMSNorm and LM head, and only ``A, b``
are trained. ``init="o_proj"`` starts ``A`` at the head's slice of ``o_proj`` (``W_O[:, h]^T``) and ``b = 0``,
so the untrained lens *is* the plain per-head logit lens of this convention (the head's ``o_proj`` contribution
through the final norm and unembedding, the norm applied to the head's contribution alone); ``init="random"``
starts from a small seeded random ``A``.

Objective (A226): ``KL(p_model || p_lens)`` per position, ``p_model`` the model's final next-token distribution
at that position, averaged over positions. Data: the model's own greedy continuations of seeded prompts of
random ordinary tokens (:func:`lens_data`); a held-out part measures the KL of the trained lens against the
untrained (per-head logit lens) baseline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import hf


@dataclass(frozen=True)
class LensConfig:
    """Training knobs: ``steps`` of Adam at ``lr`` on minibatches of ``batch`` positions, ``init`` ("o_proj" or
    "random"), ``seed`` (random init and minibatch order)."""

    steps: int = 100
    lr: float = 1e-2
    batch: int = 64
    init: str = "o_proj"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch < 1 or not self.lr > 0:
            raise ValueError(f"steps >= 0, batch >= 1 and lr > 0 required, got {self}")
        if self.init not in ("o_proj", "random"):
            raise ValueError(f"init must be 'o_proj' or 'random', got {self.init!r}")


@dataclass(frozen=True)
class LensData:
    """``z``: head -> ``(N, Dv)`` head outputs at N positions; ``logits``: ``(N, V)`` the model's final logits at
    the same positions; ``tokens``: ``(S, T)`` the sequences they come from."""

    z: dict[tuple[int, int], Tensor]
    logits: Tensor
    tokens: Tensor


def _final(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    from .causal import _base, _unembed

    return _base(model).norm, _unembed(model)


def _check_heads(model: nn.Module, heads) -> list[tuple[int, int]]:
    g = hf.geometry(model)
    out = [(int(a), int(b)) for a, b in heads]
    if not out:
        raise ValueError("heads must list at least one (layer, head)")
    for layer, h in out:
        if not (0 <= layer < g.num_layers and 0 <= h < g.num_heads):
            raise ValueError(f"heads: ({layer}, {h}) is not a head of this model ({g.num_layers} layers x "
                             f"{g.num_heads} heads)")
    return out


@torch.no_grad()
def lens_data(model: nn.Module, heads, *, sequences: int = 8, prompt: int = 8, generate: int = 24, seed: int = 0,
              vocab: int | None = None, special=()) -> LensData:
    """Seeded training text: ``sequences`` prompts of ``prompt`` random ordinary tokens, each continued greedily
    for ``generate`` tokens by the model itself; then one pass recording each head's ``z`` and the final logits
    at every position after the prompt's first token."""
    heads = _check_heads(model, heads)
    V = vocab or model.get_input_embeddings().num_embeddings
    pool = [t for t in range(V) if t not in set(special)]
    rng = random.Random(seed)
    seqs = []
    for _ in range(sequences):
        ids = torch.tensor([rng.sample(pool, prompt)])
        if generate > 0:
            ids = model.generate(ids, max_new_tokens=generate, do_sample=False, min_new_tokens=generate,
                                 pad_token_id=pool[0])
        seqs.append(ids[0])
    tokens = torch.stack(seqs)
    names = sorted({f"blocks.{layer}.attn.z" for layer, _ in heads})
    out, cache = hf.run_with_cache(model, tokens, names)
    zs = {(layer, h): cache[f"blocks.{layer}.attn.z"][:, h, 1:].reshape(-1, cache[f"blocks.{layer}.attn.z"].shape[-1])
          .float() for layer, h in heads}
    return LensData(zs, out.logits[:, 1:].reshape(-1, out.logits.shape[-1]).float(), tokens)


class AttentionLens(nn.Module):
    """The o-proj-initialized linear lens of one head (module docstring). ``forward(z (N, Dv)) -> (N, V)``."""

    def __init__(self, model: nn.Module, layer: int, head: int, init: str = "o_proj", seed: int = 0):
        super().__init__()
        (layer, head), = _check_heads(model, [(layer, head)])
        self.layer, self.head = layer, head
        norm, unembed = _final(model)
        self._frozen = (norm, unembed)  # not registered: the model's parts are never trained
        wo = dict(hf.attention_modules(model))[layer].o_proj.weight.detach().float()  # (d, H * Dv)
        H = hf.geometry(model).num_heads
        Dv = wo.shape[1] // H
        if init == "o_proj":
            A = wo[:, head * Dv:(head + 1) * Dv].T.clone()
        elif init == "random":
            g = torch.Generator().manual_seed(seed)
            A = torch.randn(Dv, wo.shape[0], generator=g) / Dv ** 0.5
        else:
            raise ValueError(f"init must be 'o_proj' or 'random', got {init!r}")
        self.A = nn.Parameter(A)
        self.b = nn.Parameter(torch.zeros(wo.shape[0]))

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[-1] != self.A.shape[0]:
            raise ValueError(f"z must be (N, {self.A.shape[0]}), got {tuple(z.shape)}")
        norm, unembed = self._frozen
        return unembed(norm(z @ self.A + self.b))


def lens_kl(lens: nn.Module, z: Tensor, logits: Tensor, chunk: int = 256) -> float:
    """Mean over positions of ``KL(softmax(logits) || softmax(lens(z)))`` (nats)."""
    total = 0.0
    with torch.no_grad():
        for s in range(0, z.shape[0], chunk):
            total += float(_kl(lens(z[s:s + chunk]), logits[s:s + chunk])) * min(chunk, z.shape[0] - s)
    return total / z.shape[0]


def _kl(lens_logits: Tensor, target_logits: Tensor) -> Tensor:
    p_log = torch.log_softmax(target_logits.float(), -1)
    q_log = torch.log_softmax(lens_logits.float(), -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def train_lens(lens: AttentionLens, z: Tensor, logits: Tensor, cfg: LensConfig = LensConfig()) -> list[float]:
    """Adam on ``A, b`` minimizing the KL objective; returns the minibatch loss of each step."""
    if z.shape[0] != logits.shape[0]:
        raise ValueError(f"z and logits differ in positions: {z.shape[0]} vs {logits.shape[0]}")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam([lens.A, lens.b], lr=cfg.lr)
    losses = []
    for _ in range(cfg.steps):
        idx = torch.randint(0, z.shape[0], (min(cfg.batch, z.shape[0]),), generator=g)
        loss = _kl(lens(z[idx]), logits[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def attention_lens_report(model: nn.Module, tok, heads, *, cfg: LensConfig = LensConfig(), sequences: int = 8,
                          prompt: int = 8, generate: int = 24, holdout: float = 0.25, probe: str | Tensor | None = None,
                          top: int = 5, seed: int = 0) -> list[dict]:
    """Train one lens per head on :func:`lens_data` and report per head the held-out KL of the untrained lens
    (the per-head logit lens baseline, ``init="o_proj"``), of the lens at its initialization, of the trained lens
    and of a constant prediction (the mean training distribution: ``kl_constant``, what a lens that ignores the
    head reaches), and the top tokens of the trained lens and of the baseline at the last position of ``probe``
    (a text or ids; None: the first generated sequence)."""
    heads = _check_heads(model, heads)
    special = getattr(tok, "all_special_ids", None) or []
    V = min(model.get_input_embeddings().num_embeddings, len(tok)) if hasattr(tok, "__len__") else None
    data = lens_data(model, heads, sequences=sequences, prompt=prompt, generate=generate, seed=seed, vocab=V,
                     special=special)
    N = data.logits.shape[0]
    n_test = max(1, int(round(N * holdout)))
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    if isinstance(probe, Tensor):
        probe_ids = probe.view(1, -1)
    else:
        probe_ids = (torch.tensor([tok(probe, add_special_tokens=False)["input_ids"]]) if probe is not None
                     else data.tokens[:1])
    names = sorted({f"blocks.{layer}.attn.z" for layer, _ in heads})
    with torch.no_grad():
        _, pc = hf.run_with_cache(model, probe_ids, names)
        # reference: a constant prediction, the mean training distribution (what a lens ignoring z can reach)
        marginal = torch.softmax(data.logits[train], -1).mean(0).clamp_min(1e-30).log()
        kl_const = float(_kl(marginal.expand(n_test, -1), data.logits[test]))
    rows = []
    for layer, h in heads:
        z = data.z[(layer, h)]
        base = AttentionLens(model, layer, h, init="o_proj")
        lens = AttentionLens(model, layer, h, init=cfg.init, seed=cfg.seed)
        kl_base = lens_kl(base, z[test], data.logits[test])
        kl_before = lens_kl(lens, z[test], data.logits[test])
        losses = train_lens(lens, z[train], data.logits[train], cfg)
        kl = lens_kl(lens, z[test], data.logits[test])
        with torch.no_grad():
            zp = pc[f"blocks.{layer}.attn.z"][0, h, -1:].float()
            tl, tt = lens(zp)[0].topk(top)
            bl, bt = base(zp)[0].topk(top)
        dec = (lambda ids: [tok.decode([i]) for i in ids]) if hasattr(tok, "decode") else (lambda ids: ids)
        rows.append({"layer": layer, "head": h, "kl_logit_lens": kl_base, "kl_init": kl_before, "kl_lens": kl,
                     "kl_constant": kl_const,
                     "train_loss_first": losses[0] if losses else None,
                     "train_loss_last": losses[-1] if losses else None,
                     "top_tokens": dec(tt.tolist()), "top_logits": tl.tolist(),
                     "logit_lens_top_tokens": dec(bt.tolist()), "positions": {"train": len(train), "test": n_test}})
    return rows


__all__ = ["AttentionLens", "LensConfig", "LensData", "attention_lens_report", "lens_data", "lens_kl",
           "train_lens"]
