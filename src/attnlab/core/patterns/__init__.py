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

__all__ = [
    "And",
    "Causal",
    "Chunked",
    "Dilated",
    "Document",
    "Full",
    "GlobalTokens",
    "Or",
    "Pattern",
    "PerHead",
    "PrefixLM",
    "Sinks",
    "SlidingWindow",
    "Strided",
]
