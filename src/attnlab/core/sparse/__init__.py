"""attnlab's one sparse engine: one tile planner, one executor, one log-sum-exp merge.

::

    plan = plan_pattern(pattern, q_len, kv_len, q_offset=0, q_block=None, device="cpu")   # static patterns
    plan = plan_blocks(block_index, block_valid, q_block, k_block, q_len, kv_len, kv_heads,
                       q_offset=0, causal=False)                  # query block g reads key blocks index[..., g, :]
    plan = plan_selection(sel, valid, key_sets, kv_heads, kv_len, q_offset=0, causal=True,
                          q_block=128, diag_block=None)           # per-query key-set selections (key-centric)
    plan = plan_tiles([Tiles(...), ...], diag_block=None)          # a method's own tiles
    out = run(q, k, v, plan, scale, score_mod=None, engine="auto")          # (B, H, Tq, Dv)
    out, lse = run_lse(q, k, v, plan, scale, score_mod=None, engine="auto")  # + (B, H, Tq) log-sum-exp
    layout = plan.layout()                                         # the BlockLayout a kernel implements

Engines: ``"python"`` (PyTorch tiles: batched SDPA for pattern plans, the fused CPU flash kernel per part
merged by :func:`~attnlab.core.softmax.lse_merge` otherwise), ``"explicit"`` (the same tiles as matmuls under
autograd), ``"native"`` (the native CPU kernel on ``plan.layout()``), ``"flex"`` (FlexAttention, pattern plans),
``"auto"``. Dense forms for references and diagnostics: :func:`selection_mask`, :func:`masked_reference`,
:func:`selection_recall`. See docs/architecture.md ("The sparse engine").
"""

from ..softmax import lse_merge
from .executor import ENGINES, choose_engine, run, run_lse
from .layout import BlockLayout
from .plan import (
    DEFAULT_Q_BLOCK,
    ROW_QUERIES,
    BlockTiles,
    PatternTiles,
    Plan,
    Tiles,
    default_q_block,
    flat_key_index,
    key_set_tiles,
    plan_blocks,
    plan_pattern,
    plan_selection,
    plan_tiles,
    save_tuned_q_block,
)
from .select import masked_reference, selection_mask, selection_recall

__all__ = [
    "DEFAULT_Q_BLOCK",
    "ENGINES",
    "ROW_QUERIES",
    "BlockLayout",
    "BlockTiles",
    "PatternTiles",
    "Plan",
    "Tiles",
    "choose_engine",
    "default_q_block",
    "flat_key_index",
    "key_set_tiles",
    "lse_merge",
    "masked_reference",
    "plan_blocks",
    "plan_pattern",
    "plan_selection",
    "plan_tiles",
    "run",
    "run_lse",
    "save_tuned_q_block",
    "selection_mask",
    "selection_recall",
]
