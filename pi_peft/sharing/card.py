"""The model card of a PI adapter (the serving flags it shows come from :mod:`pi_peft.sharing.serving`).

Everything in the card is derived from the adapter's own ``adapter_config.json`` (window, factor, RoPE, LoRA
settings), from facts passed in (QLoRA or not, the base model's license, a ``trainer_state.json``), and from an
evaluation folder written by ``pi-peft eval`` (``passkey.md``/``ppl.md`` tables and ``passkey.png``/``ppl.png``
plots, copied verbatim). Nothing is invented: a section whose facts are unknown says so or is left out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from ..utils import markdown_table
from .serving import (
    extension_of,
    fmt_factor,
    llama_cpp_rope_flags,
    llama_cpp_unsupported_note,
    lora_without_flags_text,
    vllm_lora_command,
    vllm_merged_note,
)

EVAL_TABLES = (("passkey.md", "Passkey retrieval"), ("ppl.md", "Perplexity by context length"))
EVAL_PLOTS = ("passkey.png", "ppl.png")
EVAL_DIR_IN_REPO = "eval"

METHOD_TEXT = {True: "QLoRA (4-bit base, bitsandbytes)", False: "LoRA (unquantised base)", None: "LoRA"}
PI_TAGS = ("pi-peft", "position-interpolation", "long-context")


# ---- card ----------------------------------------------------------------------------------------------------------
def training_from_trainer_state(folder: Path) -> dict[str, Any]:
    """Training facts from a transformers ``trainer_state.json`` in ``folder`` (empty when there is none)."""
    file = Path(folder) / "trainer_state.json"
    if not file.is_file():
        return {}
    state = json.loads(file.read_text())
    facts: dict[str, Any] = {}
    for key, label in (
        ("global_step", "optimizer steps"),
        ("num_train_epochs", "epochs"),
        ("train_batch_size", "per-device batch size"),
    ):
        if state.get(key) is not None:
            facts[label] = state[key]
    losses = [e["loss"] for e in state.get("log_history", []) if "loss" in e]
    if losses:
        facts["final training loss"] = round(float(losses[-1]), 4)
    return facts


def eval_files(eval_dir: Optional[Path]) -> tuple[list[tuple[str, str]], list[Path]]:
    """``([(title, markdown table)], [plot files])`` found in an evaluation folder."""
    if eval_dir is None:
        return [], []
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise ValueError(f"`eval_dir`={str(eval_dir)!r} is not a folder; pass the output folder of `pi-peft eval`.")
    tables = [(t, (eval_dir / n).read_text().strip()) for n, t in EVAL_TABLES if (eval_dir / n).is_file()]
    plots = [eval_dir / name for name in EVAL_PLOTS if (eval_dir / name).is_file()]
    if not tables and not plots:
        raise ValueError(
            f"`eval_dir`={str(eval_dir)!r} holds none of {[n for n, _ in EVAL_TABLES] + list(EVAL_PLOTS)}; pass the "
            "output folder of `pi-peft eval`, or leave it out."
        )
    return tables, plots


def _target_modules_text(value: Any) -> str:
    if isinstance(value, str):
        return f"`{value}`"
    names = sorted({str(v).rsplit(".", 1)[-1] for v in value or []})
    return ", ".join(f"`{n}`" for n in names) or "none"


def _training_rows(
    config: Mapping[str, Any], quantized: Optional[bool], training: Mapping[str, Any]
) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("method", METHOD_TEXT[quantized]),
        ("LoRA rank `r` / `lora_alpha` / dropout", f"{config.get('r')} / {config.get('lora_alpha')} / "
         f"{config.get('lora_dropout')}"),
        ("LoRA target modules", _target_modules_text(config.get("target_modules"))),
        ("trained embeddings (LongLoRA)", "yes" if config.get("train_embeddings") else "no"),
        ("trained norms (LongLoRA)", "yes" if config.get("train_norms") else "no"),
    ]  # fmt: skip
    rows += list(training.items())
    return rows


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    return markdown_table(header, rows)


def card_text(
    config: Mapping[str, Any],
    *,
    repo_id: str,
    base_model: Optional[str],
    quantized: Optional[bool] = None,
    training: Optional[Mapping[str, Any]] = None,
    eval_dir: Optional[Path] = None,
) -> str:
    """The markdown body of the card (without the YAML block)."""
    from .._version import __version__

    ext = extension_of(config)
    base = base_model or "<base model>"
    name = repo_id.split("/")[-1]
    tables, plots = eval_files(eval_dir)
    llama_flags = llama_cpp_rope_flags(ext)
    parts = [
        f"# {name}",
        f"A [pi_peft](https://pypi.org/project/pi-peft/) adapter for [`{base}`](https://huggingface.co/{base}): "
        f"{'QLoRA' if quantized else 'LoRA'} fine-tuning with Position Interpolation "
        f"([Chen et al. 2023](https://arxiv.org/abs/2306.15595)) that extends the context window from "
        f"**{ext.original_context_length:,}** to **{ext.context_length:,}** tokens.",
        "## Context extension",
        _table(
            [
                ("original window", f"{ext.original_context_length:,} tokens"),
                ("new window", f"{ext.context_length:,} tokens"),
                ("scaling factor `s`", fmt_factor(ext.scaling_factor)),
                ("RoPE type", f"`{ext.rope_type}`"),
                ("`rope_parameters` while the adapter is active", f"`{json.dumps(ext.rope_parameters)}`"),
            ],
            ("", ""),
        ),
        "## How to load",
        "```bash\npip install pi-peft\n```",
        "```python\n"
        "import pi_peft  # registers the PI method with peft; without it loading fails\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoTokenizer\n\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  # loads {base}, applies LoRA + RoPE x'
        f"{fmt_factor(ext.scaling_factor)}\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
        "```",
        'The adapter\'s `adapter_config.json` says `"peft_type": "PI"`. **Without `import pi_peft`**, peft cannot '
        "resolve that type and loading stops with `KeyError: 'PI'`. This is deliberate: loaded as a plain LoRA, the "
        f"model would run with the original RoPE and produce garbage past {ext.original_context_length:,} tokens.",
        "## How to serve",
        "Inference servers do not know pi_peft. Export first, with pi_peft installed:",
        "- **Merged model** (any server, no RoPE flags; works for every adapter):\n\n"
        f"  ```bash\n  pi-peft export merged {repo_id} {name}-merged\n  vllm serve ./{name}-merged --max-model-len "
        f"{ext.context_length}\n  ```\n\n  Its `config.json` carries the extended `rope_parameters` and "
        f"`max_position_embeddings` for the new window. {vllm_merged_note(ext)}",
    ]
    if config.get("train_embeddings") or config.get("train_norms") or config.get("modules_to_save"):
        parts.append(
            "- **Plain LoRA**: not possible for this adapter. It also trained full modules (embeddings and/or norms), "
            "which a plain LoRA cannot carry; use the merged model."
        )
    else:
        rank = int(config.get("r") or 8)
        llama = (
            f"  llama.cpp (after `convert_lora_to_gguf.py`): `llama-server -m base.gguf --lora adapter.gguf "
            f"{llama_flags}`"
            if llama_flags
            else f"  {llama_cpp_unsupported_note(ext)}"
        )
        parts.append(
            "- **Plain LoRA** (`peft_type: LORA`) for vLLM or llama.cpp, which then need the RoPE flags below. "
            f"{lora_without_flags_text(ext)}\n\n"
            f"  ```bash\n  pi-peft export lora {repo_id} {name}-lora\n"
            f"  {vllm_lora_command(ext, base, f'./{name}-lora', rank).replace(chr(10), chr(10) + '  ')}\n  ```\n\n"
            + llama
        )
    parts += [
        "## Training setup",
        _table(_training_rows(config, quantized, dict(training or {})), ("setting", "value")),
    ]
    if tables or plots:
        parts.append("## Evaluation")
        parts.append("Produced by `pi-peft eval`; copied unchanged from its output folder.")
        for title, table in tables:
            parts += [f"### {title}", table]
        parts += [f"![{p.stem}]({EVAL_DIR_IN_REPO}/{p.name})" for p in plots]
    parts += [
        "## Framework versions (at upload)",
        "\n".join(f"- {pkg} {ver}" for pkg, ver in _versions(__version__)),
    ]
    return "\n\n".join(parts) + "\n"


def _versions(pi_version: str) -> list[tuple[str, str]]:
    import peft
    import torch
    import transformers

    return [
        ("pi_peft", pi_version),
        ("PEFT", peft.__version__),
        ("Transformers", transformers.__version__),
        ("PyTorch", torch.__version__),
    ]


def build_model_card(
    config: Mapping[str, Any],
    *,
    repo_id: str,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    quantized: Optional[bool] = None,
    training: Optional[Mapping[str, Any]] = None,
    eval_dir: Optional[Path] = None,
):
    """A ``huggingface_hub.ModelCard`` for a PI adapter (YAML metadata + body).

    ``quantized``: ``True`` for QLoRA (4-bit base), ``False`` for a 16-bit base, ``None`` when not recorded (the card
    then says only "LoRA").
    """
    from huggingface_hub import ModelCard, ModelCardData

    base_model = base_model or config.get("base_model_name_or_path") or None
    data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        license=license,
        pipeline_tag="text-generation",
        tags=[*PI_TAGS, "qlora" if quantized else "lora"],
    )
    body = card_text(
        config, repo_id=repo_id, base_model=base_model, quantized=quantized, training=training, eval_dir=eval_dir
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def base_model_license(base_model: Optional[str], token: Any = None) -> Optional[str]:
    """The ``license`` in the base model's card (a local folder's README.md or the Hub card), or ``None``."""
    if not base_model:
        return None
    from huggingface_hub import ModelCard

    local = Path(base_model) / "README.md"
    if Path(base_model).is_dir() and not local.is_file():
        return None
    try:
        card = ModelCard.load(local if local.is_file() else base_model, token=token)
    except Exception:  # no card, no network, private base: the license is simply unknown
        return None
    return card.data.license
