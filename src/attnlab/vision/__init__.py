"""Vision: a small ViT taking any 2-D-capable mixer by name, the vision mixers of issue #19, tiny image tasks
and ``attnlab bench vision``."""

from .data import ImageTask
from .registry import MixerContext, build_mixer, mixer_names
from .vit import ViT, ViTConfig, build_vit

__all__ = ["ImageTask", "MixerContext", "ViT", "ViTConfig", "build_mixer", "build_vit", "mixer_names"]
