"""``attnlab bench prefix`` [B200]: prefix attention against a plain loop, the known zero shift in the first
layer, a zero-length prefix = the frozen model, gradients only into the prefix, the skills, the command and
its resume."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import tiny  # noqa: E402

from attnlab.bench import prefix as PX  # noqa: E402
from attnlab.bench.prefix_tuning import (  # noqa: E402
    HFPrefix,
    HFSoftPrompt,
    content_shift,
    hf_weights,
    prefix_attend,
)

SK = PX.SkillConfig()
SETUP = PX.BackboneSetup(dim=16, heads=2, layers=2, pretrain_steps=0)


def _loop_reference(q, k, v, pk, pv, scale):
    """Each query row by hand in float64: softmax over [prefix keys, content keys <= t]."""
    B, H, T, _ = q.shape
    g = H // k.shape[1]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // g
            for t in range(T):
                keys = torch.cat([pk[kv], k[b, kv, : t + 1]]).double()
                vals = torch.cat([pv[kv], v[b, kv, : t + 1]]).double()
                w = torch.softmax(keys @ q[b, h, t].double() * scale, dim=0)
                out[b, h, t] = w @ vals
    return out


def test_prefix_attend_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    pk, pv = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    out, w = prefix_attend(q, k, v, pk, pv, scale=8**-0.5)
    assert w.shape == (2, 4, 6, 9)
    torch.testing.assert_close(out.double(), _loop_reference(q, k, v, pk, pv, 8**-0.5), atol=1e-5, rtol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 6))
    assert float(w[..., 3:].triu(1).abs().max()) == 0.0  # content stays causal


def test_prefix_output_is_the_original_rescaled_plus_a_fixed_direction():
    """[B200]: out = (1 - alpha) * original attention output + alpha * (softmax over the prefix) V_p."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, 4, generator=g)
    k, v = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    pk, pv = torch.randn(2, 2, 4, generator=g), torch.randn(2, 2, 4, generator=g)
    out, w = prefix_attend(q, k, v, pk, pv, scale=0.5)
    orig, _ = prefix_attend(q, k, v, scale=0.5)
    alpha = w[..., :2].sum(-1, keepdim=True)
    pref = torch.softmax((q @ pk.transpose(-1, -2)) * 0.5, dim=-1) @ pv
    torch.testing.assert_close(out, (1 - alpha) * orig + alpha * pref, atol=1e-6, rtol=1e-5)


