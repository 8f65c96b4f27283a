"""`pi-peft export merged|lora`: see `pi_peft.sharing.export`."""

from __future__ import annotations

import argparse

DTYPES = ("bfloat16", "float16", "float32")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pi-peft export", description="Export a PI adapter for tools that do not know pi_peft (vLLM, llama.cpp)."
    )
    sub = p.add_subparsers(dest="kind", required=True)
    merged = sub.add_parser("merged", help="a standalone model with the adapter merged into 16-bit weights")
    lora = sub.add_parser("lora", help="a plain LoRA adapter + README with vLLM/llama.cpp RoPE flags")
    for q in (merged, lora):
        q.add_argument("adapter", help="adapter folder or Hub id")
        q.add_argument("output", help="folder to write (must not exist unless --overwrite)")
        q.add_argument("--revision", help="Hub revision of the adapter")
        q.add_argument("--allow-pickle", action="store_true", help="accept a pickle adapter_model.bin (unsafe)")
        q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    merged.add_argument("--base", help="16-bit base model (default: the adapter's base_model_name_or_path)")
    merged.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="dtype of the merged weights")
    merged.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    return p


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from ..sharing.export import export_lora, export_merged

    common = dict(revision=args.revision, allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    if args.kind == "merged":
        kwargs = dict(base=args.base, dtype=args.dtype, max_shard_size=args.max_shard_size)
        out = export_merged(args.adapter, args.output, **kwargs, **common)
    else:
        out = export_lora(args.adapter, args.output, **common)
    print(f"Wrote {out}")
    return 0
