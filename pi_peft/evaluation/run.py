"""Run ``pi-peft eval passkey|ppl`` over several models and write the report folder (see :mod:`pi_peft.cli.eval`)."""

from __future__ import annotations

import glob
import os
import sys

from ..loading import load_model, load_tokenizer


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``"LABEL=PATH"`` or ``"PATH"`` -> ``(label, path)``; the label defaults to the path's last component."""
    label, sep, path = spec.partition("=")
    if not sep:
        path = spec
        label = os.path.basename(os.path.normpath(spec)) or spec
    if not path or not label:
        raise ValueError(f"`--model` must be PATH or LABEL=PATH, got {spec!r}.")
    return label, path


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


def run_passkey(args) -> dict:
    from .passkey import evaluate_passkey
    from .report import write_passkey_report

    models = {}
    for spec in args.model:
        label, path = parse_model_spec(spec)
        model = load_model(path, dtype=args.dtype, device=args.device)  # first: a wrong path is named as such
        tokenizer = load_tokenizer(path, args.tokenizer)
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
        model = load_model(path, dtype=args.dtype, device=args.device)  # first: a wrong path is named as such
        tokenizer = load_tokenizer(path, args.tokenizer)
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
