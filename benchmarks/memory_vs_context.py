"""Peak memory and speed of one training step vs context length, plain transformers + peft vs pi_peft, on CPU.

    python benchmarks/memory_vs_context.py --json-out benchmarks/results/memory_vs_context.json

The same Llama (`_common.BENCH_DIMS`: 32k vocabulary, 4 layers, hidden 128, original window L = 512) takes one
training step (forward, backward, AdamW) on one sequence of T tokens, T = 1k ... 16k, in two configurations:

- (a) `plain`: RoPE scaled through transformers' `rope_parameters` ({"rope_type": "linear", "factor": T / L}) and a
  peft `LoraConfig` with the same adapter as (b) (same rank, target modules, trainable embeddings and norms), all
  other settings at their defaults: the attention transformers picks, `model(input_ids, labels=ids).loss` (full fp32
  logits), no gradient checkpointing.
- (b) `pi_peft`: pi_peft's recipe defaults: `PIConfig`, `attn_implementation()`, `apply_memory_savers` (non-reentrant
  gradient checkpointing) and `fused_causal_lm_loss` (no full logits).

Each (configuration, T) runs in a fresh subprocess (`_common.worker`): peak RSS, RSS above the idle process, the torch
allocation peak and tokens/s. The script prints the tables, the b/a ratios, a linear-vs-quadratic fit of memory vs T
per configuration and the targets, and writes everything as JSON with `--json-out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from _common import (
    CONFIG_HELP,
    MIB,
    fit_growth,
    machine_info,
    machine_line,
    markdown_table,
    mib,
    run_worker,
    write_json,
)

DEFAULT_CONTEXTS = [1024, 2048, 4096, 8192, 16384]
TARGET_RATIO, TARGET_RANGE = 0.35, (8192, 16384)
METRICS = ("peak_rss", "step_rss", "torch_peak")
SPEEDS = ("tokens_per_s", "tokens_per_cpu_s")
METRIC_HELP = {
    "peak_rss": "peak RSS of the process",
    "step_rss": "peak RSS minus the idle RSS after imports",
    "torch_peak": "peak of live torch CPU allocations",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS, help="context lengths T in tokens")
    p.add_argument("--configs", nargs="+", default=["plain", "pi_peft", "trl"], choices=["plain", "pi_peft", "trl"])
    p.add_argument("--extra-loss-backend", default=None,
                   help="also run (b') = (b) with this `fused_causal_lm_loss` backend, e.g. `chunked`")  # fmt: skip
    p.add_argument("--extra-chunk-tokens", type=int, default=None, help="`chunk_tokens` of (b')")
    p.add_argument("--steps", type=int, default=0,
                   help="extra timed steps after the first (0: time and RSS of the first, profiled step)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--loss-backend", default=None, help="override `fused_causal_lm_loss(backend=...)` for (b)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="`chunk_tokens` for the `chunked` loss backend")
    p.add_argument("--no-profile", action="store_true", help="skip the torch allocation peak (profiler)")
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="pin glibc's mmap threshold in the workers (bytes; e.g. 65536) so that RSS follows the live "
                   "tensors; 0 = glibc's default")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny model (CI): checks the script, measures nothing useful")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument("--json-out", default=None, help="write all measurements here (JSON)")
    p.add_argument("--report-from", default=None, help="measure nothing: print the report of a saved --json-out")
    return p.parse_args(argv)


def variants(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(label, worker configuration, loss kwargs) of every configuration to run."""
    out: list[tuple[str, str, dict[str, Any] | None]] = []
    if "plain" in args.configs:
        out.append(("plain", "plain", None))
    if "pi_peft" in args.configs:
        kwargs = {k: v for k, v in (("backend", args.loss_backend), ("chunk_tokens", args.chunk_tokens)) if v}
        out.append(("pi_peft", "pi_peft", kwargs))
    if args.extra_loss_backend:
        kwargs = {"backend": args.extra_loss_backend}
        if args.extra_chunk_tokens:
            kwargs["chunk_tokens"] = args.extra_chunk_tokens
        out.append(("pi_peft_extra", "pi_peft", kwargs))
    if "trl" in args.configs:
        out.append(("trl", "trl", None))
    return out


