"""Causal interpretability through the hook seam: activation patching, path patching, attention knockout,
direct logit attribution and the logit lens.

Every function runs a transformers causal LM (Llama, Qwen2, Mistral, Gemma 3, SmolLM2, ...) through the named
hook points of :mod:`attnlab.models.hooks` (``blocks.{l}.attn.{q,k,v,scores,z,out}``), so they compose with
whatever computes the attention (``hf.use(model, op)``, a plan). Inputs are single sequences ``(1, T)``.

Conventions (named, because the literature varies):

* **Normalized patching effect** (Wang et al. 2022; Heimersheim & Nanda 2024):
  ``(m_patched - m_corrupt) / (m_clean - m_corrupt)`` -- 0: the patch restores nothing of the clean behaviour,
  1: all of it. "Denoising" direction: the corrupted run is patched with clean activations.
* **Path patching** (Wang et al. 2022, "Interpretability in the Wild", the 3-pass algorithm; Goldowsky-Dill et
  al. 2023): senders' outputs ``z`` from the clean run reach the receivers' queries / keys / values only; every
  other head's ``z`` is frozen at its corrupted value (MLPs are recomputed, as in Wang et al.). The receiver's
  q/k/v are read at the hook points (after the projections, RoPE and q/k norms), so they are recomputed exactly
  from the modified residual stream by running the model. GQA: a receiver's key/value is its *kv head*
  (``head // group``), shared by every query head of the group -- patching ``via="k"`` or ``"v"`` changes the
  keys/values of the whole group (``PathPatchResult.patched`` lists the patched indices).
* **Path patching to the logits** (Wang et al. 2022, the screen that finds the name movers): one sender head's
  ``z`` comes from the other run, every other head's ``z`` (in every layer) is frozen at the run being patched,
  and MLPs and norms are recomputed; so the effect is the sender's *direct* path to the logits plus its paths
  through MLPs only, never through another attention head. Same argument order as activation patching: the
  corrupted run gets one clean sender (denoising); swap the ids for Wang et al.'s noising direction (the clean
  run with one corrupted sender), which is what ``attnlab circuit`` does.
* **Path patching from earlier heads to a receiver set** (``path_patching_senders``; Wang et al.'s later rounds):
  per sender, the receivers' q, k or v (each route separately, all receivers together) take the values they
  have when only the sender comes from the other run and every other head is frozen; batched, one recording
  pass plus one pass per route per batch of senders. ``attnlab circuit`` iterates it (``--path-rounds``).
* **Attention knockout** (Geva et al. 2023, "Dissecting Recall of Factual Associations"): the scores from the
  given query positions to the given key positions are set to ``-inf`` before the softmax, which renormalizes
  over the remaining keys.
* **Direct logit attribution**: each head's output through its slice of ``o_proj``, then the final RMSNorm with
  its scale *frozen from the full residual stream* (``gain * c / rms(x_final)``; for Gemma 3's post-attention
  norm, likewise frozen from the layer's full attention output), then the unembedding, dotted with the
  ``target - baseline`` direction. With the frozen scale the components sum exactly to the logit difference.
* **Logit lens** (nostalgebraist 2020): the residual stream after each layer through the model's own final norm
  and unembedding; the per-head lens sends one head's ``o_proj`` contribution through the final norm with the
  scale frozen from that layer's residual stream (the DLA convention, at an intermediate layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models import hf

Metric = Callable[[Tensor], float]
PATCH_POINTS = ("q", "k", "v", "z", "out")


# ---------------------------------------------------------------------------------------------------------
# model parts shared by the functions below
# ---------------------------------------------------------------------------------------------------------
def _base(model: nn.Module) -> nn.Module:
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise ValueError(f"{type(model).__name__}: expected a decoder with .layers and a final .norm "
                         "(Llama / Qwen2 / Mistral / Gemma 3 style)")
    return base


def _unembed(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head (unembedding); use a *ForCausalLM model")
    if getattr(hf._text_config(model), "final_logit_softcapping", None):
        raise ValueError("logit soft-capping makes the unembedding non-linear: DLA / lens are not defined")
    return head


def rms_gain(norm: nn.Module) -> tuple[Tensor, float]:
    """``(gain (d,), eps)`` of an RMSNorm module, so that ``norm(x) = gain * x / sqrt(mean(x^2) + eps)``.

    The gain is read by running the module on a vector of ones (Llama's ``w`` and Gemma's ``1 + w`` alike);
    when it matches ``w`` or ``1 + w`` (the norms upcast to float32 inside), the exact parameter is used.
    """
    if "RMSNorm" not in type(norm).__name__:
        raise ValueError(f"only RMSNorm final / post-attention norms are supported, got {type(norm).__name__}")
    eps = getattr(norm, "variance_epsilon", None)
    eps = float(getattr(norm, "eps", 1e-6) if eps is None else eps)
    w = getattr(norm, "weight", None)
    p = w if w is not None else next(norm.parameters(), None)
    if p is None:
        raise ValueError(f"{type(norm).__name__} has no gain parameter to read its size from")
    d = p.shape[-1]
    with torch.no_grad():
        probe = norm(torch.ones(1, d, dtype=p.dtype, device=p.device))[0].double().cpu() * math.sqrt(1.0 + eps)
        if w is not None:
            for exact in (w.detach().double().cpu(), 1.0 + w.detach().double().cpu()):
                if torch.allclose(probe, exact, rtol=1e-3, atol=1e-5):
                    return exact, eps
    return probe, eps


def _inv_rms(x: Tensor, eps: float) -> Tensor:
    """``(..., 1)`` ``1 / sqrt(mean(x^2) + eps)`` in float64 (the frozen scale)."""
    x = x.double()
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _check_ids(ids: Tensor, what: str = "ids") -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be one sequence of token ids, shape (1, T); got {got}")


def _sandwich(layer: nn.Module) -> bool:
    """Gemma-style layers normalize the attention output before adding it (post_attention_layernorm is then
    applied to the attention output, and pre_feedforward_layernorm exists)."""
    return hasattr(layer, "pre_feedforward_layernorm")


@dataclass
class _Trace:
    """One clean forward pass: per-layer residuals, attention outputs and head outputs (float64, CPU-free)."""

    logits: Tensor  # (1, T, V)
    embed: Tensor  # (1, T, d)
    resid: list[Tensor]  # after each layer, (1, T, d) (raw, before the final norm)
    out: list[Tensor]  # o_proj output of each layer (1, T, d)
    attn_add: list[Tensor]  # what the attention adds to the residual (post-norm for Gemma)
    z: list[Tensor]  # (1, H, T, Dv)


@torch.no_grad()
def _trace(model: nn.Module, ids: Tensor) -> _Trace:
    base = _base(model)
    L = len(base.layers)
    resid: dict[int, Tensor] = {}
    adds: dict[int, Tensor] = {}
    handles = []

    def keep_layer(i):
        def fn(module, args, output):
            resid[i] = (output[0] if isinstance(output, tuple) else output).detach()
        return fn

    def keep_post(i):
        def fn(module, args, output):
            adds[i] = (output[0] if isinstance(output, tuple) else output).detach()
        return fn

    for i, layer in enumerate(base.layers):
        handles.append(layer.register_forward_hook(keep_layer(i)))
        if _sandwich(layer):
            handles.append(layer.post_attention_layernorm.register_forward_hook(keep_post(i)))
    names = [f"blocks.{i}.attn.{p}" for i in range(L) for p in ("z", "out")]
    try:
        out, cache = hf.run_with_cache(model, ids, names, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    outs = [cache[f"blocks.{i}.attn.out"] for i in range(L)]
    return _Trace(out.logits.detach(), out.hidden_states[0].detach(), [resid[i] for i in range(L)], outs,
                  [adds.get(i, outs[i]) for i in range(L)], [cache[f"blocks.{i}.attn.z"] for i in range(L)])


def _head_outputs(model: nn.Module, layer: int, z: Tensor) -> Tensor:
    """Each head's ``o_proj`` contribution ``(1, H, T, d)`` (float64, no bias) from ``z (1, H, T, Dv)``."""
    mods = dict(hf.attention_modules(model))
    wo = mods[layer].o_proj.weight.double()  # (d, H * Dv)
    H, Dv = z.shape[1], z.shape[-1]
    return torch.einsum("bhtv,dhv->bhtd", z.double(), wo.view(-1, H, Dv))


