"""attnlab: attention mechanisms of the literature behind one interface."""

from . import ops
from .core import patterns, score_mods
from .core.attention import attention
from .core.reference import reference_attention
from .mechanisms.registry import build, catalogue, get

__all__ = ["attention", "reference_attention", "patterns", "score_mods", "build", "catalogue", "get", "ops"]
__version__ = "0.1.0"
