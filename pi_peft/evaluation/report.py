"""JSON files and Markdown tables of evaluation results (the layout is documented in :mod:`pi_peft.cli.eval`).

Every file is written to a temporary name and moved into place with ``os.replace``: complete or absent.
"""

from __future__ import annotations

import math
import os

from .._version import __version__
from ..utils import atomic_write_text, markdown_table, write_json  # noqa: F401  (write_json: used by callers)

SCHEMA_VERSION = 1


def _fmt_ppl(value: float) -> str:
    if not math.isfinite(value):
        return "inf"
    return f"{value:.2f}" if value < 1e4 else f"{value:.2e}"


def ppl_markdown(models: dict[str, dict]) -> str:
    """Rows: models; columns: context lengths; cells: perplexity."""
    lengths = sorted({r["context_length"] for m in models.values() for r in m["results"]})
    head = ["model"] + [str(n) for n in lengths]
    rows = []
    for name, m in models.items():
        by_len = {r["context_length"]: r["ppl"] for r in m["results"]}
        rows.append([name] + [_fmt_ppl(by_len[n]) if n in by_len else "-" for n in lengths])
    return "Perplexity by context length (tokens):\n\n" + markdown_table(head, rows) + "\n"


def passkey_markdown(models: dict[str, dict]) -> str:
    """Accuracy by length (mean over depths) and k_max per model, then a length x depth table per model."""
    lengths = sorted({n for m in models.values() for n in m["lengths"]})
    head = ["model"] + [str(n) for n in lengths] + ["k_max"]
    rows = []
    for name, m in models.items():
        acc = {int(k): v for k, v in m["accuracy_by_length"].items()}
        rows.append([name] + [f"{acc[n]:.2f}" if n in acc else "-" for n in lengths] + [str(m["k_max"])])
    lines = ["Passkey retrieval accuracy by prompt length (tokens), mean over depths:", "", markdown_table(head, rows)]
    for name, m in models.items():
        head = ["length \\ depth"] + [f"{d:g}" for d in m["depths"]]
        rows = [[str(n)] + [f"{a:.2f}" for a in row] for n, row in zip(m["lengths"], m["accuracy"])]
        lines += ["", f"`{name}` ({m['trials']} trials per cell):", "", markdown_table(head, rows)]
    return "\n".join(lines) + "\n"


def write_ppl_report(output_dir: str, models: dict[str, dict], settings: dict) -> dict:
    """Write ``ppl.json``, ``ppl.md`` and ``ppl.png``; ``models[label] = {"model": path, "results": [...]}``."""
    from .plots import plot_perplexity

    payload = {"task": "ppl", "schema_version": SCHEMA_VERSION, "pi_peft": __version__, "settings": settings}
    payload["models"] = models
    write_json(os.path.join(output_dir, "ppl.json"), payload)
    atomic_write_text(os.path.join(output_dir, "ppl.md"), ppl_markdown(models))
    curves = {name: {r["context_length"]: r["ppl"] for r in m["results"]} for name, m in models.items()}
    plot_perplexity(curves, os.path.join(output_dir, "ppl.png"))
    return payload


def write_passkey_report(output_dir: str, models: dict[str, dict], settings: dict) -> dict:
    """Write ``passkey.json``, ``passkey.md`` and ``passkey.png``; ``models[label]`` is a ``PasskeyResult`` dict."""
    from .plots import plot_passkey_heatmaps

    payload = {"task": "passkey", "schema_version": SCHEMA_VERSION, "pi_peft": __version__, "settings": settings}
    payload["models"] = models
    write_json(os.path.join(output_dir, "passkey.json"), payload)
    atomic_write_text(os.path.join(output_dir, "passkey.md"), passkey_markdown(models))
    plot_passkey_heatmaps(models, os.path.join(output_dir, "passkey.png"))
    return payload
