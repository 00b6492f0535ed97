import dataclasses
import json

import pytest
from layer_checks import one_thread  # noqa: F401

import attnlab
from attnlab.cli import main
from attnlab.mechanisms.registry import get, make_config, paper_title

MINE = {"mha": "L203", "moh": "L35", "mae": "L238", "mhe": "L182", "cascaded": "L87", "diff": "L265",
        "shared_diff": "L265"}


@pytest.mark.parametrize("name", MINE)
def test_registered_with_paper_and_frozen_config(name):
    e = get(name)
    assert e.family == "layers" and MINE[name] in e.papers and paper_title(MINE[name])
    assert e.decodes and e.cls.registry_name == name
    cfg = make_config(name, dim=64, heads=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 3
    layer = attnlab.build(name, dim=64, heads=4)
    assert isinstance(layer, attnlab.mechanisms.base.AttentionLayer)


def test_list_command_prints_the_catalogue(capsys):
    assert main(["list", "--family", "layers", "--json"]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert set(MINE) <= set(listed)
    assert listed["moh"]["titles"] == ["MoH: Multi-Head Attention as Mixture-of-Head Attention"]
    assert "active_heads" in listed["moh"]["config"]
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "mqa -> mha" in text and "gqa -> mha" in text


def test_unknown_option_lists_valid_ones():
    with pytest.raises(TypeError, match="valid options are"):
        attnlab.build("moh", dim=64, heads=4, experts=3)
