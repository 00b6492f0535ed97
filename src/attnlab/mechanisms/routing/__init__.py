"""Content-based sparse attention (family ``routing``): selections computed cheaply, run as gathered tiles."""

from . import (  # noqa: F401
    biformer,
    delta,
    delta_layers,
    dhsa,
    dma,
    hip,
    minference,
    moba,
    recycled,
    routing_transformer,
    sparsifiner,
    superlinear,
    vmoba,
)
