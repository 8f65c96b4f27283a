"""The exact serving flags (vLLM, llama.cpp) that give a model the RoPE a PI adapter was trained with.

Read from the adapter's own ``adapter_config.json`` through :func:`extension_of`; the per-type llama.cpp flags come
from the rope-type registry (:data:`pi_peft.rope.ROPE_TYPES`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from ..rope import ROPE_TYPES, long_range_parameters, rope_type_info, scaled_rope_parameters

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted `--max-lora-rank` values (default 16)


@dataclass(frozen=True)
class Extension:
    """The context extension an adapter applies, read from its ``adapter_config.json``."""

    original_context_length: int
    context_length: int
    scaling_factor: float
    rope_type: str
    base_rope_parameters: dict
    rope_parameters: dict  # what the model runs with: transformers' `config.rope_parameters`


def extension_of(adapter_config: Mapping[str, Any]) -> Extension:
    """The :class:`Extension` of a saved PI adapter config (raises ``ValueError`` for a non-PI adapter)."""
    if adapter_config.get("peft_type") != "PI":
        raise ValueError(
            f"`peft_type` is {adapter_config.get('peft_type')!r}, not 'PI': this is not a pi_peft adapter, so it "
            "carries no context extension."
        )
    missing = [
        k
        for k in ("original_context_length", "context_length", "scaling_factor", "base_rope_parameters")
        if adapter_config.get(k) is None
    ]
    if missing:
        raise ValueError(
            f"adapter_config.json lacks {missing}; these are filled in when the adapter is applied to its base model. "
            "Save the adapter from a model made with `get_peft_model(base, PIConfig(...))`."
        )
    rope_type = adapter_config.get("rope_type", "linear")
    extras = {k: adapter_config.get(k) for k in rope_type_info(rope_type).extra_parameters}
    params = scaled_rope_parameters(
        dict(adapter_config["base_rope_parameters"]),
        rope_type=rope_type,
        scaling_factor=float(adapter_config["scaling_factor"]),
        original_context_length=int(adapter_config["original_context_length"]),
        **extras,
    )
    return Extension(
        original_context_length=int(adapter_config["original_context_length"]),
        context_length=int(adapter_config["context_length"]),
        scaling_factor=float(adapter_config["scaling_factor"]),
        rope_type=rope_type,
        base_rope_parameters=dict(adapter_config["base_rope_parameters"]),
        rope_parameters=params,
    )


def fmt_factor(factor: float) -> str:
    return f"{factor:g}"


# ---- serving flags -------------------------------------------------------------------------------------------------
def vllm_hf_overrides(ext: Extension) -> str:
    """The JSON for vLLM's ``--hf-overrides``: the extended ``rope_parameters``."""
    return json.dumps({"rope_parameters": ext.rope_parameters}, sort_keys=True)


def vllm_lora_command(ext: Extension, base: str, adapter_path: str, rank: int, name: str = "pi") -> str:
    """``vllm serve`` for the base plus a plain LoRA adapter, with the RoPE and window the adapter was trained for."""
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    lines = [
        f"vllm serve {base}",
        "--enable-lora",
        f"--lora-modules {name}={adapter_path}",
        f"--max-lora-rank {max_rank}",
        f"--max-model-len {ext.context_length}",
        f"--hf-overrides '{vllm_hf_overrides(ext)}'",
    ]
    return " \\\n  ".join(lines)


def vllm_merged_note(ext: Extension) -> str:
    """Why ``vllm serve`` of the merged export needs ``--max-model-len`` (measured: ``benchmarks/real_model.py``)."""
    text = (
        f"Keep `--max-model-len {ext.context_length}`: vLLM derives its window from `config.json`'s "
        "`max_position_embeddings` and the RoPE `factor`"
    )
    if ext.rope_type == "linear":  # pi_peft writes max_position_embeddings = the new window; vLLM multiplies
        derived = int(round(ext.context_length * ext.scaling_factor))
        text += (
            f", and for `linear` it multiplies them ({ext.context_length:,} x {fmt_factor(ext.scaling_factor)}): "
            f"without the flag it would accept {derived:,}-token prompts, past the window the model was trained for"
        )
    return text + "."


def lora_without_flags_text(ext: Extension) -> str:
    """What vLLM and llama.cpp do with the plain LoRA export when they are not given its RoPE flags."""
    window = f"{ext.original_context_length:,}"
    return (
        f"Without them vLLM refuses a `--max-model-len` above the base's {window}-token window (forced with "
        "`VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`, it runs with the original RoPE), and llama.cpp runs with the original "
        f"RoPE; with the original RoPE the output degrades past {window} tokens."
    )


def llama_cpp_rope_flags(ext: Extension) -> Optional[str]:
    """llama.cpp runtime flags that reproduce the adapter's RoPE, or ``None`` when llama.cpp has no such flag."""
    info = ROPE_TYPES[ext.rope_type]
    params = long_range_parameters(ext.rope_parameters)  # Gemma 3: its full-attention layers' (llama.cpp scales those)
    if info.llama_cpp is None or any(params.get(k) is not None for k in info.llama_cpp_ignored):
        return None
    # `--rope-scale` replaces the GGUF's own factor: the composed one (PI on a linearly scaled base multiplies them)
    flags = [
        f"--rope-scaling {info.llama_cpp}",
        f"--rope-scale {fmt_factor(params.get('factor', ext.scaling_factor))}",
    ]
    if info.needs_original_window:
        flags.append(f"--yarn-orig-ctx {ext.original_context_length}")
    flags += [f"{flag} {params[key]:g}" for key, flag in info.llama_cpp_flags if params.get(key) is not None]
    return " ".join(flags + [f"-c {ext.context_length}"])


def llama_cpp_unsupported_note(ext: Extension) -> str:
    """What to do instead when :func:`llama_cpp_rope_flags` is ``None``."""
    return ROPE_TYPES[ext.rope_type].llama_cpp_note
