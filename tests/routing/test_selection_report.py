"""``attnlab bench selection``: every registered routing mechanism has a diagnostic; known answers of the report."""

import pytest
import torch

from attnlab.bench.selection import SelectionMethod, default_methods, grid_2d, planted_qkv, recall_report
from attnlab.mechanisms.registry import catalogue


def _covers(names: set[str], mechanism: str) -> bool:
    return any(n == mechanism or n.startswith(mechanism + ".") for n in names)


def test_every_routing_mechanism_has_a_diagnostic():
    names = {m.name for m in default_methods(512)}
    missing = [e.name for e in catalogue("routing") if not _covers(names, e.name)]
    assert not missing, f"routing mechanisms without a row in bench.selection.default_methods: {missing}"
    assert len(names) == len(default_methods(512))  # names are unique


def test_default_methods_run_at_their_density():
    q, k, v = planted_qkv(1, 1, 512, 8, seed=0)
    methods = default_methods(512)
    rows = recall_report(methods, q, k, v)
    assert [r["method"] for r in rows] == [m.name for m in methods]
    for r in rows:  # about 1/8 to 1/4 of the allowed pairs, never all, never none
        assert 0.65 < r["sparsity"] < 0.9, r
        assert 0 < r["mass"] < 1 and 0 < r["top_recall"] <= 1 and 0 < r["out_err"] < 10, r
    by = {r["method"]: r for r in rows}
    for base in ("minference.vertical_slash", "delta_select"):  # the correction lowers the output error
        assert by[base + ".delta"]["out_err"] < by[base]["out_err"]
        assert by[base + ".delta"]["sparsity"] < by[base]["sparsity"]  # and costs its sampled rows
    # a small length (no cube: no VMoBA) still builds every other method
    q, k, v = planted_qkv(1, 2, 64, 8, seed=1)
    small = recall_report(default_methods(64), q, k, v)
    assert {r["method"] for r in small} >= {"biformer", "dhsa", "dma", "sparsifiner", "superlinear", "recycled"}


def test_report_known_answers_all_selected_and_correction():
    q, k, v = planted_qkv(1, 2, 64, 8, seed=1)
    ones = lambda q, k: torch.ones(1, 1, 64, 64, dtype=torch.bool)  # noqa: E731
    diag = lambda q, k: torch.eye(64, dtype=torch.bool).view(1, 1, 64, 64)  # noqa: E731
    rows = recall_report([SelectionMethod("full", ones, causal=False), SelectionMethod("d1", diag, correction=1),
                          SelectionMethod("d4", diag, correction=4), SelectionMethod("d0", diag)], q, k, v)
    for r in rows[:4]:  # everything selected, or every row sampled by the correction: dense attention
        assert r["sparsity"] == pytest.approx(0) and r["mass"] == pytest.approx(1)
        assert r["top_recall"] == pytest.approx(1) and r["out_err"] < 1e-12
    # stride 4: rows 0, 4, .., 60 are computed densely (i + 1 keys), the other 48 rows keep their diagonal
    picked = 48 + sum(i + 1 for i in range(0, 64, 4))
    for r in rows[4:6]:
        assert r["sparsity"] == pytest.approx(1 - picked / (64 * 65 / 2))
        assert r["out_err"] > 0.1
    values = SelectionMethod("v", lambda q, k, v: v[..., :1] > 0, values=True)  # value-derived selection
    (r,) = recall_report([values], q[:, :1], k[:, :1], v[:, :1])
    assert 0 < r["sparsity"] < 1


def test_grid_2d():
    assert grid_2d(512) == (16, 32) and grid_2d(64) == (8, 8) and grid_2d(4096) == (64, 64)
    assert grid_2d(48) == (4, 12) and grid_2d(30) is None and grid_2d(40) is None
