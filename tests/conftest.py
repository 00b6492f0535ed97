import os

import pytest
import torch

# Deterministic and quiet on the 2-core machines; inductor's cache stays warm between runs.
torch.manual_seed(0)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny shapes: on the shared 2-core machines a second intra-op thread only
    adds contention (tiny models ran up to 50x slower with two); the setting is restored after the module.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; tests/interventions and
    tests/vision use it for every module (their conftest.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def gtok():
    """Gemma 3's tokenizer (from the converted cache; converting the model first if needed)."""
    from transformers import AutoTokenizer

    from attnlab.models import hf

    folder = hf.cache_root() / "models" / "gemma3-270m"
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return hf.load_model("gemma3")[1]
