"""Content-based sparse attention (family ``routing``): selections computed cheaply, run as gathered tiles."""

from . import biformer, minference, moba, routing_transformer  # noqa: F401
