"""`pi-peft train [--config recipe.yaml] [options]`: the argument parsing of :mod:`pi_peft.training.sft`.

``--help`` shows pi_peft's own options and the common training options; ``--help-all`` lists every option of trl's
``ScriptArguments``, ``SFTConfig`` and ``ModelConfig`` as well. Options that do not apply to a PI adapter are hidden.
"""

from __future__ import annotations

import argparse
import difflib
import sys

COMMON = (
    "model_name_or_path",
    "dataset_name",
    "output_dir",
    "max_steps",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "load_in_4bit",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "activation_checkpointing",
    "resume_from_checkpoint",
    "push_to_hub",
    "hub_model_id",
)
"""The trl/transformers options shown by plain `--help`."""

HIDDEN = (
    "use_peft",
    "lora_task_type",
    "load_in_8bit",
    "config",
    "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
)
"""Options that do not apply (the adapter is always a PI (LoRA) adapter for a causal LM, 8-bit is not supported) and
transformers' deprecated `gradient_checkpointing*` aliases (`activation_checkpointing*` are shown)."""

CONFIG_HELP = "a YAML recipe (e.g. recipes/llama2-7b-16k.yaml); options on the command line override it"


def make_parser():
    """trl's `TrlParser` over pi_peft's `PIArguments` (first) and trl's dataclasses."""
    from trl import ScriptArguments, TrlParser

    from ..training.sft import PIArguments, PIModelConfig, PITrainingConfig

    parser = TrlParser((PIArguments, ScriptArguments, PITrainingConfig, PIModelConfig), prog="pi-peft train")
    for action in parser._actions:
        if action.dest in HIDDEN:
            action.help = argparse.SUPPRESS
    return parser


def parse_train_args(argv: list[str] | None = None):
    """`(script_args, training_args, model_args, pi_args)` from the command line and `--config`, with clear errors for
    unknown options (in the YAML or on the command line)."""
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    known = {a.dest for a in parser._actions} | {"env"}
    if "--config" in argv:
        _check_recipe(argv[argv.index("--config") + 1] if argv.index("--config") + 1 < len(argv) else None, known)
    flags = {flag for action in parser._actions for flag in action.option_strings} | {"--config"}
    unknown = [a for a in argv if a.startswith("--") and a.split("=")[0] not in flags]
    if unknown:
        name = unknown[0][2:].split("=")[0].replace("-", "_")
        raise ValueError(f"unknown option `{unknown[0]}`{_did_you_mean(name, known)}; see `pi-peft train --help-all`.")
    pi_args, script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    return script_args, training_args, model_args, pi_args


def _did_you_mean(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _check_recipe(path: str | None, known: set[str]) -> None:
    import yaml

    if path is None:
        raise ValueError("`--config` needs a YAML file, e.g. `--config recipes/llama2-7b-16k.yaml`.")
    try:
        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"`--config`={path!r}: no such file.") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"`--config`={path!r} is not valid YAML: {exc}") from None
    if not isinstance(recipe, dict):
        raise ValueError(
            f"`--config`={path!r} must hold a YAML mapping of option: value, got {type(recipe).__name__}."
        )
    for key in recipe:
        if key not in known:
            raise ValueError(
                f"`{key}` in {path!r} is not an option of `pi-peft train`{_did_you_mean(key, known)}; fix or drop it."
            )


def pi_option_names() -> set[str]:
    """pi_peft's own options: `PIArguments` and the fields pi_peft adds to trl's `SFTConfig` (`tiled_mlp`, ...)."""
    from trl import SFTConfig

    from ..training.sft import PIArguments, PITrainingConfig

    added = set(PITrainingConfig.__dataclass_fields__) - set(SFTConfig.__dataclass_fields__)
    return set(PIArguments.__dataclass_fields__) | added


def format_help(parser, *, all_options: bool = False) -> str:
    """pi_peft's options and `--config` first, then the common trl options (or all of them)."""
    pi_names = pi_option_names()
    actions = [a for a in parser._actions if a.help != argparse.SUPPRESS and a.dest != "help"]
    pi_actions = [a for a in actions if a.dest in pi_names]
    rest = [a for a in actions if a.dest not in pi_names and (all_options or a.dest in COMMON)]
    formatter = parser._get_formatter()
    formatter.add_usage("pi-peft train [--config RECIPE.yaml] [options]", None, [])
    formatter.add_text(
        "Fine-tune a Position Interpolation (Q)LoRA adapter with trl's SFTTrainer. Every option can also be set in "
        "the --config YAML (same names, without the dashes)."
    )
    config = argparse.Action(["--config"], "config", metavar="RECIPE.yaml", help=CONFIG_HELP)
    formatter.start_section("pi_peft options")
    formatter.add_arguments([config, *pi_actions])
    formatter.end_section()
    title = "all trl / transformers options" if all_options else "common training options"
    formatter.start_section(title)
    formatter.add_arguments(rest)
    formatter.end_section()
    if not all_options:
        hidden = len([a for a in actions if a.dest not in pi_names]) - len(rest)
        formatter.add_text(f"{hidden} more options of trl's SFTConfig / ModelConfig: `pi-peft train --help-all`.")
    return formatter.format_help()


def cli_main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv or "--help-all" in argv:
        print(format_help(make_parser(), all_options="--help-all" in argv))
        return 0
    from ..training.sft import main

    main(*parse_train_args(argv))
    return 0
