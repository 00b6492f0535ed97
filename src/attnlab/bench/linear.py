"""``attnlab bench speed --sections linear``: Lightning Attention's constant speed at any length.

Rows (batch 1, 8 heads, head_dim 64, per-head decays as in TransNormerLLM):

* ``chunk``   -- the chunked kernel's forward at one length for several chunk sizes (the CPU tuning).
* ``prefill`` -- forward (and forward + backward) time, time per token, peak memory, and SDPA causal on the same
  inputs in the same run, with the speedup.
* ``decode``  -- one recurrent step after ``n`` tokens (constant) against SDPA over an ``n``-token KV cache,
  with the bytes each keeps per sequence.

Times are the fastest of the repeats (the machines are shared; slower repeats measure the queue). ``meta``
carries the ratios the issue asks about: time per token at the longest length over the shortest, and
peak memory per token at the longest over the shortest (1.0 = linear growth).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.linear import DEFAULT_CHUNK, linear_attention
from .common import Report, bench_qkv, fwd_bwd, peak_memory, time_fn
from .speed import SpeedContext

HEADS, HEAD_DIM = 8, 64
LOG_DECAY = -8.0 * torch.arange(HEADS, dtype=torch.float32) / HEADS  # TransNormerLLM's layer-0 decays


def _inputs(n: int, dtype: torch.dtype, device: str, grad: bool = False) -> list[torch.Tensor]:
    return bench_qkv(n, device, dtype, grad, HEADS, HEAD_DIM, std=0.3)  # small scores keep the decays meaningful


def _lightning(q, k, v, chunk: int) -> torch.Tensor:
    return linear_attention(q, k, v, LOG_DECAY.to(q.device), chunk=chunk)[0]


def _sdpa(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def best(times: list[float]) -> float:
    """Fastest of the repeats: on a shared machine the others include waits for a core, not our work."""
    return min(times)


def _say(row: dict) -> None:
    """Print each row as it is measured (long runs keep what they measured so far)."""
    print("linear:", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)


def run(ctx: SpeedContext) -> Report:
    rep = Report(
        "linear",
        ["kind", "length", "chunk", "time_s", "us_per_token", "peak_mib", "sdpa_s", "speedup_vs_sdpa", "state_kib"],
    )
    if ctx.only and not {"lightning", "linear"} & set(ctx.only):
        return rep
    dev, dt = ctx.device, ctx.dtype
    lengths = ctx.lengths or ((1024, 2048, 4096, 8192) if ctx.quick else (2048, 8192, 32768, 65536))
    sdpa_max = 8192 if ctx.quick else 32768  # SDPA beyond this takes minutes on 2 cores
    reps = 3 if ctx.quick else 5

    # 1. chunk size tuning at one length
    tune_len = 8192 if not ctx.quick else 4096
    q, k, v = _inputs(tune_len, dt, dev)
    fastest = (float("inf"), DEFAULT_CHUNK.get(torch.device(dev).type, 64))
    with torch.no_grad():
        for c in (32, 64, 128, 256):
            t = best(time_fn(partial(_lightning, q, k, v, c), reps=reps))
            fastest = min(fastest, (t, c))
            _say(rep.add(kind="chunk", length=tune_len, chunk=c, time_s=t, us_per_token=t / tune_len * 1e6))
    chunk = fastest[1]
    rep.meta["best_chunk"] = chunk

    # 2. prefill: forward, forward + backward, peak memory, SDPA causal on the same inputs
    per_token: dict[int, float] = {}
    mem_per_token: dict[int, float] = {}
    for n in lengths:
        long = n > 8192  # SDPA here takes tens of seconds: one timed call, no warm-up
        fwd, sdpa = partial(_lightning, *_inputs(n, dt, dev), chunk), partial(_sdpa, *_inputs(n, dt, dev))
        with torch.no_grad():
            t = best(time_fn(fwd, reps=reps))
            peak = peak_memory(fwd, dev)
            ts = best(time_fn(sdpa, reps=1 if long else reps, warmup=0 if long else 1)) if n <= sdpa_max else None
        per_token[n] = t / n
        mem_per_token[n] = peak / n
        _say(rep.add(kind="prefill fwd", length=n, chunk=chunk, time_s=t, us_per_token=t / n * 1e6,
                     peak_mib=peak / 2**20, sdpa_s=ts if ts is not None else "", speedup_vs_sdpa=ts / t if ts else ""))
        if ctx.backward or not ctx.quick:
            train = fwd_bwd(partial(_lightning, *_inputs(n, dt, dev, grad=True), chunk))
            sdpa_train = fwd_bwd(partial(_sdpa, *_inputs(n, dt, dev, grad=True)))
            tb = best(time_fn(train, reps=max(1, reps - 2)))
            peak_b = peak_memory(train, dev)
            tsb = best(time_fn(sdpa_train, reps=1, warmup=0 if long else 1)) if n <= sdpa_max else None
            _say(rep.add(kind="prefill fwd+bwd", length=n, chunk=chunk, time_s=tb, us_per_token=tb / n * 1e6,
                         peak_mib=peak_b / 2**20, sdpa_s=tsb if tsb is not None else "",
                         speedup_vs_sdpa=tsb / tb if tsb else ""))
    lo, hi = min(lengths), max(lengths)
    rep.meta["time_per_token_ratio_longest_over_shortest"] = round(per_token[hi] / per_token[lo], 3)
    rep.meta["peak_memory_per_token_ratio_longest_over_shortest"] = round(
        mem_per_token[hi] / max(mem_per_token[lo], 1e-9), 3
    )

    # 3. decoding: one recurrent step after n tokens vs SDPA over an n-token KV cache
    decode_lengths = (1024, 8192) if ctx.quick else (1024, 8192, 65536)
    for n in decode_lengths:
        q, k, v = _inputs(1, dt, dev)
        state = torch.randn(1, HEADS, HEAD_DIM, HEAD_DIM, device=dev, dtype=torch.float32)  # after n tokens
        kc, vc = (torch.randn(1, HEADS, n, HEAD_DIM, device=dev, dtype=dt) for _ in range(2))
        step = partial(linear_attention, q, k, v, LOG_DECAY.to(dev), state=state, mode="recurrent")
        kv_step = partial(F.scaled_dot_product_attention, q, kc, vc)
        with torch.no_grad():
            t = best(time_fn(step, reps=50))
            ts = best(time_fn(kv_step, reps=20))
        _say(rep.add(kind="decode step", length=n, time_s=t, us_per_token=t * 1e6, sdpa_s=ts,
                     speedup_vs_sdpa=ts / t, state_kib=state.numel() * state.element_size() / 1024))
        _say(rep.add(kind="decode sdpa kv-cache", length=n, time_s=ts, us_per_token=ts * 1e6,
                     state_kib=2 * kc.numel() * kc.element_size() / 1024))
    rep.plots.append(_plot)
    return rep


def _plot(rep: Report, run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rep.rows if r["kind"] == "prefill fwd"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["length"] for r in rows], [r["us_per_token"] for r in rows], "o-", label="lightning (chunked)")
    sd = [r for r in rows if r["sdpa_s"] != ""]
    ax.plot([r["length"] for r in sd], [r["sdpa_s"] / r["length"] * 1e6 for r in sd], "s--", label="SDPA causal")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("forward time per token (us)")
    ax.legend()
    ax.set_title("linear attention: time per token")
    path = run_dir / "linear_time_per_token.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
