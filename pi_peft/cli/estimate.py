"""`pi-peft estimate`: peak GPU memory of a PI (Q)LoRA training step from the model config (see
`pi_peft.training.estimate`)."""

from __future__ import annotations

import argparse
import json
from typing import Optional

from ..training.estimate import (
    ATTENTIONS,
    LOSSES,
    QUANTIZATIONS,
    check_gpu_gb,
    estimate_memory,
    format_estimate,
    load_model_config,
    max_context,
    parallelism_from_accelerate_config,
    recipes_table,
    training_flops,
)
from ..training.estimate import __doc__ as _ESTIMATE_DOC


def _gpu_gb(text: str) -> float:
    """argparse type of `--gpu-gb`: a positive, finite number of GiB."""
    try:
        return check_gpu_gb(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB (e.g. 24), got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi-peft estimate", description=_ESTIMATE_DOC.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="model id, local model dir or config.json")
    p.add_argument("--context-length", type=int, help="target context T in tokens")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="nf4")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gpu-gb", type=_gpu_gb, default=24.0, help="GPU memory in GiB (default 24)")
    p.add_argument("--no-train-embeddings", action="store_true")
    p.add_argument("--no-train-norms", action="store_true")
    p.add_argument("--attention", choices=ATTENTIONS, default="sdpa")
    p.add_argument("--loss", choices=LOSSES, default="fused")
    p.add_argument("--activation-offloading", action="store_true", help="checkpoints wait in CPU memory")
    p.add_argument("--tiled-mlp", action="store_true", help="MLPs run over sequence tiles (apply_tiled_mlp)")
    p.add_argument("--tile-tokens", type=int, default=None, help="tokens per MLP tile (default: automatic)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="LoRA dropout; > 0 keeps a dropped copy of each LoRA input (train default: 0.05)")  # fmt: skip
    p.add_argument(
        "--s2-group-size-ratio",
        type=float,
        default=None,
        help="S²-Attn block ratio (e.g. 0.25): also print one step's FLOPs with full attention vs S² (memory is the "
        "same either way)",
    )
    g = p.add_argument_group("more than one GPU (every number is then per GPU)")
    g.add_argument("--num-gpus", type=int, default=None, help="GPUs of the run (default 1; DDP unless sharded)")
    g.add_argument(
        "--sp-size",
        type=int,
        default=None,
        help="Ulysses sequence parallelism: GPUs sharing one sequence, context/S tokens each (needs --zero3)",
    )
    g.add_argument("--zero3", action="store_true", help="DeepSpeed ZeRO-3: weights and optimizer partitioned")
    g.add_argument("--fsdp", action="store_true", help="FSDP2 FULL_SHARD: weights and optimizer sharded")
    g.add_argument("--offload", action="store_true", help="sharded weights + optimizer in CPU memory (ZeRO-3 / FSDP)")
    g.add_argument("--accelerate-config", metavar="YAML",
                   help="take the four settings above from an accelerate config (recipes/accelerate/*.yaml); with "
                   "--recipes, instead of the one each recipe's header launches it with")  # fmt: skip
    p.add_argument("--recipes", nargs="+", metavar="YAML", help="print a markdown table for these recipe files")
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    return p


def parallel_settings(args: argparse.Namespace) -> Optional[dict]:
    """`num_gpus`, `sharding`, `sp_size`, `offload` from the flags or `--accelerate-config`; None when neither is
    given (one GPU, or with `--recipes` each recipe's own accelerate config)."""
    flags = [f"--{name}" for name in ("zero3", "fsdp", "offload") if getattr(args, name)]
    flags += [f"--{name.replace('_', '-')}" for name in ("num_gpus", "sp_size") if getattr(args, name) is not None]
    if args.zero3 and args.fsdp:
        raise ValueError(
            "`--zero3` and `--fsdp` are exclusive (DeepSpeed ZeRO-3 or FSDP2 shards the model, not both); pick one."
        )
    if args.accelerate_config:
        if flags:
            raise ValueError(
                f"`--accelerate-config` {args.accelerate_config!r} sets the GPUs and the engine; drop "
                f"{', '.join(flags)} (or drop `--accelerate-config`)."
            )
        return parallelism_from_accelerate_config(args.accelerate_config)
    if not flags:
        return None
    return dict(
        num_gpus=1 if args.num_gpus is None else args.num_gpus,
        sharding="zero3" if args.zero3 else "fsdp" if args.fsdp else "none",
        sp_size=1 if args.sp_size is None else args.sp_size,
        offload=args.offload,
    )


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    parallel = parallel_settings(args)
    if args.recipes:
        print(recipes_table(args.recipes, args.gpu_gb, parallel))
        return 0
    if args.model is None or args.context_length is None:
        _parser().error("give a MODEL and `--context-length` (or `--recipes YAML ...`)")
    kwargs = dict(
        quantization=args.quantization,
        r=args.r,
        batch_size=args.batch_size,
        train_embeddings=not args.no_train_embeddings,
        train_norms=not args.no_train_norms,
        attention=args.attention,
        loss=args.loss,
        activation_offloading=args.activation_offloading,
        tiled_mlp=args.tiled_mlp,
        tile_tokens=args.tile_tokens,
        lora_dropout=args.lora_dropout,
        **(parallel or {}),
    )
    config = load_model_config(args.model)
    est = estimate_memory(config, args.context_length, **kwargs)
    largest = max_context(config, args.gpu_gb, **kwargs)
    flops = None
    if args.s2_group_size_ratio is not None:
        flops = {
            name: training_flops(config, args.context_length, batch_size=args.batch_size, s2_group_size_ratio=ratio)
            for name, ratio in (("full", None), ("s2", args.s2_group_size_ratio))
        }
    if args.json:
        extra = {"flops": flops} if flops else {}
        print(json.dumps({**est.as_dict(), "gpu_gb": args.gpu_gb, "max_context": largest, **extra}, indent=2))
        return 0
    print(format_estimate(est, args.gpu_gb, largest))
    if flops:
        full, s2 = flops["full"], flops["s2"]
        print(
            f"\nCompute of one training step (FLOP count, an estimate of time): full attention "
            f"{full['total'] / 1e12:,.1f} TFLOP (attention {full['attention'] / full['total']:.0%}); S²-Attn ratio "
            f"{args.s2_group_size_ratio:g}: {s2['total'] / 1e12:,.1f} TFLOP, {full['total'] / s2['total']:.2f}x "
            "fewer. Peak memory is the same (SDPA/FlashAttention are O(T) either way)."
        )
    return 0
