"""Built-in layers; importing this package registers them all in the catalogue."""

from . import (
    layers,  # noqa: F401
    linear,  # noqa: F401
    routing,  # noqa: F401
)
