"""Attention layers and head structure (family "layers"); importing a module registers its layers."""
# ruff: noqa: I001 -- a plain list, one line per module, so each contributor appends one line

from . import mha  # noqa: F401
from . import moh  # noqa: F401
from . import cog  # noqa: F401
from . import relu_attn  # noqa: F401
from . import gaam  # noqa: F401
from . import mta  # noqa: F401
from . import kv_shift  # noqa: F401
from . import complexformer  # noqa: F401
from . import rcmha  # noqa: F401
from . import neural_attn  # noqa: F401
from . import optimised_attn  # noqa: F401
from . import efficient_attn  # noqa: F401
from . import super_attn  # noqa: F401
from . import mega  # noqa: F401
from . import sentinel  # noqa: F401
from . import luong  # noqa: F401
from . import mae  # noqa: F401
from . import mhe  # noqa: F401
from . import cascaded  # noqa: F401
from . import diff  # noqa: F401
from . import shvit  # noqa: F401
from . import deconstructing  # noqa: F401
from . import headmask  # noqa: F401
from . import dual_attn  # noqa: F401
from . import combiner  # noqa: F401
from . import sdm  # noqa: F401
from . import gmm_attn  # noqa: F401
from . import dca  # noqa: F401
from . import monotonic_loc  # noqa: F401
