"""``attnlab list --ops``: every op with family, paper ids and titles, options and cache kind."""

import json

from attnlab import ops
from attnlab.cli import main


def test_list_ops_json_and_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # a wide table: names are not wrapped
    assert main(["list", "--ops", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ops.names()
    by = {r["name"]: r for r in rows}
    moba = by["moba"]
    assert moba["family"] == "routing" and moba["cache"] == "kv" and moba["decodes"]
    assert moba["papers"] == ["D56", "D99"] and "Mixture-of-Block" in moba["titles"][0]
    assert moba["titles"][1].startswith("Delta Attention")
    assert moba["options"] == {"block": 64, "top_k": 3, "delta": 0}
    assert by["routing_transformer"]["options"]["centroids"] is None
    assert by["biformer"]["decodes"] is False and by["biformer"]["options"]["grid"] == [8, 8]
    assert all(len(r["titles"]) == len(r["papers"]) and all(r["titles"]) for r in rows)
    assert main(["list", "--ops", "--family", "pattern", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == set(ops.names("pattern"))
    assert main(["list", "--ops"]) == 0
    table = capsys.readouterr().out
    assert "attnlab ops" in table and "moba" in table and "sliding_window" in table
