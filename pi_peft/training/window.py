"""trl integration: ``SFTTrainer(peft_config=PIConfig(...))`` trains at the extended window, never past it.

trl's ``SFTConfig.max_length`` defaults to 1024 tokens, whatever the model. With a PI adapter that silently trains
past a shorter window (positions that were never interpolated) or truncates a longer one to 1024 tokens (so the
adapter never sees the positions it was made for). ``import pi_peft`` wraps ``SFTTrainer.__init__`` once trl's trainer
module is imported (:func:`pi_peft.integrations.install_sft_trainer_guard`) with :func:`align_sft_arguments`, so
that, for a PI adapter only:

- ``max_length`` left at trl's default (1024) or ``None`` becomes the adapter's ``context_length`` (logged);
- ``max_length`` longer than ``context_length`` is refused with a ``ValueError`` naming both;
- a shorter, explicitly chosen ``max_length`` is kept (logged);
- padding-free training without packing (``padding_free=True, packing=False``) keeps ``max_length=None``, which trl
  requires there (it does not truncate such rows); instead, once trl has tokenized the data,
  :func:`check_padding_free_rows` refuses rows longer than the window.

Every other trainer is left exactly as trl made it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Optional

logger = logging.getLogger("pi_peft")


def trl_default_max_length() -> Optional[int]:
    from trl import SFTConfig

    return next(f.default for f in dataclasses.fields(SFTConfig) if f.name == "max_length")


def pi_window(model: Any, peft_config: Any) -> Optional[int]:
    """The window a PI adapter trains at: ``peft_config``'s, resolved against ``model``; else the active PI adapter of
    a ``PeftModel``; ``None`` when no PI adapter is involved."""
    from ..tuners.pi.config import PIConfig

    if isinstance(peft_config, PIConfig):
        config = copy.deepcopy(peft_config)
        if config.context_length is not None and config.scaling_factor is None:
            return config.context_length
        return config.resolve_context(_base_window(model, config)).context_length
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    if isinstance(configs, dict) and isinstance(configs.get(active), PIConfig):
        return configs[active].context_length
    return None


def _base_window(model: Any, config) -> int:
    if config.original_context_length is not None:
        return config.original_context_length
    if isinstance(model, str):
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(model)
        return model_config.get_text_config().max_position_embeddings
    from ..tuners.pi.model import original_rope

    return original_rope(model)[1]


def untruncated(args: Any) -> bool:
    """trl does not truncate: padding-free without packing, where trl requires ``max_length=None``."""
    return bool(getattr(args, "padding_free", False)) and not getattr(args, "packing", False)


def align_max_length(args: Any, window: int) -> None:
    """Make ``args.max_length`` fit a PI window of ``window`` tokens (see the module docstring)."""
    current = args.max_length
    if current is None and untruncated(args):
        logger.warning(
            "pi_peft: `padding_free=True` without packing: trl does not truncate rows (it needs `max_length=None`), "
            "so each row must fit the PI adapter's %d-token window (checked once the data is tokenized).",
            window,
        )
        return
    if current is None or current == trl_default_max_length():
        if current != window:
            logger.warning(
                "pi_peft: SFTConfig `max_length`=%s (trl's default) -> %d, the PI adapter's `context_length`; set "
                "`max_length` explicitly to train shorter sequences.",
                current,
                window,
            )
        args.max_length = window
    elif current > window:
        raise ValueError(
            f"SFTConfig `max_length`={current} is longer than the PI adapter's window `context_length`={window}: "
            f"positions past it were never interpolated. Set `max_length` <= {window} or raise `context_length`."
        )
    elif current < window:
        logger.warning("pi_peft: `max_length`=%d trains shorter sequences than the %d-token window", current, window)


def align_sft_arguments(arguments: dict[str, Any]) -> Optional[int]:
    """``SFTTrainer.__init__``'s bound ``arguments``, aligned in place for a PI adapter (see the module docstring;
    installed by :func:`pi_peft.integrations.install_sft_trainer_guard`); returns the PI window (``None`` without a
    PI adapter, when nothing changes)."""
    from trl import SFTConfig

    model, peft_config = arguments.get("model"), arguments.get("peft_config")
    window = pi_window(model, peft_config)
    if window is None:
        return None
    training_args = arguments.get("args")
    if training_args is None:  # trl's own default, made here so that its max_length can be aligned
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
        training_args = SFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-SFT")
        arguments["args"] = training_args
    if hasattr(training_args, "max_length"):
        align_max_length(training_args, window)
    return window


def check_padding_free_rows(trainer: Any, window: Optional[int]) -> None:
    """After ``SFTTrainer.__init__``: with padding-free training without packing (no truncation, see
    :func:`untruncated`), every tokenized training row must fit the PI ``window``; a longer one would train positions
    that were never interpolated. Rows of a streamed dataset are not known up front (logged instead)."""
    from datasets import Dataset

    args = getattr(trainer, "args", None)
    if window is None or args is None or args.max_length is not None or not untruncated(args):
        return
    dataset = getattr(trainer, "train_dataset", None)
    if not isinstance(dataset, Dataset) or "input_ids" not in dataset.column_names:
        if dataset is not None:
            logger.warning("pi_peft: rows of a streamed dataset cannot be checked against the %d-token window", window)
        return
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longer = [n for n in lengths if n > window]
    if longer:
        raise ValueError(
            f"`padding_free=True` without packing trains every row whole (trl does not truncate), and {len(longer)} "
            f"of {len(lengths)} training rows are longer than the PI adapter's window `context_length`={window} "
            f"(longest {max(longer)} tokens): positions past it were never interpolated. Truncate the rows to "
            f"{window} tokens, pack them (`packing=True, packing_strategy='bfd'`), or raise `context_length`."
        )
