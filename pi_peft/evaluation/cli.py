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
import glob
import json
import os
import sys

import torch

DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``"LABEL=PATH"`` or ``"PATH"`` -> ``(label, path)``; the label defaults to the path's last component."""
    label, sep, path = spec.partition("=")
    if not sep:
        path = spec
        label = os.path.basename(os.path.normpath(spec)) or spec
    if not path or not label:
        raise ValueError(f"`--model` must be PATH or LABEL=PATH, got {spec!r}.")
    return label, path


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _torch_dtype(name: str):
    if name == "auto":
        return "auto"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"`--dtype` must be one of {['auto', *dtypes]}, got {name!r}.")
    return dtypes[name]


def load_model(path: str, dtype: str = "auto", device: str = "auto"):
    """A base, merged or PI-adapter model in eval mode on ``device`` (``auto``: CUDA when available)."""
    from transformers import AutoModelForCausalLM

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    kwargs = {"dtype": _torch_dtype(dtype)}
    if is_adapter_dir(path):
        from peft import AutoPeftModelForCausalLM

        import pi_peft  # noqa: F401  (registers PI with peft)

        model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval()


def load_tokenizer(path: str, tokenizer: str | None = None):
    from transformers import AutoTokenizer

    if tokenizer:
        return AutoTokenizer.from_pretrained(tokenizer)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        if not is_adapter_dir(path):
            raise ValueError(f"No tokenizer could be loaded from {path!r} ({exc}); pass `--tokenizer`.") from exc
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"No tokenizer in adapter folder {path!r} and no `base_model_name_or_path` in its config; "
                "pass `--tokenizer`."
            ) from None
        return AutoTokenizer.from_pretrained(base)


def read_texts(files: list[str], dataset: str | None, config: str | None, split: str, field: str) -> list[str]:
    """Texts from local files (globs allowed) or a ``datasets`` dataset."""
    if files:
        paths = sorted({p for pattern in files for p in (glob.glob(pattern) or [pattern])})
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"`--files`: no such file(s) {missing}; pass existing text files or glob patterns.")
        texts = []
        for p in paths:
            with open(p, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        return texts
    if dataset:
        from datasets import load_dataset

        data = load_dataset(dataset, config, split=split)
        if field not in data.column_names:
            raise ValueError(f"`--text-field`={field!r} is not a column of {dataset!r}; columns: {data.column_names}.")
        return list(data[field])
    raise ValueError("`eval ppl` needs text: pass `--files PATH...` or `--dataset NAME`.")


def tokenize_documents(tokenizer, texts: list[str], concatenate: bool, max_tokens: int | None) -> list[list[int]]:
    """Token ids per document, or one stream joined by EOS; cut to ``max_tokens`` in total."""
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if concatenate:
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream: list[int] = []
        for d in docs:
            stream += d + sep
        docs = [stream]
    if max_tokens:
        out, left = [], max_tokens
        for d in docs:
            if left <= 0:
                break
            out.append(d[:left])
            left -= len(out[-1])
        docs = out
    return docs


def _tqdm(desc: str):
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, leave=False, file=sys.stderr)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, help="PATH or LABEL=PATH (repeatable)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--lengths", type=int, nargs="+", required=True, help="context lengths in tokens")
    parser.add_argument("--output-dir", required=True, help="folder for the JSON, Markdown and PNG files")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pi-peft eval", description="Evaluate context extension.")
    sub = parser.add_subparsers(dest="task", required=True)
    pk = sub.add_parser("passkey", help="passkey retrieval accuracy on a length x depth grid, and k_max")
    _common(pk)
    pk.add_argument("--depths", type=float, nargs="+", default=DEFAULT_DEPTHS, help="needle depths in [0, 1]")
    pk.add_argument("--trials", type=int, default=5, help="random keys per (length, depth) cell")
    pk.add_argument("--seed", type=int, default=0)
    ppl = sub.add_parser("ppl", help="perplexity by context length (sliding window)")
    _common(ppl)
    ppl.add_argument("--stride", type=int, default=None, help="sliding-window stride (paper: 256); default: none")
    ppl.add_argument("--files", nargs="*", default=[], help="local text files or globs")
    ppl.add_argument("--dataset", default=None, help="a datasets name or local path")
    ppl.add_argument("--dataset-config", default=None)
    ppl.add_argument("--split", default="test")
    ppl.add_argument("--text-field", default="text")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens in total")
    ppl.add_argument("--no-concatenate", action="store_true", help="score documents separately, not EOS-joined")
    ppl.add_argument("--loss-chunk-size", type=int, default=1024, help="positions per fp32 logits chunk")
    return parser


def run_passkey(args) -> dict:
    from .passkey import evaluate_passkey
    from .report import write_passkey_report

    models = {}
    for spec in args.model:
        label, path = parse_model_spec(spec)
        tokenizer, model = load_tokenizer(path, args.tokenizer), load_model(path, args.dtype, args.device)
        result = evaluate_passkey(
            model,
            tokenizer,
            args.lengths,
            args.depths,
            args.trials,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=_tqdm(f"passkey {label}"),
        )
        models[label] = {"model": path, **result.to_dict()}
        print(f"{label}: accuracy by length {result.accuracy_by_length}, k_max {result.k_max}")
        del model
    settings = {k: getattr(args, k) for k in ("lengths", "depths", "trials", "seed")}
    return write_passkey_report(args.output_dir, models, settings)


def run_ppl(args) -> dict:
    from .perplexity import evaluate_perplexity
    from .report import write_ppl_report

    texts = read_texts(args.files, args.dataset, args.dataset_config, args.split, args.text_field)
    models = {}
    for spec in args.model:
        label, path = parse_model_spec(spec)
        tokenizer, model = load_tokenizer(path, args.tokenizer), load_model(path, args.dtype, args.device)
        docs = tokenize_documents(tokenizer, texts, not args.no_concatenate, args.max_tokens)
        results = []
        for n in sorted(args.lengths):
            stride = None if args.stride is None else min(args.stride, n)
            r = evaluate_perplexity(
                model, docs, n, stride, args.batch_size, args.loss_chunk_size, progress=_tqdm(f"ppl {label} @ {n}")
            )
            results.append(r.to_dict())
            print(f"{label} @ {n}: ppl {r.ppl:.3f} ({r.tokens} tokens, {r.windows} windows)")
        models[label] = {"model": path, "results": results}
        del model
    settings = {
        "lengths": args.lengths,
        "stride": args.stride,
        "files": args.files,
        "dataset": args.dataset,
        "dataset_config": args.dataset_config,
        "split": args.split,
        "text_field": args.text_field,
        "max_tokens": args.max_tokens,
        "concatenate": not args.no_concatenate,
    }
    return write_ppl_report(args.output_dir, models, settings)


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    labels = [parse_model_spec(s)[0] for s in args.model]
    if len(set(labels)) != len(labels):
        raise ValueError(f"`--model` labels must be unique, got {labels}; use LABEL=PATH to name them.")
    (run_passkey if args.task == "passkey" else run_ppl)(args)
    print(f"Results written to {args.output_dir}/")
    return 0