def _frozen_post(layer_mod: nn.Module, out: Tensor) -> Tensor | Callable[[Tensor], Tensor]:
    """The linear map taking a piece of the attention output to what it adds to the residual stream: identity
    for pre-norm layers; Gemma's post-attention RMSNorm with its scale frozen from the full output ``out``."""
    if not _sandwich(layer_mod):
        return lambda c: c
    gain, eps = rms_gain(layer_mod.post_attention_layernorm)
    s = _inv_rms(out, eps)  # (1, T, 1)
    return lambda c: c * gain * (s.unsqueeze(1) if c.dim() == 4 else s)


# ---------------------------------------------------------------------------------------------------------
# activation patching
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchResult:
    """What :func:`activation_patching` found.

    Attributes:
        effects: point -> normalized effect ``(m_patched - m_corrupt) / (m_clean - m_corrupt)``, shape
            ``(layers, heads[, positions])``; heads are query heads for ``q``/``z``, kv heads for ``k``/``v``;
            ``out`` (and ``heads=False``) has no head axis: ``(layers[, positions])``.
        patched: point -> the raw metric of each patched run, same shapes.
        clean_metric, corrupt_metric: the metric on the clean and corrupted runs.
        layers: the layer of each row; positions: the position of each last-axis entry (None: all together).
    """

    effects: dict[str, Tensor]
    patched: dict[str, Tensor]
    clean_metric: float
    corrupt_metric: float
    layers: tuple[int, ...]
    positions: tuple[int, ...] | None

    def top(self, point: str = "z", k: int = 5) -> list[tuple[tuple[int, ...], float]]:
        """The ``k`` largest effects by absolute value as ``((layer, head[, position]), effect)``; the first
        index is the layer number (not the row)."""
        e = self.effects[point]
        order = e.abs().flatten().argsort(descending=True)[:k]
        res = []
        for i in order.tolist():
            idx = list(torch.unravel_index(torch.tensor(i), e.shape))
            idx = [int(t) for t in idx]
            idx[0] = self.layers[idx[0]]
            if self.positions is not None:
                idx[-1] = self.positions[idx[-1]]
            res.append((tuple(idx), float(e.flatten()[i])))
        return res


