"""The shared harness of the distributed tests: one training step on 2 gloo processes (each rank half the batch)
equals one step in one process, the same loss and the same gradients (by parameter name)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

Batch = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def rank_step(rank: int, port: int, out: str, wrap: Callable[[nn.Module], nn.Module], model: Callable[[], nn.Module],
              batch: Batch, full_grad: Callable[[torch.Tensor], torch.Tensor] = lambda g: g) -> None:
    """In a spawned process: join the 2-process group, take half the batch through ``wrap(model())``, backward, and
    (rank 0) save the rank-averaged loss and the named gradients (``full_grad`` gathers a sharded one)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        net = wrap(model())
        idx, tgt = batch()
        part = slice(2 * rank, 2 * rank + 2)  # each rank takes half the batch
        _, loss = net(idx[part], tgt[part])
        loss.backward()  # DDP all-reduces / FSDP2 reduce-scatters the mean of the ranks' gradients
        dist.all_reduce(loss.detach_(), op=dist.ReduceOp.AVG)
        named = getattr(net, "module", net).named_parameters()
        grads = {n: full_grad(p.grad) for n, p in named}  # every rank joins a gather of sharded gradients
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out)
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def assert_two_ranks_match_one(worker: Callable[[int, int, str], None], tmp_path: Path,
                               model: Callable[[], nn.Module], batch: Batch) -> None:
    """Spawn ``worker(rank, port, out)`` on 2 processes; its loss and gradients equal one process's (1e-12)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "step.pt")
    mp.spawn(worker, args=(port, out), nprocs=2, join=True)
    got = torch.load(out)
    net = model()
    _, loss = net(*batch())
    loss.backward()
    assert abs(float(got["loss"]) - float(loss.detach())) < 1e-12
    grads = dict(net.named_parameters())
    assert set(got["grads"]) == set(grads)
    for name, g in got["grads"].items():
        assert torch.allclose(g, grads[name].grad, atol=1e-12, rtol=0), name
