"""PNG plots of evaluation results (matplotlib, headless ``Agg`` backend)."""

from __future__ import annotations

import math

from ..utils import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """Save ``fig`` as PNG, complete or absent."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def plot_perplexity(
    curves: dict[str, dict[int, float]], path: str, original_context_length: int | None = None
) -> None:
    """Perplexity (log scale) vs context length, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_len in curves.items():
        xs = sorted(by_len)
        ys = [by_len[x] if math.isfinite(by_len[x]) else float("nan") for x in xs]
        ax.plot(xs, ys, marker="o", label=name)
    if original_context_length:
        ax.axvline(original_context_length, color="grey", linestyle="--", linewidth=1, label="original window")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity by context length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_passkey_heatmaps(models: dict[str, dict], path: str) -> None:
    """One heatmap per model: passkey accuracy, prompt length (rows) x needle depth (columns)."""
    plt = _pyplot()
    n = len(models)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.6), squeeze=False)
    image = None
    for ax, (name, m) in zip(axes[0], models.items()):
        image = ax.imshow(m["accuracy"], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(m["depths"])), [f"{d:g}" for d in m["depths"]])
        ax.set_yticks(range(len(m["lengths"])), [str(x) for x in m["lengths"]])
        ax.set_xlabel("needle depth")
        ax.set_title(f"{name}\nk_max={m['k_max']}", fontsize=9)
        for i, row in enumerate(m["accuracy"]):
            for j, acc in enumerate(row):
                ax.text(j, i, f"{acc:.1f}", ha="center", va="center", fontsize=7, color="w" if acc < 0.6 else "k")
    axes[0][0].set_ylabel("prompt length (tokens)")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle("Passkey retrieval", y=1.02)
    _save(fig, path)
    plt.close(fig)
