"""Imports every op module so that each registers its ops (one line per module)."""

from ..mechanisms import (
    layers,  # noqa: F401  (cog, relu_attn, gaam, neural_attn, mta, sentinel, rcmha: each file registers its op)
    routing,  # noqa: F401  (each routing method's file registers its op)
)
from ..mechanisms.linear import lla  # noqa: F401  (Local Linear Attention registers its op)
from ..plans import policies  # noqa: F401,E402  (stream, snap, quest, drop: each plan policy file registers its op)
from . import (
    dense,  # noqa: F401
    linear,  # noqa: F401
)
