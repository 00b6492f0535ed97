"""CAB (B24, "Comprehensive Attention Benchmarking"): the quality benchmark in four attention settings --
causal / non-causal self-attention and causal / non-causal cross-attention -- plus offline image tasks
(Pathfinder, shapes, scikit-learn's 8 x 8 digits). ``attnlab bench cab``; see :mod:`.run`, :mod:`.settings`,
:mod:`.images`."""

from .images import IMAGE_TASKS, Digits, Pathfinder, SameDifferent, image_task
from .settings import SETTINGS, CabMech, CrossModel, CrossTask, ReverseTask, unsupported

__all__ = ["IMAGE_TASKS", "SETTINGS", "CabMech", "CrossModel", "CrossTask", "Digits", "Pathfinder", "ReverseTask",
           "SameDifferent", "image_task", "unsupported"]
