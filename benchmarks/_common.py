"""Shared harness of the benchmarks: the benchmark model, the training-step configurations, a worker that runs one
configuration in a fresh subprocess and measures it, and small table / fit helpers.

Run one configuration by hand (prints one JSON line):

    python benchmarks/_common.py '{"config": "pi_peft", "context_length": 2048}'

Memory is measured inside the worker process:

- `idle_rss`: resident set size after the imports (torch, transformers, peft, pi_peft), before the model is built.
- `peak_rss`: the kernel's high-water mark of the resident set (`VmHWM` in `/proc/self/status`) over the process:
  model build and the first training step, or, with `steps > 0`, over the further steps only (the mark is reset
  after the first step via `/proc/self/clear_refs`). `ru_maxrss` is recorded beside it; it is not used because Linux
  carries it across `exec` from the parent.
- `step_rss = peak_rss - idle_rss`: what the model, the optimizer and the step added on top of the imports.
- `torch_peak`: the peak of live CPU tensor allocations (bytes) from model creation through the end of the first
  training step, replayed from `torch.profiler`'s memory events (`profile_memory=True`); the closest CPU analogue of
  `torch.cuda.max_memory_allocated`.
- `step_time`: the wall time of the first step (profiled; the profiler's per-op bookkeeping is small next to steps of
  seconds), or the median of the further `steps`; `cpu_time` the CPU time of the process (all threads) over the same
  step(s). On a machine shared with other jobs, `tokens_per_cpu_s` (tokens / CPU seconds) is the steadier speed:
  waiting for a core does not count in it.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any, Optional

# RSS, its high-water mark and torch's allocation peak: shared with `pi-peft estimate`'s check
# (`pi_peft.training.measure`)
from pi_peft.training.measure import current_rss, peak_rss, reset_peak_rss, run_json_subprocess, torch_alloc_peak  # noqa: F401

# the project's one Markdown-table and one atomic-write helper (`markdown_table` re-exported for the scripts)
from pi_peft.utils import atomic_write_text, markdown_table  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1024**2
GIB = 1024**3

# The benchmark model: tiny in width and depth (so that 16k tokens run on a laptop CPU) but with a real 32k
# vocabulary, so that the (tokens x vocab) logits weigh what they weigh in Llama-2.
BENCH_DIMS: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=2,  # head_dim 64, as in Llama
    num_key_value_heads=2,
    max_position_embeddings=512,  # the original window L; every benchmarked context is an extension by PI
    tie_word_embeddings=False,
)
# The tiling benchmark's model (`tiled_mlp.py`): a Llama whose MLP dominates the recomputed layer, as Llama's does
# (intermediate 4x hidden; Llama-3: 3.5x), with grouped KV heads and an 8k vocabulary so that the loss chunk
# (1024 x 8192 fp32) stays below one layer's activations from 4k tokens on.
TILED_DIMS: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=4,  # head_dim 64
    num_key_value_heads=1,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
# CI smoke size: every code path, a few seconds.
SMOKE_DIMS: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
LORA_R, LORA_ALPHA = 16, 32  # used where the recipe defaults are not the subject (pi_overhead)

# training-step configurations a worker can run
CONFIGS = ("plain", "pi_peft", "pi_peft_tiled", "trl", "lora", "pi")
CONFIG_HELP = {
    "plain": "transformers `rope_parameters` + peft `LoraConfig` with the same adapter as (b), defaults for the "
    "rest: attention as transformers picks it, `model(input_ids, labels=...).loss` (full fp32 logits), "
    "no gradient checkpointing",
    "pi_peft": "pi_peft's recipe defaults: `PIConfig` from `pi_peft.training.sft.make_pi_config` with the recipe's "
    "default arguments, `attn_implementation()`, `apply_memory_savers` (non-reentrant gradient checkpointing), "
    "`fused_causal_lm_loss` (no full logits; on CPU its `auto` backend is pi_peft's own chunked loss)",
    "pi_peft_tiled": "(b) + `apply_memory_savers(model, tiled_mlp=True)`: every MLP over sequence tiles with its "
    "own recompute (automatic tile unless `tile_tokens` is given)",
    "trl": "trl's `SFTTrainer` with its own defaults (`SFTConfig()`: activation checkpointing and trl's chunked loss "
    "on by default) on the same model, adapter (RoPE via transformers' `rope_parameters`, the same `LoraConfig` as "
    "(a)) and data; only `max_length` is set to T (trl's 1024 would train a different, truncated sequence)",
    "lora": "plain LoRA (`LoraConfig`), original RoPE, default loss",
    "pi": "PI + LoRA (`PIConfig`, same LoRA settings as `lora`), default loss",
}


def bench_dims(smoke: bool) -> dict[str, Any]:
    return dict(SMOKE_DIMS if smoke else BENCH_DIMS)


# ---- machine -----------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """Cores, RAM, load and library versions of this machine, and the date, for the results tables."""
    import peft
    import psutil
    import torch
    import transformers

    return dict(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        ram_gib=round(psutil.virtual_memory().total / GIB, 1),
        available_gib_at_start=round(psutil.virtual_memory().available / GIB, 1),
        load_average_at_start=[round(x, 2) for x in os.getloadavg()],
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        torch_threads=torch.get_num_threads(),
    )


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['date']}; {info['cores']} cores ({info['cpu']}), {info['ram_gib']} GiB RAM "
        f"({info['available_gib_at_start']} GiB available, load average {info['load_average_at_start']} at start); "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}"
    )


# ---- configurations ----------------------------------------------------------------------------------------------
def recipe_lora_kwargs() -> dict[str, Any]:
    """The LoRA settings and LongLoRA switches of pi_peft's training recipe: the defaults of `pi_peft.training.sft`'s
    `PIModelConfig` (trl's `ModelConfig` with pi_peft's QLoRA defaults) and `PIArguments`."""
    from pi_peft.training.sft import PIArguments, PIModelConfig

    model_args, pi_args = PIModelConfig(), PIArguments()
    targets = model_args.lora_target_modules
    return dict(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules="all-linear" if list(targets or []) == ["all-linear"] else targets,
        train_embeddings=pi_args.train_embeddings,
        train_norms=pi_args.train_norms,
    )


def _norm_module_names(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and "Norm" in type(m).__name__}
    return sorted(names)


def build(config: str, dims: dict[str, Any], context_length: int, seed: int = 0, loss_kwargs=None, tile_tokens=None):
    """The model (with its adapter) and the loss function `loss_fn(model, ids) -> scalar` of a configuration.

    Every configuration starts from the same randomly initialised base (same `seed`); `context_length` T sets the PI
    factor s = T / L for the configurations that extend the context (`plain`, `pi_peft`, `pi`). `loss_kwargs`
    (`backend`, `chunk_tokens`) go to `fused_causal_lm_loss` in the `pi_peft` configuration."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    import pi_peft

    if config not in CONFIGS:
        raise ValueError(f"`config` must be one of {CONFIGS}, got {config!r}.")
    L = dims["max_position_embeddings"]
    factor = max(1.0, context_length / L)
    model_config = LlamaConfig(**dims)
    torch.manual_seed(seed)
    if config in ("plain", "trl"):
        # the do-it-yourself path: RoPE scaling through transformers' own config field, then a peft LoRA
        model_config.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": 10000.0}
        model_config.max_position_embeddings = max(L, context_length)
        model = AutoModelForCausalLM.from_config(model_config)
        kwargs = recipe_lora_kwargs()
        modules_to_save = (["embed_tokens"] if kwargs.pop("train_embeddings", False) else []) + (
            _norm_module_names(model) if kwargs.pop("train_norms", False) else []
        )
        lora = LoraConfig(task_type="CAUSAL_LM", modules_to_save=modules_to_save or None, **kwargs)
        if config == "trl":
            return _trl_trainer(model, lora, dims, context_length)
        model = get_peft_model(model, lora)
        return model.train(), _default_loss
    if config in ("pi_peft", "pi_peft_tiled"):
        from pi_peft.ops.losses import fused_causal_lm_loss
        from pi_peft.training.memory import apply_memory_savers, attn_implementation

        model = AutoModelForCausalLM.from_config(model_config, attn_implementation=attn_implementation("cpu"))
        from pi_peft.training.sft import PIArguments, PIModelConfig, make_pi_config

        pi_config = make_pi_config(PIModelConfig(), PIArguments(scaling_factor=factor), model.config)
        model = get_peft_model(model, pi_config)
        tiling = dict(tiled_mlp=True, tile_tokens=tile_tokens) if config == "pi_peft_tiled" else {}
        apply_memory_savers(model, **tiling)
        loss_kwargs = dict(loss_kwargs or {})
        return model.train(), lambda m, ids: fused_causal_lm_loss(m, ids, **loss_kwargs)
    # pi_overhead: only the peft config differs
    model = AutoModelForCausalLM.from_config(model_config)
    lora = dict(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear")
    peft_config = (
        LoraConfig(task_type="CAUSAL_LM", **lora)
        if config == "lora"
        else pi_peft.PIConfig(scaling_factor=factor, **lora)
    )
    return get_peft_model(model, peft_config).train(), _default_loss


def _trl_trainer(model, lora, dims: dict[str, Any], context_length: int):
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ids = batch(dims, context_length)[0].tolist()
    data = Dataset.from_dict({"input_ids": [ids] * 64})
    out = tempfile.mkdtemp(prefix="bench-trl-")
    args = SFTConfig(output_dir=out, max_length=context_length, max_steps=1, per_device_train_batch_size=1,
                     report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
                     dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    from pi_peft.testing import train_tokenizer

    tokenizer = train_tokenizer(["the data is already token ids"], vocab_size=300)  # only for padding
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=lora, processing_class=tokenizer)
    return trainer.model, trainer  # the worker runs `trainer.train()` (its own loop, optimizer and loss)


def _default_loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def make_optimizer(model):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)


