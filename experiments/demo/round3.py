"""Round 3 of ``experiments/demo/EXPERIMENTS.md``: rope_theta x passkey documents in fine-tuning x arms (demo code).

Each ``run`` pretrains (or loads) the demo's base for one ``rope_theta`` with the demo's defaults, evaluates the
untrained arms (``extrapolation``, ``pi``) once, then fine-tunes each arm for each ``--passkey-max`` setting (``L``:
passkey documents of at most L tokens in fine-tuning, the paper's question; ``4L``: up to 4L), with passkey probes
at ``curve_steps`` (learning curves), and appends one JSON line per cell to ``<out>/theta<theta>.jsonl``. Cells
already in the file are skipped, so an interrupted run resumes. ``report`` prints the Markdown tables of
EXPERIMENTS.md from those files. Bases are cached in ``--cache-dir`` (the demo's user cache by default, so that
``pi-peft demo`` reuses the rope_theta 10000 base).

    export OMP_WAIT_POLICY=PASSIVE
    python experiments/demo/round3.py run --theta 10000 --out experiments/demo/round3 &  # 1 thread each, two at a time
    python experiments/demo/round3.py run --theta 500 --out experiments/demo/round3 &
    python experiments/demo/round3.py report experiments/demo/round3
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import time
from dataclasses import replace

import torch

from pi_peft import demo

ARMS = ("pi-full-ft", "pi-ft", "direct-ft")


def append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def summarize(result: dict) -> dict:
    pk = result["passkey"]
    return {
        "ppl": {str(p["context_length"]): p["ppl"] for p in result["ppl"]},
        "passkey": pk["accuracy_by_length"],
        "k_max": pk["k_max"],
    }


def run(args) -> None:
    torch.set_num_threads(args.threads)
    cfg = replace(demo.DemoConfig(), rope_theta=float(args.theta), threads=args.threads)
    for item in args.set:
        name, _, value = item.partition("=")
        cfg = replace(cfg, **{name: type(getattr(cfg, name))(json.loads(value))})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"theta{args.theta:g}.jsonl")
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            done = {(r["passkey_max"], r["arm"]) for r in map(json.loads, f)}
    L, T = cfg.context_length, cfg.target_length
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    t0 = time.time()
    data = demo.prepare_data(cfg, rng)
    base, info = demo.pretrained_base(cfg, data, rng, args.cache_dir)
    common = {"theta": cfg.rope_theta, "pretrain_s": info["pretrain_s"], "pretrain_final_loss": info["final_loss"]}
    common["set"] = args.set  # the DemoConfig overrides of this run (round 4: vocab_size, split_digits)
    for arm in ("extrapolation", "pi"):
        if ("-", arm) in done or args.no_base_eval:
            continue
        torch.manual_seed(cfg.seed + 1)
        timings = {}
        results, _, _ = demo.evaluate_models(cfg, data, {arm: demo.arm_model(base, cfg, arm)}, timings)
        append(
            path,
            {**common, "passkey_max": "-", "arm": arm, **summarize(results[arm]), "eval_s": timings[f"eval {arm}"]},
        )
    for pk_name, pk_max in (("L", L), ("4L", T)):
        if pk_name not in args.passkey_max.split(","):
            continue
        cell_cfg = replace(cfg, finetune_passkey_max_tokens=pk_max)
        for arm in args.arms.split(","):
            if (pk_name, arm) in done:
                continue
            torch.manual_seed(cfg.seed + 1)  # as demo.extend
            model = demo.arm_model(base, cell_cfg, arm)
            t = time.time()
            losses, curve = demo.finetune_arm(cell_cfg, data, model, arm)
            finetune_s = time.time() - t
            timings = {}
            results, _, _ = demo.evaluate_models(cell_cfg, data, {arm: model}, timings)
            record = {**common, "passkey_max": pk_name, "arm": arm, **summarize(results[arm])}
            record.update(curve=curve, finetune_s=round(finetune_s, 1), eval_s=round(timings[f"eval {arm}"], 1))
            record["finetune_final_loss"] = sum(losses[-10:]) / len(losses[-10:])
            append(path, record)
    print(f"theta {args.theta:g}: done in {time.time() - t0:.0f} s")


def demo_records(path: str) -> list[dict]:
    """The cells of a ``pi-peft demo`` run (its ``demo.json``), in the grid's record format."""
    with open(path) as f:
        summary = json.load(f)
    cfg, timings = summary["settings"], summary["timings_s"]
    # 0 meant L in demo runs before round 4's defaults; None means 4L
    pk_max = "L" if cfg["finetune_passkey_max_tokens"] in (0, cfg["context_length"]) else "4L"
    common = {"theta": cfg["rope_theta"], "pretrain_s": summary["pretrain_s_when_trained"], "source": "demo.json"}
    records = []
    for arm, result in summary["results"].items():
        record = {**common, "passkey_max": pk_max if arm in summary["learning_curves"] else "-", "arm": arm}
        record.update(summarize(result), eval_s=timings[f"eval {arm}"])
        if arm in summary["learning_curves"]:
            record.update(curve=summary["learning_curves"][arm]["probes"], finetune_s=timings[f"finetune {arm}"])
        records.append(record)
    return records


