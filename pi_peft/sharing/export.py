"""Export a PI adapter for tools that do not know pi_peft: ``pi-peft export merged`` and ``pi-peft export lora``.

Usage::

    pi-peft export merged outputs/llama2-16k-pi llama2-16k-merged [--dtype bfloat16] [--max-shard-size 5GB]
    pi-peft export lora   outputs/llama2-16k-pi llama2-16k-lora

``merged`` reloads the base model in 16 bits (never quantised, also for a QLoRA adapter: merging into dequantised
4-bit weights would bake the quantisation error in), applies the adapter, merges it (``merge_and_unload`` keeps the
extended RoPE) and saves a plain transformers checkpoint: sharded safetensors whose ``config.json`` carries the
extended ``rope_parameters`` and ``max_position_embeddings``, plus the tokenizer. Trained embeddings and norms are
merged too.

``lora`` rewrites the adapter as a plain peft LoRA (``"peft_type": "LORA"``, same weights) with a README giving the
exact vLLM (``--hf-overrides``, ``--max-model-len``) and llama.cpp (``--rope-scaling``, ``--rope-scale``) flags that
restore the RoPE it was trained with. A plain LoRA cannot carry fully trained embeddings or norms, so such adapters
are refused with a pointer to ``export merged``.

Both write into a temporary folder next to the output and ``os.replace`` it into place: the output is complete or
absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..utils import atomic_output_dir, refuse_to_overwrite_inputs
from .card import PI_TAGS
from .loading import (
    ADAPTER_CONFIG_NAME,
    PICKLE_NAME,
    SAFETENSORS_NAME,
    check_adapter_dir,
    check_model_path,
    load_adapter,
    load_tokenizer,
    resolve_adapter_dir,
    resolve_dtype,
)
from .serving import (
    extension_of,
    fmt_factor,
    llama_cpp_rope_flags,
    llama_cpp_unsupported_note,
    lora_without_flags_text,
    vllm_lora_command,
    vllm_merged_note,
)

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


# ---- merged --------------------------------------------------------------------------------------------------------
def _merge_dtype(dtype: str, base_config: Any) -> torch.dtype:
    """``auto``: the base checkpoint's dtype when it is 16-bit, else bfloat16."""
    if dtype != "auto":
        return resolve_dtype(dtype)
    saved = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    return saved if saved in SIXTEEN_BIT else torch.bfloat16


def _check_unquantized_base(base: str, base_config: Any) -> None:
    if getattr(base_config, "quantization_config", None) is not None:
        method = base_config.quantization_config
        method = method.get("quant_method") if isinstance(method, dict) else getattr(method, "quant_method", method)
        raise ValueError(
            f"`base`={base!r} is a pre-quantised checkpoint ({method}). Merging into dequantised weights bakes the "
            "quantisation error into the model; pass `--base` pointing at the original 16-bit model it was made from."
        )


def _merged_card(ext, base: str, output_name: str) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=base, library_name="transformers", pipeline_tag="text-generation", tags=[*PI_TAGS, "merge"]
    )
    return (
        f"---\n{data.to_yaml()}\n---\n\n# {output_name}\n\n"
        f"`{base}` with a pi_peft Position Interpolation adapter merged in: context window "
        f"{ext.original_context_length:,} -> {ext.context_length:,} tokens (`rope_type={ext.rope_type!r}`, factor "
        f"{fmt_factor(ext.scaling_factor)}). `config.json` carries the extended `rope_parameters`, so plain "
        "transformers, vLLM and llama.cpp's `convert_hf_to_gguf.py` pick it up without pi_peft. The commands below "
        f"run from the folder that holds `{output_name}/` (the export's parent folder):\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM\n"
        f'model = AutoModelForCausalLM.from_pretrained("./{output_name}")\n```\n\n'
        f"```bash\nvllm serve ./{output_name} --max-model-len {ext.context_length}\n```\n\n"
        f"{vllm_merged_note(ext)}\n"
    )


