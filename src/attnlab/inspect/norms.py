"""Norm-based attention maps, representational collapse across depth, and massive activations.

Norm-based maps (Kobayashi et al. 2020, "Attention is Not Only a Weight"; 2021, "Incorporating Residual and
Normalization Layers"; 2024, A209 "Analyzing Feed-Forward Blocks ... through the Lens of Attention Maps")
--------------------------------------------------------------------------------------------------------------
A layer's attention output at query ``i`` is ``sum_h sum_j alpha^h_ij f^h(x_j)`` with ``f^h(x) = x W_V^h W_O^h``
(the value, its bias included, through the head's columns of the output projection; row vectors). Kobayashi
et al.'s head map is ``||alpha^h_ij f^h(x_j)|| = alpha^h_ij ||f^h(x_j)||`` (``NormMaps.heads``). The layer is
then followed token by token as a sum of per-input-token vectors ``c_ij`` (``sum_j c_ij`` + a bias term = the
model's real activation at ``i``), one scope (*stage*) after another; ``NormMaps.maps[stage]`` is ``||c_ij||``:

* ``attn`` (ATB): ``c_ij = sum_h alpha^h_ij f^h(x_j)``; the output projection's bias is a constant, no token's.
* ``attn_res`` (ATB+RES): the residual adds the identity, ``c_ii += x_i`` (``x``: the layer's input).
* ``attn_res_ln`` (ATB+RES+LN): the norm applied to that sum, linear once its statistics are frozen at the
  real input ``y_i``: RMSNorm ``g(c) = gain * c / sqrt(mean(y_i^2) + eps)``; LayerNorm
  ``g(c) = gamma * (c - mean(c)) / sqrt(var(y_i) + eps)`` (its ``beta`` joins the constant).
* ``ff`` (+FF): the feed-forward block, by Integrated Gradients over its element-wise non-linearity (A209's
  approach), baseline zero input, midpoint rule with ``steps`` points: part ``p`` of the FF input ``z = sum_p z_p``
  gets ``W_out (mean_k dh/du(u(a_k)) . u_p)`` where ``u_p`` are the part's pre-activations (``gate`` and
  ``up`` for gated MLPs: ``h = act(gate) * up``; ``W_1 z_p`` for BERT). The linear maps are exact; only the
  path integral is approximated, so ``sum_p`` equals ``FF(z) - FF(0)`` up to the midpoint rule's error
  (``O(1 / steps^2)``; exact when the integrand is linear in the path parameter, e.g. a gated MLP with a linear
  activation). The constant's share and ``FF(0)`` go to the constant.
* ``ff_res`` (+FF+RES): the FF's residual; for pre-norm layers this is the layer's output.
* ``ff_res_ln`` (post-norm only, BERT): the output LayerNorm, frozen likewise; the layer's output.

Norm placement (which norm is "the LN"):

* pre-norm decoders (Llama, SmolLM2, Qwen2, Mistral): the input RMSNorm acts on each token alone, so it is part
  of ``f`` (the value path reads ``RMSNorm(x_j)``); ``attn_res`` adds the *raw* residual ``x_i``;
  ``attn_res_ln`` is the FF's input norm (``post_attention_layernorm``) applied to the residual sum.
* Gemma 3 (sandwich norms): the post-attention RMSNorm, frozen at the real attention output, is applied
  inside ``attn`` (``heads`` stays before it: the definition ``||alpha f||``); ``attn_res_ln`` is
  ``pre_feedforward_layernorm``; the post-feed-forward RMSNorm (frozen at the real FF output) is inside ``ff``.
* BERT (post-norm): ``attn_res_ln`` is the attention block's LayerNorm; ``ff_res_ln`` the output LayerNorm.

``mixing_ratio(map)`` is the share of each row's norm mass on other tokens, ``sum_{j != i} m_ij / sum_j m_ij``
(the row-wise context-mixing ratio, our convention for Kobayashi et al. 2021's).

The maps hold every ``(query, key)`` vector of a stage at once: memory ``O(T^2 (d + d_ff))`` per layer in float64;
they are a short-sequence tool (hundreds of tokens).

Collapse across depth (A142, Barbero et al. 2025, "Why do LLMs attend to the first token?")
-------------------------------------------------------------------------------------------
Per layer, on the residual stream ``X (T, d)`` (row 0: the embeddings, row ``l + 1``: after block ``l``):
the mean pairwise cosine similarity over token pairs ``i != j``, and the rank-collapse residual
``||X - 1 mean(X)^T||_F`` (the distance to the nearest "all tokens equal" matrix, Dong et al. 2021's ``res(X)``
measured in the Frobenius norm as in Barbero et al.), plus that residual over ``||X||_F`` (``relative``:
scale-free, since pre-norm residual streams grow with depth). ``skip`` leaves out the first tokens (the sink,
whose massive activations dominate both measures).

Massive activations (A135, Sun et al. 2024)
-------------------------------------------
An activation of the residual stream after block ``l`` is massive when ``|a| > min_abs`` and
``|a| > ratio * median(|h_l|)`` (the paper's 100 and about 1000x; both are arguments). The intervention sets
chosen ``(layer, token, dim)`` activations of the residual stream to zero or to their mean over a set of inputs
(forward hooks on the decoder blocks: the residual stream is not an attention hook point) and reports the
next-token loss and perplexity on the given ids before and after.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..models import hf
from .capture import forward_kwargs, transformer_blocks
from .causal import _head_outputs, _inv_rms, rms_gain
from .metrics import massive_activations

STAGES = ("attn", "attn_res", "attn_res_ln", "ff", "ff_res", "ff_res_ln")
_FF_CHUNK = 1 << 22  # pre-activations per chunk of query rows in the FF split (float64: 32 MiB)


# ---------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------
def _check_batch_ids(ids: Tensor, what: str = "ids", single: bool = False) -> None:
    ok = isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[1] >= 1 and not ids.is_floating_point()
    if ok and single:
        ok = ids.shape[0] == 1
    if not ok:
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        shape = "(1, T)" if single else "(B, T)"
        raise ValueError(f"{what} must be integer token ids of shape {shape}; got {got}")


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    hs = kwargs.get("hidden_states")
    if isinstance(hs, Tensor):
        return hs
    raise ValueError("could not find the hidden states among a module's inputs")


def _blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: found no transformer blocks")
    return blocks


def _residual_stream(model: nn.Module, ids: Tensor,
                     edit: Callable[[int, Tensor], Tensor | None] | None = None) -> tuple[list[Tensor], Any]:
    """One no-grad forward pass; ``[embeddings, after block 0, ..., after block L-1]`` each ``(B, T, d)`` and the
    model's output. ``edit(layer, h)`` may return a replacement for block ``layer``'s output."""
    blocks = _blocks(model)
    inputs: dict[int, Tensor] = {}
    outputs: dict[int, Tensor] = {}
    handles = []
    for idx, block in blocks:
        def pre(mod, args, kwargs, idx=idx):
            inputs[idx] = _first_tensor(args, kwargs).detach()

        def post(mod, args, output, idx=idx):
            h = output[0] if isinstance(output, tuple) else output
            if edit is not None:
                new = edit(idx, h)
                if new is not None:
                    h = new
                    output = (new, *output[1:]) if isinstance(output, tuple) else new
            outputs[idx] = h.detach()
            return output

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post))
    try:
        with torch.no_grad():
            out = model(**forward_kwargs(model, ids, logits_rows=0))
    finally:
        for h in handles:
            h.remove()
    first = blocks[0][0]
    return [inputs[first]] + [outputs[i] for i, _ in blocks], out


# ---------------------------------------------------------------------------------------------------------
# norm-based maps
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layer:
    """Where a block's pieces live. kind: "pre-norm", "sandwich" (Gemma 3) or "post-norm" (BERT)."""

    kind: str
    block: nn.Module
    attn: nn.Module
    o_proj: nn.Linear
    attn_post: nn.Module | None  # Gemma 3: RMSNorm on the attention output
    ff_norm: nn.Module  # the norm whose output the FF reads (see the module docstring)
    ff_in: tuple[nn.Linear, ...] | None  # (gate, up) or (dense,); None: unsupported FF
    act: Callable[[Tensor], Tensor] | None
    ff_out: nn.Linear | None
    ff_post: nn.Module | None  # Gemma 3: RMSNorm on the FF output
    out_norm: nn.Module | None  # BERT: the output LayerNorm


