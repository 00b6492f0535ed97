"""One training step under DistributedDataParallel (gloo, 2 processes) equals one step in one process."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from attnlab.models.lm import LMConfig, TransformerLM

CFG = dict(vocab=32, dim=32, layers=2, heads=4, mechanisms=("mha", "diff"), mechanism_options=({}, {"heads": 2}))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(0))
    return seq[:, :-1], seq[:, 1:]


def model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(LMConfig(**CFG)).double()


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        net = DDP(model())
        idx, tgt = batch()
        part = slice(2 * rank, 2 * rank + 2)  # each rank takes half the batch
        _, loss = net(idx[part], tgt[part])
        loss.backward()
        dist.all_reduce(loss.detach_(), op=dist.ReduceOp.AVG)
        if rank == 0:
            torch.save({"loss": loss, "grads": [p.grad for p in net.module.parameters()]}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_step_matches_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    got = torch.load(out)
    net = model()
    _, loss = net(*batch())
    loss.backward()
    assert abs(float(got["loss"]) - float(loss.detach())) < 1e-12
    for g, p in zip(got["grads"], net.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-12, rtol=0)