def report(args) -> None:
    records = demo_records(args.demo_json) if args.demo_json else []
    for path in sorted(glob.glob(os.path.join(args.dir, "theta*.jsonl"))):
        with open(path) as f:
            records += [json.loads(line) for line in f]
    records.sort(key=lambda r: (-r["theta"], r["passkey_max"] != "-", r["passkey_max"], r["arm"]))
    cfg = demo.DemoConfig()
    L, T = cfg.context_length, cfg.target_length
    pk = [str(n) for n in cfg.passkey_lengths]
    head = ["theta", "FT passkey docs up to", "arm", f"ppl {L} / {2 * L} / {T}", f"passkey {' / '.join(pk)}", "k_max"]
    head += ["FT wall", "eval wall"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in records:
        cells = [f"{r['theta']:g}", r["passkey_max"], r["arm"] + (" (demo run)" if "source" in r else "")]
        cells.append(" / ".join(f"{r['ppl'][str(n)]:.2f}" for n in (L, 2 * L, T)))
        cells += [" / ".join(f"{r['passkey'][n]:.2f}" for n in pk), str(r["k_max"])]
        cells += [f"{r['finetune_s']:.0f} s" if "finetune_s" in r else "-", f"{r['eval_s']:.0f} s"]
        print("| " + " | ".join(cells) + " |")
    steps = sorted({c["step"] for r in records for c in r.get("curve", [])})
    print(f"\nLearning curves: passkey at {L} / {2 * L} / {T} after fine-tuning steps {steps} and at the end\n")
    head = ["theta", "FT passkey docs up to", "arm"] + [f"step {s}" for s in steps] + [f"step {cfg.finetune_steps}"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in records:
        if "curve" not in r:
            continue
        accs = [c["accuracy_by_length"] for c in r["curve"]] + [r["passkey"]]
        cells = [f"{r['theta']:g}", r["passkey_max"], r["arm"]]
        cells += [" / ".join(f"{a[str(n)]:.2f}" for n in (L, 2 * L, T)) for a in accs]
        print("| " + " | ".join(cells) + " |")
    pre = {r["theta"]: r["pretrain_s"] for r in records}
    print("\nPretraining wall time: " + ", ".join(f"theta {t:g}: {s:.0f} s" for t, s in sorted(pre.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--theta", type=float, required=True)
    p.add_argument("--out", default="experiments/demo/round3")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--passkey-max", default="L,4L", help="fine-tuning passkey documents up to L, 4L or both")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-base-eval", action="store_true", help="skip extrapolation / pi (e.g. in a demo run)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a DemoConfig field")
    p.add_argument("--cache-dir", default=demo.default_cache_dir())
    p = sub.add_parser("report")
    p.add_argument("dir", nargs="?", default="experiments/demo/round3")
    p.add_argument("--demo-json", default=None, help="also report the cells of a `pi-peft demo` run (its demo.json)")
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