def _check_pair(clean_ids: Tensor, corrupt_ids: Tensor) -> None:
    _check_ids(clean_ids, "clean_ids")
    _check_ids(corrupt_ids, "corrupt_ids")
    if clean_ids.shape != corrupt_ids.shape:
        raise ValueError(f"clean and corrupted ids differ in shape: {tuple(clean_ids.shape)} vs "
                         f"{tuple(corrupt_ids.shape)}")


def _layer_list(layers: Iterable[int] | None, num_layers: int) -> tuple[int, ...]:
    out = tuple(range(num_layers)) if layers is None else tuple(int(x) for x in layers)
    if not out or any(not 0 <= x < num_layers for x in out):
        raise ValueError(f"layers must be at least one layer in 0..{num_layers - 1}, got {list(out)}")
    return out


def _normalize(m: Tensor | float, clean: float, corrupt: float) -> Tensor | float:
    return (m - corrupt) / (clean - corrupt)


def _metric_rows(metric: Metric, logits: Tensor) -> list[float]:
    return [float(metric(logits[b : b + 1])) for b in range(logits.shape[0])]


def _positions(positions, T: int) -> tuple[int, ...] | None:
    if positions is None:
        return None
    if positions is True or positions == "each":
        return tuple(range(T))
    out = tuple(int(p) % T if -T <= int(p) < T else T for p in positions)
    if any(p >= T for p in out):
        raise ValueError(f"positions {list(positions)} outside the sequence (length {T})")
    return out


def activation_patching(
    model: nn.Module,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    metric: Metric,
    points: Sequence[str] = ("z",),
    *,
    layers: Iterable[int] | None = None,
    heads: bool = True,
    positions: Iterable[int] | bool | None = None,
    batch: int = 8,
) -> PatchResult:
    """Patch clean activations into the corrupted run, one (layer, head[, position]) slice at a time.

    Args:
        model: a causal LM; clean_ids, corrupt_ids: ``(1, T)`` of the same length.
        metric: ``metric(logits (1, T, V)) -> float`` (e.g. a logit difference at the last position).
        points: hook points to patch, from ``q, k, v, z, out`` (``z``: each head's output before ``o_proj``).
        layers: layers to patch (default: all).
        heads: patch each head separately (True) or every head of the layer together (False).
        positions: None patches every position at once; True patches each position separately; a list of
            positions patches those, each separately.
        batch: patched runs per forward pass (copy ``b`` of the batch carries its own patch).

    Returns a :class:`PatchResult` (normalized effect, see the module docstring).
    """
    _check_pair(clean_ids, corrupt_ids)
    bad = [p for p in points if p not in PATCH_POINTS]
    if bad or not points:
        raise ValueError(f"points must be among {PATCH_POINTS}, got {list(points)}")
    g = hf.geometry(model)
    layer_list = _layer_list(layers, g.num_layers)
    T = clean_ids.shape[1]
    pos = _positions(positions, T)

    names = [f"blocks.{layer}.attn.{p}" for p in points for layer in layer_list]
    with torch.no_grad():
        clean_out, cache = hf.run_with_cache(model, clean_ids, names)
        m_clean = float(metric(clean_out.logits))
        m_corrupt = float(metric(model(input_ids=corrupt_ids, use_cache=False).logits))
    if m_clean == m_corrupt:
        raise ValueError(f"the metric is the same on the clean and corrupted runs ({m_clean}): the normalized "
                         "effect is undefined")

    # jobs: (point, row, head or None, position index or None); each becomes one batch copy
    jobs: list[tuple[str, int, int | None, int | None]] = []
    for p in points:
        nh = 1 if (p == "out" or not heads) else (g.num_kv_heads if p in ("k", "v") else g.num_heads)
        for r, _ in enumerate(layer_list):
            for h in range(nh):
                for i in [None] if pos is None else range(len(pos)):
                    jobs.append((p, r, h if (heads and p != "out") else None, i))

    raw = torch.empty(len(jobs), dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(jobs), batch):
            part = jobs[s : s + batch]
            by_name: dict[str, list[tuple[int, int | None, int | None]]] = {}
            for b, (p, r, h, i) in enumerate(part):
                by_name.setdefault(f"blocks.{layer_list[r]}.attn.{p}", []).append((b, h, i))

            def make(name, entries):
                clean = cache[name]

                def fn(value, ctx):  # replace copy b's slice by the clean one
                    value = value.clone()
                    for b, h, i in entries:
                        t = slice(None) if i is None else pos[i]
                        if clean.dim() == 3:  # out: (B, T, d)
                            value[b, t] = clean[0, t]
                        elif h is None:  # all heads
                            value[b, :, t] = clean[0, :, t]
                        else:
                            value[b, h, t] = clean[0, h, t]
                    return value
                return fn

            table = {name: make(name, entries) for name, entries in by_name.items()}
            with hf.hooks(model, table):
                logits = model(input_ids=corrupt_ids.expand(len(part), -1), use_cache=False).logits
            raw[s : s + len(part)] = torch.tensor(_metric_rows(metric, logits), dtype=torch.float64)

    effects, patched = {}, {}
    k = 0
    for p in points:
        nh = 1 if (p == "out" or not heads) else (g.num_kv_heads if p in ("k", "v") else g.num_heads)
        shape = (len(layer_list), nh) + (() if pos is None else (len(pos),))
        n = math.prod(shape)
        vals = raw[k : k + n].view(shape)
        k += n
        if nh == 1 and (p == "out" or not heads):
            vals = vals.squeeze(1)
        patched[p] = vals
        effects[p] = _normalize(vals, m_clean, m_corrupt)
    return PatchResult(effects, patched, m_clean, m_corrupt, layer_list, pos)