def _layers(model: nn.Module) -> dict[int, _Layer]:
    mods = dict(hf.attention_modules(model))
    out = {}
    for idx, block in _blocks(model):
        attn = mods[idx]
        if all(hasattr(block, n) for n in ("attention", "intermediate", "output")):
            so = block.attention.output
            out[idx] = _Layer("post-norm", block, attn, so.dense, None, so.LayerNorm,
                              (block.intermediate.dense,), block.intermediate.intermediate_act_fn,
                              block.output.dense, None, block.output.LayerNorm)
            continue
        if not (hasattr(block, "input_layernorm") and hasattr(block, "post_attention_layernorm")
                and hasattr(block, "mlp") and hasattr(attn, "o_proj")):
            raise ValueError(f"{type(block).__name__}: norm maps support pre-norm decoders (Llama / Qwen2 / Mistral "
                             "style), Gemma 3 and BERT encoders")
        mlp = block.mlp
        gated = all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        ff_in = (mlp.gate_proj, mlp.up_proj) if gated else None
        act = mlp.act_fn if gated else None
        ff_out = mlp.down_proj if gated else None
        if hasattr(block, "pre_feedforward_layernorm"):
            out[idx] = _Layer("sandwich", block, attn, attn.o_proj, block.post_attention_layernorm,
                              block.pre_feedforward_layernorm, ff_in, act, ff_out,
                              getattr(block, "post_feedforward_layernorm", None), None)
        else:
            out[idx] = _Layer("pre-norm", block, attn, attn.o_proj, None, block.post_attention_layernorm,
                              ff_in, act, ff_out, None, None)
    return out


