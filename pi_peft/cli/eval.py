"""``pi-peft eval passkey`` and ``pi-peft eval ppl``: prove that a context extension worked.

Examples::

    pi-peft eval passkey --model llama2-16k-pi --lengths 2048 4096 8192 16384 --trials 10 --output-dir results
    pi-peft eval ppl --model base=meta-llama/Llama-2-7b-hf --model pi=llama2-16k-pi \\
        --dataset emozilla/pg19-test --text-field text --max-tokens 131072 \\
        --lengths 2048 4096 8192 16384 --stride 256 --output-dir results

``--model`` is repeatable and takes ``PATH`` or ``LABEL=PATH``; a path is a base or merged model, or a PI adapter
folder (``adapter_config.json``, loaded with ``AutoPeftModelForCausalLM`` after ``import pi_peft``). The tokenizer
comes from ``--tokenizer``, else the model folder, else the adapter's base model.

Output folder layout (read by the model card generator; each file is written atomically)::

    <output-dir>/
      passkey.json   {"task": "passkey", "schema_version": 1, "pi_peft": version, "settings": {...},
                      "models": {label: {"model": path, "lengths": [..], "depths": [..], "trials": n,
                                         "accuracy": [[acc per depth] per length], "accuracy_by_length": {len: acc},
                                         "k_max": int, "records": [{"length", "depth", "tokens", "key", "output",
                                                                    "correct"}, ...]}}}
      passkey.md     accuracy by length + k_max per model, then a length x depth table per model
      passkey.png    one heatmap per model, length x depth
      ppl.json       {"task": "ppl", "schema_version": 1, "pi_peft": version, "settings": {...},
                      "models": {label: {"model": path, "results": [{"context_length", "stride", "nll", "ppl",
                                                                     "tokens", "windows"}, ...]}}}
      ppl.md         perplexity table, models x context lengths
      ppl.png        perplexity vs context length, one line per model

``k_max`` is the paper's effective context window: the largest tested length such that every tested length up to it
has passkey accuracy >= 20% (0 when even the shortest fails). Perplexity uses ``use_cache=False`` and a chunked loss.
"""

from __future__ import annotations

import argparse

from . import fraction, positive_int

DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
DTYPES = ("auto", "float32", "bfloat16", "float16")  # pi_peft.sharing.loading.DTYPES, named without importing torch


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, help="PATH or LABEL=PATH (repeatable)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--lengths", type=positive_int, nargs="+", required=True, help="context lengths in tokens")
    parser.add_argument("--output-dir", required=True, help="folder for the JSON, Markdown and PNG files")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pi-peft eval", description="Evaluate context extension.")
    sub = parser.add_subparsers(dest="task", required=True)
    pk = sub.add_parser("passkey", help="passkey retrieval accuracy on a length x depth grid, and k_max")
    _common(pk)
    pk.add_argument("--depths", type=fraction, nargs="+", default=DEFAULT_DEPTHS, help="needle depths in [0, 1]")
    pk.add_argument("--trials", type=positive_int, default=5, help="random keys per (length, depth) cell")
    pk.add_argument("--seed", type=int, default=0)
    ppl = sub.add_parser("ppl", help="perplexity by context length (sliding window)")
    _common(ppl)
    ppl.add_argument("--stride", type=positive_int, default=None, help="sliding-window stride (paper: 256)")
    ppl.add_argument("--files", nargs="*", default=[], help="local text files or globs")
    ppl.add_argument("--dataset", default=None, help="a datasets name or local path")
    ppl.add_argument("--dataset-config", default=None)
    ppl.add_argument("--split", default="test")
    ppl.add_argument("--text-field", default="text")
    ppl.add_argument("--max-tokens", type=positive_int, default=None, help="score at most this many tokens")
    ppl.add_argument("--no-concatenate", action="store_true", help="score documents separately, not EOS-joined")
    ppl.add_argument("--loss-chunk-size", type=positive_int, default=1024, help="positions per fp32 logits chunk")
    return parser


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ..evaluation.run import parse_model_spec, read_texts, run_passkey, run_ppl

    labels = [parse_model_spec(s)[0] for s in args.model]
    if len(set(labels)) != len(labels):
        raise ValueError(f"`--model` labels must be unique, got {labels}; use LABEL=PATH to name them.")
    common = dict(output_dir=args.output_dir, batch_size=args.batch_size, dtype=args.dtype, device=args.device)
    common.update(lengths=args.lengths, tokenizer=args.tokenizer)
    if args.task == "passkey":
        run_passkey(args.model, depths=args.depths, trials=args.trials, seed=args.seed, **common)
    else:
        source = dict(files=args.files, dataset=args.dataset, dataset_config=args.dataset_config, split=args.split)
        source["text_field"] = args.text_field
        texts = read_texts(args.files, args.dataset, args.dataset_config, args.split, args.text_field)
        run_ppl(
            args.model,
            texts=texts,
            stride=args.stride,
            loss_chunk_size=args.loss_chunk_size,
            max_tokens=args.max_tokens,
            concatenate=not args.no_concatenate,
            source=source,
            **common,
        )
    print(f"Results written to {args.output_dir}/")
    return 0
