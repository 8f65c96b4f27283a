"""Does a `pi-peft demo` run reproduce another? Every perplexity within a tolerance, every passkey `k_max` and every
claim equal, the corpus the same (issue 23's acceptance).

    python experiments/demo/compare_runs.py experiments/demo/run/demo.json outputs/demo/demo.json

Prints one row per figure and exits 1 if any differs by more than `--tolerance` (relative, default 3%).
"""

from __future__ import annotations

import argparse
import json
import sys


def figures(run: dict) -> dict[str, float]:
    """`arm ppl@L` and `arm k_max` of every evaluated arm."""
    out = {}
    for arm, r in run["results"].items():
        for cell in r["ppl"]:
            out[f"{arm} ppl@{cell['context_length']}"] = cell["ppl"]
        out[f"{arm} k_max"] = r["passkey"]["k_max"]
    return out


def compare(a: dict, b: dict, tolerance: float) -> tuple[list[str], bool]:
    fa, fb = figures(a), figures(b)
    if fa.keys() != fb.keys():
        return [
            f"different figures: only in the first {sorted(fa.keys() - fb.keys())}, only in the second "
            f"{sorted(fb.keys() - fa.keys())}"
        ], False
    rows = ["| figure | first | second | rel. diff | holds |", "|---|---|---|---|---|"]
    ok = True
    for key in fa:
        x, y = fa[key], fb[key]
        if key.endswith("k_max"):
            holds, diff = x == y, "-"
        else:
            rel = abs(y - x) / abs(x)
            holds, diff = rel <= tolerance, f"{rel:.2%}"
        ok &= holds
        rows.append(f"| {key} | {x:.4g} | {y:.4g} | {diff} | {holds} |")
    same_claims = a["claims"] == b["claims"]
    same_corpus = a["corpus"]["sha256"] == b["corpus"]["sha256"]
    rows += ["", f"claims equal: {same_claims}; corpus sha256 equal: {same_corpus} ({b['corpus']['sha256'][:16]})"]
    return rows, ok and same_claims and same_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", help="demo.json of one run (e.g. the committed one)")
    p.add_argument("second", help="demo.json of the other run")
    p.add_argument("--tolerance", type=float, default=0.03, help="largest relative perplexity difference")
    args = p.parse_args(argv)
    runs = [json.load(open(path, encoding="utf-8")) for path in (args.first, args.second)]
    rows, ok = compare(*runs, args.tolerance)
    print("\n".join(rows))
    print(f"reproduced: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