def _freeze(norm: nn.Module, y: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``norm`` made linear by freezing its statistics at its real input ``y (B, T, d)``.

    Returns ``(g, shift)``: ``g`` maps parts with the query row on axis 1 (``(B, T, d)`` or ``(B, T, K, d)``)
    and ``shift (d,)`` is the norm's additive bias, so that ``norm(sum_p c_p) = sum_p g(c_p) + shift``.
    """
    y = y.double().cpu()
    if isinstance(norm, nn.LayerNorm):
        var = y.var(-1, keepdim=True, unbiased=False)
        s = torch.rsqrt(var + norm.eps)  # (B, T, 1)
        d = y.shape[-1]
        gain = norm.weight.double().cpu() if norm.weight is not None else torch.ones(d, dtype=torch.float64)
        shift = norm.bias.double().cpu() if norm.bias is not None else torch.zeros(d, dtype=torch.float64)
        center = True
    else:
        gain, eps = rms_gain(norm)  # raises for anything but an RMSNorm
        s = _inv_rms(y, eps)
        shift = torch.zeros_like(gain)
        center = False

    def g(c: Tensor) -> Tensor:
        if center:
            c = c - c.mean(-1, keepdim=True)
        return c * gain * (s if c.dim() == 3 else s.unsqueeze(2))

    return g, shift


def _ff_parts(lay: _Layer, parts: Tensor, const: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """The FF block's output split over the parts of its input (module docstring, ``ff``).

    ``parts (B, Tq, Tk, d)``, ``const (B, Tq, d)`` (the FF input is ``parts.sum(2) + const``). Returns the FF
    output as ``(parts (B, Tq, Tk, d), const (B, Tq, d))``: the constant gets its own share and ``FF(0)``.
    Query rows are independent, so they go in chunks of about 4M pre-activations (``B x rows x Tk x d_ff``).
    """
    lin = [(m.weight.double().cpu(), m.bias.double().cpu() if m.bias is not None else None) for m in lay.ff_in]
    lin = [(w, b if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)) for w, b in lin]
    w_out = lay.ff_out.weight.double().cpu()
    b_out = lay.ff_out.bias.double().cpu() if lay.ff_out.bias is not None else None
    B, Tq, Tk, _ = parts.shape
    rows = max(1, _FF_CHUNK // (B * (Tk + 1) * w_out.shape[1]))
    outs = [_ff_rows(lay.act, lin, w_out, b_out, parts[:, s:s + rows], const[:, s:s + rows], steps)
            for s in range(0, Tq, rows)]
    return torch.cat([o for o, _ in outs], 1), torch.cat([c for _, c in outs], 1)


def _ff_rows(act: Callable[[Tensor], Tensor], lin: list[tuple[Tensor, Tensor]], w_out: Tensor, b_out: Tensor | None,
             parts: Tensor, const: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """:func:`_ff_parts` on some query rows; ``lin``: the input projections ``[(W, b)]`` (gate, up or BERT's one)."""
    z = torch.cat([parts, const.unsqueeze(2)], 2)  # the constant as one more part
    pre = [z @ w.T for w, _ in lin]  # (B, r, P, I) each part's pre-activations
    base = [b for _, b in lin]
    tot = [p.sum(2) for p in pre]  # (B, r, I)
    a = ((torch.arange(steps, dtype=torch.float64) + 0.5) / steps).view(-1, 1, 1, 1)  # midpoints
    with torch.enable_grad():
        u = (base[0] + a * tot[0]).requires_grad_(True)  # (steps, B, r, I) on the straight path
        act_u = act(u)
        du = torch.autograd.grad(act_u.sum(), u)[0]  # element-wise derivative
    act_u = act_u.detach()
    if len(pre) == 2:  # gated: h = act(gate) * up
        up = base[1] + a * tot[1]
        dh = (du * up).mean(0).unsqueeze(2) * pre[0] + act_u.mean(0).unsqueeze(2) * pre[1]
        h0 = act(base[0]) * base[1]
    else:  # h = act(W_1 z + b_1)
        dh = du.mean(0).unsqueeze(2) * pre[0]
        h0 = act(base[0])
    out = dh @ w_out.T  # (B, r, P, d)
    c = out[:, :, -1] + h0 @ w_out.T
    if b_out is not None:
        c = c + b_out
    return out[:, :, :-1], c


@dataclass(frozen=True)
class NormMaps:
    """Norm-based maps of one layer (float64, CPU). Shapes: ``B`` sequences, ``H`` query heads, ``T`` tokens.

    Attributes:
        layer: the layer index; kind: ``"pre-norm"``, ``"sandwich"`` (Gemma 3) or ``"post-norm"`` (BERT).
        weights: ``(B, H, T, T)`` the attention weights ``alpha`` the layer used.
        value_norms: ``(B, H, T)`` ``||f^h(x_j)||`` per key.
        heads: ``(B, H, T, T)`` ``||alpha^h_ij f^h(x_j)||`` (Kobayashi et al. 2020).
        maps: stage -> ``(B, T, T)`` ``||c_ij||`` (stages in ``STAGES`` order; ``ff*`` only with ``ffn=True``,
            ``ff_res_ln`` only for post-norm layers).
        vectors: stage -> ``(parts (B, T, T, d), const (B, T, d))`` with ``parts.sum(2) + const`` the model's
            activation at that stage (only with ``keep_vectors=True``).
    """

    layer: int
    kind: str
    weights: Tensor
    value_norms: Tensor
    heads: Tensor
    maps: dict[str, Tensor]
    vectors: dict[str, tuple[Tensor, Tensor]] | None = None

    @property
    def layer_map(self) -> Tensor:
        """``(B, T, T)`` the deepest stage computed (with ``ffn=True``: the whole layer, input to output)."""
        return self.maps[[s for s in STAGES if s in self.maps][-1]]


def norm_maps(
    model: nn.Module, ids: Tensor, layers: Iterable[int] | None = None, *, ffn: bool = True, steps: int = 32,
    keep_vectors: bool = False,
) -> dict[int, NormMaps]:
    """Norm-based attention maps of ``layers`` (default: all) on ``ids (B, T)`` (no padding).

    One forward pass: the weights and values come from the hook seam (``blocks.{l}.attn.weights`` rows
    ``0..T`` and ``blocks.{l}.attn.v``, so a model running an op or a plan is analysed as it runs), the norms'
    real inputs (for their frozen statistics) from forward pre-hooks on the norm modules.

    Args:
        ffn: also follow the feed-forward block (stages ``ff``, ``ff_res``, ``ff_res_ln``); needs a gated MLP
            (``gate_proj``/``up_proj``/``down_proj``/``act_fn``) or BERT's.
        steps: midpoints of the Integrated-Gradients path through the FF non-linearity.
        keep_vectors: also return every stage's per-token vectors (``NormMaps.vectors``).
    Returns ``{layer: NormMaps}``.
    """
    _check_batch_ids(ids)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    lays = _layers(model)
    g = hf.geometry(model)
    chosen = sorted(lays) if layers is None else [int(x) for x in layers]
    if not chosen or any(x not in lays for x in chosen):
        raise ValueError(f"layers {list(chosen)} must be among 0..{g.num_layers - 1}")
    if ffn:
        bad = [x for x in chosen if lays[x].ff_in is None]
        if bad:
            raise ValueError(f"layers {bad}: the FF block is not a gated MLP or BERT's, so ffn=True is not supported "
                             "(pass ffn=False for the attention stages)")
    T = ids.shape[1]

    # the norms' real inputs: their statistics are frozen at them
    seen: dict[tuple[int, str], Tensor] = {}
    handles = []

    def keep(key):
        def fn(mod, args, kwargs):
            seen[key] = _first_tensor(args, kwargs).detach()
        return fn

    for x in chosen:
        lay = lays[x]
        watch = {"x": lay.block, "ff_norm": lay.ff_norm}
        if lay.attn_post is not None:
            watch["attn_post"] = lay.attn_post
        if ffn and lay.ff_post is not None:
            watch["ff_post"] = lay.ff_post
        if ffn and lay.out_norm is not None:
            watch["out_norm"] = lay.out_norm
        for name, mod in watch.items():
            handles.append(mod.register_forward_pre_hook(keep((x, name)), with_kwargs=True))
    names = [f"blocks.{x}.attn.{p}" for x in chosen for p in ("weights", "v")]
    try:
        _, cache = hf.run_with_cache(model, ids, names, rows=(0, T))
    finally:
        for h in handles:
            h.remove()

    result = {}
    with torch.no_grad():
        for x in chosen:
            result[x] = _layer_maps(model, x, lays[x], cache, seen, ffn, steps, keep_vectors)
    return result


def _layer_maps(model, x: int, lay: _Layer, cache, seen, ffn: bool, steps: int, keep_vectors: bool) -> NormMaps:
    alpha = cache[f"blocks.{x}.attn.weights"].double().cpu()  # (B, H, T, T)
    v = cache[f"blocks.{x}.attn.v"].double()  # (B, Hkv, T, Dv), on the model's device
    B, H, T, _ = alpha.shape
    v = v.repeat_interleave(H // v.shape[1], dim=1)  # query head h reads kv head h // group
    if lay.kind == "post-norm":  # BERT's output projection lives beside the attention module
        wo = lay.o_proj.weight.double()
        f = torch.einsum("bhtv,dhv->bhtd", v, wo.view(-1, H, v.shape[-1])).cpu()
    else:
        f = _head_outputs(model, x, v).cpu()  # (B, H, T, d): f^h(x_j)
    value_norms = f.norm(dim=-1)
    heads = alpha * value_norms.unsqueeze(2)  # ||alpha f|| = alpha ||f||: alpha >= 0

    xin = seen[(x, "x")].double().cpu()
    d = xin.shape[-1]
    parts = torch.einsum("bhqk,bhkd->bqkd", alpha, f)  # sum over heads
    const = torch.zeros(B, T, d, dtype=torch.float64)
    if lay.o_proj.bias is not None:
        const = const + lay.o_proj.bias.double().cpu()
    if lay.attn_post is not None:  # Gemma 3: frozen at the real attention output
        gp, shift = _freeze(lay.attn_post, seen[(x, "attn_post")].cpu())
        parts, const = gp(parts), gp(const) + shift
    vectors = {"attn": (parts, const)}

    res = parts.clone()
    idx = torch.arange(T)
    res[:, idx, idx] += xin  # the residual: identity on the diagonal
    vectors["attn_res"] = (res, const)

    gl, shift = _freeze(lay.ff_norm, seen[(x, "ff_norm")].cpu())
    ln, ln_c = gl(res), gl(const) + shift
    vectors["attn_res_ln"] = (ln, ln_c)

    if ffn:
        ff, ff_c = _ff_parts(lay, ln, ln_c, steps)
        if lay.ff_post is not None:
            gp, shift = _freeze(lay.ff_post, seen[(x, "ff_post")].cpu())
            ff, ff_c = gp(ff), gp(ff_c) + shift
        vectors["ff"] = (ff, ff_c)
        base, base_c = (ln, ln_c) if lay.kind == "post-norm" else (res, const)  # what the FF's residual carries
        fr, fr_c = ff + base, ff_c + base_c
        vectors["ff_res"] = (fr, fr_c)
        if lay.out_norm is not None:
            go, shift = _freeze(lay.out_norm, seen[(x, "out_norm")].cpu())
            vectors["ff_res_ln"] = (go(fr), go(fr_c) + shift)
    maps = {s: vectors[s][0].norm(dim=-1) for s in STAGES if s in vectors}
    return NormMaps(x, lay.kind, alpha, value_norms, heads, maps, vectors if keep_vectors else None)


def mixing_ratio(m: Tensor) -> Tensor:
    """Row-wise context-mixing ratio of a norm map ``(..., T, T)``: ``sum_{j != i} m_ij / sum_j m_ij``
    -> ``(..., T)`` (0: the row keeps only its own token, 1: only context)."""
    if m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"a norm map is square in its last two axes, got {tuple(m.shape)}")
    total = m.sum(-1)
    own = m.diagonal(dim1=-2, dim2=-1)
    return (total - own) / total.clamp_min(1e-300)


# ---------------------------------------------------------------------------------------------------------
# representational / rank collapse across depth
# ---------------------------------------------------------------------------------------------------------
def collapse(hidden: Tensor, skip: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Collapse measures of token representations ``hidden (..., T, d)``, over tokens ``skip..T``.

    Returns ``(cosine, residual, relative)``, each ``(...)``: the mean cosine similarity over pairs ``i != j``
    (a zero vector counts as cosine 0), ``||X - 1 mean(X)^T||_F``, and that over ``||X||_F``.
    """
    if not isinstance(hidden, Tensor) or hidden.dim() < 2:
        raise ValueError("hidden must be a tensor (..., T, d)")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    X = hidden[..., skip:, :].double()
    n = X.shape[-2]
    if n < 2:
        raise ValueError(f"collapse needs at least 2 tokens after skipping {skip}; got {n}")
    U = X / X.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    G = U @ U.transpose(-1, -2)
    cosine = (G.sum((-1, -2)) - G.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    residual = (X - X.mean(-2, keepdim=True)).flatten(-2).norm(dim=-1)
    relative = residual / X.flatten(-2).norm(dim=-1).clamp_min(1e-300)
    return cosine, residual, relative


@dataclass(frozen=True)
class Collapse:
    """Collapse across depth: row 0 is the embeddings, row ``l + 1`` the residual stream after block ``l``.

    cosine, residual, relative: ``(L + 1, B)`` (see :func:`collapse`).
    """

    cosine: Tensor
    residual: Tensor
    relative: Tensor
    skip: int


def collapse_by_layer(model: nn.Module, ids: Tensor, skip: int = 0) -> Collapse:
    """:func:`collapse` of the residual stream of ``ids (B, T)`` at every depth (no padding)."""
    _check_batch_ids(ids)
    if ids.shape[1] - skip < 2:
        raise ValueError(f"collapse needs at least 2 tokens after skipping {skip}; got {ids.shape[1]} tokens")
    stream, _ = _residual_stream(model, ids)
    parts = [collapse(h.cpu(), skip) for h in stream]
    return Collapse(*(torch.stack([p[k] for p in parts]) for k in range(3)), skip=skip)


# ---------------------------------------------------------------------------------------------------------
# massive activations
# ---------------------------------------------------------------------------------------------------------
class MassiveSite(NamedTuple):
    """One activation of the residual stream after block ``layer``: ``h[token, dim] = value``."""

    layer: int
    token: int
    dim: int
    value: float = float("nan")


def massive_sites(hidden: Tensor, layer: int = 0, min_abs: float = 100.0, ratio: float = 1000.0) -> list[MassiveSite]:
    """Massive activations of one layer's hidden states ``(T, d)`` (Sun et al.: ``|a| > min_abs`` and
    ``|a| > ratio * median(|h|)``), largest magnitude first."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        raise ValueError("hidden must be one layer's hidden states (T, d)")
    if min_abs < 0 or ratio < 0:
        raise ValueError(f"thresholds must be >= 0, got min_abs={min_abs}, ratio={ratio}")
    a = hidden.detach().double().abs()
    hit = (a > min_abs) & (a > ratio * a.median())
    toks, dims = hit.nonzero(as_tuple=True)
    vals = hidden.detach().double()[toks, dims]
    order = vals.abs().argsort(descending=True)
    return [MassiveSite(layer, int(toks[i]), int(dims[i]), float(vals[i])) for i in order.tolist()]


@dataclass(frozen=True)
class MassiveReport:
    """Massive activations of one sequence, every layer.

    Attributes:
        sites: every qualifying activation, by layer then magnitude.
        summary: layer -> :func:`attnlab.inspect.metrics.massive_activations` (largest magnitude, its ratio
            to the median, its (token, dim), count).
        min_abs, ratio: the thresholds used.
    """

    sites: tuple[MassiveSite, ...]
    summary: dict[int, dict[str, float]]
    min_abs: float
    ratio: float

    def layers(self) -> list[int]:
        """Layers holding at least one massive activation."""
        return sorted({s.layer for s in self.sites})

    def first_sites(self) -> list[MassiveSite]:
        """Each massive ``(token, dim)`` at the first layer where it qualifies (where it emerges)."""
        first: dict[tuple[int, int], MassiveSite] = {}
        for s in self.sites:
            key = (s.token, s.dim)
            if key not in first or s.layer < first[key].layer:
                first[key] = s
        return sorted(first.values(), key=lambda s: (s.layer, s.token, s.dim))


def find_massive(model: nn.Module, ids: Tensor, min_abs: float = 100.0, ratio: float = 1000.0) -> MassiveReport:
    """Massive activations in the residual stream after every block for ``ids (1, T)``."""
    _check_batch_ids(ids, single=True)
    stream, _ = _residual_stream(model, ids)
    sites: list[MassiveSite] = []
    summary = {}
    for layer, h in enumerate(stream[1:]):
        sites.extend(massive_sites(h[0], layer, min_abs, ratio))
        summary[layer] = massive_activations(h[0], min_abs, ratio)
    return MassiveReport(tuple(sites), summary, float(min_abs), float(ratio))


def _check_sites(sites: Sequence, L: int, T: int, d: int) -> list[tuple[int, int, int]]:
    out = []
    if not sites:
        raise ValueError("give at least one (layer, token, dim) site")
    for s in sites:
        if len(s) < 3:
            raise ValueError(f"a site is (layer, token, dim), got {s!r}")
        layer, tok, dim = int(s[0]), int(s[1]), int(s[2])
        if not (0 <= layer < L and 0 <= tok < T and 0 <= dim < d):
            raise ValueError(f"site {tuple(s[:3])} outside {L} layers x {T} tokens x {d} dims")
        out.append((layer, tok, dim))
    return out


def massive_means(model: nn.Module, inputs: Sequence[Tensor], sites: Sequence) -> Tensor:
    """``(n_sites,)`` the mean of each site's activation ``h_layer[token, dim]`` over ``inputs`` (each
    ``(1, T)``, long enough to hold every site's token)."""
    if not inputs:
        raise ValueError("give at least one input to average over")
    total = None
    for ids in inputs:
        _check_batch_ids(ids, "each input", single=True)
        stream, _ = _residual_stream(model, ids)
        chk = _check_sites(sites, len(stream) - 1, ids.shape[1], stream[0].shape[-1])
        vals = torch.tensor([float(stream[layer + 1][0, tok, dim]) for layer, tok, dim in chk], dtype=torch.float64)
        total = vals if total is None else total + vals
    return total / len(inputs)


def _next_token_loss(out: Any, ids: Tensor) -> float:
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError("the intervention measures next-token loss: use a causal LM (*ForCausalLM) with logits")
    lg = logits[:, :-1].double()
    return float(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1)))


