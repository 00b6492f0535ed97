"""The intervention registry: NAME[:key=value,...] parsing with clear errors, composition (hooks stack, one decoding
loop per arm), every registered intervention changes a tiny model's output and its identity knobs leave it as is."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import Tok, samples, tiny  # noqa: E402

from attnlab.interventions import decoding as D  # noqa: E402
from attnlab.interventions import fit as F  # noqa: E402
from attnlab.interventions import registry as R  # noqa: E402
from attnlab.plans import calibrate as C  # noqa: E402

NAMES = ("zerotuning", "act", "fim", "scale_dim", "decore", "dagcd", "lookback", "pause", "headmask", "moa")


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


def test_every_issue_name_is_registered_with_its_kind():
    assert set(NAMES) <= set(R.names())
    kinds = {n: R.get(n).kind for n in NAMES}
    assert {n for n, k in kinds.items() if k == "decode"} == {"decore", "dagcd", "lookback"}
    assert kinds["pause"] == "prompt" and kinds["moa"] == "plan"
    assert {n for n, k in kinds.items() if k == "hooks"} == {"zerotuning", "act", "fim", "scale_dim", "headmask"}


def test_parse_typed_knobs_and_labels():
    c = R.parse_one("zerotuning:gamma=1.5,layers=0-2/5,screen=scan")
    assert c.knobs["gamma"] == 1.5 and c.knobs["layers"] == (0, 1, 2, 5) and c.knobs["screen"] == "scan"
    assert c.knobs["heads"] == "fit"  # default filled in
    assert R.parse_one(c.label) == c  # the label parses back to the same choice
    d = R.parse_one("decore:heads=3.1/5.2,alpha=0.5,entropy=false")
    assert d.knobs["heads"] == ((3, 1), (5, 2)) and d.knobs["entropy"] is False
    assert R.parse_one("fim:strength=none").knobs["strength"] is None
    arm = R.parse("act:alpha=3+zerotuning:gamma=1e+1")  # '+' inside a number is not a separator
    assert [c.name for c in arm] == ["act", "zerotuning"] and arm[1].knobs["gamma"] == 10.0
    assert R.arm_label(arm) == "act:alpha=3.0+zerotuning:gamma=10.0"


@pytest.mark.parametrize("text, words", [
    ("nope", ["unknown intervention 'nope'", "zerotuning", "dagcd", "pause"]),
    ("act:gama=2", ["act", "no knob 'gama'", "alpha", "beta", "heads", "layers"]),
    ("zerotuning:gamma=big", ["gamma", "expected float", "'big'"]),
    ("zerotuning:screen=fast", ["screen", "grad, scan"]),
    ("zerotuning:layers=3-1", ["backwards"]),
    ("decore:heads=3", ["layer.head"]),
    ("act:alpha", ["key=value"]),
    ("act:alpha=1,alpha=2", ["given twice"]),
    ("decore+dagcd", ["at most one decoding function", "decore and dagcd", "separate --intervention"]),
    ("act+act", ["act appears twice"]),
])
def test_bad_interventions_fail_naming_what_is_valid(text, words):
    with pytest.raises(ValueError) as e:
        R.parse(text)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_hooks_and_prompt_compose_with_one_decoding_loop():
    arm = R.parse("zerotuning:gamma=2,heads=all+act:heads=all+pause:every=8,count=1+decore:heads=1.0,alpha=1")
    assert [c.spec.kind for c in arm] == ["hooks", "hooks", "prompt", "decode"]


def _logits(model, ids, attach=None):
    with torch.no_grad():
        if attach is None:
            return model(input_ids=ids).logits[0, -1]
        with attach(model):
            return model(input_ids=ids).logits[0, -1]


def _arm(model, text, fitted=None):
    return R.build_arm(model, Tok(), R.parse(text), fitted)


def _gen(model, arm, ids, n=6):
    with D.Base(model) as base:
        return arm.generate(model, ids, n, base)[0].tolist()


PROMPT = list(samples(1, seed=7, length=40)[0].ids)


def _fim_fit(model, strength, layers):
    fc = F.FitContext(model, Tok(), samples(2, seed=3))
    return F.fit_fim(fc, {"strength": strength, "layers": layers, "rows": 8, "tail": 8})


HOOK_CHANGES = [
    "zerotuning:gamma=4,heads=all",
    "act:alpha=1.5,beta=0,heads=all",
    "scale_dim:dim=3,factor=0,layers=0/1",
    "headmask:heads=1.0/0.2",
]


@pytest.mark.parametrize("text", HOOK_CHANGES + ["fim"])
def test_each_hook_intervention_changes_the_logits(llama, text):
    ids = torch.tensor([PROMPT])
    # a random model's positional bias is small: a large strength makes its removal visible
    fitted = {"fim": _fim_fit(llama, 30.0, (0, 1))} if text == "fim" else None
    choice = R.parse(text if text != "fim" else "fim:strength=30,layers=0/1")
    arm = R.build_arm(llama, Tok(), choice, fitted)
    (part,) = arm.parts
    assert part.attach is not None
    base, out = _logits(llama, ids), _logits(llama, ids, part.attach)
    assert (out - base).abs().max() > 1e-3, text
    assert torch.allclose(_logits(llama, ids), base)  # hooks gone after the block


@pytest.mark.parametrize("text", [
    "zerotuning:gamma=1,heads=all",
    "act:alpha=1e9,heads=all",
    "scale_dim:dim=3,factor=1,layers=0/1",
    "headmask:heads=1.0/0.2,factor=1",
])
def test_identity_knobs_leave_the_logits_equal(llama, text):
    ids = torch.tensor([PROMPT])
    (part,) = _arm(llama, text).parts
    assert torch.allclose(_logits(llama, ids, part.attach), _logits(llama, ids), atol=1e-5, rtol=0), text


def test_fim_at_strength_zero_and_pause_every_zero_are_the_plain_model(llama):
    (fim,) = R.build_arm(llama, Tok(), R.parse("fim:strength=0,layers=0/1"),
                         {"fim": _fim_fit(llama, 0.0, (0, 1))}).parts
    assert fim.attach is None
    (pause,) = _arm(llama, "pause:every=0,count=1").parts
    assert pause.prompt is None
    plain = _gen(llama, R.Arm("plain"), PROMPT)
    assert _gen(llama, R.Arm("p", [pause]), PROMPT) == plain


def test_pause_changes_the_prompt_and_the_output(llama):
    arm = _arm(llama, "pause:every=8,count=2")
    marker = Tok()(" [PAUSE]")["input_ids"]
    p = arm.prompt(PROMPT)
    # 40 tokens, every 8: after tokens 8, 16 and 24 (none in the last 8 + 8), two markers each
    assert len(marker) == 1 and len(p) == 40 + 3 * 2
    assert p[8:10] == marker * 2 and p[18:20] == marker * 2 and p[28:30] == marker * 2
    assert [t for t in p if t not in marker] == [t for t in PROMPT if t not in marker]
    assert p[-8:] == PROMPT[-8:]  # the end (the question) untouched
    assert not torch.allclose(_logits(llama, torch.tensor([p])), _logits(llama, torch.tensor([PROMPT])))


@pytest.mark.parametrize("text", [
    "decore:heads=1.0/1.1/1.2/1.3/0.0/0.1,alpha=4",
    "dagcd:heads=1.0/1.1/0.2,weight=30",
    "lookback:detector=mean,candidates=3,temperature=1.5,chunk_len=2",
])
def test_each_decoding_intervention_changes_the_tokens(llama, text):
    plain = _gen(llama, R.Arm("plain"), PROMPT)
    got = _gen(llama, _arm(llama, text), PROMPT)
    assert len(got) == len(plain) == 6
    assert got != plain, text


def test_decoding_identities_give_the_greedy_tokens(llama):
    plain = _gen(llama, R.Arm("plain"), PROMPT)
    assert _gen(llama, _arm(llama, "decore:heads=1.0/1.1,alpha=0"), PROMPT) == plain
    assert _gen(llama, _arm(llama, "lookback:detector=mean,candidates=1,temperature=0"), PROMPT) == plain
    with D.Base(llama) as base:  # the DAGCD loop itself (split prefill, observer) at weight 0
        toks = D.dagcd_greedy(llama, torch.tensor([PROMPT]), 6, base.new_cache, heads=[(1, 0)], weight=0.0)
    assert toks[0].tolist() == plain


def test_composed_hooks_equal_the_calibrations_applied_together(llama):
    arm = _arm(llama, "zerotuning:gamma=3,heads=all+act:alpha=1.5,beta=0.2,heads=all")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        with arm.parts[0].attach(llama), arm.parts[1].attach(llama):
            got = llama(input_ids=ids).logits[0, -1]
        with C.ZeroTuning.uniform(2, 4, 3.0).attach(llama), C.ACT(alpha=1.5, beta=0.2).attach(llama):
            want = llama(input_ids=ids).logits[0, -1]
        zt_only = _logits(llama, ids, arm.parts[0].attach)
    assert torch.allclose(got, want, atol=1e-6)
    assert (got - zt_only).abs().max() > 1e-4  # both acted


def test_a_decoding_loop_runs_under_hook_interventions(llama):
    both = _gen(llama, _arm(llama, "zerotuning:gamma=4,heads=all+decore:heads=1.0,alpha=0"), PROMPT)
    (zt,) = _arm(llama, "zerotuning:gamma=4,heads=all").parts
    assert both == _gen(llama, R.Arm("zt", [zt]), PROMPT)  # decore at alpha 0 = greedy, under the hooks


def test_an_unfitted_choice_refuses_to_build(llama):
    with pytest.raises(ValueError, match="fit it first"):
        _arm(llama, "fim")
    with pytest.raises(ValueError, match="outside the model"):
        _arm(llama, "decore:heads=9.0,alpha=1")


def test_default_tasks_come_from_the_papers_and_fall_back():
    arms = [c for a in ("zerotuning", "decore") for c in R.parse(a)]
    assert R.default_tasks(arms, ("kv", "niah", "passkey")) == ["kv"]
    assert R.default_tasks(arms, ("icl_cls", "faithful", "mdqa", "kv")) == ["icl_cls", "kv", "faithful", "mdqa"]
    from attnlab.interventions import data

    names = data.task_names()  # every default names a task that exists
    for spec in R.REGISTRY.values():
        assert set(spec.default_tasks) <= set(names), spec.name
