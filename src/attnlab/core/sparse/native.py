"""attnlab's native CPU kernel for block-sparse attention (a PyTorch C++ extension, sources in ``csrc/``).

It executes a :class:`~attnlab.core.sparse.layout.BlockLayout` -- per (batch or 1, head or 1, query block) the key
blocks to visit, *full* blocks with no mask work and *partial* blocks with the exact bit mask -- forward and
backward, fp32 and bf16 (fp32 accumulation), with K/V read in place and grouped-query attention without
repeating K/V. Forward is a flash-style online softmax per query tile; backward recomputes the tiles (dQ per
query tile, dK/dV per key tile over the transposed block lists, so no atomics).

Public API (stable; the sparse engine calls only this):

``available() -> bool``
    True when the extension is built (or builds now) for this torch, these sources and this CPU. False when
    no compiler exists or the build fails: one warning says so, and attnlab uses its Python engine.
    ``ATTNLAB_NATIVE=0`` turns the kernel off.
``build(verbose: bool = False) -> None``
    Build (or load the cached build) now; raises ``RuntimeError`` with the compiler's message on failure.
``block_attention(q, k, v, layout, scale, *, bias=None, alibi=None, softcap=None, temperature=None,
q_order=None, k_order=None) -> (out, lse)``
    q ``(B, Hq, Tq, D)``, k ``(B, Hkv, Tk, D)``, v ``(B, Hkv, Tk, Dv)`` on CPU, float32 or bfloat16, last dim
    contiguous (any other strides are read in place); ``Hq % Hkv == 0``. ``layout``: a BlockLayout for these
    lengths (``layout.q_len == Tq``, ``layout.kv_len == Tk``; query row ``i`` sits at ``layout.q_offset + i``).
    Returns ``out (B, Hq, Tq, Dv)`` in q's dtype and ``lse (B, Hq, Tq)`` float32 (``-inf`` for rows seeing no
    key; their output and gradients are zero). Exact gradients flow to q, k, v, ``bias``, ``temperature`` and
    through ``lse`` too (so log-sum-exp merges of several calls stay exact). Scores, in this order::

        s = scale * temperature[h] * (q_i . k_j)
        s = softcap * tanh(s / softcap)                        # if softcap
        s = s + bias[b, h, i, j] - alibi[h] * |q_pos_i - j|    # if bias / alibi
        s = -inf where the layout does not allow (i, j)

    ``bias``: ``(B or 1, Hq or 1, Tq, Tk)`` (row i is query row i of this call); ``alibi``: ``(Hq,)`` slopes
    (constant, no gradient); ``temperature``: ``(Hq,)``; ``softcap``: a positive float. ``q_order`` /
    ``k_order``: optional permutations when the layout is over reordered sequences (2-D grids in Z-order: square
    patches become blocks); rows are read and written through them, nothing is copied.

``supports_backward() -> bool``: True (the engine asks before running a training step through the kernel).

``set_gemm(name)`` / ``gemm()``: the tile-product engine ("own": register-blocked kernel on ATen's
``Vectorized``; "brgemm": oneDNN's batch-reduce GEMM shipped with torch), a measured choice.
``default_block(device_type="cpu") -> int``: the block size (q_block = k_block) layouts for the kernel should
use; ``attnlab bench speed`` measures block size and tile-product engine per machine and stores both in
``$ATTNLAB_CACHE/tuning.json`` (``save_tuning``); later processes start from them.

The build lives in ``$ATTNLAB_CACHE/native`` (default ``~/.cache/attnlab/native``), in a folder keyed by the torch
version, a hash of the sources and build flags, and the CPU's model and flags, so a stale or foreign build is
never loaded; later processes load it in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import threading
import warnings
import weakref
from pathlib import Path

import torch
from torch import Tensor

from .layout import BlockLayout

_SRC_DIR = Path(__file__).resolve().parents[4] / "csrc"
_SOURCES = ("block_attention.cpp",)
_lock = threading.Lock()
_module = None
_error: str | None = None
_warned = False
_transposed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cache_root() -> Path:
    return Path(os.environ.get("ATTNLAB_CACHE") or Path.home() / ".cache" / "attnlab")


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags (the build uses -march=native)."""
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        text = platform.processor() + platform.machine()
    return text


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
    cap = torch.backends.cpu.get_cpu_capability()
    # ATen's Vectorized picks its width from CPU_CAPABILITY_*; match what this torch uses on this CPU.
    if cap.startswith("AVX512"):
        flags += ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    elif cap.startswith("AVX2"):
        flags += ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def _build_key() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((_SRC_DIR / name).read_bytes())
    h.update(" ".join(_flags()).encode())
    h.update(_cpu_signature().encode())
    h.update(torch.__version__.encode())
    return f"torch{torch.__version__.replace('+', '_')}-{h.hexdigest()[:16]}"


