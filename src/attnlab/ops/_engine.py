"""The one place where ops and routing layers import the sparse engine (tiles, their executor, dense masks).

Every routing op reads the engine (``core.sparse``) through this module, so moving it changes these lines only;
the three helpers below keep the ops' part-list style on top of the engine's plans (no engine code here).
"""

from ..core.sparse import (  # noqa: F401
    Plan,
    Tiles,
    flat_key_index,
    key_set_tiles,
    masked_reference,
    plan_blocks,
    plan_selection,
    plan_tiles,
    run,
    selection_mask,
)


def tiles_from_selection(sel, valid, key_sets, Hkv, Tk, q_offset=0, causal=True, q_block=128) -> list:
    """The parts of ``core.sparse.plan_selection`` (key-centric, up to ``q_block`` queries per tile), to be combined
    with other parts in :func:`tile_attention`; a decoding call's block plan comes whole (so alone it keeps its
    BlockLayout and runs on the native kernel)."""
    plan = plan_selection(sel, valid, key_sets, Hkv, Tk, q_offset, causal, q_block=q_block)
    return [plan] if plan.mode == "blocks" else list(plan.parts)


def tiles_from_blocks(block_index, block_valid, q_block, k_block, Tq, Tk, Hkv, q_offset=0, causal=False) -> Plan:
    """``core.sparse.plan_blocks``: pass it alone to :func:`tile_attention` (a block plan keeps its BlockLayout,
    so the native kernel can run it)."""
    return plan_blocks(block_index, block_valid, q_block, k_block, Tq, Tk, Hkv, q_offset, causal)


def tile_attention(q, k, v, parts, scale, diag_block=None):
    """``core.sparse.run`` over the union of ``parts`` (and the causal diagonal blocks, if asked); a single
    plan from :func:`tiles_from_blocks` runs as it is."""
    if len(parts) == 1 and isinstance(parts[0], Plan) and not diag_block:
        return run(q, k, v, parts[0], scale)
    return run(q, k, v, plan_tiles([p for x in parts for p in (x.parts if isinstance(x, Plan) else (x,))],
                                   diag_block), scale)


__all__ = ["Plan", "Tiles", "flat_key_index", "key_set_tiles", "masked_reference", "plan_blocks", "plan_selection",
           "plan_tiles", "run", "selection_mask", "tile_attention", "tiles_from_blocks", "tiles_from_selection"]
