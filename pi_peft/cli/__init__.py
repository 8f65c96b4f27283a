"""The ``pi-peft`` command: one module per subcommand in this package, imported only when that subcommand runs.

Error policy, the same for every subcommand: a user mistake (a bad option, a missing file, an adapter that does not
fit, a Hub error) prints one line, ``pi-peft <command>: error: ...``, and exits with code 2, like argparse's own
usage errors; ``--debug`` (anywhere on the command line) shows the full traceback instead. An unexpected failure
also prints one line, names the exception type and exits with code 1.

``pi-peft --help`` and ``--version`` import neither torch nor peft.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module in this package, one-line help); each module has `cli_main(argv) -> int`
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("pi_peft.cli.train", "fine-tune a PI (Q)LoRA adapter (see recipes/)"),
    "estimate": ("pi_peft.cli.estimate", "estimate peak GPU memory for a model, context and recipe"),
    "eval": ("pi_peft.cli.eval", "passkey retrieval / perplexity by context length"),
    "demo": ("pi_peft.cli.demo", "the PI paper in miniature, on CPU, offline"),
    "push": ("pi_peft.cli.push", "upload an adapter with a generated model card to the Hub"),
    "export": ("pi_peft.cli.export", "export a merged model or a plain LoRA adapter for vLLM/llama.cpp"),
    "gguf-to-hf": ("pi_peft.cli.gguf", "a GGUF file -> a transformers folder (safetensors, config, tokenizer)"),
}

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, ImportError)
"""Exceptions that mean "the input is wrong": pi_peft's own checks raise ValueError/TypeError with the fix, missing
files and Hub failures are OSErrors (huggingface_hub's errors included), a missing extra is an ImportError."""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a bad value is argparse's usage error, exit code 2)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def _usage() -> str:
    lines = ["usage: pi-peft [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        "options:",
        "  --debug    show the full traceback of an error",
        "  --version  print the version and exit",
        "",
        "Run `pi-peft <command> --help` for the options of a command.",
    ]
    return "\n".join(lines)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message with newlines folded (KeyError's quotes removed)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    text = " ".join(str(message).split())
    return text or type(exc).__name__


def run(command: str, func, argv: list[str], *, debug: bool = False) -> int:
    """Run ``func(argv)`` under the error policy of this module."""
    try:
        return int(func(argv) or 0)
    except KeyboardInterrupt:
        print(f"pi-peft {command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"pi-peft {command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: say so in one line; --debug shows where
        if debug:
            raise
        print(
            f"pi-peft {command}: internal error: {type(exc).__name__}: {one_line(exc)} "
            "(run again with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .._version import __version__

        print(f"pi-peft {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"pi-peft: error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[command]
    return run(command, lambda a: importlib.import_module(module_name).cli_main(a), rest, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