#: a build takes a minute or two; a lock older than this was left by a killed build (torch's FileBaton holds no
#: pid), and every later load would wait on it forever
STALE_LOCK_S = 15 * 60


def clear_stale_lock(folder: Path, now: float | None = None) -> bool:
    """Remove ``folder/lock`` when it is older than :data:`STALE_LOCK_S`; True if removed (with a warning)."""
    import time

    lock = folder / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_S:
        return False
    lock.unlink(missing_ok=True)
    warnings.warn(f"removed a stale build lock ({age / 60:.0f} min old, left by a killed build): {lock}",
                  stacklevel=2)
    return True


def _compile(verbose: bool):
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        raise RuntimeError("no C++ compiler found (install g++)")
    key = _build_key()
    name = f"attnlab_native_{key.split('-')[-1]}"
    folder = cache_root() / "native" / key
    default = Path.home() / ".cache" / "attnlab" / "native" / key
    if not (folder / f"{name}.so").exists() and (default / f"{name}.so").exists():
        folder = default  # the same key (sources, flags, torch, CPU) already built in the default cache
    folder.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(folder)
    mod = cpp_extension.load(
        name=name,
        sources=[str(_SRC_DIR / s) for s in _SOURCES],
        extra_cflags=_flags(),
        build_directory=str(folder),
        verbose=verbose,
    )
    prefix = key.rsplit("-", 1)[0] + "-"
    for old in folder.parent.glob(prefix + "*"):  # stale builds of older sources for this torch
        if old != folder and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return mod


# ---- measured per-device choices (`attnlab bench speed` writes them to the tuning file) --------------------

DEFAULT_BLOCK = 64  # q_block = k_block of layouts planned for the kernel, until a run measures better
_BLOCKS = (32, 64, 128, 256)


def _tuning_file() -> Path:
    return cache_root() / "tuning.json"


