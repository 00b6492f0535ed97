"""Attention ops by name: ``attnlab.ops.get("moba")(q, k, v, scale=..., q_offset=..., **options)``.

See :mod:`attnlab.ops.registry` for the one signature every op follows.
"""

from .registry import OpSpec, OpState, get, names, reference, register_op, specs

__all__ = ["OpSpec", "OpState", "get", "names", "reference", "register_op", "specs"]
