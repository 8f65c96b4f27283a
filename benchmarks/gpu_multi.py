"""Peak memory per GPU and tokens/s of `pi-peft train` on several GPUs, beside `pi-peft estimate`'s per-GPU peak.

    python benchmarks/gpu_multi.py                                   # the GPU bench Llama (nothing downloaded)
    python benchmarks/gpu_multi.py --model meta-llama/Meta-Llama-3-8B --load-in-4bit --context-length 65536
    python benchmarks/gpu_multi.py --configs fsdp2 ulysses_fa2 --num-gpus 4 --steps 8

Not run by this project (it had no machine with two GPUs); on a machine without >= 2 CUDA GPUs it exits with
status 2 and says so. It exercises the paths the 2-process CPU tests (tests/test_distributed*.py) cannot:

- `fsdp2`: accelerate's own FSDP2 plugin (`recipes/accelerate/fsdp2-qlora.yaml`), FULL_SHARD over all GPUs;
- `cp_ring`: torch/accelerate context parallelism (ring attention over the GPUs: FSDP2 + `parallelism_config_cp_size`
  = the GPUs; no CPU kernel has a sharding strategy for it), SDPA;
- `ulysses_fa2`: DeepSpeed Ulysses sequence parallelism + ZeRO-3 (`recipes/accelerate/ulysses-zero3.yaml`, SP size =
  the GPUs) with FlashAttention 2 as the attention it wraps (needs `flash-attn`; skipped, and said so, without it);
- `zero3`, `ddp`: the other shipped configs, for comparison.

Each config is the command a user runs: `accelerate launch --config_file <cfg> benchmarks/gpu_multi.py --worker ...`,
whose worker is `pi-peft train` (`pi_peft.training.sft.main`) on a local JSONL of random token ids packed into
windows of `--context-length`, for `--steps` optimizer steps, batch 1 per GPU, no accumulation, LoRA r=16 on all
linear layers (dropout 0, embeddings and norms frozen), non-reentrant checkpointing, the sequence-tiled MLP,
bf16. A callback records `torch.cuda.max_memory_allocated` / `max_memory_reserved` on every rank after every step
and the step times; tokens/s = tokens per optimizer step over all GPUs (T x the data-parallel ranks) / the median
time of the steps after the first. The estimate beside it is `pi_peft.training.estimate.estimate_memory` for the same
model and settings (its total includes the 1 GiB CUDA term, which `max_memory_allocated` does not; both are
written). Ring-attention CP is not in the estimator: its row carries the FSDP2 estimate at T / GPUs tokens per rank,
labelled so. Results: `benchmarks/results/gpu_multi.json` (and a markdown table on stdout).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from _common import GIB, HERE, markdown_table, write_json

REPO = os.path.dirname(HERE)
NO_MULTI_GPU_MESSAGE = (
    "gpu_multi.py needs a machine with at least 2 CUDA GPUs; torch.cuda.device_count() is {count} here (torch "
    "{torch}). Run it on a multi-GPU machine with a CUDA build of torch (and deepspeed, flash-attn for the SP "
    "configs); on CPU the 2-process tests (tests/test_distributed*.py) cover DDP, FSDP2, ZeRO-3 and Ulysses."
)
# The offline model: wide enough for 8-way sequence parallelism (16 heads, 8 kv heads), small enough to download
# nothing and fit any GPU; its window L = 4096, every benchmarked context an extension by PI.
GPU_BENCH_DIMS: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
# name -> accelerate config (recipes/accelerate/), estimator sharding, sequence/context parallel, attention
CONFIGS: dict[str, dict[str, Any]] = {
    "fsdp2": dict(accelerate="fsdp2-qlora.yaml", sharding="fsdp", split=None, attention="sdpa"),
    "cp_ring": dict(accelerate="fsdp2-qlora.yaml", sharding="fsdp", split="cp", attention="sdpa"),
    "ulysses_fa2": dict(accelerate="ulysses-zero3.yaml", sharding="zero3", split="sp", attention="flash_attention_2"),
    "zero3": dict(accelerate="zero3.yaml", sharding="zero3", split=None, attention="sdpa"),
    "ddp": dict(accelerate="ddp.yaml", sharding="none", split=None, attention="sdpa"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench", help="model id or local dir; `bench`: GPU_BENCH_DIMS, offline")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base, bf16 quant storage (FSDP/ZeRO-3)")
    p.add_argument("--context-length", type=int, default=32768, help="tokens per sequence T (default 32768)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per config (the first is warm-up)")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS), help="what to run")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per config before it is killed")
    p.add_argument("--json-out", default=os.path.join(HERE, "results", "gpu_multi.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: the result file of one launch
    return p.parse_args(argv)


# ---- the plan: one accelerate command per config ------------------------------------------------------------------
def accelerate_config(name: str, num_gpus: int, tmp: str) -> tuple[str, list[str]]:
    """The accelerate config file and the extra `accelerate launch` flags of config `name` on `num_gpus` GPUs."""
    import yaml

    spec = CONFIGS[name]
    path = os.path.join(REPO, "recipes", "accelerate", spec["accelerate"])
    flags = ["--num_processes", str(num_gpus)]
    if spec["split"] == "sp":
        flags += ["--parallelism_config_sp_size", str(num_gpus)]
    if spec["split"] == "cp":  # FSDP2 + ring attention over every GPU: a copy of the FSDP2 file with the CP keys
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        cfg["parallelism_config"] = dict(parallelism_config_dp_shard_size=1, parallelism_config_cp_size=num_gpus,
                                         parallelism_config_cp_backend="torch")  # fmt: skip
        path = os.path.join(tmp, "fsdp2-cp.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f)
    return path, flags


def train_argv(args: argparse.Namespace, name: str, model: str, data: str, out: str) -> list[str]:
    """`pi-peft train` options of config `name` (every one a documented `pi-peft train` flag)."""
    argv = ["--model_name_or_path", model, "--dataset_name", "json", "--data_files", data, "--data_mode", "pretrain",
            "--context_length", str(args.context_length), "--max_steps", str(args.steps),
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-4",
            "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.0", "--train_embeddings", "false",
            "--train_norms", "false", "--tiled_mlp", "true", "--bf16", "true", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--output_dir", out,
            "--attn_implementation", CONFIGS[name]["attention"]]  # fmt: skip
    if args.load_in_4bit:
        argv += ["--load_in_4bit", "true", "--bnb_4bit_quant_storage", "bfloat16"]
    return argv


def skip_reason(name: str, num_gpus: int, args: argparse.Namespace, heads: int) -> Optional[str]:
    """Why config `name` cannot run here (said in the results, never replaced by another config), or None."""
    spec = CONFIGS[name]
    if spec["sharding"] == "zero3" and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    if spec["attention"] == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (FlashAttention 2 under SP is what this config measures)"
    if spec["split"] and (args.context_length % num_gpus or heads % num_gpus):
        return f"{num_gpus} GPUs must divide the context length {args.context_length} and the {heads} heads"
    return None


def estimate(name: str, model_config: dict, args: argparse.Namespace, num_gpus: int) -> dict[str, Any]:
    """`estimate_memory` for config `name` with the benchmark's settings (per GPU)."""
    from pi_peft.training.estimate import estimate_memory

    spec = CONFIGS[name]
    kw = dict(quantization="nf4" if args.load_in_4bit else "none", r=16, lora_dropout=0.0, train_embeddings=False,
              train_norms=False, tiled_mlp=True, attention=spec["attention"], num_gpus=num_gpus,
              sharding=spec["sharding"])  # fmt: skip
    T, note = args.context_length, None
    if spec["split"] == "sp":
        kw["sp_size"] = num_gpus
    elif spec["split"] == "cp":
        T, note = T // num_gpus, f"ring-attention CP is not modelled: FSDP2 estimate at T/{num_gpus} tokens per rank"
    e = estimate_memory(model_config, T, **kw)
    return dict(total=e.total, without_cuda_overhead=e.total - e.overhead, breakdown=e.as_dict(), note=note)


