"""The ``pi-peft`` command. Each subcommand lives in its own module and is imported only when used."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("pi_peft.train", "cli_main", "fine-tune a PI (Q)LoRA adapter (see recipes/)"),
    "estimate": ("pi_peft.estimate", "cli_main", "estimate peak GPU memory for a model, context and recipe"),
    "eval": ("pi_peft.evaluation.cli", "cli_main", "passkey retrieval / perplexity by context length"),
    "demo": ("pi_peft.demo", "cli_main", "the PI paper in miniature, on CPU, offline"),
    "push": ("pi_peft.hub", "cli_main", "upload an adapter with a generated model card to the Hub"),
    "export": ("pi_peft.export", "cli_main", "export a merged model or a plain LoRA adapter for vLLM/llama.cpp"),
}


def _usage() -> str:
    lines = ["usage: pi-peft <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `pi-peft <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"pi-peft {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"pi-peft: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[command]
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
