"""Peak memory of training steps measured on CPU, in a fresh subprocess: the check behind `pi-peft estimate`.

Shared by `recipes/check_estimate.py`, `tests/test_estimate.py` and the scripts in `benchmarks/`:

- [`peak_rss`] / [`reset_peak_rss`] / [`current_rss`]: the kernel's high-water mark of this process's resident set
  (`VmHWM`), its reset, and the current RSS;
- [`torch_alloc_peak`]: the peak of live torch CPU allocations replayed from a `torch.profiler` memory profile (the
  CPU analogue of `torch.cuda.max_memory_allocated`);
- [`run_json_subprocess`]: run a worker in a fresh Python process and read the JSON line it prints;
- [`measure_cpu_peak`]: fp32 LoRA training steps of a Llama config, the run
[`pi_peft.training.estimate.estimate_memory`] is
  checked against (`python -m pi_peft.training.measure '{"config": {...}, "context_length": 2048}'` runs one by hand).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any, Optional

# glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in its heap, so without a fixed threshold
# RSS follows the largest heap ever used rather than the live tensors; a fixed one returns them to the system.
MMAP_THRESHOLD = 65536


def peak_rss() -> int:
    """High-water mark of this process's resident set (`VmHWM`), in bytes.

    Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries that one across `exec`, so a worker would report its
    parent's RSS at spawn time whenever its own peak is lower. `VmHWM` belongs to the address space created by `exec`.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no procfs: the best available


def reset_peak_rss() -> bool:
    """Reset the high-water mark (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    """The current resident set size of this process, in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def torch_alloc_peak(prof) -> tuple[int, int]:
    """(peak, final) bytes of live CPU tensor allocations, replayed in time order from a `torch.profiler` profile
    taken with `profile_memory=True`."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # allocations positive, frees negative
        peak = max(peak, live)
    return peak, live


def run_json_subprocess(
    argv: list[str], *, timeout: Optional[float] = None, env: Optional[dict[str, str]] = None
) -> dict[str, Any]:
    """Run `python argv...` in a fresh process and return the JSON object on the last line of its stdout; raises a
    `RuntimeError` with the worker's stderr when it fails (an out-of-memory kill included)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {argv} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimator_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The run of [`measure_cpu_peak`], inside the subprocess: build, two training steps, peak RSS above the
    baseline taken after the imports."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    import pi_peft
    from pi_peft.ops.losses import fused_causal_lm_loss
    from pi_peft.training.memory import apply_memory_savers

    torch.set_num_threads(int(spec.get("threads", 1)))
    baseline = peak_rss()
    torch.manual_seed(0)
    config = LlamaConfig(**spec["config"])
    T = int(spec["context_length"])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    factor = max(1.0, T / config.max_position_embeddings)
    dropout = float(spec.get("lora_dropout", 0.0))
    pi = pi_peft.PIConfig(scaling_factor=factor, r=int(spec.get("r", 8)), target_modules="all-linear",
                          train_embeddings=True, train_norms=True, lora_dropout=dropout)  # fmt: skip
    model = get_peft_model(model, pi).train()
    apply_memory_savers(model, tiled_mlp=bool(spec.get("tiled_mlp")), tile_tokens=spec.get("tile_tokens"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (int(spec.get("batch_size", 1)), T))  # (B, T)
    chunk = int(spec.get("chunk_tokens", 1024))
    for _ in range(2):
        loss = fused_causal_lm_loss(model, ids, backend="chunked", chunk_tokens=chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"baseline": baseline, "peak": peak_rss()}


def measure_cpu_peak(
    config: dict[str, Any],
    context_length: int,
    *,
    r: int = 8,
    batch_size: int = 1,
    chunk_tokens: int = 1024,
    threads: int = 1,
    tiled_mlp: bool = False,
    tile_tokens: Optional[int] = None,
    lora_dropout: float = 0.0,
    timeout: float = 900,
) -> int:
    """Measured peak memory (bytes) of fp32 LoRA training steps of a Llama `config` on CPU: the peak RSS (`VmHWM`,
    Linux) of a fresh subprocess minus its peak after the imports.

    The run mirrors [`pi_peft.training.estimate.estimate_memory`] with `quantization="none"`, `dtype_bytes=4`,
    `device="cpu"`,
    `loss="chunked"`, `loss_chunk_tokens=chunk_tokens`: PIConfig with LoRA rank `r` (and `lora_dropout`) on all
    linear layers, trainable
    embeddings and norms, non-reentrant checkpointing, pi_peft's chunked loss, AdamW, two steps; with `tiled_mlp`, the
    MLPs run over sequence tiles (`tile_tokens`, default automatic). glibc's mmap threshold is fixed
    ([`MMAP_THRESHOLD`]) so that RSS follows the live tensors."""
    spec = dict(config=config, context_length=context_length, r=r, batch_size=batch_size, threads=threads,
                chunk_tokens=chunk_tokens, tiled_mlp=tiled_mlp, tile_tokens=tile_tokens)  # fmt: skip
    spec["lora_dropout"] = lora_dropout
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": str(threads)}
    result = run_json_subprocess(["-m", "pi_peft.training.measure", json.dumps(spec)], timeout=timeout, env=env)
    return int(result["peak"] - result["baseline"])


if __name__ == "__main__":
    print(json.dumps(estimator_worker(json.loads(sys.argv[1]))))
