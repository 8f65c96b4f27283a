"""`pi-peft gguf-to-hf`: a GGUF file -> an ordinary transformers checkpoint folder; see `pi_peft.sharing.gguf`."""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pi-peft gguf-to-hf",
        description="De-quantise a GGUF file (llama.cpp's format) into a transformers folder: safetensors weights, "
        "config.json and tokenizer. Needs `pip install gguf`.",
    )
    p.add_argument("gguf_file", help="the .gguf file (only read)")
    p.add_argument("output", help="folder to write (must not exist unless --overwrite)")
    p.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights (default float32: exact)"
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from ..sharing.gguf import gguf_to_folder

    out = gguf_to_folder(
        args.gguf_file, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite
    )
    print(f"Wrote {out}")
    return 0
