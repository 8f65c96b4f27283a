"""S²-Attn vs full attention, side by side: one layer's attention and one whole training step, time and peak memory.

    python benchmarks/s2_attention.py --json-out benchmarks/results/s2_attention.json

For every context T (default 2k, 4k, 8k, 16k) and both attentions, full (`sdpa`) and S²-Attn with
`s2_group_size_ratio` 1/4 (`pi_s2_sdpa_0.25`), each measurement runs in its own fresh subprocess, full and S²
alternating in order from one T to the next:

- **attention**: the attention of one layer of the benchmark Llama (`_common.BENCH_DIMS`: 2 heads of 64, batch 1)
  called through transformers' `AttentionInterface` exactly as a model calls it (module in training mode,
  `position_ids` passed along), forward + backward, `--attn-reps` timed repetitions after one warm-up; peak of live
  torch allocations above the inputs (profiler replay) for one repetition.
- **step**: one whole training step (forward, backward, AdamW) of the benchmark Llama with pi_peft's recipe defaults
  (`_common.build("pi_peft")`: PI, LoRA + embeddings + norms, gradient checkpointing, chunked loss) with
  `s2_attn=False` or `True`: torch allocation peak over build + first step (profiled), peak RSS, and the median time of
  `--steps` further steps.

It prints both tables with S²/full ratios (time, CPU time, memory), the exact count of query-key pairs each attention
computes, and what that means for Llama-2-7B at 32k tokens (a FLOP-count estimate with
`pi_peft.training.estimate.training_flops`, not a measurement). `--report-from FILE.json` prints the tables of a saved
run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

from _common import (
    MIB,
    batch,
    bench_dims,
    current_rss,
    machine_info,
    machine_line,
    make_optimizer,
    markdown_table,
    peak_rss,
    reset_peak_rss,
    run_json_subprocess,
    timed_repeats,
    torch_alloc_peak,
    train_step,
    write_json,
)

from pi_peft.training.estimate import causal_attention_pairs, training_flops

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA2_7B = "meta-llama/Llama-2-7b-hf"
TARGET_ATTENTION_SPEEDUP = 3.0  # at the largest context


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="tokens T per row (default 2k-16k)")
    p.add_argument("--ratio", type=float, default=0.25, help="s2_group_size_ratio")
    p.add_argument("--parts", nargs="+", default=["attention", "step"], choices=["attention", "step"])
    p.add_argument("--attn-reps", type=int, default=3, help="timed forward+backward repetitions of the attention")
    p.add_argument("--steps", type=int, default=2, help="timed training steps after the first")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = all cores)")
    p.add_argument("--smoke", action="store_true", help="tiny model (CI): checks the script, measures nothing useful")
    p.add_argument("--json-out", default=None, help="write all measurements here (JSON)")
    p.add_argument("--report-from", default=None, help="print the tables of a saved --json-out file, run nothing")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    return p.parse_args(argv)


# ---- workers (each in a fresh process) ----------------------------------------------------------------------------
def _fake_attention_module(num_heads: int, num_kv_heads: int, head_dim: int):
    import torch

    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = num_heads // num_kv_heads
    module.head_dim = head_dim
    module.layer_idx = 0
    return module.train()


def attention_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pi_peft.ops import s2_attn

    torch.set_num_threads(int(spec.get("threads", 0)) or os.cpu_count())
    dims = bench_dims(bool(spec.get("smoke")))
    T, ratio = int(spec["context_length"]), float(spec["ratio"])
    heads, kv_heads = dims["num_attention_heads"], dims["num_key_value_heads"]
    head_dim = dims["hidden_size"] // heads
    name = "sdpa" if spec["mode"] == "full" else s2_attn.s2_implementation_name("sdpa", ratio)
    attention = ALL_ATTENTION_FUNCTIONS[name]
    module = _fake_attention_module(heads, kv_heads, head_dim)
    g = torch.Generator().manual_seed(0)

    def tensor(h):  # (B, h, T, D) as a model hands it over: a transposed (B, T, h, D) projection
        return torch.randn(1, T, h, head_dim, generator=g).transpose(1, 2).requires_grad_(True)

    q, k, v = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    grad_out = torch.randn(1, T, heads, head_dim, generator=g)
    position_ids = torch.arange(T)[None]

    def rep():
        out, _ = attention(module, q, k, v, None, dropout=0.0, scaling=head_dim**-0.5, position_ids=position_ids)
        out.backward(grad_out)
        for x in (q, k, v):
            x.grad = None

    rep()  # warm-up
    _, times, cpu_times = timed_repeats(rep, int(spec["reps"]))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rep()
    alloc_peak, _ = torch_alloc_peak(prof)
    return dict(
        part="attention",
        mode=spec["mode"],
        implementation=name,
        context_length=T,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        times=times,
        time=statistics.median(times),
        cpu_time=statistics.median(cpu_times),
        alloc_peak=alloc_peak,
        pairs=causal_attention_pairs(T, None if spec["mode"] == "full" else ratio),
    )


def step_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import peft  # noqa: F401  (imported before the idle baseline is taken)
    import torch
    from peft import get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, LlamaConfig

    import pi_peft.ops.losses
    from pi_peft.training.memory import apply_memory_savers, attn_implementation
    from pi_peft.training.sft import PIArguments, PIModelConfig, make_pi_config

    pi_peft.ops.losses.available_loss_backends()  # import trl's loss kernel now, not inside the step
    torch.set_num_threads(int(spec.get("threads", 0)) or os.cpu_count())
    dims = bench_dims(bool(spec.get("smoke")))
    T, s2 = int(spec["context_length"]), spec["mode"] == "s2"
    idle = current_rss()
    ids = batch(dims, T)

    def build():  # `_common.build("pi_peft")` with `s2_attn` set
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(LlamaConfig(**dims), attn_implementation=attn_implementation("cpu"))
        factor = max(1.0, T / dims["max_position_embeddings"])
        pi_args = PIArguments(scaling_factor=factor, s2_attn=s2, s2_group_size_ratio=float(spec["ratio"]))
        model = get_peft_model(base, make_pi_config(PIModelConfig(), pi_args, base.config))
        apply_memory_savers(model)
        return model.train()

    def loss_fn(model, ids):
        return pi_peft.ops.losses.fused_causal_lm_loss(model, ids)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build()
        optimizer = make_optimizer(model)
        losses = [train_step(model, loss_fn, optimizer, ids)]
    alloc_peak, _ = torch_alloc_peak(prof)
    del prof
    implementation = model.base_model.model.config._attn_implementation
    reset = reset_peak_rss()
    more, times, cpu_times = timed_repeats(lambda: train_step(model, loss_fn, optimizer, ids), int(spec["steps"]))
    losses += more
    peak = peak_rss()
    return dict(
        part="step",
        mode=spec["mode"],
        implementation=implementation,
        context_length=T,
        times=times,
        time=statistics.median(times),
        cpu_time=statistics.median(cpu_times),
        alloc_peak=alloc_peak,
        peak_rss=peak,
        step_rss=peak - idle,
        peak_rss_reset=reset,
        losses=losses,
    )


# ---- main ---------------------------------------------------------------------------------------------------------
def run(args) -> dict[str, Any]:
    contexts = args.contexts or ([256, 512] if args.smoke else [2048, 4096, 8192, 16384])
    runs = []
    for part in args.parts:
        for i, T in enumerate(contexts):
            order = ("full", "s2") if i % 2 == 0 else ("s2", "full")  # alternate, so that drift hits both alike
            for mode in order:
                spec = dict(
                    part=part,
                    mode=mode,
                    context_length=T,
                    ratio=args.ratio,
                    reps=args.attn_reps,
                    steps=args.steps,
                    threads=args.threads,
                    smoke=args.smoke,
                )
                print(f"{part} T={T} {mode} ...", file=sys.stderr, flush=True)
                runs.append(run_json_subprocess([os.path.abspath(__file__), "--worker", json.dumps(spec)]))
    return dict(runs=runs, contexts=contexts)


def summarize(result: dict[str, Any], ratio: float) -> dict[str, Any]:
    by = {(r["part"], r["mode"], r["context_length"]): r for r in result["runs"]}
    summary: dict[str, Any] = {"attention": {}, "step": {}}
    for part in ("attention", "step"):
        for T in result["contexts"]:
            full, s2 = by.get((part, "full", T)), by.get((part, "s2", T))
            if not (full and s2):
                continue
            summary[part][T] = dict(
                speedup=full["time"] / s2["time"],
                cpu_speedup=full["cpu_time"] / s2["cpu_time"],
                alloc_ratio=s2["alloc_peak"] / full["alloc_peak"],
                rss_ratio=s2["step_rss"] / full["step_rss"] if part == "step" else None,
            )
    largest = max(summary["attention"]) if summary["attention"] else None
    if largest is not None:
        speedup = summary["attention"][largest]["speedup"]
        summary["attention_target"] = dict(
            context=largest, speedup=speedup, target=TARGET_ATTENTION_SPEEDUP, met=speedup >= TARGET_ATTENTION_SPEEDUP
        )
    full7, s27 = training_flops(LLAMA2_7B, 32768), training_flops(LLAMA2_7B, 32768, s2_group_size_ratio=ratio)
    share = full7["attention"] / full7["total"]
    measured = summary["attention"][largest]["speedup"] if largest is not None else None
    summary["llama2_7b_32k"] = dict(
        full=full7,
        s2=s27,
        attention_share_full=share,
        flop_speedup=full7["total"] / s27["total"],
        pair_ratio=causal_attention_pairs(32768, ratio) / causal_attention_pairs(32768),
        measured_attention_speedup=measured,
        step_speedup_with_measured=(1 / (1 - share + share / measured)) if measured else None,
    )
    return summary


def report(result: dict[str, Any], summary: dict[str, Any], info: dict[str, Any], ratio: float) -> str:
    by = {(r["part"], r["mode"], r["context_length"]): r for r in result["runs"]}
    out = [f"Machine: {machine_line(info)}", ""]
    rows = []
    for T, s in summary["attention"].items():
        full, s2 = by[("attention", "full", T)], by[("attention", "s2", T)]
        rows.append(
            [
                T,
                f"{full['time']:.3f}",
                f"{s2['time']:.3f}",
                f"{s['speedup']:.2f}x",
                f"{s['cpu_speedup']:.2f}x",
                f"{full['alloc_peak'] / MIB:,.1f}",
                f"{s2['alloc_peak'] / MIB:,.1f}",
                f"{s['alloc_ratio']:.2f}",
                f"{s2['pairs'] / full['pairs']:.3f}",
            ]  # fmt: skip
        )
    if rows:
        out += [
            "One layer's attention, forward + backward, through the registered attention function "
            f"(2 heads x 64, batch 1; S² ratio {ratio:g}):",
            "",
            markdown_table(
                [
                    "T",
                    "full (s)",
                    "S² (s)",
                    "speedup",
                    "CPU-time speedup",
                    "full peak (MiB)",
                    "S² peak (MiB)",
                    "S²/full peak",
                    "S²/full query-key pairs",
                ],  # fmt: skip
                rows,
            ),
            "",
        ]
        t = summary["attention_target"]
        out.append(
            f"Target: attention >= {t['target']:g}x faster at {t['context']} tokens: {t['speedup']:.2f}x, "
            f"{'met' if t['met'] else 'MISSED'}."
        )
        out.append("")
    rows = []
    for T, s in summary["step"].items():
        full, s2 = by[("step", "full", T)], by[("step", "s2", T)]
        rows.append(
            [
                T,
                f"{full['time']:.2f}",
                f"{s2['time']:.2f}",
                f"{s['speedup']:.2f}x",
                f"{s['cpu_speedup']:.2f}x",
                f"{full['alloc_peak'] / MIB:,.0f}",
                f"{s2['alloc_peak'] / MIB:,.0f}",
                f"{s['alloc_ratio']:.2f}",
                f"{full['step_rss'] / MIB:,.0f}",
                f"{s2['step_rss'] / MIB:,.0f}",
                f"{s['rss_ratio']:.2f}",
            ]  # fmt: skip
        )
    if rows:
        impl = sorted({r["implementation"] for r in result["runs"] if r["part"] == "step"})
        out += [
            "One training step of the benchmark Llama, pi_peft's recipe defaults (attention implementations in "
            f"training: {impl}):",
            "",
            markdown_table(
                [
                    "T",
                    "full (s)",
                    "S² (s)",
                    "speedup",
                    "CPU-time speedup",
                    "full torch peak (MiB)",
                    "S² torch peak (MiB)",
                    "S²/full",
                    "full step RSS (MiB)",
                    "S² step RSS (MiB)",
                    "S²/full RSS",
                ],
                rows,
            ),  # fmt: skip
            "",
        ]
    e = summary["llama2_7b_32k"]
    out.append(
        "Llama-2-7B at 32k tokens (estimate from FLOP counts, not measured): attention is "
        f"{100 * e['attention_share_full']:.0f} % of a LoRA training step's FLOPs with full attention "
        f"({e['full']['total'] / 1e15:.2f} PFLOP per 32k-token row); S² with ratio {ratio:g} computes "
        f"{e['pair_ratio']:.3f} of the query-key pairs, so the step needs {e['s2']['total'] / 1e15:.2f} PFLOP "
        f"({e['flop_speedup']:.2f}x fewer)."
        + (
            f" At the attention speedup measured here at {summary['attention_target']['context']} tokens "
            f"({e['measured_attention_speedup']:.2f}x), Amdahl's law gives a step "
            f"{e['step_speedup_with_measured']:.2f}x faster."
            if e["measured_attention_speedup"]
            else ""
        )
    )
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        worker = attention_worker if spec["part"] == "attention" else step_worker
        print(json.dumps(worker(spec)))
        return 0
    if args.report_from:
        with open(args.report_from) as f:
            saved = json.load(f)
        result = dict(runs=saved["runs"], contexts=saved["contexts"])
        print(report(result, summarize(result, saved["args"]["ratio"]), saved["machine"], saved["args"]["ratio"]))
        return 0
    info = machine_info()
    result = run(args)
    summary = summarize(result, args.ratio)
    text = report(result, summary, info, args.ratio)
    print(text)
    write_json(args.json_out, dict(machine=info, args=vars(args), **result, summary=summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