# ---------------------------------------------------------------------------------------------------------
# path patching
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathPatchResult:
    """Result of :func:`path_patching`: ``effect`` normalized like activation patching, the raw metric of the
    final run, the clean / corrupted metrics, and ``patched``: the (layer, point, index) slices the final run
    replaced (kv-head indices for ``k``/``v``)."""

    effect: float
    metric: float
    clean_metric: float
    corrupt_metric: float
    patched: tuple[tuple[int, str, int], ...] = field(default_factory=tuple)


def _senders_clean(part: list[tuple[int, int]], clean: dict, corrupt: dict) -> Callable:
    """A ``z`` hook for a batch of ``len(part)`` rows: every head at the corrupted run, except that row ``b`` copies
    its sender ``part[b]`` from the clean run."""
    B = len(part)

    def freeze(z, ctx):
        new = corrupt[ctx.name].to(z.dtype).expand(B, -1, -1, -1).clone()
        for b, (layer, h) in enumerate(part):
            if layer == ctx.layer:
                new[b, h] = clean[ctx.name][0, h]
        return new

    return freeze


def _z_runs(model: nn.Module, clean_ids: Tensor, corrupt_ids: Tensor, metric: Metric):
    """Every head's ``z`` on the clean and corrupted runs and the metric of each: ``(clean, corrupt, m_clean,
    m_corrupt)``; a metric equal on both runs leaves the normalized effect undefined and raises."""
    zn = [f"blocks.{i}.attn.z" for i in range(hf.geometry(model).num_layers)]
    with torch.no_grad():
        clean_out, clean = hf.run_with_cache(model, clean_ids, zn)
        corrupt_out, corrupt = hf.run_with_cache(model, corrupt_ids, zn)
    m_clean, m_corrupt = float(metric(clean_out.logits)), float(metric(corrupt_out.logits))
    if m_clean == m_corrupt:
        raise ValueError(f"the metric is the same on the clean and corrupted runs ({m_clean}): the normalized "
                         "effect is undefined")
    return clean, corrupt, m_clean, m_corrupt


