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

Step times of separate subprocesses differ with the machine's load at the time each one ran. For the time target use
the interleaved mode, which measures nothing else:

    python benchmarks/tiled_mlp.py --interleaved --json-out benchmarks/results/tiled_mlp_interleaved.json

Both configurations live in one process at one T (`--time-context`, 16k by default) on the same batch; after one
untimed warm-up step each they take steps in rounds B T T B (as `pi_overhead.py` does), so that drift in load hits
both alike. Reported: the ratio of the median step times (t)/(b), the median of the per-round ratios (each round: the
two (t) steps over the two (b) steps) with its bootstrap 95 % interval, wall clock and CPU time of the process.
"""

from __future__ import annotations

import argparse
import statistics
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

from pi_peft.training.measure import MMAP_THRESHOLD

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
    p.add_argument(
        "--interleaved",
        action="store_true",
        help="measure step time only: both configurations in one process, steps interleaved B T T B",
    )
    p.add_argument("--time-context", type=int, default=TARGET_T, help="T of the --interleaved mode")
    p.add_argument("--rounds", type=int, default=4, help="B T T B rounds of the --interleaved mode")
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
    from pi_peft.training.estimate import estimate_memory

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


# ---- interleaved step time ---------------------------------------------------------------------------------------
def measure_interleaved(args: argparse.Namespace) -> dict[str, Any]:
    """Step times of (b) and (t) in this process at `args.time_context` tokens, in `args.rounds` B T T B rounds."""
    import torch
    from _common import batch, build, make_optimizer
    from pi_overhead import timed_step

    from pi_peft.ops.tiled_mlp import TILED_ATTR

    torch.set_num_threads(args.threads)
    dims = bench_dims(True) if args.smoke else dict(TILED_DIMS)
    T = args.time_context
    runs = {}
    for config in CONFIGS:
        tile = args.tile_tokens if config == "pi_peft_tiled" else None
        model, loss_fn = build(config, dims, T, seed=0, tile_tokens=tile)
        runs[config] = dict(model=model, loss_fn=loss_fn, optimizer=make_optimizer(model), times=[], cpu_times=[])
    ids = batch(dims, T)  # (1, T)
    tiled = {c: sum(hasattr(m, TILED_ATTR) for m in r["model"].modules()) for c, r in runs.items()}
    first_loss = {c: float(r["loss_fn"](r["model"], ids).detach()) for c, r in runs.items()}  # same model, same loss
    for config, run in runs.items():  # warm-up, not timed
        wall, cpu = timed_step(run["model"], run["loss_fn"], run["optimizer"], ids)
        print(f"  warm-up {config:>13} T={T}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr, flush=True)
    ratios, cpu_ratios = [], []
    for i in range(args.rounds):
        wall, cpu = dict.fromkeys(CONFIGS, 0.0), dict.fromkeys(CONFIGS, 0.0)
        for config in ("pi_peft", "pi_peft_tiled", "pi_peft_tiled", "pi_peft"):
            run = runs[config]
            t, c = timed_step(run["model"], run["loss_fn"], run["optimizer"], ids)
            run["times"].append(t)
            run["cpu_times"].append(c)
            wall[config] += t
            cpu[config] += c
        ratios.append(wall["pi_peft_tiled"] / wall["pi_peft"])
        cpu_ratios.append(cpu["pi_peft_tiled"] / cpu["pi_peft"])
        print(f"  round {i + 1}/{args.rounds}: (t)/(b) wall {ratios[-1]:.3f}, CPU {cpu_ratios[-1]:.3f}",
              file=sys.stderr, flush=True)  # fmt: skip
    return dict(
        context_length=T,
        dims=dims,
        tile_tokens=args.tile_tokens,
        tiled_mlps=tiled,
        first_loss=first_loss,
        threads=torch.get_num_threads(),
        step_times={c: r["times"] for c, r in runs.items()},
        cpu_times={c: r["cpu_times"] for c, r in runs.items()},
        ratios=ratios,
        cpu_ratios=cpu_ratios,
    )


def summarize_interleaved(result: dict[str, Any]) -> dict[str, Any]:
    from pi_overhead import bootstrap_median_ci

    out: dict[str, Any] = dict(rounds=len(result["ratios"]))
    for kind, times, ratios in (("wall", "step_times", "ratios"), ("cpu", "cpu_times", "cpu_ratios")):
        med = {c: statistics.median(result[times][c]) for c in CONFIGS}
        out[kind] = dict(median_step_s=med, ratio_of_medians=med["pi_peft_tiled"] / med["pi_peft"],
                         median_round_ratio=statistics.median(result[ratios]),
                         median_round_ratio_ci95=bootstrap_median_ci(result[ratios]),
                         min_round_ratio=min(result[ratios]), max_round_ratio=max(result[ratios]))  # fmt: skip
    out["met"] = out["wall"]["ratio_of_medians"] <= TARGET_TIME
    return out


def report_interleaved(result: dict[str, Any], summary: dict[str, Any], info: dict[str, Any]) -> str:
    dims, T = result["dims"], result["context_length"]
    lines = [f"machine: {machine_line(info)}", "",
             f"model: Llama, hidden {dims['hidden_size']}, intermediate {dims['intermediate_size']}, "
             f"{dims['num_hidden_layers']} layers; T = {T} tokens, batch 1, fp32, {result['threads']} thread(s); "
             f"{summary['rounds']} rounds (b) (t) (t) (b) in one process after one warm-up step each", "",
             f"- (b) pi_peft: {CONFIG_HELP['pi_peft']}", f"- (t) pi_peft + tiled MLP: {CONFIG_HELP['pi_peft_tiled']}",
             ""]  # fmt: skip
    headers = ["clock", "(b) median step (s)", "(t) median step (s)", "(t)/(b): ratio of medians",
               "per-round ratio: median [95% CI]", "min - max"]  # fmt: skip
    rows = []
    for kind, name in (("wall", "wall"), ("cpu", "CPU of the process")):
        k = summary[kind]
        lo, hi = k["median_round_ratio_ci95"]
        rows.append([name, f"{k['median_step_s']['pi_peft']:.2f}", f"{k['median_step_s']['pi_peft_tiled']:.2f}",
                     f"{k['ratio_of_medians']:.3f}", f"{k['median_round_ratio']:.3f} [{lo:.3f}, {hi:.3f}]",
                     f"{k['min_round_ratio']:.3f} - {k['max_round_ratio']:.3f}"])  # fmt: skip
    lines += [markdown_table(headers, rows), ""]
    lines.append(f"target (t) step time <= {TARGET_TIME} x (b) at {T} (interleaved, ratio of wall-clock medians): "
                 f"{summary['wall']['ratio_of_medians']:.3f} -> {'met' if summary['met'] else 'MISSED'}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_from:
        import json

        with open(args.report_from, encoding="utf-8") as f:
            saved = json.load(f)
        if "result" in saved:  # an --interleaved run
            print(report_interleaved(saved["result"], summarize_interleaved(saved["result"]), saved["machine"]))
            return 0
        print(report(saved["runs"], summarize(saved["runs"]), saved["machine"]))
        return 0
    info = machine_info()
    if args.interleaved:
        result = measure_interleaved(args)
        summary = summarize_interleaved(result)
        print(report_interleaved(result, summary, info))
        write_json(args.json_out, dict(machine=info, args=vars(args), result=result, summary=summary))
        return 0
    runs = measure(args)
    summary = summarize(runs)
    print(report(runs, summary, info))
    write_json(args.json_out, dict(machine=info, args=vars(args), runs=runs, summary=summary, mib=MIB))
    return 0


if __name__ == "__main__":
    sys.exit(main())
