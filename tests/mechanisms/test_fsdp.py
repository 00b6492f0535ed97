"""One training step of a TransformerLM with registered layers under FSDP2 (``fully_shard``, gloo, 2 processes,
CPU) equals one step in one process: the same loss and the same gradients."""

import torch
from torch.distributed.fsdp import fully_shard
from two_ranks import assert_two_ranks_match_one, rank_step

from attnlab.models.lm import LMConfig, TransformerLM

# layers of the one base with different ops and extras: grouped-query sdpa (mha), gated heads (mae), a recurrent
# linear op (lightning). (Not MoH: its load-balance loss is a product of means over the whole batch, so half-batch
# losses do not average to it.)
CFG = dict(vocab=32, dim=32, layers=3, heads=4, mechanisms=("mha", "mae", "lightning"),
           mechanism_options=({"kv_heads": 2}, {"gate_hidden": 8}, {"chunk": 4}))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, 32, (4, 13), generator=torch.Generator().manual_seed(0))
    return seq[:, :-1], seq[:, 1:]


def model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(LMConfig(**CFG)).double()


def _shard(net: TransformerLM) -> TransformerLM:
    for block in net.blocks:  # each block its own shard group, then the root (embeddings, head)
        fully_shard(block)
    return fully_shard(net)


def _worker(rank: int, port: int, out: str) -> None:
    rank_step(rank, port, out, _shard, model, batch, full_grad=lambda g: g.full_tensor())


def test_fsdp2_step_matches_single_process(tmp_path):
    assert_two_ranks_match_one(_worker, tmp_path, model, batch)