# ---- the worker: pi-peft train with a peak-memory callback, inside `accelerate launch` ---------------------------
def worker(result_path: str, argv: list[str]) -> int:
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    from pi_peft.cli.train import parse_train_args
    from pi_peft.training.sft import main

    class PeakMemory(TrainerCallback):
        """Per step: wall time and this rank's CUDA peaks; at the end, every rank's, written by rank 0."""

        def __init__(self):
            self.steps: list[dict[str, float]] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.steps.append(dict(time=time.perf_counter() - self.start,
                                   allocated=torch.cuda.max_memory_allocated(),
                                   reserved=torch.cuda.max_memory_reserved()))  # fmt: skip

        def on_train_end(self, args, state, control, **kwargs):
            mine = dict(rank=dist.get_rank() if dist.is_initialized() else 0, device=torch.cuda.current_device(),
                        steps=self.steps)  # fmt: skip
            ranks = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
            if dist.is_initialized():
                dist.all_gather_object(ranks, mine)
            if mine["rank"] == 0:
                write_json(result_path, dict(ranks=ranks))

    torch.cuda.reset_peak_memory_stats()
    main(*parse_train_args(argv), callbacks=[PeakMemory()])
    return 0


def summarize(result: dict, tokens_per_step: int) -> dict[str, Any]:
    """Peak per GPU (max over steps) and tokens/s (median step after the first) of one config's worker result."""
    ranks = sorted(result["ranks"], key=lambda r: r["rank"])
    times = [s["time"] for s in ranks[0]["steps"]][1:] or [s["time"] for s in ranks[0]["steps"]]
    return dict(
        peak_allocated_per_gpu=[max(s["allocated"] for s in r["steps"]) for r in ranks],
        peak_reserved_per_gpu=[max(s["reserved"] for s in r["steps"]) for r in ranks],
        step_times=[s["time"] for s in ranks[0]["steps"]],
        tokens_per_step=tokens_per_step,
        tokens_per_second=tokens_per_step / statistics.median(times),
    )