def _tuned() -> dict:
    try:
        data = json.loads(_tuning_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def default_block(device_type: str = "cpu") -> int:
    """The measured best block size (query rows = keys per block) for the kernel's layouts."""
    val = _tuned().get(f"native_block/{device_type}")
    return val if isinstance(val, int) and val in _BLOCKS else DEFAULT_BLOCK


def save_tuning(block: int, gemm_name: str, device_type: str = "cpu") -> None:
    """Remember the measured block size and tile-product engine (and use the engine from now on)."""
    if block not in _BLOCKS or gemm_name not in _GEMMS:
        raise ValueError(f"block must be one of {_BLOCKS} and gemm one of {sorted(_GEMMS)}")
    path = _tuning_file()
    try:
        data = _tuned()
        data[f"native_block/{device_type}"] = block
        data[f"native_gemm/{device_type}"] = gemm_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
    except OSError:  # a read-only cache must not break a benchmark
        pass
    if _module is not None:
        set_gemm(gemm_name)


def _initial_gemm(mod) -> None:
    """The tuned engine, else brgemm when it runs here (it measured faster on AVX-512), else our own."""
    want = _tuned().get("native_gemm/cpu")
    if want not in _GEMMS:
        want = "brgemm"
    if want == "brgemm":
        try:
            mod.set_gemm(1)
            probe = torch.randn(1, 1, 8, 8)
            one = torch.ones(1, 1, 1, dtype=torch.int32)
            lay = (torch.zeros(1, 1, 1, 1, dtype=torch.int32), one[0], torch.ones(1, 1, 1, 1, dtype=torch.bool))
            mod.forward(probe, probe, probe, *lay, None, 8, 8, 0, 1.0, None, None, 0.0, None, None, None)
            return
        except Exception:  # oneDNN's ukernel unsupported on this CPU
            pass
    mod.set_gemm(0)


def build(verbose: bool = False) -> None:
    """Build or load the extension now; raises RuntimeError when it cannot."""
    global _module, _error
    with _lock:
        if _module is not None:
            return
        try:
            mod = _compile(verbose)
            _initial_gemm(mod)
            _module = mod
            _error = None
        except Exception as exc:  # a compiler error, a missing header, no compiler at all
            lines = str(exc).strip().splitlines()
            first = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")
            _error = f"{type(exc).__name__}: {first.strip()}"
            raise RuntimeError(f"attnlab native kernel build failed: {_error}") from exc


def available() -> bool:
    """Whether the native kernel can run here (builds it on first use; warns once when it cannot)."""
    global _warned
    if os.environ.get("ATTNLAB_NATIVE", "1") == "0":
        return False
    if _module is not None:
        return True
    if _error is None:
        try:
            build()
        except RuntimeError:
            pass
    if _module is None and not _warned:
        _warned = True
        warnings.warn(
            f"attnlab: the native CPU kernel is unavailable ({_error}); using the Python block-sparse engine. "
            "Run `bash scripts/setup.sh` with g++ installed to build it.",
            RuntimeWarning,
            stacklevel=2,
        )
    return _module is not None


def supports_backward() -> bool:
    """The kernel has an exact backward (dQ, dK, dV, bias, temperature and through the log-sum-exp)."""
    return True


def _ext():
    if _module is None:
        build()
    return _module


_GEMMS = {"own": 0, "brgemm": 1}


def set_gemm(name: str) -> None:
    """Choose the tile-product engine: "own" (ATen Vectorized micro-kernel) or "brgemm" (oneDNN via torch)."""
    if name not in _GEMMS:
        raise ValueError(f"gemm must be one of {sorted(_GEMMS)}, got {name!r}")
    _ext().set_gemm(_GEMMS[name])


def gemm() -> str:
    return {v: k for k, v in _GEMMS.items()}[int(_ext().get_gemm())]


def _layout_args(layout: BlockLayout) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    kv_index = layout.kv_index.to(torch.int32).contiguous()
    kv_count = layout.kv_count.to(torch.int32).contiguous()
    full = layout.full.to(torch.bool).contiguous()
    bits = None if layout.bits is None else layout.bits.to(torch.bool).contiguous()
    return kv_index, kv_count, full, bits


def _transpose(layout: BlockLayout, kv_index: Tensor, kv_count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    got = _transposed.get(layout)
    if got is None:
        got = tuple(_ext().transpose_layout(kv_index, kv_count, layout.num_k_blocks))
        _transposed[layout] = got
    return got


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, temperature, alibi, layout, scale, softcap, q_order, k_order):
        kv_index, kv_count, full, bits = _layout_args(layout)
        args = (kv_index, kv_count, full, bits, layout.q_block, layout.k_block, layout.q_offset, float(scale))
        mods = (bias, alibi, float(softcap or 0.0), temperature)
        out, lse = _ext().forward(q, k, v, *args, *mods, q_order, k_order)
        ctx.save_for_backward(q, k, v, out, lse, bias, temperature, alibi, q_order, k_order)
        ctx.layout, ctx.args, ctx.softcap = layout, args, float(softcap or 0.0)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, bias, temperature, alibi, q_order, k_order = ctx.saved_tensors
        kv_index, kv_count, full, bits, qb, kb, q_offset, scale = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        qt_index, qt_slot, qt_count = _transpose(ctx.layout, kv_index, kv_count)
        need_bias = bias is not None and ctx.needs_input_grad[3]
        need_temp = temperature is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dbias, dtemp = _ext().backward(
            dout, q, k, v, out, lse, dlse, kv_index, kv_count, full, bits, qt_index, qt_slot, qt_count,
            qb, kb, q_offset, scale, bias, alibi, ctx.softcap, temperature, need_bias, need_temp, q_order, k_order,
        )
        gb = gt = None
        if need_bias:
            gb = dbias.sum(dim=[d for d in (0, 1) if bias.shape[d] == 1], keepdim=True)
        if need_temp:
            gt = dtemp
        return dq, dk, dv, gb, gt, None, None, None, None, None, None


def block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    scale: float,
    *,
    bias: Tensor | None = None,
    alibi: Tensor | None = None,
    softcap: float | None = None,
    temperature: Tensor | None = None,
    q_order: Tensor | None = None,
    k_order: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention over ``layout``'s blocks: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D/Dv) -> (out (B, Hq, Tq, Dv), lse (B, Hq, Tq)).

    ``q_order`` / ``k_order``: optional permutations (``(Tq,)`` / ``(Tk,)``) when ``layout`` describes the
    sequences reordered (e.g. a 2-D grid in Z-order, so that blocks are square patches): layout query row ``r``
    is q row ``q_order[r]``, layout key ``j`` is key ``k_order[j]``. Rows are read and written through the orders
    (no permuted copies); out, lse, gradients, ``bias`` and ALiBi stay in natural order and positions."""
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    if q.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"block_attention supports float32 and bfloat16, got {q.dtype}")
    if (layout.q_len, layout.kv_len) != (Tq, Tk):
        raise ValueError(f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len}; got Tq={Tq}, Tk={Tk}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap!r}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if bias is not None:
        if bias.dim() != 4 or bias.shape[0] not in (1, B) or bias.shape[1] not in (1, Hq) or bias.shape[2:] != (Tq, Tk):
            raise ValueError(f"bias must be (B or 1, Hq or 1, {Tq}, {Tk}), got {tuple(bias.shape)}")
        bias = bias.to(torch.float32).contiguous()
    for name, t in (("alibi", alibi), ("temperature", temperature)):
        if t is not None and t.shape != (Hq,):
            raise ValueError(f"{name} must have shape ({Hq},), got {tuple(t.shape)}")
    alibi = None if alibi is None else alibi.detach().to(torch.float32).contiguous()
    temperature = None if temperature is None else temperature.to(torch.float32).contiguous()
    orders = []
    for name, o, n in (("q_order", q_order, Tq), ("k_order", k_order, Tk)):
        if o is not None and (o.dim() != 1 or o.numel() != n):
            raise ValueError(f"{name} must be a permutation of length {n}, got shape {tuple(o.shape)}")
        orders.append(None if o is None else o.to(device="cpu", dtype=torch.int32).contiguous())
    return _BlockAttention.apply(q, k, v, bias, temperature, alibi, layout, float(scale), softcap, *orders)


def merge_gathered_(out: Tensor, lse: Tensor, part_out: Tensor, part_lse: Tensor, src: Tensor, hit: Tensor) -> None:
    """Inference-only, in place: merge a query-gathered partial result into natural-order rows by log-sum-exp.

    out (n, Dv), lse (n,): the running result (float32, contiguous); part_out (P, Dv), part_lse (P,): a kernel call
    on gathered rows; row i takes slot ``src[i]`` where ``hit[i]`` (src (n,) int64, hit (n,) bool). One pass, no
    gathered copies; not differentiable (callers use ``lse_merge`` under autograd)."""
    _ext().merge_gathered_(out, lse, part_out, part_lse, src, hit)


__all__ = [
    "DEFAULT_BLOCK", "merge_gathered_", "available", "block_attention", "build", "cache_root", "default_block", "gemm", "save_tuning",
    "set_gemm", "supports_backward",
]