def label_of(name: str, runs: list[dict[str, Any]]) -> str:
    if name == "plain":
        return "(a) plain"
    if name == "trl":
        return "(c) trl SFTTrainer"
    kwargs = next(r["loss_kwargs"] for r in runs if r["label"] == name)
    loss = ", loss " + ", ".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else ""
    return ("(b) pi_peft" if name == "pi_peft" else "(b') pi_peft") + loss


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for T in sorted(args.contexts):  # configurations interleaved per context, so load drift hits all alike
        for label, config, loss_kwargs in variants(args):
            spec = dict(config=config, context_length=T, steps=args.steps, threads=args.threads, smoke=args.smoke,
                        profile=not args.no_profile, loss_kwargs=loss_kwargs,
                        mmap_threshold=args.mmap_threshold)  # fmt: skip
            run = {"label": label, **run_worker(spec, timeout=args.timeout)}
            msg = f"peak RSS {mib(run['peak_rss'])} MiB, torch peak {mib(run['torch_peak'])} MiB"
            print(f"  {label:>13} T={T:>6}: {msg}, {run['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
            runs.append(run)
    return runs


def by_config(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(run["label"], {})[run["context_length"]] = run
    return out


def ratio(b, a) -> float | None:
    return None if a is None or b is None or a == 0 else b / a


def fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios x/a per context for every configuration x besides (a), growth fits per configuration and metric, and
    the target checks."""
    table = by_config(runs)
    contexts = sorted({r["context_length"] for r in runs})
    others = [name for name in table if name != "plain"]
    ratios: dict[str, dict[int, dict[str, Any]]] = {}
    if "plain" in table:
        for name in others:
            ratios[name] = {
                T: {m: ratio(table[name][T].get(m), table["plain"][T].get(m)) for m in (*METRICS, *SPEEDS)}
                for T in contexts
                if T in table[name] and T in table["plain"]
            }
    if "trl" in table and "pi_peft" in table:  # (b) / (c): pi_peft against the peer a user would pick instead
        ratios["pi_peft_vs_trl"] = {
            T: {m: ratio(table["pi_peft"][T].get(m), table["trl"][T].get(m)) for m in (*METRICS, *SPEEDS)}
            for T in contexts
            if T in table["pi_peft"] and T in table["trl"]
        }
    fits = {}
    for name, rows in table.items():
        Ts = sorted(rows)
        fits[name] = {m: fit_growth(Ts, [rows[T][m] for T in Ts]) for m in METRICS if rows[Ts[0]][m] is not None}
    lo, hi = TARGET_RANGE
    targets: dict[str, dict[str, Any]] = {}
    for name, per_T in ratios.items():
        if name == "pi_peft_vs_trl":
            continue
        in_range = [T for T in per_T if lo <= T <= hi]
        targets[name] = {
            m: dict(
                worst_ratio=max(per_T[T][m] for T in in_range), met=all(per_T[T][m] <= TARGET_RATIO for T in in_range)
            )  # fmt: skip
            for m in METRICS
            if in_range and all(per_T[T][m] is not None for T in in_range)
        }
        targets[name]["growth"] = fits[name]["step_rss"]["verdict"]
    return dict(contexts=contexts, ratios=ratios, fits=fits, targets=targets)


def report(runs: list[dict[str, Any]], summary: dict[str, Any], info: dict[str, Any]) -> str:
    table = by_config(runs)
    names = list(table)
    others = [n for n in names if n != "plain"]
    label = {name: label_of(name, runs) for name in names}
    short = {name: label[name].split(" ")[0] for name in names}  # (a), (b), (b')
    lines = [f"machine: {machine_line(info)}", ""]
    for n in names:
        kwargs = next(r["loss_kwargs"] for r in runs if r["label"] == n)
        text = f"as (b), with `fused_causal_lm_loss(**{kwargs})`: a variant, not the defaults"
        text = CONFIG_HELP[n] if n in ("plain", "trl") or (n == "pi_peft" and not kwargs) else text
        lines.append(f"- {label[n]}: {text}")
    for metric in METRICS:
        lines += ["", f"{METRIC_HELP[metric]} (MiB):", ""]
        headers = ["T"] + [label[n] for n in names] + [f"{short[n]} / (a)" for n in others if n in summary["ratios"]]
        vs_trl = summary["ratios"].get("pi_peft_vs_trl")
        headers += ["(b) / (c)"] if vs_trl else []
        rows = []
        for T in summary["contexts"]:
            row = [T] + [mib(table[n].get(T, {}).get(metric)) for n in names]
            row += [fmt_ratio(summary["ratios"][n].get(T, {}).get(metric)) for n in others if n in summary["ratios"]]
            row += [fmt_ratio(vs_trl.get(T, {}).get(metric))] if vs_trl else []
            rows.append(row)
        lines.append(markdown_table(headers, rows))
    for key, title in (("tokens_per_s", "tokens / wall-clock second"), ("tokens_per_cpu_s", "tokens / CPU second")):
        lines += ["", f"Speed, {title} (timed: {runs[0]['timed_steps']} step):", ""]
        headers = ["T"] + [label[n] for n in names] + [f"{short[n]} / (a)" for n in others if n in summary["ratios"]]
        rows = []
        for T in summary["contexts"]:
            row = [T] + [f"{table[n][T][key]:.0f}" if table[n].get(T, {}).get(key) else "n/a" for n in names]
            row += [fmt_ratio(summary["ratios"][n].get(T, {}).get(key)) for n in others if n in summary["ratios"]]
            rows.append(row)
        lines.append(markdown_table(headers, rows))
    lines.append("")
    lines += ["Growth of memory with T (least-squares c0 + c1 T + c2 T^2):", ""]
    headers = [
        "config",
        "metric",
        "MiB per 1k tokens (linear fit)",
        "MiB per 1k tokens between contexts",
        "T^2 share of growth",
        "log-log exponent",
        "growth",
    ]
    rows = []
    for n in names:
        for m, fit in summary["fits"][n].items():
            share = "n/a" if fit["quadratic_share"] is None else f"{fit['quadratic_share']:.0%}"
            exponent = "n/a" if fit["exponent"] is None else f"{fit['exponent']:.2f}"
            slope = (
                "n/a" if fit["bytes_per_token_linear"] is None else f"{fit['bytes_per_token_linear'] * 1000 / MIB:.1f}"
            )
            steps = ", ".join(f"{x * 1000 / MIB:.0f}" for x in fit["interval_slopes"]) or "n/a"
            rows.append([label[n], m, slope, steps, share, exponent,
                         fit["verdict"]])  # fmt: skip
    lines += [markdown_table(headers, rows), ""]
    lo, hi = TARGET_RANGE
    for n, checks in summary["targets"].items():
        for m, t in checks.items():
            if m == "growth":
                continue
            verdict = "met" if t["met"] else "MISSED"
            lines.append(f"target {short[n]} <= {TARGET_RATIO} x (a) at {lo}-{hi} tokens, {METRIC_HELP[m]}: worst "
                         f"{short[n]}/(a) {t['worst_ratio']:.2f} -> {verdict}")  # fmt: skip
        if not checks["growth"].startswith("untested"):
            verdict = "MISSED" if checks["growth"] == "quadratic" else "met"
            lines.append(
                f"target linear growth, no T^2 term, of {short[n]} (step RSS): {checks['growth']} -> {verdict}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_from:
        with open(args.report_from, encoding="utf-8") as f:
            saved = json.load(f)
        print(report(saved["runs"], summarize(saved["runs"]), saved["machine"]))
        return 0
    info = machine_info()
    runs = measure(args)
    summary = summarize(runs)
    print(report(runs, summary, info))
    write_json(args.json_out, dict(machine=info, args=vars(args), runs=runs, summary=summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
