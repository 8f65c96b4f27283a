"""Upload a PI adapter to the Hugging Face Hub with a generated model card: ``pi-peft push`` and ``model.push_to_hub``.

Usage::

    pi-peft push outputs/llama2-16k-pi you/llama2-16k-pi --eval-dir outputs/eval [--private] [--revision dev]

``push_adapter`` (and the CLI) upload ``adapter_config.json``, ``adapter_model.safetensors``, tokenizer files when
present, a ``README.md`` built by :mod:`pi_peft.sharing.card`, and the evaluation plots under ``eval/``, in one commit.

Why ``model.push_to_hub`` is routed here: peft's ``PeftModel.push_to_hub`` is transformers'
``PushToHubMixin.push_to_hub``, which calls ``save_pretrained`` (peft's template card) and then *overwrites*
``README.md`` with the repo's current card or an empty template. No hook runs between the two, so generating the card
in ``save_pretrained``-adjacent code would never reach the Hub. Instead ``import pi_peft`` wraps
``PeftModel.push_to_hub`` (:func:`pi_peft.integrations.install_push_to_hub`): for a model whose adapter is a PI
adapter it calls :func:`push_to_hub` here (same arguments as transformers'); any other model takes peft's unchanged
path.

The token comes from the usual places (``token=``, ``HF_TOKEN``, ``hf auth login``) through ``HfApi``; pi_peft never
prints it or writes it to a file, and the CLI has no ``--token`` option (it would show up in the shell history).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ..utils import is_kbit_model
from .card import EVAL_DIR_IN_REPO, base_model_license, build_model_card, eval_files, training_from_trainer_state
from .loading import ADAPTER_CONFIG_NAME, SAFETENSORS_NAME, TOKENIZER_FILES, check_adapter_dir, resolve_adapter_dir


def _offline() -> bool:
    """huggingface_hub's `is_offline_mode()`, which reads HF_HUB_OFFLINE once at import, or the variable set since."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _require_online(repo_id: str) -> None:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if _offline():
        raise OfflineModeIsEnabled(
            f"Cannot push to {repo_id!r}: the Hub is in offline mode (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE "
            "(e.g. `HF_HUB_OFFLINE=0 pi-peft push ...`) and make sure you are logged in (`hf auth login`)."
        )


def _is_pi_model(model: Any) -> bool:
    from ..tuners.pi.config import PIConfig

    configs = getattr(model, "peft_config", None) or {}
    return any(isinstance(c, PIConfig) for c in configs.values())


def _save_model_adapter(model: Any, folder: Path, adapter_name: Optional[str]) -> Path:
    """``model.save_pretrained`` of one adapter into ``folder``; returns the folder holding its files."""
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ValueError(f"`adapter_name`={name!r} is not an adapter of this model ({list(model.peft_config)}).")
    model.save_pretrained(str(folder), selected_adapters=[name])
    return folder if name == "default" else folder / name


def _stage(source: Path, staging: Path, eval_dir: Optional[Path]) -> list[tuple[Path, str]]:
    """Copy what will be uploaded into ``staging``; return ``[(local file, path in repo)]``."""
    files = [ADAPTER_CONFIG_NAME, SAFETENSORS_NAME] + [f for f in TOKENIZER_FILES if (source / f).is_file()]
    uploads = []
    for name in files:
        shutil.copy2(source / name, staging / name)
        uploads.append((staging / name, name))
    for plot in eval_files(eval_dir)[1]:
        (staging / EVAL_DIR_IN_REPO).mkdir(exist_ok=True)
        shutil.copy2(plot, staging / EVAL_DIR_IN_REPO / plot.name)
        uploads.append((staging / EVAL_DIR_IN_REPO / plot.name, f"{EVAL_DIR_IN_REPO}/{plot.name}"))
    return uploads


def push_adapter(
    adapter: Any,
    repo_id: str,
    *,
    eval_dir: Union[str, os.PathLike, None] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    create_pr: bool = False,
    token: Union[str, bool, None] = None,
    license: Optional[str] = None,
    quantized: Optional[bool] = None,
    base_model: Optional[str] = None,
    tags: Optional[Sequence[str]] = None,
    adapter_name: Optional[str] = None,
):
    """Upload a PI adapter (a ``PeftModel`` or an adapter folder) and its generated model card in one commit.

    Args:
        adapter: a PI ``PeftModel``, or a local adapter folder (a Hub id is downloaded first, same path).
        repo_id: target repo, e.g. ``"you/llama2-16k-pi"``; created if missing.
        eval_dir: output folder of ``pi-peft eval``; its tables go into the card and its plots under ``eval/``.
        private, revision, commit_message, commit_description, create_pr, token: as in ``huggingface_hub``.
            ``revision`` is a branch, created from main when missing.
        license: the card's license; defaults to the base model card's license when it can be read.
        quantized: whether the adapter was trained on a 4/8-bit base (QLoRA); read from a model, unknown (``None``)
            for a folder unless given.
        base_model: the base model id for the card; defaults to the adapter's ``base_model_name_or_path``.
        tags: extra tags for the card.
        adapter_name: which adapter of a multi-adapter model (default: the active one).

    Returns:
        ``huggingface_hub.CommitInfo`` of the commit.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"`repo_id` must be a Hub repo name such as 'you/llama2-16k-pi', got {repo_id!r}.")
    _require_online(repo_id)
    eval_dir = Path(eval_dir) if eval_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="pi-peft-push-") as tmp:
        tmp = Path(tmp)
        if hasattr(adapter, "peft_config"):
            if not _is_pi_model(adapter):
                raise ValueError("`adapter` is a peft model without a PI adapter; use its own `push_to_hub`.")
            source = _save_model_adapter(adapter, tmp / "saved", adapter_name)
            quantized = is_kbit_model(adapter) if quantized is None else quantized
            training: dict = {}
        else:
            source = resolve_adapter_dir(adapter, token=token)
            training = training_from_trainer_state(source)
        config = check_adapter_dir(source)  # refuses pickles: the Hub copy must be safetensors
        base_model = base_model or config.get("base_model_name_or_path") or None
        staging = tmp / "upload"
        staging.mkdir()
        uploads = _stage(source, staging, eval_dir)
        card = build_model_card(
            config,
            repo_id=repo_id,
            base_model=base_model,
            license=license or base_model_license(base_model, token=token),
            quantized=quantized,
            training=training,
            eval_dir=eval_dir,
        )
        if tags:
            card.data.tags = list(dict.fromkeys([*card.data.tags, *tags]))
        card.save(staging / "README.md")
        uploads.append((staging / "README.md", "README.md"))
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(file)) for file, path in uploads]

        # everything is checked and staged: only now touch the Hub
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or "Upload PI adapter with pi_peft",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )


def push_to_hub(model: Any, repo_id: str, **kwargs: Any):
    """``model.push_to_hub(repo_id, ...)`` for a PI ``PeftModel``: :func:`push_adapter` with transformers' arguments.

    ``max_shard_size`` and ``safe_serialization`` are accepted for compatibility and ignored (adapters are small and
    always safetensors).
    """
    kwargs.pop("max_shard_size", None)
    kwargs.pop("safe_serialization", None)
    return push_adapter(model, repo_id, **kwargs)


# ---- CLI -----------------------------------------------------------------------------------------------------------
