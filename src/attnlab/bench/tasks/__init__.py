"""Quality benchmark: synthetic tasks scored in one backbone where only the attention mechanism changes.

Tasks (seeded generators, fixed test splits): MQAR, selective copying, induction copy with length
extrapolation, flip-flop language modeling, in-context linear regression, needle-in-a-haystack-lite, ListOps.
``attnlab bench tasks`` runs a suite; ``docs/benchmarks.md`` shows a quick run.
"""

from .backbone import Backbone, BackboneConfig
from .base import Batch, Task
from .flipflop import FlipFlop, FlipFlopConfig
from .induction import Induction, InductionConfig
from .listops import ListOps, ListOpsConfig
from .mechanisms import LayerSpec, MechSpec, parse_mechanism
from .mqar import MQAR, MQARConfig
from .needle import Needle, NeedleConfig
from .regression import InContextRegression, RegressionConfig
from .selective_copy import SelectiveCopy, SelectiveCopyConfig
from .trainer import TrainConfig, train

__all__ = [
    "Backbone", "BackboneConfig", "Batch", "Task", "FlipFlop", "FlipFlopConfig", "Induction", "InductionConfig",
    "ListOps", "ListOpsConfig", "LayerSpec", "MechSpec", "parse_mechanism", "MQAR", "MQARConfig", "Needle",
    "NeedleConfig", "InContextRegression", "RegressionConfig", "SelectiveCopy", "SelectiveCopyConfig",
    "TrainConfig", "train",
]