def test_content_shift_known_answers():
    w = torch.softmax(torch.randn(2, 3, 4, 4), -1).tril()
    w = w / w.sum(-1, keepdim=True)
    tv, mass = content_shift(w, w, 0)
    assert float(tv.abs().max()) < 1e-6 and float(mass.abs().max()) == 0.0
    # a prefix taking mass alpha, content rescaled by (1 - alpha): no shift, mass alpha
    alpha = torch.full((2, 3, 4, 1), 0.3)
    new = torch.cat([alpha / 2, alpha / 2, (1 - alpha) * w], dim=-1)
    tv, mass = content_shift(w, new, 2)
    assert float(tv.abs().max()) < 1e-6
    torch.testing.assert_close(mass, torch.full((2, 3, 4), 0.3))
    # disjoint supports: a full move; every weight on the prefix: counted as a full move
    a = torch.tensor([[1.0, 0.0]])
    assert float(content_shift(a, torch.tensor([[0.0, 1.0]]))[0]) == pytest.approx(1.0)
    assert float(content_shift(a, torch.tensor([[1.0, 0.0, 0.0]]), 1)[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="prefix columns"):
        content_shift(a, a, 1)


def _backbone(seed: int = 0):
    model = PX.build_backbone(SK, SETUP, seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_backbone_prefix_first_layer_shift_is_zero_deeper_is_not():
    base = _backbone()
    model = PX.wrap_prefix(base, 3)
    with torch.no_grad():
        for b in model.blocks:  # a prefix that takes real mass
            b.mixer.prefix_k.normal_(0, 2.0)
            b.mixer.prefix_v.normal_(0, 2.0)
    x = PX.skill_batch(SK, "first", 8, torch.Generator().manual_seed(0)).x
    ref = PX.backbone_weights(PX.wrap_prefix(base, 0), x)
    new = PX.backbone_weights(model, x)
    s = PX.shift_summary(ref, new, 3)
    assert s["shift_l0"] < 1e-6  # the known answer: layer 0 sees the same content
    assert s["shift_by_layer"][1] > 1e-4  # deeper layers see inputs the prefix changed
    assert s["prefix_mass"] > 0.05
    # a soft prompt also enters the short convolution before the first mixer: the first positions change
    soft = torch.randn(3, SETUP.dim)
    s2 = PX.shift_summary(ref, PX.backbone_weights(PX.wrap_prefix(base, 0), x, soft), 3)
    assert s2["shift_l0"] > 1e-4


def test_zero_length_prefix_is_the_frozen_model():
    base = _backbone()
    x = PX.skill_batch(SK, "max", 4, torch.Generator().manual_seed(1)).x
    with torch.no_grad():
        ref, _ = base(x)
        got = PX.backbone_hidden(PX.wrap_prefix(base, 0), x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    model = tiny("llama")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            HFPrefix(model, 0)(model, ids).logits[:, -1],
            model(input_ids=ids).logits[:, -1],
            atol=1e-5,
            rtol=1e-5,
        )


def test_gradients_reach_only_the_prefix():
    base = _backbone()
    model = PX.wrap_prefix(base, 2)
    prefix = [p for b in model.blocks for p in (b.mixer.prefix_k, b.mixer.prefix_v)]
    for p in prefix:
        p.requires_grad_(True)
    batch = PX.skill_batch(SK, "lag5", 4, torch.Generator().manual_seed(2))
    PX.backbone_loss(model, batch)[0].backward()
    ids = {id(p) for p in prefix}
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in prefix)
    assert all(p.grad is None for p in model.parameters() if id(p) not in ids)

    hf = tiny("llama")
    for p in hf.parameters():
        p.requires_grad_(False)
    pre = HFPrefix(hf, 3, init_ids=torch.tensor([5, 6, 7]))
    ids_ = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    pre(hf, ids_).logits[:, -1].logsumexp(-1).sum().backward()
    assert float(pre.k.grad.abs().sum()) > 0 and float(pre.v.grad.abs().sum()) > 0
    assert all(p.grad is None for p in hf.parameters())


def test_hf_prefix_and_soft_prompt_shift_zero_in_layer_0():
    model = tiny("llama")
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    ref = hf_weights(model, ids)
    assert ref[0].shape == (2, 4, 10, 10)
    for adapter in (
        HFPrefix(model, 3, init_ids=torch.tensor([3, 4, 5])),
        HFSoftPrompt(model, 3, init_ids=torch.tensor([8, 9, 10])),
    ):
        new = hf_weights(model, ids, adapter)
        assert new[0].shape == (2, 4, 10, 13)
        s = PX.shift_summary(ref, new, 3)
        assert s["shift_l0"] < 1e-5, type(adapter).__name__
        assert s["shift_by_layer"][1] > 1e-4 and s["prefix_mass"] > 0.01


def test_skills_known_answers_and_layout():
    s = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert PX.skill_targets("first", s).tolist() == [[3] * 8]
    assert PX.skill_targets("max", s).tolist() == [[3, 3, 4, 4, 5, 9, 9, 9]]
    assert PX.skill_targets("min", s).tolist() == [[3, 1, 1, 1, 1, 1, 1, 1]]
    assert PX.skill_targets("lag2", s)[0, 2:].tolist() == [3, 1, 4, 1, 5, 9]
    with pytest.raises(ValueError, match="unknown skill"):
        PX.skill_targets("sort", s)
    b = PX.skill_batch(SK, "lag5", 3, torch.Generator().manual_seed(0))
    assert (b.x[:, 0] == SK.neutral).all() and (b.x[:, 1 : 1 + SK.gap] == SK.filler).all()
    content = b.x[:, 1 + SK.gap :]
    scored = b.mask[:, 1 + SK.gap :]
    assert scored[:, : SK.skip].sum() == 0 and scored[:, SK.skip :].all()
    assert (b.y[:, 1 + SK.gap + 5 :] == content[:, :-5][:, : content.shape[1] - 5]).all()
    mix = PX.pretrain_batch(SK, 4, torch.Generator().manual_seed(0))
    assert sorted(set(mix.x[:, 0].tolist())) == [SK.marker("first"), SK.marker("max")]


class _WordTok:
    """Whitespace/punctuation tokenizer: every word, ':' and ',' and newline is one token."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        import re

        return {
            "input_ids": [
                self.vocab.setdefault(t, len(self.vocab)) for t in re.findall(r" ?\w+|[:,\n]", text)
            ]
        }


def test_kv_prompts_answer_the_right_value():
    tok = _WordTok()
    inv = {}
    for task in ("kv", "kv-prev"):
        X, Y = PX.kv_set(tok, task, 20, seed=0, pairs=4)
        inv = {i: w for w, i in tok.vocab.items()}
        assert X.shape == (20, 4 * 4 + 2)
        for row, y in zip(X.tolist(), Y.tolist()):
            words = [inv[i] for i in row]
            pairs = [(words[j], words[j + 2]) for j in range(0, 16, 4)]
            q = next(i for i, (k, _) in enumerate(pairs) if k == words[-2])
            assert q >= 1
            want = pairs[q][1] if task == "kv" else pairs[q - 1][1]
            assert inv[y] == want
    with pytest.raises(ValueError, match="unknown task"):
        PX.kv_set(tok, "sort", 2, 0)


def _args(tmp_path: Path, **over) -> argparse.Namespace:
    ns = dict(
        models=["backbone"],
        tasks_backbone=["first"],
        tasks_hf=None,
        methods=["zero", "prefix", "finetune"],
        seeds=[0],
        steps=3,
        prefix_len=2,
        pretrain_steps=5,
        quick=True,
        out=str(tmp_path),
        resume=None,
        threads=1,
        executor="local",
        address=None,
        workers=1,
    )
    ns.update(over)
    return argparse.Namespace(**ns)


def test_command_writes_files_and_resumes(tmp_path, monkeypatch):
    assert PX.run(_args(tmp_path)) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("prefix-")]
    for name in ("results.jsonl", "results.json", "results.md", "prefix_accuracy.png", "prefix_shift.png"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["zero", "prefix", "finetune"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    pre = next(r for r in rows if r["method"] == "prefix")
    assert (
        pre["shift_l0"] < 1e-5 and pre["trainable"] == 2 * 2 * 2 * 2 * 16
    )  # layers * (k, v) * Hkv * P * head_dim
    assert math.isfinite(next(r for r in rows if r["method"] == "finetune")["shift_mean"])
    assert list(run_dir.glob("backbone-*.pt"))  # the pretrained backbone is kept for resume

    def boom(cfg):
        raise AssertionError("a finished configuration ran again")

    monkeypatch.setattr(PX, "run_config", boom)
    assert PX.run(_args(tmp_path, resume=str(run_dir))) == 0
    assert len((run_dir / "results.jsonl").read_text().splitlines()) == 3


def test_bad_configurations_fail_clearly():
    with pytest.raises(ValueError, match="method must be one of"):
        PX.PrefixConfig("backbone", "first", "fewshot")
    with pytest.raises(ValueError, match="task must be one of"):
        PX.PrefixConfig("smollm2", "first", "prefix")
    with pytest.raises(ValueError, match="prefix_len"):
        PX.PrefixConfig("backbone", "first", "prefix", prefix_len=0)


def test_claims_verdicts():
    def row(task, method, acc, model="backbone"):
        return {"model": model, "task": task, "method": method, "accuracy": acc}

    rows = [
        row("first", "zero", 0.2),
        row("first", "prefix", 0.95),
        row("lag5", "prefix", 0.1),
        row("lag5", "finetune", 0.9),
        row("min", "prefix", 0.7),
        row("min", "finetune", 1.0),
    ]
    got = PX.claims(rows)
    assert got[0].endswith("-> holds") and got[1].endswith("-> holds")
    assert "not reproduced: the prefix learned it" in got[2]
    assert PX.claims([row("lag5", "prefix", 0.1), row("lag5", "finetune", 0.2)])[0].endswith("fails too")
