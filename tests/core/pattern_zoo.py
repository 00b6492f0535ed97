"""One small instance of every pattern class, for tests that check every engine against the reference.

``pattern_zoo()`` returns ``(name, pattern, seq_len)``: ``seq_len`` is a valid small length for the
pattern (the grid size for grid patterns, which accept no other), chosen not to be a multiple of 8 or 16
where the pattern allows it.
"""

from __future__ import annotations

from attnlab.core.patterns import (
    And,
    Causal,
    Chunked,
    Dilated,
    Document,
    FITGroups,
    Full,
    GlobalTokens,
    HaloBlocks,
    MaxViTBlock,
    MaxViTGrid,
    Neighborhood,
    Or,
    Pattern,
    PerHead,
    PowerAttention,
    PrefixLM,
    Radial,
    ShiftedChunks,
    ShiftedCrossChunk,
    Sinks,
    SlidingWindow,
    Stochastic,
    Strided,
    StridedShards,
)


def pattern_zoo() -> list[tuple[str, Pattern, int]]:
    """Every pattern class at least once; per-head patterns have 4 heads (so calls need 4 query heads)."""
    return [
        # basic 1-D patterns
        ("full", Full(), 29),
        ("causal", Causal(), 29),
        ("prefix_lm", PrefixLM(7), 29),
        ("document", Document((5, 11, 1, 12)), 29),
        ("sliding_window", SlidingWindow(6), 29),
        ("sliding_window_two_sided", SlidingWindow(4, causal=False), 29),
        ("sinks", Sinks(3), 29),
        ("global_tokens", GlobalTokens(2), 29),
        ("dilated", Dilated(4, 3), 29),
        ("strided", Strided(5), 29),
        ("chunked", Chunked(7), 29),
        ("chunked_causal", Chunked(6, causal=True), 29),
        # composition
        ("and", And((Causal(), SlidingWindow(5, causal=False))), 29),
        ("or", Or((SlidingWindow(3), Sinks(2))), 29),
        ("per_head", PerHead((SlidingWindow(4), Causal(), Dilated(3, 2), Chunked(5))), 29),
        # shifted chunks
        ("shifted_chunks", ShiftedChunks(6, 4), 29),
        ("shifted_chunks_bidir", ShiftedChunks(5, 4, causal=False, shift=2), 29),
        ("scca_fixed", ShiftedCrossChunk(6, 4), 29),
        ("scca_flow", ShiftedCrossChunk(8, 4, mode="flow"), 29),
        # neighborhood (NAT / DiNAT / GNA)
        ("na1d", Neighborhood(29, 5), 29),
        ("na1d_causal_dilated", Neighborhood(29, 4, dilation=2, causal=True), 29),
        ("na2d", Neighborhood((5, 7), 3), 35),
        ("na2d_dilated_strided", Neighborhood((6, 9), (3, 5), dilation=(2, 1), stride=(1, 2)), 54),
        ("na2d_causal_axis", Neighborhood((6, 7), 3, causal=(True, False)), 42),
        ("na3d", Neighborhood((3, 4, 5), (3, 3, 3), stride=(1, 1, 2)), 60),
        # vision blocks
        ("halo", HaloBlocks((6, 7), 3, 1), 42),
        ("maxvit_block", MaxViTBlock((6, 7), 3), 42),
        ("maxvit_grid", MaxViTGrid((6, 8), (3, 2)), 48),
        ("maxvit_block_or_grid", MaxViTBlock((6, 8), 3) | MaxViTGrid((6, 8), 2), 48),
        # heads / long range / stochastic
        ("s2_shards", StridedShards(3, 4), 29),
        ("s2_shards_bidir", StridedShards(2, 4, local_blocks=2, shards=3, causal=False), 29),
        ("power", PowerAttention(), 29),
        ("power_blocks", PowerAttention(3, local_blocks=2), 29),
        ("radial", Radial(2), 29),
        ("radial_frames_causal", Radial(1, frame=5, causal=True), 29),
        ("fit", FITGroups(5, latents=2), 29),
        ("fit_causal", FITGroups(4, latents=1, causal=True), 29),
        ("stochastic", Stochastic(0.3, block=4, seed=1), 29),
        ("stochastic_bidir", Stochastic(0.5, block=3, seed=2, causal=False), 29),
    ]


__all__ = ["pattern_zoo"]