def prepare_inputs(args: argparse.Namespace, tmp: str, blocks: int) -> tuple[str, dict, str]:
    """The model (the offline bench Llama saved with a tokenizer, or `--model`), its config, and a JSONL of random
    token ids with `blocks` windows of `--context-length`."""
    import random

    from pi_peft.testing import save_tiny_checkpoint, train_tokenizer
    from pi_peft.training.data import write_jsonl
    from pi_peft.training.estimate import load_model_config

    model = args.model
    if model == "bench":
        model = os.path.join(tmp, "bench-llama")
        words = "the a river stone light old house road winter letter garden morning city window".split()
        tokenizer = train_tokenizer([" ".join(words * 20)] * 10, vocab_size=256)
        save_tiny_checkpoint(model, "llama", seed=0, tokenizer=tokenizer, **GPU_BENCH_DIMS)
    config = load_model_config(model)
    vocab = config.get("text_config", config)["vocab_size"]
    rng = random.Random(0)
    docs = ({"input_ids": [rng.randrange(3, vocab) for _ in range(args.context_length)]} for _ in range(blocks + 1))
    return model, config, write_jsonl(docs, os.path.join(tmp, "tokens.jsonl"))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []  # the worker's `pi-peft train` options
    args = parse_args(argv[: len(argv) - len(rest) - (1 if "--" in argv else 0)])
    if args.worker:
        return worker(args.worker, rest)
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        print(NO_MULTI_GPU_MESSAGE.format(count=count, torch=torch.__version__), file=sys.stderr)
        return 2
    num_gpus = args.num_gpus or count
    if not 2 <= num_gpus <= count:
        print(f"gpu_multi.py: error: `--num-gpus` {num_gpus} must be between 2 and the {count} GPUs here.",
              file=sys.stderr)  # fmt: skip
        return 2
    import accelerate
    import transformers

    tmp = tempfile.mkdtemp(prefix="pi_peft_gpu_multi_", dir=os.path.expanduser("~/.cache"))
    model, config, data = prepare_inputs(args, tmp, blocks=args.steps * num_gpus + 2)
    heads = config.get("text_config", config)["num_attention_heads"]
    rows, results = [], {}
    for name in args.configs:
        spec, est = CONFIGS[name], estimate(name, config, args, num_gpus)
        entry: dict[str, Any] = dict(accelerate_config=f"recipes/accelerate/{spec['accelerate']}", estimate=est)
        reason = skip_reason(name, num_gpus, args, heads)
        if reason is None:
            cfg, flags = accelerate_config(name, num_gpus, tmp)
            out = os.path.join(tmp, f"out-{name}")
            result_path = os.path.join(tmp, f"result-{name}.json")
            cmd = ["accelerate", "launch", "--config_file", cfg, *flags, os.path.abspath(__file__), "--worker",
                   result_path, "--", *train_argv(args, name, model, data, out)]  # fmt: skip
            entry["command"] = " ".join(cmd)
            print(f"[{name}] {entry['command']}", file=sys.stderr, flush=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
                rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
            except subprocess.TimeoutExpired:
                rc, tail = None, f"killed after {args.timeout} s"
            if rc == 0 and os.path.isfile(result_path):
                with open(result_path) as f:
                    dp = 1 if spec["split"] else num_gpus  # sequences per step: SP / CP share one over all GPUs
                    entry.update(status="ran", **summarize(json.load(f), dp * args.context_length))
            else:
                entry.update(status="failed", returncode=rc, output_tail=tail)
        else:
            entry.update(status="skipped", reason=reason)
        results[name] = entry
        peaks = entry.get("peak_allocated_per_gpu")
        rows.append([name, entry["status"], f"{max(peaks) / GIB:.2f}" if peaks else "-",
                     f"{est['without_cuda_overhead'] / GIB:.2f}", f"{est['total'] / GIB:.2f}",
                     f"{entry['tokens_per_second']:,.0f}" if peaks else "-",
                     entry.get("reason") or (est["note"] or "")])  # fmt: skip
    headers = ["config", "status", "peak allocated, max over GPUs (GiB)", "estimate w/o CUDA term (GiB)",
               "estimate total (GiB)", "tokens/s", "note"]  # fmt: skip
    print(f"{count} x {torch.cuda.get_device_name(0)}; model {args.model}, 4-bit {args.load_in_4bit}, "
          f"T={args.context_length}, {num_gpus} GPUs, {args.steps} steps")  # fmt: skip
    print(markdown_table(headers, rows))
    info = dict(gpu=torch.cuda.get_device_name(0), gpus=count, used=num_gpus, torch=torch.__version__,
                transformers=transformers.__version__, accelerate=accelerate.__version__,
                deepspeed=_version("deepspeed"), flash_attn=_version("flash_attn"),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))  # fmt: skip
    write_json(args.json_out, dict(machine=info, args={k: v for k, v in vars(args).items() if k != "worker"},
                                   model_config=config, data="random token ids, seed 0", results=results))  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _version(module: str) -> Optional[str]:
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(__import__(module), "__version__", "unknown")


if __name__ == "__main__":
    sys.exit(main())
