"""Summary rows of a frontier run over the cells the dense model solves, for chosen methods and lengths.

    python scripts/measurements/frontier_solved.py runs/frontier-main-4k --model gemma3 --tasks passkey,niah,multikey,fwe
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attnlab.frontier import report
from attnlab.frontier.run import aggregate, load_records, solvable_rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", default=None, help="comma list (default: every solved task)")
    p.add_argument("--lengths", default=None, help="comma list (default: all)")
    p.add_argument("--methods", default=None)
    a = p.parse_args()
    rows = [r for r in aggregate(load_records(a.run / "samples.jsonl")) if r["model"] == a.model]
    if a.tasks:
        rows = [r for r in rows if r["task"] in a.tasks.split(",")]
    if a.lengths:
        rows = [r for r in rows if str(r["length"]) in a.lengths.split(",")]
    rows = solvable_rows(rows)
    if a.methods:
        rows = [r for r in rows if r["method"] in a.methods.split(",") + ["dense"]]
    summary = report.summarize(rows)
    print(f"cells: {sorted({(r['task'], r['length']) for r in rows})}")
    print("| method | budget | protocol | KV held | accuracy [95% CI] | vs dense | prefill x | decode x | n |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in sorted(summary, key=lambda s: (s["method"] != "dense", s["method"], -(s["budget"] or 0), s["protocol"])):
        ci = (s.get("ci_lo"), s.get("ci_hi"))
        f = report._fmt
        print(f"| {s['method']} | {f(s['budget'])} | {s['protocol']} | {f(s.get('kv_ratio'))} | "
              f"{f(s['accuracy'], 3)} [{f(ci[0], 2)}, {f(ci[1], 2)}] | {f(s.get('delta_vs_dense'), 1)} | "
              f"{f(s.get('prefill_speedup'))} | {f(s.get('decode_speedup'))} | {s['n']} |")
    for c in report.claims(summary, rows):
        print(c["claim"], c["passed"], c["value"], "|", c["detail"])


if __name__ == "__main__":
    main()
