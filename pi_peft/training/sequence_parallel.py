"""Sequence parallelism (DeepSpeed Ulysses / ALST, arXiv 2506.13996) for PI training: the checks that stop a run
before its first step when Ulysses would train a wrong model or not start at all.

Ulysses is the one transformers and accelerate integrate: `ParallelismConfig(sp_backend="deepspeed", sp_size=N)`
(or `ACCELERATE_USE_PARALLELISM_CONFIG=true` with `PARALLELISM_CONFIG_SP_SIZE=N`, `PARALLELISM_CONFIG_SP_BACKEND=
deepspeed`, `PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION=sdpa`) with a DeepSpeed ZeRO-3 config. Each of the N ranks of
a sequence-parallel group gets `T / N` consecutive tokens of the same rows (DeepSpeed's `UlyssesSPDataLoaderAdapter`
shards the batch, with the *global* `position_ids`, so RoPE, and PI's scaled `inv_freq` with it, rotates every token
by its position in the whole row); the MLPs, norms, LoRA and the loss run on the shard; attention runs one all-to-all
before and after, so that each rank attends the whole sequence with `H / N` of the heads.

What follows from that, and is checked by [`check_sequence_parallel`]:

- `num_attention_heads % sp_size == 0`, and the key/value heads split too (`num_key_value_heads % sp_size == 0`) or
  are replicated (DeepSpeed's own rule: `sp_size % num_key_value_heads == 0`, each rank then holds one kv head);
- every row's length is a multiple of `sp_size`: in `pretrain` mode every row is exactly `max_length` tokens, so
  `max_length % sp_size == 0`; SFT batches are padded to their longest row, so `pad_to_multiple_of` must be a
  multiple of `sp_size`;
- ZeRO stage 3. With ZeRO-1/2 the same step gives the loss and the gradients multiplied by `sp_size`
  (DeepSpeed #5248; measured: exactly x2 with `sp_size=2`), silently: refused;
- the core attention is one Ulysses can wrap (`sdpa`, `flash_attention_2`/`_3`, a hub FlashAttention kernel) and the
  one the model was loaded with; `eager` and `flex_attention` are refused (as accelerate does);
- S²-Attn is refused: after the all-to-all each rank holds a slice of the heads, and S² decides shifted vs unshifted
  blocks by the global head index (`ops.s2_attn.check_all_heads` refuses it inside the attention too);
- packing. `pretrain` rows are exact windows of documents joined with EOS and no document mask (as in the PI
  paper): there documents attend across their boundaries in one process and under Ulysses alike, nothing changes.
  trl's SFT packing (`packing=True`: `position_ids` restart at every document) is kept apart in one process by a
  block-diagonal mask transformers builds from `position_ids` (only when the forward builds no KV cache: training
  with `use_cache=False` or checkpointing; tests/test_distributed_deepspeed.py checks both); Ulysses drops the
  attention mask and runs causal attention over the whole gathered row with `sdpa`, so packed documents would
  attend each other: refused with `sdpa`, allowed with
  FlashAttention (its varlen path reads the restarting `position_ids`). Right padding (trl's) is harmless: causal
  attention never lets a real token see the padding after it, and padded labels are -100.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .distributed import deepspeed_config, world_size, zero_stage

SP_ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3")
"""Core attention implementations Ulysses wraps (besides hub FlashAttention kernels, `org/flash-attn...`)."""

_MASK_AWARE = ("flash_attention_2", "flash_attention_3")  # keep packed documents apart through `position_ids`


def _is_hub_flash_kernel(name: str) -> bool:
    return "/" in name and "flash-attn" in name


def sp_settings(training_args: Any = None) -> dict:
    """`{"sp_size", "sp_backend", "sp_attn_implementation"}` of a run: from `training_args.parallelism_config`
    (transformers' `TrainingArguments`) when set, else from accelerate's environment
    (`ACCELERATE_USE_PARALLELISM_CONFIG=true` and `PARALLELISM_CONFIG_SP_*`), else no sequence parallelism."""
    pc = getattr(training_args, "parallelism_config", None)
    if pc is not None:
        handler = getattr(pc, "sp_handler", None)
        return {
            "sp_size": int(pc.sp_size or 1),
            "sp_backend": pc.sp_backend,
            "sp_attn_implementation": getattr(handler, "sp_attn_implementation", None),
        }
    env = os.environ
    if env.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() != "true":
        return {"sp_size": 1, "sp_backend": None, "sp_attn_implementation": None}
    return {
        "sp_size": int(env.get("PARALLELISM_CONFIG_SP_SIZE", "1")),
        "sp_backend": env.get("PARALLELISM_CONFIG_SP_BACKEND", "deepspeed"),
        "sp_attn_implementation": env.get("PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION"),
    }


def check_sequence_parallel(
    sp_size: int,
    *,
    num_attention_heads: int,
    num_key_value_heads: Optional[int] = None,
    max_length: Optional[int] = None,
    data_mode: str = "pretrain",
    pad_to_multiple_of: Optional[int] = None,
    zero_stage: Optional[int] = None,
    sp_backend: Optional[str] = "deepspeed",
    sp_attn_implementation: Optional[str] = None,
    attn_implementation: Optional[str] = None,
    s2_attn: bool = False,
    packing: bool = False,
    world_size: Optional[int] = None,
) -> None:
    """Refuse a sequence-parallel run that would be wrong or fail (see the module docstring), with the field, the
    value and the fix. Pure: no process group, no model. A no-op for `sp_size == 1`.

    Args:
        sp_size: ranks per sequence-parallel group (`ParallelismConfig.sp_size`).
        num_attention_heads, num_key_value_heads: the model's (text) config.
        max_length: tokens per row (`pretrain`: every row is exactly this long).
        data_mode: `"pretrain"` (packed exact windows) or `"sft"` (rows padded per batch).
        pad_to_multiple_of: the SFT collator's padding multiple.
        zero_stage: the DeepSpeed ZeRO stage, `None` without DeepSpeed.
        sp_backend, sp_attn_implementation: `ParallelismConfig.sp_backend` and its handler's core attention.
        attn_implementation: the attention the model is loaded with (`None`: transformers' default, `sdpa`).
        s2_attn: the adapter's `s2_attn`.
        packing: trl's SFT packing (`position_ids` restart per document).
        world_size: the number of processes (`WORLD_SIZE`), when known.
    """
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ValueError(f"`sp_size` must be a positive int (ranks per sequence), got {sp_size!r}.")
    if sp_size == 1:
        return
    if sp_backend != "deepspeed":
        raise ValueError(
            f"`sp_backend`={sp_backend!r} with `sp_size`={sp_size}: sequence parallelism here is DeepSpeed Ulysses; "
            "set `sp_backend='deepspeed'` (`PARALLELISM_CONFIG_SP_BACKEND=deepspeed`)."
        )
    if world_size is not None and world_size % sp_size:
        raise ValueError(
            f"`sp_size`={sp_size} does not divide the {world_size} processes (`WORLD_SIZE`); launch a multiple of "
            f"{sp_size} processes or pick an `sp_size` that divides {world_size}."
        )
    if zero_stage is None:
        raise ValueError(
            f"`sp_size`={sp_size} needs DeepSpeed (Ulysses runs inside its engine): pass `--deepspeed "
            "ds_zero3.json` (a ZeRO-3 config) or launch with an accelerate DeepSpeed ZeRO-3 config."
        )
    if zero_stage != 3:
        raise ValueError(
            f"DeepSpeed ZeRO stage {zero_stage} with `sp_size`={sp_size}: Ulysses with ZeRO-1/2 gives the loss and "
            f"the gradients multiplied by sp_size (x{sp_size}; DeepSpeed #5248), silently. Use ZeRO stage 3 "
            "(`zero_optimization.stage: 3`)."
        )
    if num_attention_heads % sp_size:
        raise ValueError(
            f"`sp_size`={sp_size} does not divide the model's `num_attention_heads`={num_attention_heads}: Ulysses "
            f"gives each rank num_attention_heads / sp_size heads. Pick an `sp_size` that divides "
            f"{num_attention_heads}."
        )
    kv = num_attention_heads if num_key_value_heads is None else num_key_value_heads
    if kv % sp_size and sp_size % kv:
        raise ValueError(
            f"`sp_size`={sp_size} and the model's `num_key_value_heads`={kv}: Ulysses splits the key/value heads "
            f"across the ranks (kv % sp_size == 0) or replicates them (sp_size % kv == 0, each rank one kv head); "
            f"neither holds. Pick an `sp_size` that divides {kv} or a multiple of it."
        )
    if data_mode == "pretrain":
        if max_length is not None and max_length % sp_size:
            lower, upper = max_length - max_length % sp_size, max_length + sp_size - max_length % sp_size
            raise ValueError(
                f"`max_length`={max_length} is not a multiple of `sp_size`={sp_size}: each rank gets max_length / "
                f"sp_size tokens of every row. Set `max_length` to {lower} or {upper}."
            )
    elif not pad_to_multiple_of or pad_to_multiple_of % sp_size:
        raise ValueError(
            f"`pad_to_multiple_of`={pad_to_multiple_of!r} with `sp_size`={sp_size}: SFT batches are padded to their "
            f"longest row, and every row's length must be a multiple of sp_size (each rank gets 1/sp_size of it). "
            f"Set `pad_to_multiple_of` to {sp_size} (or a multiple of it)."
        )
    core = sp_attn_implementation
    if core is None:
        raise ValueError(
            f"`sp_attn_implementation` is not set with `sp_size`={sp_size}: Ulysses wraps one core attention. Set it "
            "to the model's attention, e.g. `DeepSpeedSequenceParallelConfig(sp_attn_implementation='sdpa')` or "
            "`PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION=sdpa`."
        )
    if core not in SP_ATTN_IMPLEMENTATIONS and not _is_hub_flash_kernel(core):
        raise ValueError(
            f"`sp_attn_implementation`={core!r} cannot be wrapped by Ulysses sequence parallelism ('eager' builds a "
            f"T x T mask, 'flex_attention' is not supported); use one of {list(SP_ATTN_IMPLEMENTATIONS)} or a hub "
            "FlashAttention kernel (e.g. 'kernels-community/flash-attn2')."
        )
    model_attn = "sdpa" if attn_implementation is None else attn_implementation
    if model_attn != core:
        raise ValueError(
            f"`sp_attn_implementation`={core!r} but the model is loaded with `attn_implementation`={model_attn!r}: "
            "Ulysses replaces the core attention by name, so the two must be the same. Set both to the same value "
            "(`--attn_implementation sdpa`)."
        )
    if s2_attn:
        raise ValueError(
            f"`s2_attn=True` with `sp_size`={sp_size}: after Ulysses' all-to-all each rank holds "
            f"1/{sp_size} of the attention heads, and S²-Attn shifts heads by their global index (the second half), "
            "so the shifted and unshifted halves would land on the wrong heads. Set `s2_attn=False` (full attention, "
            "which Ulysses splits by heads instead), or train with `sp_size=1`."
        )
    if data_mode != "pretrain" and packing and core not in _MASK_AWARE:
        raise ValueError(
            f"`packing=True` with `sp_size`={sp_size} and `sp_attn_implementation`={core!r}: Ulysses drops the "
            "attention mask and runs causal attention over the whole gathered row, so the packed documents would "
            "attend each other (one process keeps them apart). Set `packing=False`, or use "
            "`attn_implementation`/`sp_attn_implementation` 'flash_attention_2' (it separates documents by "
            "`position_ids`)."
        )


def check_training_sequence_parallel(
    training_args: Any,
    model_config: Any,
    peft_config: Any = None,
    data_mode: str = "pretrain",
    attn_implementation: Optional[str] = None,
) -> int:
    """[`check_sequence_parallel`] for a `pi-peft train` run, its settings read from `training_args` (trl's
    `SFTConfig`), the environment (accelerate's launch; the DeepSpeed config as `distributed.deepspeed_config`
    reads it), the model's config and `attn_implementation` (the one the
    model is loaded with; `None`: transformers' default, `sdpa`); returns `sp_size` (1: none)."""
    sp = sp_settings(training_args)
    if sp["sp_size"] == 1:
        return 1
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    attn = attn_implementation
    check_sequence_parallel(
        sp["sp_size"],
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", None),
        max_length=getattr(training_args, "max_length", None),
        data_mode=data_mode,
        pad_to_multiple_of=getattr(training_args, "pad_to_multiple_of", None),
        zero_stage=zero_stage(deepspeed_config(training_args)),
        sp_backend=sp["sp_backend"],
        sp_attn_implementation=sp["sp_attn_implementation"],
        attn_implementation=attn,
        s2_attn=bool(getattr(peft_config, "s2_attn", False)),
        packing=bool(getattr(training_args, "packing", False)),
        world_size=world_size(),
    )
    return sp["sp_size"]
