"""Run ``pi-peft eval passkey|ppl`` over several models and write the report folder (see :mod:`pi_peft.cli.eval`)."""

from __future__ import annotations

import glob
import os
import sys

from ..sharing.loading import load_model, load_tokenizer


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


def run_passkey(
    model_specs: list[str],
    *,
    lengths: list[int],
    depths: list[float],
    trials: int,
    output_dir: str,
    seed: int = 0,
    batch_size: int = 1,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: str | None = None,
) -> dict:
    """Passkey retrieval of each model (``"LABEL=PATH"`` or ``"PATH"``) on the same keys; writes ``output_dir``."""
    from .passkey import evaluate_passkey
    from .report import write_passkey_report

    models = {}
    for spec in model_specs:
        label, path = parse_model_spec(spec)
        model = load_model(path, dtype=dtype, device=device)  # first: a wrong path is named as such
        result = evaluate_passkey(
            model,
            load_tokenizer(path, tokenizer),
            lengths,
            depths,
            trials,
            seed=seed,
            batch_size=batch_size,
            progress=_tqdm(f"passkey {label}"),
        )
        models[label] = {"model": path, **result.to_dict()}
        print(f"{label}: accuracy by length {result.accuracy_by_length}, k_max {result.k_max}")
        del model
    settings = {"lengths": lengths, "depths": depths, "trials": trials, "seed": seed}
    return write_passkey_report(output_dir, models, settings)


def run_ppl(
    model_specs: list[str],
    *,
    lengths: list[int],
    texts: list[str],
    output_dir: str,
    stride: int | None = None,
    batch_size: int = 1,
    loss_chunk_size: int = 1024,
    max_tokens: int | None = None,
    concatenate: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: str | None = None,
    source: dict | None = None,
) -> dict:
    """Sliding-window perplexity of each model on ``texts`` at each length; writes ``output_dir``. ``source``
    (where the texts came from) is recorded in the report's settings."""
    from .perplexity import evaluate_perplexity
    from .report import write_ppl_report

    models = {}
    for spec in model_specs:
        label, path = parse_model_spec(spec)
        model = load_model(path, dtype=dtype, device=device)  # first: a wrong path is named as such
        docs = tokenize_documents(load_tokenizer(path, tokenizer), texts, concatenate, max_tokens)
        results = []
        for n in sorted(lengths):
            window_stride = None if stride is None else min(stride, n)
            r = evaluate_perplexity(
                model, docs, n, window_stride, batch_size, loss_chunk_size, progress=_tqdm(f"ppl {label} @ {n}")
            )
            results.append(r.to_dict())
            print(f"{label} @ {n}: ppl {r.ppl:.3f} ({r.tokens} tokens, {r.windows} windows)")
        models[label] = {"model": path, "results": results}
        del model
    settings = {
        "lengths": lengths,
        "stride": stride,
        **(source or {}),
        "max_tokens": max_tokens,
        "concatenate": concatenate,
    }
    return write_ppl_report(output_dir, models, settings)
