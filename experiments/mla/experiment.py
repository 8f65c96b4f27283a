"""MHA2MLA in miniature, on CPU: convert the demo's pretrained Llama to MLA, fine-tune briefly, compare; then with PI.

    python experiments/mla/experiment.py --output-dir experiments/mla         # the committed table (results.md)
    python experiments/mla/experiment.py --quick --output-dir /tmp/mla        # smoke run, a minute
    python experiments/mla/experiment.py --long --output-dir experiments/mla  # MLA + PI, the demo's setting (long.md)

``--long`` answers what the small setting cannot (its PI arms never retrieve): the demo's defaults, base and
fine-tuning (``pi_peft.demo.finetune_arm``: 400 steps x 8 rows x 4L, passkey documents up to 4L) and the demo's
evaluation (perplexity at L, 2L, 4L; passkey at L ... 4L, 50 trials per length), for `pi-ft` (the demo's arm, PI
alone, full cache) and `mla-25%-pi-ft` (MLA at a quarter of the cache + PI in one adapter), side by side.

Steps, all through pi_peft's public path (`get_peft_model(base, MLAConfig(...))`, `initialize_mla_weights`):

1. The demo's data and base (`pi_peft.demo`: Python stdlib sources + passkey documents, a byte-level BPE, a small
   Llama with multi-head attention pretrained at window L; cached like the demo's base).
2. Arms (LoRA r=16 on all other linear layers + embeddings + norms in every adapter, as in the demo):
   - `original`: the base (full K/V cache: 2 x heads x head_dim values per token and layer).
   - `mla-25%-init`, `mla-12%-init`: the conversion alone (2-norm partial RoPE on calibration batches, joint SVD),
     no training: what the conversion loses.
   - `mla-25%-ft`, `mla-12%-ft`: the same fine-tuned at L (MLA matrices + LoRA), `finetune_steps` steps.
   - `pi-ft`: the demo's PI adapter (s = 4, no MLA) fine-tuned at 4L: long context, full cache (reference).
   - `mla-25%-pi-ft`: MLA (25% cache) + PI (s = 4) in one adapter, fine-tuned at 4L with the same batches and steps.
3. Perplexity (held-out files, sliding window) at L, 2L, 4L and passkey accuracy at L, 2L, 4L (greedy generation,
   so the MLA arms decode with the latent cache). Writes ``results.json`` and ``results.md`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from dataclasses import asdict, replace

import torch

import pi_peft  # noqa: F401  (registers PI and MLA with peft)
from pi_peft import demo
from pi_peft.utils import atomic_write_text

# (kv_rank, rope_dims) of the two compression levels for the demo model (4 heads x head_dim 32, hidden 128):
# original 2 x 4 x 32 = 256 cached values per token and layer
LEVELS = {"25%": (32, 8), "12%": (16, 4)}  # 32 + 4 x 8 = 64 (25%), 16 + 4 x 4 = 32 (12.5%)
EXPERIMENT = dict(
    vocab_size=1024,  # the demo's tokenizer before round 4 (one token per digit), pinned so that the committed
    split_digits=True,  # results stay comparable (and its cached base is reused) when the demo's defaults move
    pretrain_steps=1200,
    pretrain_batch=16,
    pretrain_lr=2e-3,
    passkey_fraction=0.5,  # a base that retrieves at L (with the demo's 0.3 x 8 rows x 1000 steps it did not)
    finetune_steps=150,
    finetune_batch=4,
    ppl_tokens=4096,
    passkey_depths=(0.1, 0.5, 0.9),
    passkey_trials=6,
    threads=1,
)
QUICK = dict(demo.QUICK, finetune_steps=4, threads=1)
QUICK_LEVELS = {"25%": (8, 4), "12%": (4, 2)}  # quick model: 4 heads x head_dim 16


def mla_adapter(base, cfg, data, level, scaling_factor=1.0, calibration_batches=8, selection="2-norm"):
    from peft import get_peft_model

    from pi_peft.tuners.mla import MLAConfig, initialize_mla_weights

    kv_rank, rope_dims = level
    config = MLAConfig(
        kv_rank=kv_rank,
        rope_dims=rope_dims,
        rope_selection=selection,
        scaling_factor=scaling_factor,
        r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        train_embeddings=True,
        train_norms=True,
    )
    model = get_peft_model(copy.deepcopy(base), config)
    if selection != "2-norm":
        return model
    rng = random.Random(cfg.seed + 7)
    L = cfg.context_length
    batches = [
        demo.make_batch(data["train"], data["tokenizer"], rng, 8, L, 0.0, L) for _ in range(calibration_batches)
    ]
    initialize_mla_weights(model, batches)
    return model


def finetune(cfg, data, model, length, label):
    rng = random.Random(cfg.seed + 1)  # the same batches for every arm at the same length
    passkey_max = cfg.context_length  # passkey documents of at most L tokens: retrieval past L is never taught

    def batches():
        fraction = cfg.finetune_passkey_fraction
        return demo.make_batch(
            data["train"], data["tokenizer"], rng, cfg.finetune_batch, length, fraction, passkey_max
        )

    losses = demo.train(model, batches, cfg.finetune_steps, cfg.finetune_lr, label, log_every=50)
    return sum(losses[-20:]) / len(losses[-20:])


def cache_values(model_config, level=None) -> int:
    heads, head_dim = model_config.num_key_value_heads, model_config.hidden_size // model_config.num_attention_heads
    return 2 * heads * head_dim if level is None else level[0] + heads * level[1]


def evaluate(cfg, data, model):
    from pi_peft.evaluation.passkey import evaluate_passkey
    from pi_peft.evaluation.perplexity import perplexity_by_length

    L, T = cfg.context_length, cfg.target_length
    ppl = perplexity_by_length(model, [data["heldout"]], [L, 2 * L, T], stride=cfg.ppl_stride, batch_size=8)
    pk = evaluate_passkey(model, data["tokenizer"], [L, 2 * L, T], cfg.passkey_depths, cfg.passkey_trials, seed=2)
    return {"ppl": {p.context_length: p.ppl for p in ppl}, "passkey": dict(pk.accuracy_by_length)}


def table(results, cfg) -> str:
    L, T = cfg.context_length, cfg.target_length
    lengths = [L, 2 * L, T]
    head = ["arm", "cached values / token / layer", "vs original", "train loss"]
    head += [f"ppl @{n}" for n in lengths] + [f"passkey @{n}" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    original = results["original"]["cache_values"]
    for name, r in results.items():
        cells = [name, r["cache_values"], f"{r['cache_values'] / original:.3f}", r.get("train_loss", "")]
        cells = [str(c) if not isinstance(c, float) else f"{c:.3f}" for c in cells]
        cells += [f"{r['ppl'][n]:.2f}" for n in lengths] + [f"{r['passkey'][n]:.2f}" for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prepare(cfg, args):
    """The demo's data and pretrained base for ``cfg`` (the user's base cache unless ``--quick``)."""
    torch.set_num_threads(cfg.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    rng = random.Random(cfg.seed)
    data = demo.prepare_data(cfg, rng)
    base, info = demo.pretrained_base(cfg, data, rng, None if args.quick else demo.default_cache_dir())
    return data, base, info


def long_context(args) -> int:
    """`pi-ft` and `mla-25%-pi-ft` fine-tuned and evaluated exactly as ``pi-peft demo`` does its arms."""
    cfg = replace(demo.DemoConfig(**(QUICK if args.quick else {})), threads=args.threads)
    level = (QUICK_LEVELS if args.quick else LEVELS)["25%"]
    t0 = time.time()
    data, base, info = prepare(cfg, args)
    mc = base.config
    torch.manual_seed(cfg.seed + 1)  # as demo.extend
    arms = {
        "pi-ft": (demo.arm_model(base, cfg, "pi-ft"), None),
        "mla-25%-pi-ft": (mla_adapter(base, cfg, data, level, float(cfg.factor)), level),
    }
    rows, curves, timings = {}, {}, {"pretrain_or_load": round(time.time() - t0, 1)}
    for name, (model, lvl) in arms.items():
        t = time.time()
        losses, curves[name] = demo.finetune_arm(cfg, data, model, "pi-ft")  # the LoRA arm's lr and batches
        timings[f"finetune {name}"] = round(time.time() - t, 1)
        model.eval()
        results, _, _ = demo.evaluate_models(cfg, data, {name: model}, timings)
        rows[name] = {"cache_values": cache_values(mc, lvl), "train_loss": sum(losses[-20:]) / 20, **results[name]}
    original = rows["pi-ft"]["cache_values"]
    L, T = cfg.context_length, cfg.target_length
    head = ["arm", "cached values / token / layer", "vs original", f"ppl {L} / {2 * L} / {T}"]
    head += [f"passkey {' / '.join(str(n) for n in cfg.passkey_lengths)}", "k_max", "passkey 128 / 256 / 512 by step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        ppl = " / ".join(f"{p['ppl']:.2f}" for p in r["ppl"])
        acc = r["passkey"]["accuracy_by_length"]
        pk = " / ".join(f"{acc[n] if n in acc else acc[str(n)]:.2f}" for n in cfg.passkey_lengths)
        steps = "; ".join(
            f"{c['step']}: " + " / ".join(f"{v:.2f}" for v in c["accuracy_by_length"].values()) for c in curves[name]
        )
        cells = [name, str(r["cache_values"]), f"{r['cache_values'] / original:.3f}", ppl, pk]
        lines.append("| " + " | ".join(cells + [str(r["passkey"]["k_max"]), steps]) + " |")
    header = (
        f"The demo's setting (`pi_peft.demo.DemoConfig()`: L = {L} -> {T}, rope_theta {cfg.rope_theta:g}, vocab "
        f"{cfg.vocab_size}, {cfg.finetune_steps} fine-tuning steps x {cfg.finetune_batch} rows x {T} tokens, passkey "
        f"documents up to {demo.finetune_passkey_max(cfg)} tokens; LoRA r {cfg.lora_r} + embeddings + norms); MLA "
        f"level (kv_rank, rope_dims) = {level}, 2-norm selection; {cfg.threads} thread(s), "
        f"{time.time() - t0:.0f} s in all."
    )
    md = "\n".join(lines)
    print(header)
    print(md)
    payload = {"config": asdict(cfg), "level": level, "pretrain": info, "timings": timings, "results": rows}
    payload["learning_curves"] = curves
    stem = os.path.join(args.output_dir, "long")
    atomic_write_text(f"{stem}.json", json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(f"{stem}.md", f"{header}\n\n{md}\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--variations",
        action="store_true",
        help="checks of the setup instead of the main table: the exact conversion (every rotary dim, full rank) "
        "must match the original; 4x the fine-tuning steps; 'high' instead of '2-norm' (writes variations.*)",
    )
    parser.add_argument("--long", action="store_true", help="MLA + PI at the demo's own setting (writes long.*)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.long:
        return long_context(args)
    cfg = replace(demo.DemoConfig(), **(QUICK if args.quick else EXPERIMENT))
    levels = QUICK_LEVELS if args.quick else LEVELS
    t0 = time.time()
    data, base, info = prepare(cfg, args)
    mc = base.config
    L, T = cfg.context_length, cfg.target_length
    results, timings = {}, {"pretrain_or_load": round(time.time() - t0, 1)}

    def run(name, model, level=None, train_length=None):
        t = time.time()
        entry = {"cache_values": cache_values(mc, level)}
        if train_length is not None:
            entry["train_loss"] = finetune(cfg, data, model, train_length, name)
        model.eval()
        entry.update(evaluate(cfg, data, model))
        results[name] = entry
        timings[name] = round(time.time() - t, 1)
        print(name, json.dumps(entry), flush=True)

    run("original", base)
    if args.variations:
        head_dim = mc.hidden_size // mc.num_attention_heads
        exact = (mc.num_key_value_heads * head_dim, head_dim)  # full rank of [W_v] with no no-RoPE key rows
        run("mla-exact", mla_adapter(base, cfg, data, exact, selection="high"), exact)
        tag, level = next(iter(levels.items()))
        longer = replace(cfg, finetune_steps=4 * cfg.finetune_steps)
        t = time.time()
        model = mla_adapter(base, longer, data, level)
        entry = {"cache_values": cache_values(mc, level), "train_loss": finetune(longer, data, model, L, "4x")}
        model.eval()
        results[f"mla-{tag}-ft-4x-steps"] = {**entry, **evaluate(cfg, data, model)}
        timings[f"mla-{tag}-ft-4x-steps"] = round(time.time() - t, 1)
        print(f"mla-{tag}-ft-4x-steps", json.dumps(results[f"mla-{tag}-ft-4x-steps"]), flush=True)
        run(f"mla-{tag}-high-ft", mla_adapter(base, cfg, data, level, selection="high"), level, train_length=L)
    for tag, level in ({} if args.variations else levels).items():
        run(f"mla-{tag}-init", mla_adapter(base, cfg, data, level), level)
        run(f"mla-{tag}-ft", mla_adapter(base, cfg, data, level), level, train_length=L)
    if not args.variations:
        run("pi-ft", demo.pi_adapter(base, cfg, float(cfg.factor)), None, train_length=T)
        tag = next(iter(levels))
        run(f"mla-{tag}-pi-ft", mla_adapter(base, cfg, data, levels[tag], float(cfg.factor)), levels[tag], T)

    md = table(results, cfg)
    header = (
        f"Base: Llama {mc.num_hidden_layers} layers, hidden {mc.hidden_size}, {mc.num_attention_heads} heads "
        f"(multi-head attention), L = {L}, pretrained {cfg.pretrain_steps} steps; fine-tuning {cfg.finetune_steps} "
        f"steps x {cfg.finetune_batch} rows at L (MLA arms) or 4L = {T} (PI arms); passkey {len(cfg.passkey_depths)} "
        f"depths x {cfg.passkey_trials} keys per length; levels (kv_rank, rope_dims) = {levels}, 2-norm selection."
    )
    if args.variations:
        header += (
            f" Variations: `mla-exact` keeps every rotary dim with a full-rank latent (kv_rank {exact[0]}, rope_dims "
            f"{exact[1]}), no training; `-ft-4x-steps`: {4 * cfg.finetune_steps} fine-tuning steps; `-high-ft`: "
            "rope_selection 'high' (the fastest rotations) instead of '2-norm'."
        )
    print(header)
    print(md)
    payload = {"config": asdict(cfg), "levels": levels, "pretrain": info, "timings": timings, "results": results}
    payload["results"] = {k: {**v, "ppl": {str(n): p for n, p in v["ppl"].items()}} for k, v in results.items()}
    stem = os.path.join(args.output_dir, "variations" if args.variations else "results")
    with open(f"{stem}.json.tmp", "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(f"{stem}.json.tmp", f"{stem}.json")
    with open(f"{stem}.md.tmp", "w") as f:
        f.write(f"{header}\n\n{md}\n")
    os.replace(f"{stem}.md.tmp", f"{stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
