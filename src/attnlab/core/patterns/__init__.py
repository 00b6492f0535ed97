"""Static sparse patterns. See ``base.Pattern`` for the contract every pattern meets."""

from .base import And, Or, Pattern, PerHead
from .basic import (
    Causal,
    Chunked,
    Dilated,
    Document,
    Full,
    GlobalTokens,
    PrefixLM,
    Sinks,
    SlidingWindow,
    Strided,
)
from .heads import StridedShards
from .longrange import FITGroups, PowerAttention, Radial
from .neighborhood import GridPattern, Neighborhood
from .shifted import ShiftedChunks, ShiftedCrossChunk
from .stochastic import Stochastic
from .vision import HaloBlocks, MaxViTBlock, MaxViTGrid

__all__ = [
    "And",
    "Causal",
    "Chunked",
    "Dilated",
    "Document",
    "FITGroups",
    "Full",
    "GlobalTokens",
    "GridPattern",
    "HaloBlocks",
    "MaxViTBlock",
    "MaxViTGrid",
    "Neighborhood",
    "Or",
    "Pattern",
    "PerHead",
    "PowerAttention",
    "PrefixLM",
    "Radial",
    "ShiftedChunks",
    "ShiftedCrossChunk",
    "Sinks",
    "SlidingWindow",
    "Stochastic",
    "Strided",
    "StridedShards",
]