@dataclass(frozen=True)
class MassiveIntervention:
    """Next-token loss (mean nats per predicted token) on the ids, as run and with the sites set to ``values``."""

    loss: float
    loss_intervened: float
    sites: tuple[tuple[int, int, int], ...]
    values: Tensor

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def perplexity_intervened(self) -> float:
        return math.exp(self.loss_intervened)

    @property
    def delta(self) -> float:
        """``loss_intervened - loss``."""
        return self.loss_intervened - self.loss


def massive_intervention(model: nn.Module, ids: Tensor, sites: Sequence, mode: str = "zero",
                         means: Tensor | Sequence[float] | None = None) -> MassiveIntervention:
    """Set the residual-stream activations ``sites`` (``(layer, token, dim)``, or ``MassiveSite``) to zero
    (``mode="zero"``) or to ``means`` (``mode="mean"``, e.g. from :func:`massive_means`) at the output of their
    block (later layers read the new value), and measure the next-token loss on ``ids (1, T)``, ``T >= 2``."""
    _check_batch_ids(ids, single=True)
    if ids.shape[1] < 2:
        raise ValueError("the next-token loss needs at least 2 tokens")
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    blocks = _blocks(model)
    d = hf._text_config(model).hidden_size
    chk = _check_sites(sites, len(blocks), ids.shape[1], d)
    if mode == "mean":
        if means is None:
            raise ValueError("mode='mean' needs means (one per site; see massive_means)")
        values = torch.as_tensor(means, dtype=torch.float64).reshape(-1)
        if values.numel() != len(chk):
            raise ValueError(f"got {values.numel()} means for {len(chk)} sites")
    else:
        values = torch.zeros(len(chk), dtype=torch.float64)

    by_layer: dict[int, list[tuple[int, int, float]]] = {}
    for (layer, tok, dim), val in zip(chk, values.tolist()):
        by_layer.setdefault(layer, []).append((tok, dim, val))

    def edit(layer: int, h: Tensor) -> Tensor | None:
        if layer not in by_layer:
            return None
        h = h.clone()
        for tok, dim, val in by_layer[layer]:
            h[:, tok, dim] = val
        return h

    _, out = _residual_stream(model, ids)
    _, out_iv = _residual_stream(model, ids, edit)
    return MassiveIntervention(_next_token_loss(out, ids), _next_token_loss(out_iv, ids), tuple(chk), values)


__all__ = [
    "STAGES", "Collapse", "MassiveIntervention", "MassiveReport", "MassiveSite", "NormMaps", "collapse",
    "collapse_by_layer", "find_massive", "massive_intervention", "massive_means", "massive_sites", "mixing_ratio",
    "norm_maps",
]
