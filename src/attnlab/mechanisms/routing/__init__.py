"""Content-based sparse attention (family ``routing``): selections computed cheaply, run as gathered tiles.

One file per method: its functions, its op (``attnlab.ops.get(name)``, registered there) and its layer
(``RoutingLayer`` = projections + the op + the layer's own parameters). Importing this package registers both.
"""

from . import (  # noqa: F401
    biformer,
    delta,
    delta_layers,
    dhsa,
    dma,
    hip,
    light_forcing,
    minference,
    moba,
    rectified,
    recycled,
    routing_transformer,
    sparsifiner,
    ssa,
    superlinear,
    vmoba,
)
