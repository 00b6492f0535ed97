"""`attnlab inspect heads` end to end on the saved planted induction circuit (word-level tokenizer, nothing
downloaded): every analysis row is written, SAD finds the planted K-side source, and --resume skips done work."""

from __future__ import annotations

import json

import pytest

from attnlab.cli import main
from tests.inspect.test_causal import IND_HEAD, NV, PREV_HEAD, planted
from tests.inspect.test_causal_cli import word_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted")
    planted().save_pretrained(path)
    word_tokenizer([f"t{i}" for i in range(NV - 1)] + ["<s>"], bos="<s>").save_pretrained(path)
    return path


def test_heads_command_and_resume(folder, tmp_path):
    out = tmp_path / "runs"
    args = ["inspect", "heads", "--model", str(folder), "--analyses", "rope,frames,long,sad", "--tokens", "40",
            "--long-tokens", "60", "--window", "8", "--sad-head", f"1.{IND_HEAD}", "--out", str(out)]
    assert main(args) == 0
    (run,) = out.glob("heads-*")
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["analysis"] for r in rows] == ["rope", "frames", "long", "sad"]
    sad = rows[3]["detail"]
    assert sad["key_sources"][0][0] == f"L0H{PREV_HEAD}" and sad["induction_target_rows"] == 1.0
    assert len(rows[0]["detail"]["per_layer"]) == 2
    doc = json.loads((run / "results.json").read_text())
    assert [r["analysis"] for r in doc["rows"]] == ["rope", "frames", "long", "sad"]
    assert "## " in (run / "details.md").read_text()
    assert (run / f"{folder.name}_rope.png").stat().st_size > 1000
    before = (run / "results.jsonl").read_text()
    assert main(args[:-2] + ["--resume", str(run), "--no-png"]) == 0
    assert (run / "results.jsonl").read_text() == before  # nothing recomputed


def test_bad_arguments(capsys):
    assert main(["inspect", "heads", "--analyses", "rope,nope"]) == 2
    assert "choose from" in capsys.readouterr().out
    assert main(["inspect", "heads", "--analyses", "sad", "--sad-head", "18"]) == 2
    assert "LAYER.HEAD" in capsys.readouterr().out
