"""Multi-process checks of `pi-peft train`: no silent fallback to a run that is not the distributed run asked for.

Three points of a run, each a clear error naming what it got and the fix:

- :func:`check_launch` (before the model loads; a pure function of the environment and the arguments): the launch
  would not be distributed although several processes were asked for (`torchrun` on CPU without `use_cpu`, the
  one-process `accelerate launch --cpu --num_processes N`), or an engine setting that silently loses something
  (ZeRO-3 without 16-bit weights on save, 4-bit + FSDP with a quant storage dtype other than the compute dtype).
  Ulysses sequence parallelism has its own checks (ZeRO-1/2 included): :mod:`pi_peft.training.sequence_parallel`.
- :func:`check_engine` (after the trainer is built): the engine accelerate built is the one asked for (FSDP asked
  for on CPU builds DDP; DeepSpeed asked for but another engine built). `Trainer(deepspeed=..., use_cpu=True)` under
  torchrun does build DeepSpeed (gloo process group, DeepSpeed's CPU accelerator), so `use_cpu` is no refusal.
- :func:`check_rope_across_ranks` (before the first step): every rank holds the same RoPE frequencies (PI applied on
  every rank, or on none).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import torch

from ..utils import read_json_object

TRUE = ("1", "true", "yes", "on")

ONE_PROCESS_LAUNCH = (
    "`accelerate launch` started ONE process (WORLD_SIZE is not set) although it was asked for several (it set "
    "MASTER_ADDR={addr!r}, which it does only for `--num_processes` > 1): with `--cpu` or an accelerate config of "
    "`distributed_type: MULTI_CPU`, accelerate's simple launcher runs a single process whatever `--num_processes` "
    "says. Launch N CPU processes with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ...` "
    "or `torchrun --nproc_per_node N -m pi_peft train --use_cpu ...`; for one process drop `--num_processes` (or "
    "unset MASTER_ADDR)."
)


def _flag(env: Mapping[str, str], name: str) -> bool:
    return str(env.get(name, "")).strip().lower() in TRUE


def world_size(env: Optional[Mapping[str, str]] = None) -> int:
    """`WORLD_SIZE` of the launch (1 when unset); ValueError naming the variable when it is not a positive integer."""
    env = os.environ if env is None else env
    value = env.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"WORLD_SIZE={value!r} is not a positive integer; unset it or let the launcher set it.")
    return size


def uses_cpu(training_args, env: Optional[Mapping[str, str]] = None) -> bool:
    """The run asked for accelerate's CPU engine: `use_cpu`, or `ACCELERATE_USE_CPU=true` (what `accelerate launch
    --cpu` sets)."""
    env = os.environ if env is None else env
    return bool(getattr(training_args, "use_cpu", False)) or _flag(env, "ACCELERATE_USE_CPU")


def deepspeed_config(training_args, env: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """The DeepSpeed config the run asks for: `deepspeed` (a dict or a JSON file), else the accelerate launcher's
    (`ACCELERATE_USE_DEEPSPEED=true`: its `ACCELERATE_DEEPSPEED_CONFIG_FILE`, or the ZeRO settings it exported, as a
    dict); `None` without DeepSpeed."""
    env = os.environ if env is None else env
    ds = getattr(training_args, "deepspeed", None)
    if not ds and _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        ds = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if ds in (None, "", "none"):
            zero = {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}
            zero["stage3_gather_16bit_weights_on_model_save"] = _flag(
                env, "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"
            )
            return {"zero_optimization": zero, "_from": "ACCELERATE_DEEPSPEED_* (accelerate config)"}
    if not ds:
        return None
    if isinstance(ds, Mapping):
        return dict(ds)
    return read_json_object(ds, "deepspeed", "a DeepSpeed config", "pass the path of a DeepSpeed JSON config.")


def zero_stage(config: Optional[Mapping]) -> Optional[int]:
    """`zero_optimization.stage` of a DeepSpeed config (`None` without DeepSpeed, 0 when the config has no ZeRO)."""
    if config is None:
        return None
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    try:
        return int(stage)
    except (TypeError, ValueError):
        raise ValueError(
            f"`zero_optimization.stage`={stage!r} in the DeepSpeed config must be 0, 1, 2 or 3."
        ) from None


def fsdp_requested(training_args, env: Optional[Mapping[str, str]] = None) -> str:
    """What asked for FSDP (`"fsdp='full_shard'"`, `"ACCELERATE_USE_FSDP=true"`), `""` when nothing did."""
    env = os.environ if env is None else env
    fsdp = getattr(training_args, "fsdp", None)
    if fsdp:
        return f"`fsdp`={fsdp!r}"
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return "ACCELERATE_USE_FSDP=true (accelerate's FSDP config)"
    return ""


def check_launch(
    training_args,
    model_args=None,
    env: Optional[Mapping[str, str]] = None,
    cuda_available: Optional[bool] = None,
) -> None:
    """Refuse a launch that would not run the distributed training it asks for, before any model is loaded.

    A pure function of the environment `env` (default `os.environ`), the arguments and `cuda_available` (default
    `torch.cuda.is_available()`); it starts no process group. Raises `RuntimeError` (the launch) or `ValueError` (an
    option) with one line: what it got and the fix.
    """
    env = os.environ if env is None else env
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    size = world_size(env)
    cpu = uses_cpu(training_args, env)
    ds = deepspeed_config(training_args, env)

    if size == 1 and "WORLD_SIZE" not in env and "ACCELERATE_DYNAMO_BACKEND" in env and env.get("MASTER_ADDR"):
        raise RuntimeError(ONE_PROCESS_LAUNCH.format(addr=env["MASTER_ADDR"]))
    if size > 1 and not cuda and not cpu and ds is None:
        raise RuntimeError(
            f"WORLD_SIZE={size} but there is no GPU and neither `use_cpu` nor ACCELERATE_USE_CPU=true is set: "
            f"accelerate would run {size} independent one-process trainings, each writing `output_dir`. Pass "
            "`--use_cpu` (or set ACCELERATE_USE_CPU=true) for accelerate's gloo CPU engine, or run on GPUs."
        )
    stage = zero_stage(ds)
    if stage == 3:
        zero = ds.get("zero_optimization") or {}
        gather = zero.get("stage3_gather_16bit_weights_on_model_save")
        if gather == "auto" and _flag(env, "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"):
            gather = True  # accelerate fills "auto" from its config's `zero3_save_16bit_model`
        if gather is not True:
            source = ds.get("_from") or f"`deepspeed`={getattr(training_args, 'deepspeed', None)!r}"
            raise ValueError(
                f"ZeRO-3 ({source}) has `stage3_gather_16bit_weights_on_model_save`={gather!r}: the final adapter "
                "would be saved from partitioned parameters (empty), not gathered. Set "
                "`zero_optimization.stage3_gather_16bit_weights_on_model_save: true` (accelerate config: "
                "`zero3_save_16bit_model: true`)."
            )
    fsdp = fsdp_requested(training_args, env)
    if fsdp and model_args is not None and getattr(model_args, "load_in_4bit", False):
        storage, compute = getattr(model_args, "bnb_4bit_quant_storage", None), getattr(model_args, "dtype", None)
        if storage is None or str(storage).replace("torch.", "") != str(compute).replace("torch.", ""):
            raise ValueError(
                f"`bnb_4bit_quant_storage`={storage!r} with `load_in_4bit` and FSDP ({fsdp}): FSDP shards 4-bit "
                f"weights as tensors of their storage dtype, which must be the compute dtype `dtype`={compute!r} (as "
                f"Answer.AI's FSDP-QLoRA). Set `--bnb_4bit_quant_storage {compute}`."
            )


def check_engine(trainer, env: Optional[Mapping[str, str]] = None) -> None:
    """Refuse a trainer whose accelerate engine is not the one asked for (after it is built, before training):
    fewer processes than `WORLD_SIZE`, FSDP asked for but DDP built (accelerate's FSDP on CPU), DeepSpeed asked for
    but another engine built. `RuntimeError` with what was asked, what was built, and the fix."""
    from accelerate.utils import DistributedType

    env = os.environ if env is None else env
    accelerator = trainer.accelerator
    built, processes = accelerator.distributed_type, accelerator.num_processes
    size = world_size(env)
    if size > 1 and (processes != size or built == DistributedType.NO):
        raise RuntimeError(
            f"WORLD_SIZE={size} but accelerate built a {processes}-process {built} engine: the processes would train "
            "independently. On CPU pass `--use_cpu` (or ACCELERATE_USE_CPU=true)."
        )
    fsdp = fsdp_requested(trainer.args, env)
    if fsdp and built != DistributedType.FSDP:
        raise RuntimeError(
            f"FSDP was asked for ({fsdp}) but accelerate built {built} (accelerate's FSDP needs GPUs; on CPU it "
            "silently replicates the model as DDP). Run on GPUs, or drop the FSDP setting to train with DDP."
        )
    ds = getattr(trainer.args, "deepspeed", None) or _flag(env, "ACCELERATE_USE_DEEPSPEED")
    if ds and built != DistributedType.DEEPSPEED:
        raise RuntimeError(
            f"DeepSpeed was asked for (`deepspeed`={getattr(trainer.args, 'deepspeed', None)!r}) but accelerate "
            f"built {built}. Launch with `torchrun` or `accelerate launch --use_deepspeed` (not `--cpu`), with "
            "deepspeed installed (`pip install 'pi-peft[distributed]'`)."
        )


def rope_inv_freqs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rotary `inv_freq` buffer of `model` (`{buffer name: tensor}`), the frequencies PI scales."""
    return {name: buf for name, buf in model.named_buffers() if name.split(".")[-1].endswith("inv_freq")}


def check_rope_across_ranks(model: torch.nn.Module, group: Any = None) -> int:
    """All-gather every rotary `inv_freq` of `model` (float64) and refuse (`RuntimeError`, on every rank) when the
    ranks differ: RoPE scaled by PI on some ranks and not on others trains a model no rank holds. A no-op without an
    initialised process group of more than one process. Returns the number of ranks compared."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 1
    mine = {
        name: buf.detach().to("cpu", torch.float64).flatten().tolist() for name, buf in rope_inv_freqs(model).items()
    }
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    reference = gathered[0]
    for rank, theirs in enumerate(gathered[1:], start=1):
        if set(theirs) != set(reference):
            raise RuntimeError(
                f"RoPE differs across ranks: rank {rank} has the rotary buffers {sorted(theirs)}, rank 0 has "
                f"{sorted(reference)}. Every rank must load the same base model and PI adapter before training."
            )
        for name, values in reference.items():
            if theirs[name] != values:
                ref, got = torch.tensor(values), torch.tensor(theirs[name])
                diff = (ref - got).abs().max().item() if ref.shape == got.shape else float("nan")
                raise RuntimeError(
                    f"RoPE differs across ranks: `{name}` on rank {rank} differs from rank 0's (max abs difference "
                    f"{diff:.3g}; PI applied on some ranks only?). Every rank must load the same base model and apply "
                    "the same PI adapter (same `context_length`, `rope_type`) before training."
                )
    return len(gathered)
