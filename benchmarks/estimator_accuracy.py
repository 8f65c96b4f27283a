"""`pi-peft estimate` (`pi_peft.training.estimate.estimate_memory`) vs the peaks measured by `memory_vs_context.py`.

    python benchmarks/estimator_accuracy.py --from-json benchmarks/results/memory_vs_context.json

The estimator predicts GPU memory: the peak of `torch.cuda.max_memory_allocated` plus a fixed 1 GiB for the CUDA
context. The measurements are on CPU. This script maps one onto the other as follows, and says so in its output:

- the estimate is taken with `device="cpu"` (no CUDA overhead) and `dtype_bytes=4` (the CPU runs are fp32), with the
  measured run's settings: LoRA rank and LongLoRA switches from the run, batch size, SDPA attention, and for (b)
  gradient checkpointing + the loss its `auto` backend ran (`loss="chunked"` on CPU, `"fused"` for trl's kernel), for
  (c) checkpointing + `loss="fused"` (trl's kernel), for
  (b') `loss="chunked"` with its `chunk_tokens`, for (a) neither (`gradient_checkpointing=False`, `loss="full"`);
- the run's LoRA dropout (`lora_dropout`, the recipe default 0.05) is passed on: every LoRA layer keeps a dropped
  copy of its input;
- it is compared with two measured numbers of the same subprocess:
  `torch_peak`, the peak of live torch CPU allocations (the CPU analogue of `max_memory_allocated`), and
  `step_rss`, the peak RSS minus the RSS of the same process after its imports and before the model was built (what
  the operating system saw the model, optimizer and step add; it also holds allocator slack and library buffers);
- the ratio is estimate / measured; the target is within 25 % (0.75 to 1.25) for pi_peft's recipe (b), the
  configuration the estimator is written for. (a) is shown for reference.

Without `--from-json` (or when the file is missing) it first runs the measurements itself (`--contexts`, `--smoke`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from _common import MIB, machine_info, machine_line, markdown_table, mib, write_json

TOLERANCE = 0.25
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory_vs_context.json")
MEASURES = ("torch_peak", "step_rss")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from-json", default=None, help=f"measurements of memory_vs_context.py (e.g. {DEFAULT_JSON})")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096], help="when measuring here")
    p.add_argument("--smoke", action="store_true", help="when measuring here: tiny model (CI)")
    p.add_argument("--json-out", default=None, help="write the comparison here (JSON)")
    return p.parse_args(argv)


def load_runs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """The measured runs, the machine they ran on, and where they came from."""
    if args.from_json and os.path.isfile(args.from_json):
        with open(args.from_json, encoding="utf-8") as f:
            payload = json.load(f)
        return payload["runs"], payload["machine"], args.from_json
    if args.from_json:
        print(f"{args.from_json} not found: measuring now", file=sys.stderr)
    import memory_vs_context

    mvc_args = memory_vs_context.parse_args(["--contexts", *map(str, args.contexts)] + (["--smoke"] * args.smoke))
    return memory_vs_context.measure(mvc_args), machine_info(), "measured by this run"


def estimate_for(run: dict[str, Any]):
    """`estimate_memory` with the settings of a measured run (see the module docstring)."""
    from pi_peft.training.estimate import estimate_memory

    plain = run["config"] == "plain"
    lora = run["lora"]
    backend = (run.get("loss_kwargs") or {}).get("backend", "auto")
    if backend == "auto":  # what `fused_causal_lm_loss` picked on this CPU
        from pi_peft.ops.losses import available_loss_backends

        backend = available_loss_backends("cpu")[0]
    if run["config"] == "trl":
        backend = "trl"  # SFTTrainer computes its loss with trl's chunked kernel
    loss = "full" if plain else ("chunked" if backend == "chunked" else "fused")
    chunk = (run.get("loss_kwargs") or {}).get("chunk_tokens")
    extra = {"loss_chunk_tokens": chunk} if loss == "chunked" and chunk else {}
    return estimate_memory(
        dict(run["dims"]),
        run["context_length"],
        quantization="none",
        r=lora["r"],
        batch_size=run["batch_size"],
        gradient_checkpointing=not plain,
        train_embeddings=lora["train_embeddings"],
        train_norms=lora["train_norms"],
        lora_dropout=lora.get("lora_dropout", 0.0),
        dtype_bytes=4,
        attention="sdpa",
        loss=loss,
        device="cpu",
        **extra,
    )


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    order = list(dict.fromkeys(r["label"] for r in runs))  # (a), (b), (b') as measured
    for run in sorted(runs, key=lambda r: (order.index(r["label"]), r["context_length"])):
        est = estimate_for(run)
        row = dict(label=run["label"], config=run["config"], loss_kwargs=run.get("loss_kwargs"),
                   context_length=run["context_length"], estimate=est.as_dict())  # fmt: skip
        for m in MEASURES:
            measured = run.get(m)
            row[m] = measured
            row[f"ratio_{m}"] = est.total / measured if measured else None
        rows.append(row)
    return rows


def within(ratio) -> str:
    if ratio is None:
        return "n/a"
    return "yes" if abs(ratio - 1) <= TOLERANCE else "no"


def report(rows: list[dict[str, Any]], info: dict[str, Any], source: str) -> str:
    lines = [f"measurements: {source}", f"machine: {machine_line(info)}", ""]
    lines.append("estimate: estimate_memory(device='cpu', dtype_bytes=4, quantization='none', the run's LoRA "
                 "settings); ratio = estimate / measured; target for (b): within 25 %")  # fmt: skip
    names = {"plain": "(a) plain", "pi_peft": "(b) pi_peft", "trl": "(c) trl SFTTrainer (loss='fused')"}
    for label in dict.fromkeys(r["label"] for r in rows):
        sub = [r for r in rows if r["label"] == label]
        name = names.get(label, "(b') pi_peft, loss " + json.dumps(sub[0]["loss_kwargs"]))
        lines += ["", f"{name}:", ""]
        headers = ["T", "weights", "LoRA+optim", "activations", "logits", "estimate (MiB)", "torch peak",
                   "est / torch peak", "within 25%", "step RSS", "est / step RSS", "within 25%"]  # fmt: skip
        table = []
        for r in sub:
            e = r["estimate"]
            table.append([r["context_length"], *(mib(e[k]) for k in ("weights", "trainable", "activations", "logits")),
                          mib(e["total"]), mib(r["torch_peak"]), fmt(r["ratio_torch_peak"]),
                          within(r["ratio_torch_peak"]), mib(r["step_rss"]), fmt(r["ratio_step_rss"]),
                          within(r["ratio_step_rss"])])  # fmt: skip
        lines.append(markdown_table(headers, table))
    b = [r for r in rows if r["label"] == "pi_peft"]
    for m in MEASURES:
        ratios = [r[f"ratio_{m}"] for r in b if r[f"ratio_{m}"] is not None]
        if ratios:
            worst = max(ratios, key=lambda x: abs(x - 1))
            verdict = "met" if abs(worst - 1) <= TOLERANCE else "MISSED"
            lines.append(f"target estimator within 25 % of (b)'s {m}: estimate/measured from {min(ratios):.2f} "
                         f"to {max(ratios):.2f} -> {verdict}")  # fmt: skip
    return "\n".join(lines)


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    runs, info, source = load_runs(args)
    rows = compare(runs)
    print(report(rows, info, source))
    write_json(args.json_out, dict(machine=info, source=source, rows=rows, mib=MIB))
    return 0


if __name__ == "__main__":
    sys.exit(main())
