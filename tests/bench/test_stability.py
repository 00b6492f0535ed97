"""``bench stability`` (B252): z-loss and log Z on known logits, the attention-logit monitor against a hand
computation, the options changing training, the LR-sensitivity metric on known losses, the generated language,
and the command writing its files and resuming."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnlab.bench import stability
from attnlab.bench.stability import MarkovCopy, MarkovCopyConfig, lr_sensitivity
from attnlab.bench.tasks.backbone import (
    AttentionLogitMonitor,
    Backbone,
    BackboneConfig,
    log_z,
    output_z_loss,
    task_loss,
)
from attnlab.bench.tasks.base import generator
from attnlab.bench.tasks.mechanisms import LayerSpec, build_layer
from attnlab.bench.tasks.trainer import StabilityOptions, TrainConfig, train
from attnlab.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is faster, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(qk_norm: bool = False, rope: bool = True, layers: int = 2, dim: int = 16, heads: int = 2,
           vocab: int = 11) -> Backbone:
    torch.manual_seed(0)
    spec = LayerSpec("mha", {"qk_norm": qk_norm, "rope": rope})
    return Backbone(BackboneConfig(dim=dim, heads=heads, layers=layers, mlp=True),
                    lambda i: build_layer(spec, dim, heads), vocab=vocab, num_classes=vocab)


# ---- z-loss and log Z -------------------------------------------------------------------------------------------
def test_log_z_and_z_loss_on_known_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, -1.0], [100.0, 0.0, 0.0, 0.0]])
    by_hand = [math.log(4.0), math.log(math.e + math.e**2 + math.e**3 + math.e**-1), 100.0 + math.log(1 + 3 * math.exp(-100))]
    assert log_z(logits).tolist() == pytest.approx(by_hand, rel=1e-6)
    expected = 1e-4 * sum(v * v for v in by_hand) / 3
    assert float(output_z_loss(logits, 1e-4)) == pytest.approx(expected, rel=1e-6)
    # bfloat16 logits are reduced in float32 (log Z near 100 keeps its digits)
    assert log_z(logits.bfloat16()).dtype == torch.float32


def test_task_loss_reports_log_z_and_adds_the_z_term():
    model = _model()
    with torch.no_grad():
        model.head.weight.zero_()  # every logit 0: log Z = log(classes) exactly
    b = MarkovCopy(MarkovCopyConfig(vocab=11, seq_len=12, copy_len=2)).sample(3, generator(0))
    stats: dict[str, float] = {}
    plain, _, _ = task_loss(model, "classify", b.x, b.y, b.mask, stats=stats)
    assert stats["log_z"] == pytest.approx(math.log(11), rel=1e-6)
    assert stats["task_loss"] == pytest.approx(math.log(11), rel=1e-6)  # uniform prediction
    with_z, _, _ = task_loss(model, "classify", b.x, b.y, b.mask, z_loss=0.5)
    assert float((with_z - plain).detach()) == pytest.approx(0.5 * math.log(11) ** 2, rel=1e-5)
    with pytest.raises(ValueError, match="z_loss"):
        task_loss(model, "regress", b.x, b.y.float(), b.mask, z_loss=0.1)


# ---- the attention-logit monitor -------------------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_logit_monitor_matches_a_hand_computation(qk_norm):
    model = _model(qk_norm=qk_norm, rope=False, layers=1)
    mixer = model.blocks[0].mixer
    if qk_norm:  # gains other than 1, so the hand computation must apply them
        with torch.no_grad():
            mixer.q_norm.weight.uniform_(0.5, 2.0)
            mixer.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randint(0, 11, (2, 9), generator=generator(3))
    with AttentionLogitMonitor(model) as mon:
        model(x)
    # by hand: embed, the convolution's residual, the mixer's norm, the projections, per-head dot products
    blk = model.blocks[0]
    with torch.no_grad():
        h = model.embed(x)
        h = h + blk.conv(blk.norm_conv(h))
        u = blk.norm_mix(h)
        best = 0.0
        for head in range(2):
            Wq = mixer.q_proj.weight[8 * head: 8 * head + 8]  # (d, dim)
            Wk = mixer.k_proj.weight[8 * head: 8 * head + 8]
            q, k = u @ Wq.T, u @ Wk.T  # (B, T, d)
            if qk_norm:
                q = _rms(q, mixer.q_norm.weight, mixer.q_norm.eps)
                k = _rms(k, mixer.k_norm.weight, mixer.k_norm.eps)
            for bi in range(2):
                for i in range(9):
                    for j in range(i + 1):  # causal pairs only
                        best = max(best, abs(float(q[bi, i] @ k[bi, j])) / math.sqrt(8))
    assert mon.values() == [pytest.approx(best, rel=1e-5)]
    # the wrapper is gone afterwards, and a fresh monitor starts empty
    assert "project" not in vars(mixer)
    assert AttentionLogitMonitor(model).values() == [None]


def test_attention_logit_monitor_leaves_outputs_unchanged():
    model = _model()
    x = torch.randint(0, 11, (2, 7), generator=generator(1))
    before = model(x)[0]
    with AttentionLogitMonitor(model) as mon:
        during = model(x)[0]
    assert torch.equal(before, during)
    assert all(v is not None and v > 0 for v in mon.values())


# ---- the options change training --------------------------------------------------------------------------------
def _grads(model: Backbone, **kw) -> dict[str, torch.Tensor]:
    b = MarkovCopy(MarkovCopyConfig(vocab=11, seq_len=12, copy_len=2)).sample(4, generator(0))
    model.zero_grad()
    task_loss(model, "classify", b.x, b.y, b.mask, **kw)[0].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_z_loss_and_qk_norm_change_the_gradients():
    base = _grads(_model())
    z = _grads(_model(), z_loss=1e-2)
    assert not torch.allclose(base["head.weight"], z["head.weight"])
    qk = _grads(_model(qk_norm=True))  # same seed: the projections start equal (the norms' gains are ones)
    assert torch.equal(_model().blocks[0].mixer.q_proj.weight, _model(qk_norm=True).blocks[0].mixer.q_proj.weight)
    name = "blocks.0.mixer.q_proj.weight"
    assert not torch.allclose(base[name], qk[name])
    assert "blocks.0.mixer.q_norm.weight" in qk and "blocks.0.mixer.q_norm.weight" not in base


def _train(stability_opts: StabilityOptions | None, qk_norm: bool = False, lr: float = 1e-2):
    task = MarkovCopy(MarkovCopyConfig(vocab=11, seq_len=12, copy_len=2, val_size=8, test_size=4))
    bb = BackboneConfig(dim=16, heads=2, layers=1)
    spec = LayerSpec("mha", {"qk_norm": qk_norm})
    cfg = TrainConfig(lr=lr, batch_size=4, max_steps=6, budget_s=60, eval_every=6, target=None, warmup=2)
    return train(task, lambda i: build_layer(spec, 16, 2), bb, cfg, 0, stability=stability_opts)


def test_trainer_probes_do_not_perturb_training_and_options_change_it():
    plain = _train(None)
    probed = _train(StabilityOptions(log_every=2))
    assert plain["loss"] == probed["loss"] and plain["metrics"] == probed["metrics"]
    assert "log" not in plain and "final_loss" not in plain  # the quality benchmark's rows are unchanged
    assert [e["step"] for e in probed["log"]] == [0, 2, 4, 5]
    assert all(len(e["max_logit"]) == 1 and e["max_logit"][0] > 0 for e in probed["log"])
    assert probed["initial_loss"] > probed["final_loss"] > 0
    assert _train(StabilityOptions(z_loss=1e-1))["final_loss"] != probed["final_loss"]
    assert _train(StabilityOptions(), qk_norm=True)["final_loss"] != probed["final_loss"]
    with pytest.raises(ValueError, match="z_loss"):
        StabilityOptions(z_loss=-1.0)


# ---- the LR-sensitivity metric ---------------------------------------------------------------------------------
def test_lr_sensitivity_known_answers():
    # capped at the initial loss 4: [3, 2, 2.5, 4 (diverged)] -> best 2 -> mean(1, 0, 0.5, 2) = 0.875
    assert lr_sensitivity([3.0, 2.0, 2.5, None], 4.0) == pytest.approx(0.875)
    # a loss above the initial one counts as the initial loss; nan and inf are diverged
    assert lr_sensitivity([2.0, 9.0, float("nan"), float("inf")], 4.0) == pytest.approx(1.5)
    assert lr_sensitivity([1.5, 1.5, 1.5], 4.0) == 0.0
    assert lr_sensitivity([None, None], 4.0) == 0.0  # nothing trained: no spread between rates
    with pytest.raises(ValueError, match="two learning rates"):
        lr_sensitivity([1.0], 4.0)
    with pytest.raises(ValueError, match="initial_loss"):
        lr_sensitivity([1.0, 2.0], float("nan"))


def test_summarize_uses_the_metric_and_flags_divergence():
    def row(v, lr, final, logit):
        return {"variant": v, "lr": lr, "seed": 0, "initial_loss": 4.0, "final_loss": final,
                "stopped": "max_steps" if final is not None else "diverged",
                "log": [{"step": 0, "lr": lr, "loss": 4.0, "log_z": 1.0, "max_logit": [1.0, logit]}]}
    rows = [row("a", 0.1, 2.0, 3.0), row("a", 1.0, None, 5e4), row("b", 0.1, 2.2, 2.0), row("b", 1.0, 2.4, 6.0)]
    out = {r["variant"]: r for r in stability.summarize(rows, ["a", "b"], [0.1, 1.0])}
    assert out["a"]["lr_sensitivity"] == pytest.approx(1.0) and out["a"]["diverged"] == 1
    assert out["b"]["lr_sensitivity"] == pytest.approx(0.1) and out["b"]["best_lr"] == 0.1
    assert out["a"]["max_logit_top_lr"] == 5e4 and out["b"]["max_logit_top_lr"] == 6.0


# ---- the generated language -------------------------------------------------------------------------------------
def test_markov_copy_follows_its_chain_and_copies():
    cfg = MarkovCopyConfig(vocab=16, seq_len=40, branching=3, copy_len=8)
    task = MarkovCopy(cfg)
    b = task.sample(64, generator(5))
    seq = torch.cat([b.x, b.y[:, -1:]], dim=1)  # (n, T + 1): the whole sequence
    assert torch.equal(b.y[:, :-1], b.x[:, 1:]) and bool(b.mask.all())
    allowed = torch.zeros(16, 16, dtype=torch.bool)
    allowed[torch.arange(16)[:, None], task.successors] = True
    legal = allowed[seq[:, :-1], seq[:, 1:]]  # (n, T): transitions the chain allows
    # only the two seams of the copied segment may break the chain
    assert int((~legal).sum(1).max()) <= 2
    # some segment of 8 tokens in the second half repeats one of the first half
    found = 0
    for s in seq:
        firsts = {tuple(s[i:i + 8].tolist()) for i in range(0, 41 // 2 - 8 + 1)}
        found += any(tuple(s[j:j + 8].tolist()) in firsts for j in range(41 // 2, 41 - 8 + 1))
    assert found == 64
    assert 0 < task.chain_entropy() < math.log(3)
    with pytest.raises(ValueError, match="copy_len"):
        MarkovCopyConfig(seq_len=10, copy_len=8)


# ---- the command ------------------------------------------------------------------------------------------------
def test_cli_small_run_writes_files_and_resumes(tmp_path, monkeypatch):
    args = ["bench", "stability", "--quick", "--steps", "4", "--dim", "16", "--lrs", "0.01", "1.0",
            "--variants", "baseline", "qk_norm", "--workers", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    for name in ("results.json", "results.md", "results.jsonl", "stability-loss-vs-lr.png",
                 "stability-logits-top-lr.png"):
        assert (run / name).is_file(), name
    data = json.loads((run / "results.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["baseline", "qk_norm"]
    assert all(r["lr_sensitivity"] is not None and r["lr_sensitivity"] >= 0 for r in data["rows"])
    lines = (run / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4

    def boom(rc):
        raise AssertionError("a finished configuration was trained again")

    monkeypatch.setattr(stability, "run_one", boom)
    assert main(args[:-2] + ["--resume", str(run)]) == 0
    assert (run / "results.jsonl").read_text().splitlines() == lines
