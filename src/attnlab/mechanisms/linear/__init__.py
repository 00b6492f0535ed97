"""Linear, recurrent and hybrid attention (family ``linear``); importing registers every layer."""

from . import (  # noqa: F401
    agent,
    agent_pooled,
    care,
    flowformer,
    inline,
    l2vit,
    lightnet,
    lightning,
    linear_attention,
    lla,
    rat,
    titans,
    tnl,
)
