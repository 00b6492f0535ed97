"""One training step under DistributedDataParallel (gloo, 2 processes) equals one step in one process."""

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from two_ranks import assert_two_ranks_match_one, rank_step

from attnlab.models.lm import LMConfig, TransformerLM

CFG = dict(vocab=32, dim=32, layers=2, heads=4, mechanisms=("mha", "diff"), mechanism_options=({}, {"heads": 2}))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(0))
    return seq[:, :-1], seq[:, 1:]


def model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(LMConfig(**CFG)).double()


def _worker(rank: int, port: int, out: str) -> None:
    rank_step(rank, port, out, DDP, model, batch)


def test_ddp_step_matches_single_process(tmp_path):
    assert_two_ranks_match_one(_worker, tmp_path, model, batch)
