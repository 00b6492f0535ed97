import os

import pytest
import torch

# Deterministic and quiet on the 2-core machines; inductor's cache stays warm between runs.
torch.manual_seed(0)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
