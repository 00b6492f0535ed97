"""Attention layers and head structure (family "layers"); importing a module registers its layers."""

from . import mha  # noqa: F401
