"""Imports every op module so that each registers its ops (one line per module)."""

from . import dense  # noqa: F401
