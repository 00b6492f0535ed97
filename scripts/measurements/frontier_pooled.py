"""Pool frontier runs made with different ``--seed`` (disjoint samples) and summarize them over the cells the
dense model solves, with the claims: sample indices of the i-th run are offset by ``i * 1000`` so that no two
runs' samples share a key.

    python scripts/measurements/frontier_pooled.py runs/frontier-claims-4k runs/frontier-confirm-4k --model gemma3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attnlab.frontier import report
from attnlab.frontier.run import aggregate, load_records, solvable_rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--model", required=True)
    p.add_argument("--methods", default=None, help="comma list (default: the methods every run holds)")
    a = p.parse_args()
    records, methods = [], None
    for i, run in enumerate(a.runs):
        recs = [dict(r, sample=r["sample"] + 1000 * i) for r in load_records(run / "samples.jsonl")
                if r["model"] == a.model]
        held = {r["method"] for r in recs}
        methods = held if methods is None else methods & held
        records += recs
    if a.methods:
        methods = set(a.methods.split(",")) | {"dense"}
    rows = solvable_rows([r for r in aggregate([r for r in records if r["method"] in methods])])
    summary = report.summarize(rows)
    print(f"runs: {', '.join(map(str, a.runs))}; cells: {sorted({(r['task'], r['length']) for r in rows})}")
    print("| method | budget | KV held | accuracy [95% CI] | vs dense | decode x | n |")
    print("|---|---|---|---|---|---|---|")
    f = report._fmt
    for s in sorted(summary, key=lambda s: (s["method"] != "dense", -(s["accuracy"] or 0))):
        print(f"| {s['method']} | {f(s['budget'])} | {f(s.get('kv_ratio'))} | {f(s['accuracy'], 3)} "
              f"[{f(s.get('ci_lo'), 2)}, {f(s.get('ci_hi'), 2)}] | {f(s.get('delta_vs_dense'), 1)} | "
              f"{f(s.get('decode_speedup'))} | {s['n']} |")
    for c in report.claims(summary):
        print(c["claim"], c["passed"], c["detail"])


if __name__ == "__main__":
    main()