def train_step(model, loss_fn, optimizer, ids) -> float:
    """One training step: forward, backward, optimizer step. Returns the loss."""
    loss = loss_fn(model, ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed_repeats(fn, n: int) -> tuple[list, list[float], list[float]]:
    """Call ``fn()`` ``n`` times: its outputs, and the wall-clock and CPU seconds (this process) of each call."""
    outputs, times, cpu_times = [], [], []
    for _ in range(n):
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs.append(fn())
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return outputs, times, cpu_times


def batch(dims: dict[str, Any], context_length: int, batch_size: int = 1, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, dims["vocab_size"], (batch_size, context_length), generator=g)  # (B, T)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one configuration and measure its training steps (run in a fresh process, see `run_worker`)."""
    import peft  # noqa: F401  (imported before the idle baseline is taken)
    import torch
    import transformers  # noqa: F401

    import pi_peft  # noqa: F401
    import pi_peft.ops.losses
    import pi_peft.training.sft  # noqa: F401

    # imports trl's loss kernel now, so that the import is not in the step
    pi_peft.ops.losses.available_loss_backends()
    threads = int(spec.get("threads", 0)) or os.cpu_count()
    torch.set_num_threads(threads)
    dims = spec.get("dims") or bench_dims(bool(spec.get("smoke")))
    T, B, steps = int(spec["context_length"]), int(spec.get("batch_size", 1)), int(spec.get("steps", 0))
    gc.collect()
    idle = current_rss()
    ids = batch(dims, T, B)
    profile = bool(spec.get("profile", True))
    seed = int(spec.get("seed", 0))
    if spec["config"] == "trl":
        return _trl_worker(spec, dims, T, B, steps, profile, seed, idle, threads)
    # first step: model build + one training step, under the memory profiler (torch allocation peak)
    start = time.perf_counter()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, loss_fn = build(spec["config"], dims, T, seed, spec.get("loss_kwargs"), spec.get("tile_tokens"))
            optimizer = make_optimizer(model)
            step_start, cpu_start = time.perf_counter(), time.process_time()
            losses = [train_step(model, loss_fn, optimizer, ids)]
            times, cpu_times = [time.perf_counter() - step_start], [time.process_time() - cpu_start]
        alloc_peak, _ = torch_alloc_peak(prof)
        del prof
    else:
        model, loss_fn = build(spec["config"], dims, T, seed, spec.get("loss_kwargs"), spec.get("tile_tokens"))
        optimizer = make_optimizer(model)
        step_start, cpu_start = time.perf_counter(), time.process_time()
        losses = [train_step(model, loss_fn, optimizer, ids)]
        times, cpu_times = [time.perf_counter() - step_start], [time.process_time() - cpu_start]
        alloc_peak = None
    build_time = step_start - start
    reset = False
    if steps > 0:  # further steps, timed without the profiler, with the RSS high-water mark reset
        gc.collect()
        reset = reset_peak_rss()
        times, cpu_times = [], []
        for _ in range(steps):
            step_start, cpu_start = time.perf_counter(), time.process_time()
            losses.append(train_step(model, loss_fn, optimizer, ids))
            times.append(time.perf_counter() - step_start)
            cpu_times.append(time.process_time() - cpu_start)
    return _result(spec, dims, T, B, steps, idle, reset, alloc_peak, build_time, times, cpu_times, losses, model,
                   threads)  # fmt: skip


def _trl_worker(spec, dims, T, B, steps, profile, seed, idle, threads) -> dict[str, Any]:
    """(c): `SFTTrainer.train()` for 1 + `steps` steps (its own loop, optimizer, checkpointing and loss); memory over
    the whole run (model build included, as the first step of the other configurations), time per step over all."""
    start = time.perf_counter()
    ctx = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        ctx = profiler(activities=[ProfilerActivity.CPU], profile_memory=True)
        ctx.__enter__()
    model, trainer = build("trl", dims, T, seed)
    trainer.args.max_steps = 1 + steps
    step_start, cpu_start = time.perf_counter(), time.process_time()
    out = trainer.train()
    n = 1 + steps
    times, cpu_times = [(time.perf_counter() - step_start) / n], [(time.process_time() - cpu_start) / n]
    alloc_peak = None
    if ctx is not None:
        ctx.__exit__(None, None, None)
        alloc_peak, _ = torch_alloc_peak(ctx)
    result = _result(spec, dims, T, B, steps, idle, False, alloc_peak, step_start - start, times, cpu_times,
                     [float(out.training_loss)], model, threads)  # fmt: skip
    result["timed_steps"] = f"mean of {n} (trainer.train(), first included)"
    result["checkpointing"] = bool(trainer.args.activation_checkpointing)
    return result


def _result(spec, dims, T, B, steps, idle, reset, alloc_peak, build_time, times, cpu_times, losses, model, threads):
    peak = peak_rss()
    step_time = statistics.median(times)
    return dict(
        config=spec["config"],
        tile_tokens=spec.get("tile_tokens"),
        loss_kwargs=spec.get("loss_kwargs"),
        dims=dims,
        lora=recipe_lora_kwargs(),
        context_length=T,
        batch_size=B,
        idle_rss=idle,
        peak_rss=peak,
        ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        step_rss=peak - idle,
        peak_rss_reset=reset,
        torch_peak=alloc_peak,
        build_time=build_time,
        step_times=times,
        step_time=step_time,
        cpu_time=statistics.median(cpu_times),
        tokens_per_cpu_s=B * T / statistics.median(cpu_times),
        timed_steps="first (profiled)" if steps == 0 else f"{steps} after the first",
        tokens_per_s=B * T / step_time,
        losses=losses,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        attn_implementation=model.config._attn_implementation,
        threads=threads,
        pid=os.getpid(),
    )


def run_worker(spec: dict[str, Any], timeout: Optional[float] = None) -> dict[str, Any]:
    """Run [`worker`] in a fresh Python process and return its measurements; raises with the worker's stderr if it
    fails (an out-of-memory kill included). `spec["mmap_threshold"]` pins glibc's mmap threshold in the worker
    (`MALLOC_MMAP_THRESHOLD_`), so that its RSS follows the live tensors instead of glibc's retained heap."""
    env = {"MALLOC_MMAP_THRESHOLD_": str(spec["mmap_threshold"])} if spec.get("mmap_threshold") else None
    return run_json_subprocess([os.path.join(HERE, "_common.py"), json.dumps(spec)], timeout=timeout, env=env)


# ---- analysis ----------------------------------------------------------------------------------------------------
def fit_growth(contexts: list[int], values: list[float]) -> dict[str, Any]:
    """Fit `value(T) = c0 + c1 T + c2 T^2` (least squares) and say whether growth is linear or quadratic.

    `quadratic_share` is the part of the growth from the smallest to the largest T that the T^2 term explains. The
    growth is called linear when it is below 10 % in size, quadratic when above, concave when below -10 % (noise, or a
    constant-size block that is already reached at small T), flat when it does not grow. `exponent` is the log-log
    slope of `value - c0` between the two largest contexts (1 for linear, 2 for quadratic growth), `interval_slopes`
    the bytes per token between consecutive contexts (constant for linear growth, rising with T for quadratic). With
    fewer than 3 contexts only a line is fitted."""
    import numpy as np

    T = np.asarray(contexts, dtype=float)
    y = np.asarray(values, dtype=float)
    if len(T) < 2:
        return dict(bytes_per_token_linear=None, intercept_linear=None, interval_slopes=[], quadratic_share=None,
                    exponent=None, verdict="untested (1 point)")  # fmt: skip
    lin = np.polyfit(T, y, 1)  # [c1, c0]
    order = np.argsort(T)
    slopes = np.diff(y[order]) / np.diff(T[order])  # bytes per token between consecutive contexts
    out: dict[str, Any] = dict(
        bytes_per_token_linear=float(lin[0]), intercept_linear=float(lin[1]), interval_slopes=slopes.tolist()
    )
    if len(T) < 3:
        out.update(quadratic_share=None, exponent=None, verdict="untested (2 points)")
        return out
    c2, c1, c0 = np.polyfit(T, y, 2)
    lo, hi = T.min(), T.max()
    growth_quad = c2 * (hi**2 - lo**2)
    growth_total = c1 * (hi - lo) + growth_quad
    share = float(growth_quad / growth_total) if growth_total > 0 else float("nan")
    t1, t2 = T[order[-2]], T[order[-1]]
    y1, y2 = y[order[-2]] - c0, y[order[-1]] - c0
    exponent = float(np.log(y2 / y1) / np.log(t2 / t1)) if y1 > 0 and y2 > 0 else float("nan")
    out.update(
        c0=float(c0),
        c1=float(c1),
        c2=float(c2),
        quadratic_share=share,
        exponent=exponent,
        verdict="flat"
        if growth_total <= 0
        else ("linear" if abs(share) < 0.10 else ("quadratic" if share > 0 else "concave")),
    )
    return out


def mib(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x / MIB:,.0f}"


def write_json(path: Optional[str], payload: dict[str, Any]) -> None:
    """Write `payload` to `path` as JSON, complete or absent (`pi_peft.utils.atomic_write_text`)."""
    if not path:
        return
    atomic_write_text(path, json.dumps(payload, indent=2))


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