def path_patching(
    model: nn.Module,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    metric: Metric,
    senders: Sequence[tuple[int, int]],
    receivers: Sequence[tuple[int, int]],
    via: str | Sequence[str] = "q",
) -> PathPatchResult:
    """Effect of the path senders -> receivers' queries / keys / values (Wang et al. 2022's 3 passes + 1).

    1. clean run: cache every head's ``z``; 2. corrupted run: likewise; 3. corrupted run with the senders' ``z``
    set to clean and every other head's ``z`` frozen to corrupted, recording the receivers' ``via`` inputs
    (recomputed from the modified residual stream); 4. corrupted run patching only those receiver inputs.

    Args:
        senders, receivers: ``(layer, query head)`` pairs; every receiver must sit in a later layer than some
            sender. via: ``"q"``, ``"k"``, ``"v"`` or several of them. GQA: see the module docstring.
    """
    _check_ids(clean_ids, "clean_ids")
    _check_ids(corrupt_ids, "corrupt_ids")
    if clean_ids.shape != corrupt_ids.shape:
        raise ValueError("clean and corrupted ids must have the same shape")
    vias = (via,) if isinstance(via, str) else tuple(via)
    if not vias or any(v not in ("q", "k", "v") for v in vias):
        raise ValueError(f"via must be 'q', 'k', 'v' or several of them, got {via!r}")
    g = hf.geometry(model)
    for what, pairs in (("senders", senders), ("receivers", receivers)):
        if not pairs:
            raise ValueError(f"{what} must list at least one (layer, head)")
        for layer, h in pairs:
            if not (0 <= layer < g.num_layers and 0 <= h < g.num_heads):
                raise ValueError(f"{what}: ({layer}, {h}) is not a head of this model "
                                 f"({g.num_layers} layers x {g.num_heads} heads)")
    first = min(layer for layer, _ in senders)
    late = [r for r in receivers if r[0] <= first]
    if late:
        raise ValueError(f"receivers {late} do not sit after any sender (first sender layer {first}): no path")

    clean, corrupt, m_clean, m_corrupt = _z_runs(model, clean_ids, corrupt_ids, metric)

    send = set(map(tuple, senders))

    def freeze(z, ctx):  # senders clean, every other head corrupted
        new = corrupt[ctx.name].clone()
        for layer, h in send:
            if layer == ctx.layer:
                new[:, h] = clean[ctx.name][:, h]
        return new

    targets: dict[str, set[int]] = {}
    for layer, h in receivers:
        for v in vias:
            targets.setdefault(f"blocks.{layer}.attn.{v}", set()).add(h if v == "q" else h // g.group)
    recorded: dict[str, Tensor] = {}

    def record(value, ctx):
        recorded[ctx.name] = value.detach().clone()

    with torch.no_grad():
        with hf.hooks(model, {"blocks.*.attn.z": freeze, **{name: record for name in targets}}):
            model(input_ids=corrupt_ids, use_cache=False)

        def patch(value, ctx):
            new = value.clone()
            for i in targets[ctx.name]:
                new[:, i] = recorded[ctx.name][:, i]
            return new

        with hf.hooks(model, {name: patch for name in targets}):
            m = float(metric(model(input_ids=corrupt_ids, use_cache=False).logits))
    done = tuple(sorted((_hook_layer(name), name.rsplit(".", 1)[1], i) for name, idx in targets.items()
                        for i in idx))
    return PathPatchResult(float(_normalize(m, m_clean, m_corrupt)), m, m_clean, m_corrupt, done)


def _hook_layer(name: str) -> int:
    return int(name.split(".")[1])


def path_patching_logits(
    model: nn.Module,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    metric: Metric,
    *,
    layers: Iterable[int] | None = None,
    batch: int = 8,
) -> PatchResult:
    """Path patching from each head to the logits (Wang et al. 2022): the sender's path through the residual
    stream and the MLPs only, every other attention head frozen.

    Per sender ``(layer, head)``: the corrupted run with the sender's ``z`` taken from the clean run and every
    other head's ``z`` (all layers) frozen at its corrupted-run value; MLPs and norms are recomputed. One
    forward per sender, ``batch`` senders per pass (copy ``b`` carries sender ``b``), the cost of activation
    patching ``z``. Denoising by argument order (module docstring); swap the ids for noising. A sender in the
    last layer has no downstream head, so its effect equals activation patching of its ``z``.

    Args:
        model: a causal LM; clean_ids, corrupt_ids: ``(1, T)`` of the same length.
        metric: ``metric(logits (1, T, V)) -> float``.
        layers: the senders' layers (default: all); every head of each is a sender.
        batch: senders per forward pass.

    Returns a :class:`PatchResult` with the one point ``"z"``: ``effects["z"]`` ``(len(layers), heads)``
    normalized ``(m_patched - m_corrupt) / (m_clean - m_corrupt)``, ``patched["z"]`` the raw metric.
    """
    _check_pair(clean_ids, corrupt_ids)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    g = hf.geometry(model)
    layer_list = _layer_list(layers, g.num_layers)
    clean, corrupt, m_clean, m_corrupt = _z_runs(model, clean_ids, corrupt_ids, metric)
    senders = [(layer, h) for layer in layer_list for h in range(g.num_heads)]
    raw = torch.empty(len(senders), dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(senders), batch):
            part = senders[s : s + batch]
            B = len(part)

            freeze = _senders_clean(part, clean, corrupt)

            with hf.hooks(model, {"blocks.*.attn.z": freeze}):
                logits = model(input_ids=corrupt_ids.expand(B, -1), use_cache=False).logits
            raw[s : s + B] = torch.tensor(_metric_rows(metric, logits), dtype=torch.float64)
    vals = raw.view(len(layer_list), g.num_heads)
    return PatchResult({"z": _normalize(vals, m_clean, m_corrupt)}, {"z": vals}, m_clean, m_corrupt, layer_list,
                       None)


def path_patching_senders(
    model: nn.Module,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    metric: Metric,
    receivers: Sequence[tuple[int, int]],
    vias: Sequence[str] = ("q", "k", "v"),
    *,
    batch: int = 8,
) -> PatchResult:
    """Path patching from every earlier head to a set of receivers' queries / keys / values, one route at a time
    (Wang et al. 2022's later rounds: senders -> the name movers' queries, -> the S-inhibition heads' values, ...).

    Senders: every head in the layers before the last receiver's layer. Per sender and batch of senders:

    1. the corrupted run with the sender's ``z`` from the clean run and every other head's ``z`` (all layers)
       frozen at its corrupted value, recording the receivers' ``q``, ``k`` and ``v`` (recomputed from the
       modified residual stream) -- one forward for all routes;
    2. per route in ``vias``: the corrupted run with only the receivers' ``via`` input replaced by the recorded
       one (everything else computed freely, as in :func:`path_patching`) -- one forward per route.

    So ``1 + len(vias)`` forwards per sender, ``batch`` senders per forward (copy ``b`` carries sender ``b``).
    All receivers are patched together (the path into the set). A receiver in or before the sender's layer
    reads an unchanged input, so each sender reaches only the receivers after it. GQA: a ``k`` / ``v`` route
    patches the receivers' whole kv groups (module docstring). Denoising by argument order; swap the ids for
    noising. Equals :func:`path_patching` with that one sender and the same receivers (tested).

    Returns a :class:`PatchResult` whose points are the routes: ``effects[via]`` ``(len(layers), heads)``
    normalized like activation patching, ``patched[via]`` the raw metric, ``layers`` the senders' layers
    ``0 .. last receiver layer - 1``.
    """
    _check_pair(clean_ids, corrupt_ids)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    vias = tuple(vias)
    if not vias or any(v not in ("q", "k", "v") for v in vias) or len(set(vias)) != len(vias):
        raise ValueError(f"vias must be distinct routes among 'q', 'k', 'v', got {list(vias)}")
    g = hf.geometry(model)
    rec = [(int(a), int(b)) for a, b in receivers]
    if not rec:
        raise ValueError("receivers must list at least one (layer, head)")
    for layer, h in rec:
        if not (0 <= layer < g.num_layers and 0 <= h < g.num_heads):
            raise ValueError(f"receivers: ({layer}, {h}) is not a head of this model "
                             f"({g.num_layers} layers x {g.num_heads} heads)")
    last = max(layer for layer, _ in rec)
    if last == 0:
        raise ValueError(f"receivers {rec} all sit in layer 0: no earlier head can send to them")
    clean, corrupt, m_clean, m_corrupt = _z_runs(model, clean_ids, corrupt_ids, metric)
    # the receivers' slices per route and hook point (kv heads for k / v)
    targets: dict[str, dict[str, list[int]]] = {v: {} for v in vias}
    for v in vias:
        for layer, h in rec:
            idx = targets[v].setdefault(f"blocks.{layer}.attn.{v}", [])
            i = h if v == "q" else h // g.group
            if i not in idx:
                idx.append(i)
    record_names = {name for v in vias for name in targets[v]}
    layer_list = tuple(range(last))
    senders = [(layer, h) for layer in layer_list for h in range(g.num_heads)]
    raw = {v: torch.empty(len(senders), dtype=torch.float64) for v in vias}
    with torch.no_grad():
        for s in range(0, len(senders), batch):
            part = senders[s : s + batch]
            B = len(part)
            recorded: dict[str, Tensor] = {}

            freeze = _senders_clean(part, clean, corrupt)

            def record(value, ctx, recorded=recorded):
                recorded[ctx.name] = value.detach().clone()

            ids = corrupt_ids.expand(B, -1)
            with hf.hooks(model, {"blocks.*.attn.z": freeze, **{name: record for name in record_names}}):
                model(input_ids=ids, use_cache=False)
            for v in vias:
                def patch(value, ctx, v=v, recorded=recorded):
                    new = value.clone()
                    for i in targets[v][ctx.name]:
                        new[:, i] = recorded[ctx.name][:, i]
                    return new

                with hf.hooks(model, {name: patch for name in targets[v]}):
                    logits = model(input_ids=ids, use_cache=False).logits
                raw[v][s : s + B] = torch.tensor(_metric_rows(metric, logits), dtype=torch.float64)
    patched = {v: raw[v].view(len(layer_list), g.num_heads) for v in vias}
    effects = {v: _normalize(x, m_clean, m_corrupt) for v, x in patched.items()}
    return PatchResult(effects, patched, m_clean, m_corrupt, layer_list, None)


# ---------------------------------------------------------------------------------------------------------
# attention knockout
# ---------------------------------------------------------------------------------------------------------
KnockoutBlock = tuple[int, "Sequence[int] | int | None", "Sequence[int] | int", "Sequence[int] | int"]


def _as_list(x, what: str, n: int) -> list[int]:
    vals = [x] if isinstance(x, int) else list(x)
    out = [int(v) + n if int(v) < 0 else int(v) for v in vals]
    if not out or any(not 0 <= v < n for v in out):
        raise ValueError(f"{what} {x!r} outside 0..{n - 1}")
    return out


def attention_knockout(model: nn.Module, ids: Tensor, blocks: Sequence[KnockoutBlock]) -> Tensor:
    """Logits ``(1, T, V)`` with attention edges removed.

    Each block is ``(layer, heads, from_positions, to_positions)``: in ``layer`` (heads: an int, a list, or
    None for all), every query position in ``from_positions`` stops attending every key position in
    ``to_positions`` (their scores become ``-inf``; the softmax renormalizes over the other keys). A block that
    would leave a query no key at all raises ``ValueError``.
    """
    _check_ids(ids)
    g = hf.geometry(model)
    T = ids.shape[1]
    per_layer: dict[int, list[tuple[list[int], list[int], list[int]]]] = {}
    for blk in blocks:
        if len(blk) != 4:
            raise ValueError(f"a block is (layer, heads, from_positions, to_positions), got {blk!r}")
        layer, heads, frm, to = blk
        if not 0 <= int(layer) < g.num_layers:
            raise ValueError(f"layer {layer} outside 0..{g.num_layers - 1}")
        hs = list(range(g.num_heads)) if heads is None else _as_list(heads, "heads", g.num_heads)
        fl, tl = _as_list(frm, "from_positions", T), _as_list(to, "to_positions", T)
        if g.is_causal:
            for f in fl:
                if set(range(f + 1)) <= set(tl):
                    raise ValueError(f"knockout would block every key of query position {f} (layer {layer})")
        per_layer.setdefault(int(layer), []).append((hs, fl, tl))

    def knock(sc, ctx):  # sc (B, H, r, Tk) for query rows ctx.rows
        s, e = ctx.rows
        rel = sc.shape[-1] - T  # keys before this call's queries (0 without a cache)
        sc = sc.clone()
        for hs, fl, tl in per_layer.get(ctx.layer, []):
            rows = [f - s for f in fl if s <= f < e]
            if rows:
                h = torch.tensor(hs).view(-1, 1, 1)
                r = torch.tensor(rows).view(1, -1, 1)
                k = torch.tensor([t + rel for t in tl]).view(1, 1, -1)
                sc[:, h, r, k] = float("-inf")
        return sc

    with torch.no_grad(), hf.hooks(model, {f"blocks.{layer}.attn.scores": knock for layer in per_layer}):
        return model(input_ids=ids, use_cache=False).logits


def knockout_effect(model: nn.Module, ids: Tensor, blocks: Sequence[KnockoutBlock], metric: Metric) -> float:
    """``metric(knocked-out logits) - metric(logits)``: the change the knockout causes."""
    with torch.no_grad():
        base = float(metric(model(input_ids=ids, use_cache=False).logits))
    return float(metric(attention_knockout(model, ids, blocks))) - base


# ---------------------------------------------------------------------------------------------------------
# direct logit attribution
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DLAResult:
    """Direct logit attribution (float64). With ``position=None`` every field gains a trailing ``T`` axis.

    Attributes:
        heads: ``(layers, heads)`` each head's direct contribution to ``logit[target] - logit[baseline]``.
        embed: the embeddings' contribution; mlp: ``(layers,)`` everything else each block adds (MLP and, for
            Gemma, its norms); attn_bias: ``(layers,)`` the ``o_proj`` bias (zero without one);
            unembed_bias: the LM head's bias difference.
        total: the sum of all of the above; logit: the model's own logit difference (equal up to rounding).
    """

    heads: Tensor
    embed: Tensor
    mlp: Tensor
    attn_bias: Tensor
    unembed_bias: Tensor
    total: Tensor
    logit: Tensor


@torch.no_grad()
def direct_logit_attribution(
    model: nn.Module, ids: Tensor, target_tokens: int | tuple[int, int], position: int | None = -1,
) -> DLAResult:
    """Each head's direct effect on the logit of ``target_tokens`` (an int, or ``(target, baseline)`` for the
    difference) at ``position`` (None: every position), with the final RMSNorm scale frozen from the full
    residual stream (module docstring). ``ids`` ``(1, T)``."""
    _check_ids(ids)
    base, head = _base(model), _unembed(model)
    tgt, bl = (target_tokens, None) if isinstance(target_tokens, int) else tuple(target_tokens)
    Vocab = head.weight.shape[0]
    for t in (tgt, bl):
        if t is not None and not 0 <= int(t) < Vocab:
            raise ValueError(f"token {t} outside the vocabulary (0..{Vocab - 1})")
    T = ids.shape[1]
    if position is not None and not -T <= position < T:
        raise ValueError(f"position {position} outside the sequence (length {T})")
    tr = _trace(model, ids)
    W = head.weight.double()
    direction = W[tgt] - (W[bl] if bl is not None else 0)  # (d,)
    bias = getattr(head, "bias", None)
    ub = torch.zeros((), dtype=torch.float64)
    if bias is not None:
        ub = bias.double()[tgt] - (bias.double()[bl] if bl is not None else 0)
    gain, eps = rms_gain(base.norm)
    s = _inv_rms(tr.resid[-1], eps)[0, :, 0]  # (T,)
    u = gain * direction  # the frozen norm folded into the direction: logit(c) = s * (u . c)

    def proj(c: Tensor) -> Tensor:  # c (..., T, d) -> (..., T)
        return (c.double() @ u) * s

    mods = dict(hf.attention_modules(model))
    heads, mlp, abias = [], [], []
    prev = tr.embed
    for i, layer in enumerate(base.layers):
        post = _frozen_post(layer, tr.out[i])
        ho = post(_head_outputs(model, i, tr.z[i]))  # (1, H, T, d)
        heads.append(proj(ho)[0])  # (H, T)
        b = getattr(mods[i].o_proj, "bias", None)
        bo = post(b.double().expand_as(tr.out[i]).clone()) if b is not None else None
        abias.append(proj(bo)[0] if bo is not None else torch.zeros(T, dtype=torch.float64))
        mlp.append(proj(tr.resid[i].double() - prev.double() - tr.attn_add[i].double())[0])
        prev = tr.resid[i]
    heads_t, mlp_t, ab_t = torch.stack(heads), torch.stack(mlp), torch.stack(abias)
    emb = proj(tr.embed)[0]
    total = heads_t.sum((0, 1)) + mlp_t.sum(0) + ab_t.sum(0) + emb + ub
    lg = tr.logits[0].double()
    logit = lg[:, tgt] - (lg[:, bl] if bl is not None else 0)
    ubt = ub.expand(T)
    if position is not None:
        heads_t, mlp_t, ab_t = heads_t[..., position], mlp_t[:, position], ab_t[:, position]
        emb, total, logit, ubt = emb[position], total[position], logit[position], ubt[position]
    return DLAResult(heads_t, emb, mlp_t, ab_t, ubt, total, logit)


# ---------------------------------------------------------------------------------------------------------
# logit lens
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LensResult:
    """Logit lens at one position.

    Attributes:
        logits: ``(layers + 1, V)`` row 0: the embeddings, row ``l + 1``: the residual stream after layer ``l``,
            each through the model's final norm and unembedding (the last row is the model's logits).
        top_tokens, top_logits: ``(layers + 1, top)`` the largest entries of each row.
        head_top_tokens, head_top_logits: ``(layers, heads, top)`` per-head lens (None unless ``heads=True``).
        head_logits: ``(layers, heads, V)`` the full per-head lens (None unless ``full_heads=True``).
    """

    logits: Tensor
    top_tokens: Tensor
    top_logits: Tensor
    head_top_tokens: Tensor | None = None
    head_top_logits: Tensor | None = None
    head_logits: Tensor | None = None


@torch.no_grad()
def logit_lens(
    model: nn.Module, ids: Tensor, position: int = -1, top: int = 5, *, heads: bool = False,
    full_heads: bool = False,
) -> LensResult:
    """The logit lens at ``position`` of ``ids (1, T)``; ``heads=True`` adds the per-head lens (each head's
    ``o_proj`` contribution through the final norm, scale frozen from that layer's residual stream, and the
    unembedding; no unembedding bias)."""
    _check_ids(ids)
    T = ids.shape[1]
    if not -T <= position < T:
        raise ValueError(f"position {position} outside the sequence (length {T})")
    base, head = _base(model), _unembed(model)
    tr = _trace(model, ids)
    with torch.no_grad():
        rows = torch.stack([tr.embed[0, position]] + [r[0, position] for r in tr.resid])  # (L + 1, d)
        logits = head(base.norm(rows.unsqueeze(0)))[0].float()
    V = logits.shape[-1]
    k = min(top, V)
    tl, tt = logits.topk(k, dim=-1)
    res = dict(logits=logits, top_tokens=tt, top_logits=tl)
    if heads or full_heads:
        gain, eps = rms_gain(base.norm)
        W = head.weight.double()
        hl = []
        for i, layer in enumerate(base.layers):
            post = _frozen_post(layer, tr.out[i])
            ho = post(_head_outputs(model, i, tr.z[i]))[0, :, position]  # (H, d)
            s = _inv_rms(tr.resid[i][0, position], eps)  # (1,)
            hl.append(((ho * gain * s) @ W.T).float())
        hlt = torch.stack(hl)  # (L, H, V)
        htl, htt = hlt.topk(k, dim=-1)
        res.update(head_top_tokens=htt, head_top_logits=htl, head_logits=hlt if full_heads else None)
    return LensResult(**res)


__all__ = [
    "DLAResult", "KnockoutBlock", "LensResult", "Metric", "PATCH_POINTS", "PatchResult", "PathPatchResult",
    "activation_patching", "attention_knockout", "direct_logit_attribution", "knockout_effect", "logit_lens",
    "path_patching", "path_patching_logits", "path_patching_senders", "rms_gain",
]