def export_merged(
    adapter: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    base: Optional[str] = None,
    dtype: str = "auto",
    max_shard_size: Union[int, str] = "5GB",
    revision: Optional[str] = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Merge a PI adapter into a 16-bit copy of its base and save a standalone transformers checkpoint.

    Args:
        adapter: adapter folder or Hub id.
        output: folder to write (must not exist unless ``overwrite``).
        base: base model (folder or Hub id); defaults to the adapter's ``base_model_name_or_path``. Must be the
            un-quantised model, also for QLoRA adapters.
        dtype: ``"auto"`` (the base's 16-bit dtype, else bfloat16), ``"bfloat16"``, ``"float16"``, or ``"float32"``.
        max_shard_size: largest safetensors shard, e.g. ``"5GB"``.
        revision: Hub revision of the adapter.
        allow_pickle: accept a pickle ``adapter_model.bin``.
        overwrite: replace an existing ``output`` (atomically).
    """
    from transformers import AutoConfig

    adapter_dir = resolve_adapter_dir(adapter, revision=revision)
    config = check_adapter_dir(adapter_dir, allow_pickle=allow_pickle)
    ext = extension_of(config)
    base = base or config.get("base_model_name_or_path")
    refuse_to_overwrite_inputs(output, {"adapter": adapter_dir, "base model": base})
    if not base:
        raise ValueError("The adapter does not record its base model; pass `base=` (CLI: `--base`).")
    output = Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"`output`={str(output)!r} already exists; choose a new folder or pass `--overwrite`.")
    check_model_path(str(base), "base")
    base_config = AutoConfig.from_pretrained(base)
    _check_unquantized_base(base, base_config)
    torch_dtype = _merge_dtype(dtype, base_config)

    model = load_adapter(adapter_dir, base, dtype=torch_dtype, allow_pickle=allow_pickle)  # 16-bit, never 4-bit
    merged = model.merge_and_unload()
    got = merged.config.rope_parameters
    if any(got.get(k) != v for k, v in ext.rope_parameters.items()):  # merge_and_unload must keep PI's RoPE
        raise RuntimeError(f"merged model has rope_parameters {got}, expected {ext.rope_parameters}")
    merged.config.dtype = torch_dtype
    tokenizer = load_tokenizer(adapter_dir, required=False) or load_tokenizer(base, required=False)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.model_max_length = ext.context_length
            tokenizer.save_pretrained(tmp)
        else:
            print(f"pi-peft export: no tokenizer found in {str(adapter_dir)!r} or {base!r}; saved without one.")
        (tmp / "README.md").write_text(_merged_card(ext, base, output.name))
    return output


# ---- plain LoRA ----------------------------------------------------------------------------------------------------
def plain_lora_config(pi_config: dict[str, Any]) -> dict[str, Any]:
    """The adapter config as a plain ``LoraConfig`` dict (PI fields dropped, ``peft_type`` ``LORA``)."""
    from peft import LoraConfig

    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    plain = {k: v for k, v in pi_config.items() if k in lora_fields}
    plain["peft_type"] = "LORA"
    plain["modules_to_save"] = None
    LoraConfig.from_peft_type(**plain)  # raises if peft would not accept it
    return plain


def _lora_readme(ext, base: str, output: Path, rank: int) -> str:
    output_name = f"./{output.name}"  # the commands run from the export's parent folder (said below)
    llama = llama_cpp_rope_flags(ext)
    llama_text = (
        "```bash\n"
        f"python convert_lora_to_gguf.py --base <base model folder> {output_name} --outfile adapter.gguf\n"
        f"llama-server -m base.gguf --lora adapter.gguf {llama}\n```\n"
        if llama
        else f"{llama_cpp_unsupported_note(ext)}\n"
    )
    return (
        f"# {output.name}: plain LoRA export of a pi_peft adapter\n\n"
        f"This is a standard peft LoRA adapter (`peft_type: LORA`) for `{base}`. It was trained with Position "
        f"Interpolation: the context window grew from {ext.original_context_length:,} to {ext.context_length:,} "
        f"tokens (`rope_type={ext.rope_type!r}`, factor {fmt_factor(ext.scaling_factor)}). **The adapter does not "
        f"carry that RoPE change**: each tool must be told, with the flags below. {lora_without_flags_text(ext)}\n\n"
        f"The commands run from the folder that holds `{output.name}/` (the export's parent folder); `{base}` is the "
        "base model as the adapter records it (`base_model_name_or_path`).\n\n"
        "## vLLM\n\n"
        f"```bash\n{vllm_lora_command(ext, base, output_name, rank)}\n```\n\n"
        "`--hf-overrides` replaces the base's `rope_parameters` with the extended ones; `--max-model-len "
        f"{ext.context_length}` is the new window; `--max-lora-rank` must be at least the adapter's rank ({rank}; "
        "vLLM's default is 16).\n\n"
        "## llama.cpp\n\n"
        f"{llama_text}\n"
        "## transformers + peft\n\n"
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}", rope_parameters={ext.rope_parameters!r})\n'
        f'model = PeftModel.from_pretrained(base, "{output_name}")\n```\n'
    )


def export_lora(
    adapter: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a PI adapter as a plain LoRA adapter plus a README with the RoPE flags vLLM/llama.cpp need."""
    adapter_dir = resolve_adapter_dir(adapter, revision=revision)
    refuse_to_overwrite_inputs(output, {"adapter": adapter_dir})
    config = check_adapter_dir(adapter_dir, allow_pickle=allow_pickle)
    ext = extension_of(config)
    full = [k for k in ("train_embeddings", "train_norms") if config.get(k)]
    if full or config.get("modules_to_save"):
        what = full or [f"modules_to_save={config.get('modules_to_save')}"]
        raise ValueError(
            f"This adapter also trained full modules ({', '.join(f'`{w}`' for w in what)}), which a plain LoRA "
            "cannot carry; exporting it as LoRA would silently drop them. Use `pi-peft export merged` instead, which "
            "merges them into a standalone model."
        )
    plain = plain_lora_config(config)
    base = config.get("base_model_name_or_path") or "<base model>"
    output = Path(output)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        if (adapter_dir / SAFETENSORS_NAME).is_file():
            shutil.copy2(adapter_dir / SAFETENSORS_NAME, tmp / SAFETENSORS_NAME)
        else:  # allow_pickle was given (check_adapter_dir refuses otherwise): convert to safetensors
            from safetensors.torch import save_file

            state = torch.load(adapter_dir / PICKLE_NAME, map_location="cpu", weights_only=True)
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / SAFETENSORS_NAME, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(plain, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_lora_readme(ext, base, output, int(config.get("r") or 8)))
    return output


# ---- CLI -----------------------------------------------------------------------------------------------------------
