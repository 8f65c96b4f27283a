"""
Check `pi-peft estimate` against measured peaks, and regenerate the estimate in the recipes' headers.

```bash
python recipes/check_estimate.py            # measured vs estimated: prints a markdown table
python recipes/check_estimate.py --headers  # rewrite the "Estimated peak GPU memory" lines of recipes/*.yaml
                                            # (multi-GPU recipes: per GPU, under their accelerate config)
python recipes/check_estimate.py --engines recipes/llama3-8b-112k.yaml  # one recipe under every accelerate config
```

The check trains tiny Llama configs on CPU (fp32 LoRA steps, `pi_peft.training.measure.measure_cpu_peak`): the peak
RSS of a
fresh subprocess minus its RSS after the imports, at several context lengths, untiled and with the sequence-tiled
MLP (`tiled_mlp=True`) on an MLP-heavy config, and with LoRA dropout.
"""

import argparse
import glob
import os

from pi_peft.training.estimate import (
    GIB,
    engine_label,
    estimate_memory,
    is_multi_gpu,
    parallelism_from_accelerate_config,
    recipe_row,
)
from pi_peft.training.measure import measure_cpu_peak

CONFIGS = {
    "h128-L2-V2048": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=2048, max_position_embeddings=256),
    "h256-L4-V4096": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512),
    "h256-i1024-L2-V8192": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, vocab_size=8192, max_position_embeddings=512),
}  # fmt: skip
# (config, settings) rows; every row runs at every length
ROWS = [
    ("h128-L2-V2048", {}),
    ("h256-L4-V4096", {}),
    ("h256-i1024-L2-V8192", {}),
    ("h256-i1024-L2-V8192", {"tiled_mlp": True}),
    ("h256-i1024-L2-V8192", {"lora_dropout": 0.05}),
]
LENGTHS = (2048, 4096, 8192)
CHUNK = 1024
HERE = os.path.dirname(os.path.abspath(__file__))


def check() -> None:
    print("| config | settings | context | measured peak (MiB) | estimate (MiB) | estimate / measured |")
    print("|---|---|---|---|---|---|")
    for name, settings in ROWS:
        config = CONFIGS[name]
        for length in LENGTHS:
            measured = measure_cpu_peak(config, length, r=8, chunk_tokens=CHUNK, **settings)
            estimate = estimate_memory(config, length, quantization="none", r=8, dtype_bytes=4, device="cpu",
                                       loss="chunked", loss_chunk_tokens=CHUNK, **settings).total  # fmt: skip
            label = ", ".join(f"{k}={v}" for k, v in settings.items()) or "-"
            print(f"| {name} | {label} | {length} | {measured / 2**20:.1f} | {estimate / 2**20:.1f} | "
                  f"{estimate / measured:.2f} |", flush=True)  # fmt: skip


def header_lines(path: str) -> list[str]:
    """The two estimate lines of a recipe's header, from `pi_peft.training.estimate.recipe_row` (per GPU under the
    accelerate config of the recipe's `accelerate launch --config_file` line, if it has one)."""
    row = recipe_row(path)
    e, name = row["estimate"], os.path.basename(path)
    gib = lambda x: f"{x / GIB:.1f}"  # noqa: E731
    layer = "recomputed layer" + (f" (MLP tiles of {e.tile_tokens})" if e.tile_tokens else "")
    if not is_multi_gpu(e):
        return [
            f"# Estimated peak GPU memory (pi-peft estimate --recipes recipes/{name}): {gib(e.total)} GiB",
            f"#   weights {gib(e.weights)} + LoRA/embeddings/norms with grads and AdamW {gib(e.trainable)} + "
            f"checkpoints {gib(e.checkpoints)} + max({layer} {gib(e.layer)}, logits/loss {gib(e.logits)}) + CUDA "
            f"{gib(e.overhead)}; largest context that fits 24 GiB: {row['max_context']}",
        ]
    one = recipe_row(path, parallel={})  # the same recipe on one GPU, for comparison
    a2a = f" + all-to-all {gib(e.all_to_all)}" if e.sp_size > 1 else ""
    tokens = f", {e.tokens_per_rank} tokens per GPU" if e.sp_size > 1 else ""
    return [
        f"# Estimated peak GPU memory per GPU (pi-peft estimate --recipes recipes/{name}): {gib(e.total)} GiB on "
        f"{engine_label(e)}{tokens}",
        f"#   weights {gib(e.weights)} (1/{e.num_gpus}) + gathered {gib(e.gathered)} + LoRA/embeddings/norms with "
        f"grads and AdamW {gib(e.trainable)} + checkpoints {gib(e.checkpoints)} + max({layer} {gib(e.layer)}{a2a}, "
        f"logits/loss {gib(e.logits)}) + CUDA {gib(e.overhead)}; largest context that fits 24 GiB per GPU: "
        f"{row['max_context']} (on one GPU: {gib(one['estimate'].total)} GiB, largest {one['max_context']})",
    ]


def write_headers(paths: list[str]) -> None:
    """Replace each recipe's "Estimated peak GPU memory" line and the line after it (atomic write)."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        at = next(k for k, line in enumerate(lines) if line.startswith("# Estimated peak GPU memory"))
        lines[at : at + 2] = header_lines(path)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        os.replace(tmp, path)
        print(f"{path}: {lines[at]}")


def engines_table(recipe: str) -> str:
    """A markdown table of `recipe` per GPU on one GPU and under every `recipes/accelerate/*.yaml` (GiB)."""
    configs = sorted(glob.glob(os.path.join(HERE, "accelerate", "*.yaml")))
    head = (
        "| accelerate config | GPUs | weights | gathered | LoRA+optim | checkpoints | recomputed layer | all-to-all "
    )
    lines = [head + "| logits | total per GPU (GiB) | max context |", "|" + "---|" * 11]
    for label, parallel in [("(none: one GPU)", {})] + [
        (f"`accelerate/{os.path.basename(c)}`", parallelism_from_accelerate_config(c)) for c in configs
    ]:
        row = recipe_row(recipe, parallel=parallel)
        e = row["estimate"]
        sizes = (e.weights, e.gathered, e.trainable, e.checkpoints, e.layer, e.all_to_all, e.logits, e.total)
        cells = [label, engine_label(e), *(f"{x / GIB:.2f}" for x in sizes), str(row["max_context"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--headers", action="store_true", help="rewrite the estimate lines of recipes/*.yaml")
    p.add_argument("--engines", metavar="RECIPE", help="print RECIPE's estimate under every recipes/accelerate config")
    args = p.parse_args(argv)
    if args.engines:
        print(engines_table(args.engines))
    elif args.headers:
        write_headers(sorted(glob.glob(os.path.join(HERE, "*.yaml"))))
    else:
        check()


if __name__ == "__main__":
    main()
