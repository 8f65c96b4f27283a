"""Peak memory and step time of one training step with and without the sequence-tiled MLP, side by side, on CPU.

    python benchmarks/tiled_mlp.py --json-out benchmarks/results/tiled_mlp.json

The model (`_common.TILED_DIMS`) is a Llama whose MLP dominates a layer's activations, as in Llama (intermediate 4x
hidden, grouped KV heads, 8k vocabulary, 2 layers, original window L = 512). At each T (4k, 8k, 16k by default) two
configurations run, each in a fresh subprocess, interleaved per T so that load drift hits both alike:

- (b) `pi_peft`: pi_peft's recipe defaults (`PIConfig` from `make_pi_config`, LoRA on all linear layers with the
  recipe's dropout, trainable embeddings and norms, non-reentrant checkpointing, pi_peft's chunked loss);
- (t) `pi_peft_tiled`: the same + `apply_memory_savers(model, tiled_mlp=True)` (automatic tile).

Memory: the step's peak RSS above the idle process (`step_rss`; glibc's mmap threshold pinned so that RSS follows the
live tensors) and the peak of live torch allocations of the first step (`torch_peak`). Time: the median of `--steps`
further steps (wall clock and CPU time of the process), and the estimator's prediction
(`estimate_memory(..., tiled_mlp=...)`) beside each measurement. Targets: (t)/(b) peak <= 0.7 at 16k, step time
(t)/(b) <= 1.3.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import (
    CONFIG_HELP,
    MIB,
    TILED_DIMS,
    bench_dims,
    machine_info,
    machine_line,
    markdown_table,
    mib,
    run_worker,
    write_json,
)

from pi_peft.measure import MMAP_THRESHOLD

DEFAULT_CONTEXTS = [4096, 8192, 16384]
TARGET_MEMORY, TARGET_TIME, TARGET_T = 0.7, 1.3, 16384
CONFIGS = ("pi_peft", "pi_peft_tiled")
MEMORY = ("step_rss", "torch_peak")
TIMES = ("step_time", "cpu_time")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS, help="context lengths T in tokens")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the first (median)")
    p.add_argument("--tile-tokens", type=int, default=None, help="MLP tile of (t) (default: automatic)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-profile", action="store_true", help="skip the torch allocation peak (profiler)")
    p.add_argument("--smoke", action="store_true", help="tiny model (CI): checks the script, measures nothing useful")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    p.add_argument("--json-out", default=None, help="write all measurements here (JSON)")
    p.add_argument("--report-from", default=None, help="measure nothing: print the report of a saved --json-out")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    dims = bench_dims(True) if args.smoke else dict(TILED_DIMS)
    runs = []
    for T in sorted(args.contexts):
        for config in CONFIGS:
            spec = dict(config=config, dims=dims, context_length=T, steps=args.steps, threads=args.threads,
                        profile=not args.no_profile, mmap_threshold=MMAP_THRESHOLD,
                        tile_tokens=args.tile_tokens if config == "pi_peft_tiled" else None)  # fmt: skip
            run = run_worker(spec, timeout=args.timeout)
            msg = f"step RSS {mib(run['step_rss'])} MiB, torch peak {mib(run['torch_peak'])} MiB"
            print(f"  {config:>13} T={T:>6}: {msg}, step {run['step_time']:.1f} s", file=sys.stderr, flush=True)
            runs.append(run)
    return runs


def estimate_for(run: dict[str, Any]):
    """`estimate_memory` with the run's settings (CPU, fp32, chunked loss, the recipe's LoRA settings)."""
    from pi_peft.estimate import estimate_memory

    lora = run["lora"]
    tiled = run["config"] == "pi_peft_tiled"
    return estimate_memory(dict(run["dims"]), run["context_length"], quantization="none", r=lora["r"],
                           train_embeddings=lora["train_embeddings"], train_norms=lora["train_norms"], dtype_bytes=4,
                           loss="chunked", device="cpu", lora_dropout=lora["lora_dropout"], tiled_mlp=tiled,
                           tile_tokens=run.get("tile_tokens") if tiled else None)  # fmt: skip


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    table: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        table.setdefault(run["context_length"], {})[run["config"]] = run
    rows = {}
    for T, pair in sorted(table.items()):
        if set(pair) != set(CONFIGS):
            continue
        b, t = pair["pi_peft"], pair["pi_peft_tiled"]
        row = {f"ratio_{m}": t[m] / b[m] for m in (*MEMORY, *TIMES) if b.get(m) and t.get(m)}
        for name, run in (("b", b), ("t", t)):
            row[f"estimate_{name}"] = estimate_for(run).total
        rows[T] = row
    targets = {}
    if TARGET_T in rows:
        r = rows[TARGET_T]
        targets["memory"] = dict(ratio=r.get("ratio_step_rss"), torch=r.get("ratio_torch_peak"),
                                 met=all(x is not None and x <= TARGET_MEMORY
                                         for x in (r.get("ratio_step_rss"), r.get("ratio_torch_peak"))))  # fmt: skip
    times = [r["ratio_step_time"] for r in rows.values() if "ratio_step_time" in r]
    cpu = [r["ratio_cpu_time"] for r in rows.values() if "ratio_cpu_time" in r]
    if times:
        targets["time"] = dict(worst=max(times), worst_cpu=max(cpu) if cpu else None, met=max(times) <= TARGET_TIME)
    return dict(rows=rows, targets=targets)


def report(runs: list[dict[str, Any]], summary: dict[str, Any], info: dict[str, Any]) -> str:
    by = {(r["context_length"], r["config"]): r for r in runs}
    dims = runs[0]["dims"]
    lines = [f"machine: {machine_line(info)}", "",
             f"model: Llama, hidden {dims['hidden_size']}, intermediate {dims['intermediate_size']}, "
             f"{dims['num_hidden_layers']} layers, {dims['num_attention_heads']} heads / "
             f"{dims['num_key_value_heads']} KV heads, vocabulary {dims['vocab_size']}; fp32, batch 1, "
             f"LoRA {runs[0]['lora']}", "",
             f"- (b) pi_peft: {CONFIG_HELP['pi_peft']}", f"- (t) pi_peft + tiled MLP: {CONFIG_HELP['pi_peft_tiled']}",
             "", "memory (MiB; step RSS = peak RSS minus the idle RSS after imports, glibc mmap threshold pinned; "
             "torch peak = live torch allocations), and the estimator (`estimate_memory(..., tiled_mlp=...)`, CPU, "
             "fp32):",
             ""]  # fmt: skip
    headers = ["T", "(b) step RSS", "(t) step RSS", "(t)/(b)", "(b) torch peak", "(t) torch peak", "(t)/(b)",
               "(b) estimate", "(t) estimate", "est/RSS (b)", "est/RSS (t)", "MLP tile"]  # fmt: skip
    rows = []
    for T, r in summary["rows"].items():
        b, t = by[(int(T), "pi_peft")], by[(int(T), "pi_peft_tiled")]
        tile = estimate_for(t).tile_tokens
        rows.append([T, mib(b["step_rss"]), mib(t["step_rss"]), fmt(r.get("ratio_step_rss")), mib(b["torch_peak"]),
                     mib(t["torch_peak"]), fmt(r.get("ratio_torch_peak")), mib(r["estimate_b"]), mib(r["estimate_t"]),
                     fmt(r["estimate_b"] / b["step_rss"]), fmt(r["estimate_t"] / t["step_rss"]), tile])  # fmt: skip
    lines.append(markdown_table(headers, rows))
    lines += ["", f"step time (median of {runs[0]['timed_steps']} steps; s), measured side by side:", ""]
    headers = ["T", "(b) wall", "(t) wall", "(t)/(b) wall", "(b) CPU", "(t) CPU", "(t)/(b) CPU", "loss (b)",
               "loss (t)"]  # fmt: skip
    rows = []
    for T, r in summary["rows"].items():
        b, t = by[(int(T), "pi_peft")], by[(int(T), "pi_peft_tiled")]
        rows.append([T, f"{b['step_time']:.1f}", f"{t['step_time']:.1f}", fmt(r.get("ratio_step_time")),
                     f"{b['cpu_time']:.1f}", f"{t['cpu_time']:.1f}", fmt(r.get("ratio_cpu_time")),
                     f"{b['losses'][0]:.4f}", f"{t['losses'][0]:.4f}"])  # fmt: skip
    lines += [markdown_table(headers, rows), ""]
    tg = summary["targets"]
    if "memory" in tg:
        m = tg["memory"]
        lines.append(f"target (t) peak <= {TARGET_MEMORY} x (b) at {TARGET_T}: step RSS {fmt(m['ratio'])}, torch peak "
                     f"{fmt(m['torch'])} -> {'met' if m['met'] else 'MISSED'}")  # fmt: skip
    if "time" in tg:
        t = tg["time"]
        lines.append(f"target (t) step time <= {TARGET_TIME} x (b): worst wall-clock ratio {fmt(t['worst'])} (CPU "
                     f"time {fmt(t['worst_cpu'])}) -> {'met' if t['met'] else 'MISSED'}")  # fmt: skip
    return "\n".join(lines)


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_from:
        import json

        with open(args.report_from, encoding="utf-8") as f:
            saved = json.load(f)
        print(report(saved["runs"], summarize(saved["runs"]), saved["machine"]))
        return 0
    info = machine_info()
    runs = measure(args)
    summary = summarize(runs)
    print(report(runs, summary, info))
    write_json(args.json_out, dict(machine=info, args=vars(args), runs=runs, summary=summary, mib=MIB))
    return 0


if __name__ == "__main__":
    sys.exit(main())
