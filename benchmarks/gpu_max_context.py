"""Largest trainable context on this CUDA GPU for a model and pi_peft's recipe, found by search, beside the estimate.

    python benchmarks/gpu_max_context.py --model meta-llama/Llama-2-7b-hf --load-in-4bit --gpu-gb 24
    python benchmarks/gpu_max_context.py --model bench --gpu-gb 8     # the CPU benchmarks' Llama, nothing downloaded

The base is loaded as the recipe loads it (`pi_peft.training.sft.quantization_config`: NF4 with double quantisation
and bf16
compute with `--load-in-4bit`, else bf16), with `attn_implementation()`. The adapter is the recipe's default
`PIConfig` (`pi_peft.training.sft.make_pi_config`), the memory savers are `apply_memory_savers`, the loss is
`fused_causal_lm_loss` and the optimizer AdamW: the same training step as configuration (b) of
`memory_vs_context.py`. For each candidate context T one step runs on one sequence of T random tokens, and T fits when
the step finishes within the budget: the allocator is capped at `--gpu-gb` GiB
(`torch.cuda.set_per_process_memory_fraction`), so a step that would need more fails with an out-of-memory error.
The search doubles T from `--start` until a step fails, then bisects down to `--multiple-of` tokens. It prints every
step's `torch.cuda.max_memory_allocated`, the largest trainable context, and `pi_peft.training.estimate`'s prediction
for the
same settings beside it.

On a machine without CUDA it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from typing import Any

from _common import BENCH_DIMS, GIB, markdown_table, write_json

NO_CUDA_MESSAGE = (
    "gpu_max_context.py needs a CUDA GPU, and torch.cuda.is_available() is False here (torch {torch}). Run it on a "
    "machine with an NVIDIA GPU and a CUDA build of torch; on CPU use memory_vs_context.py and estimator_accuracy.py."
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench", help="model id or local dir; `bench`: the CPU benchmarks' Llama")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base as in the shipped recipes")
    p.add_argument("--gpu-gb", type=float, default=None, help="memory budget in GiB (default: the whole GPU)")
    p.add_argument("--start", type=int, default=4096, help="first context tried")
    p.add_argument("--multiple-of", type=int, default=1024, help="resolution of the search in tokens")
    p.add_argument("--limit", type=int, default=262144, help="largest context tried")
    p.add_argument("--json-out", default=None, help="write the trials and the result here (JSON)")
    return p.parse_args(argv)


def search_max_context(
    fits: Callable[[int], bool], start: int, multiple_of: int, limit: int
) -> tuple[int, list[tuple[int, bool]]]:
    """The largest multiple of `multiple_of` in [`multiple_of`, `limit`] for which `fits` holds, assuming that it
    holds below some threshold and fails above it: double from `start` until it fails, then bisect. Returns the
    context (0 when not even `multiple_of` fits) and the trials `(T, fits)` in order."""
    for name, value in (("start", start), ("multiple_of", multiple_of), ("limit", limit)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if start % multiple_of or limit < start:
        raise ValueError(
            f"`start`={start} must be a multiple of `multiple_of`={multiple_of} and at most `limit`={limit}."
        )
    trials: list[tuple[int, bool]] = []

    def check(T: int) -> bool:
        ok = fits(T)
        trials.append((T, ok))
        return ok

    cap = limit // multiple_of * multiple_of
    lo, hi = 0, start  # lo fits (0: nothing known to fit), hi fails
    T = start
    while True:
        if not check(T):
            hi = T
            break
        lo = T
        if T >= cap:
            return lo, trials
        T = min(2 * T, cap)
    if lo == 0:  # even `start` failed: bisect below it
        lo_k, hi_k = 0, hi // multiple_of
    else:
        lo_k, hi_k = lo // multiple_of, hi // multiple_of
    while hi_k - lo_k > 1:
        mid = (lo_k + hi_k) // 2
        if check(mid * multiple_of):
            lo_k = mid
        else:
            hi_k = mid
    return lo_k * multiple_of, trials


def load_model(args: argparse.Namespace):
    """The base (recipe loading) with the recipe's PIConfig and memory savers applied, on the GPU."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pi_peft.training.memory import apply_memory_savers, attn_implementation
    from pi_peft.training.sft import PIArguments, PIModelConfig, make_pi_config, quantization_config

    model_args = PIModelConfig(model_name_or_path=args.model, load_in_4bit=args.load_in_4bit)
    attn = attn_implementation("cuda")
    if args.model == "bench":
        if args.load_in_4bit:
            raise ValueError("`--load-in-4bit` needs real weights: pass `--model` a model id or directory.")
        base = AutoModelForCausalLM.from_config(LlamaConfig(**BENCH_DIMS), attn_implementation=attn)
        base = base.to(device="cuda", dtype=torch.bfloat16)
    else:
        quant = quantization_config(model_args)
        kwargs: dict[str, Any] = dict(attn_implementation=attn, dtype=torch.bfloat16)
        if quant is not None:
            kwargs.update(quantization_config=quant, device_map={"": torch.cuda.current_device()})
        base = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
        if quant is None:
            base = base.to("cuda")
    L = base.config.max_position_embeddings
    pi_args = PIArguments(scaling_factor=max(1.0, args.limit / L))  # the factor does not change memory
    model = get_peft_model(base, make_pi_config(model_args, pi_args, base.config))
    apply_memory_savers(model)
    return model.train(), model_args


