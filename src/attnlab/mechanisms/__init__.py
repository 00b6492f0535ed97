"""Built-in layers; importing this package registers them all in the catalogue."""

from . import layers  # noqa: F401
from . import linear  # noqa: F401
from . import routing  # noqa: F401
