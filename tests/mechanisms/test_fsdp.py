"""One training step of a TransformerLM with registered layers under FSDP2 (``fully_shard``, gloo, 2 processes,
CPU) equals one step in one process: the same loss and the same gradients."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

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


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        net = model()
        for block in net.blocks:  # each block its own shard group, then the root (embeddings, head)
            fully_shard(block)
        fully_shard(net)
        idx, tgt = batch()
        part = slice(2 * rank, 2 * rank + 2)  # each rank takes half the batch
        _, loss = net(idx[part], tgt[part])
        loss.backward()  # FSDP2 reduce-scatters the mean of the ranks' gradients
        dist.all_reduce(loss.detach_(), op=dist.ReduceOp.AVG)
        full = [p.grad.full_tensor() for p in net.parameters()]  # gather the sharded gradients
        if rank == 0:
            names = [n for n, _ in net.named_parameters()]
            torch.save({"loss": loss, "grads": dict(zip(names, full))}, out)
    finally:
        dist.destroy_process_group()


def test_fsdp2_step_matches_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    got = torch.load(out)
    net = model()
    _, loss = net(*batch())
    loss.backward()
    assert abs(float(got["loss"]) - float(loss.detach())) < 1e-12
    grads = dict(net.named_parameters())
    assert set(got["grads"]) == set(grads)
    for name, g in got["grads"].items():
        assert torch.allclose(g, grads[name].grad, atol=1e-12, rtol=0), name