def make_fits(model) -> tuple[Callable[[int], bool], dict[int, int]]:
    """`fits(T)`: one training step at T tokens completes; its `max_memory_allocated` goes into the dict."""
    import torch

    from pi_peft.ops.losses import fused_causal_lm_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    vocab = model.get_base_model().config.vocab_size
    peaks: dict[int, int] = {}

    def fits(T: int) -> bool:
        ids = torch.randint(0, vocab, (1, T), device="cuda")  # (1, T)
        torch.cuda.reset_peak_memory_stats()
        try:
            loss = fused_causal_lm_loss(model, ids)
            loss.backward()
            optimizer.step()
            torch.cuda.synchronize()
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        finally:
            optimizer.zero_grad(set_to_none=True)
            loss = None
            gc.collect()
            torch.cuda.empty_cache()
        peaks[T] = torch.cuda.max_memory_allocated()
        status = "fits" if ok else "out of memory"
        print(f"  T={T:>7}: {status}, max_memory_allocated {peaks[T] / GIB:.2f} GiB", file=sys.stderr, flush=True)
        return ok

    return fits, peaks


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE.format(torch=torch.__version__), file=sys.stderr)
        return 2
    from pi_peft.training.estimate import estimate_memory, load_model_config, max_context

    total = torch.cuda.get_device_properties(0).total_memory
    gpu_gb = args.gpu_gb or total / GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_gb * GIB / total))
    model, model_args = load_model(args)
    fits, peaks = make_fits(model)
    largest, trials = search_max_context(fits, args.start, args.multiple_of, args.limit)

    config = dict(BENCH_DIMS) if args.model == "bench" else load_model_config(args.model)
    est_kwargs = dict(quantization="nf4" if args.load_in_4bit else "none", r=model_args.lora_r, dtype_bytes=2)
    predicted = max_context(config, gpu_gb, multiple_of=args.multiple_of, **est_kwargs)
    rows = []
    for T, ok in trials:
        est = estimate_memory(config, T, **est_kwargs)
        rows.append([T, "yes" if ok else "no", f"{peaks[T] / GIB:.2f}", f"{est.total / GIB:.2f}",
                     f"{(est.total - est.overhead) / GIB:.2f}",
                     f"{(est.total - est.overhead) / peaks[T]:.2f}" if ok else "n/a"])  # fmt: skip
    name = torch.cuda.get_device_name(0)
    print(
        f"GPU: {name}, {total / GIB:.1f} GiB, budget {gpu_gb:.1f} GiB; model {args.model}, 4-bit {args.load_in_4bit}"
    )
    headers = ["T", "fits", "max_memory_allocated (GiB)", "estimate total (GiB)", "estimate without CUDA overhead",
               "estimate w/o overhead / measured"]  # fmt: skip
    print(markdown_table(headers, rows))
    ratio = f"{predicted / largest:.2f}" if largest else "n/a"
    print(f"largest trainable context (search): {largest} tokens; estimator's max_context: {predicted} tokens "
          f"(estimate / search = {ratio})")  # fmt: skip
    write_json(args.json_out, dict(gpu=name, total=total, budget_gib=gpu_gb, args=vars(args), trials=trials,
                                   peaks=peaks, largest=largest, estimator_max_context=predicted))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
