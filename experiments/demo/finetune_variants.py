"""Fine-tuning variants of ``pi-peft demo`` on one pretrained base (the runs I1-I6 of ``EXPERIMENTS.md``).

The base is pretrained exactly as ``pi-peft demo`` does (same functions, same seeds) and cached, so that several
fine-tuning settings can be compared without pretraining again. Arms: ``direct-ft`` and ``pi-ft`` as in the demo, and
``<rope_type>`` / ``<rope_type>-ft`` (e.g. ``llama3``, ``yarn``: the same adapter with another pi_peft ``rope_type``,
without / with fine-tuning). ``--eval-every N`` prints passkey accuracy at L and 4L every N fine-tuning steps.
``--set`` applies on top of :data:`ROUND2`, the demo's defaults of rounds 1-2 (rope_theta 500, ...), so that the
commands of EXPERIMENTS.md still reproduce I1-I6 now that the demo's defaults changed (round 3).

    OMP_WAIT_POLICY=PASSIVE python experiments/demo/finetune_variants.py --arms pi-ft,direct-ft \\
        --set finetune_steps=240 --set lora_r=64 --set finetune_lr=0.002
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, replace

import torch
from transformers import AutoModelForCausalLM

from pi_peft import demo
from pi_peft.evaluation.passkey import evaluate_passkey

# the demo's defaults when I1-I6 ran (before round 3 changed them)
ROUND2 = dict(
    rope_theta=500.0,
    vocab_size=1024,  # the tokenizer of rounds 1-3 (one token per digit), pinned since the demo's defaults moved on
    split_digits=True,
    finetune_passkey_max_tokens=128,  # passkey documents up to L unless a variant sets it (the default then)
    pretrain_steps=1000,
    pretrain_batch=16,
    pretrain_lr=2e-3,
    passkey_fraction=0.5,
    finetune_steps=120,
    finetune_batch=4,
    finetune_lr=1e-3,
    passkey_depths=(0.0, 0.25, 0.5, 0.75),
    passkey_trials=4,
    arms=("extrapolation", "pi", "direct-ft", "pi-ft"),
)

PRETRAIN_FIELDS = ("context_length", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
PRETRAIN_FIELDS += ("rope_theta", "vocab_size", "corpus_chars", "heldout_every", "pretrain_steps", "pretrain_batch")
PRETRAIN_FIELDS += ("pretrain_lr", "passkey_fraction", "seed")


def cached_base(cfg: demo.DemoConfig, data: dict, rng: random.Random, cache_dir: str):
    """The demo's pretrained base for ``cfg``'s pretraining fields, from ``cache_dir`` when trained before."""
    key = json.dumps({k: asdict(cfg)[k] for k in PRETRAIN_FIELDS}, sort_keys=True)
    path = os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:16])
    if os.path.isdir(path):
        return AutoModelForCausalLM.from_pretrained(path).eval()
    base, _ = demo.pretrain(cfg, data, rng)
    base.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
    return base


def adapter(base, cfg: demo.DemoConfig, arm: str):
    """``arm``'s model: the demo's PI / direct adapter, or the same adapter with another ``rope_type``."""
    kind = arm.removesuffix("-ft")
    if kind in ("pi", "direct"):
        return demo.pi_adapter(base, cfg, 1.0 if kind == "direct" else float(cfg.factor))
    return demo.pi_adapter(base, cfg, float(cfg.factor), rope_type=kind)


def finetune(model, cfg: demo.DemoConfig, data: dict, arm: str, eval_every: int) -> None:
    """The demo's fine-tuning (same batches for every arm), with optional passkey probes during training."""
    L, T, tok = cfg.context_length, cfg.target_length, data["tokenizer"]
    rng, step = random.Random(cfg.seed + 1), [0]
    passkey_max = cfg.finetune_passkey_max_tokens or L

    def batches():
        if eval_every and step[0] and step[0] % eval_every == 0:
            with torch.no_grad():
                pk = evaluate_passkey(model, tok, [L, T], cfg.passkey_depths, cfg.passkey_trials, seed=99)
            example = pk.records[0]
            print(
                f"  {arm} step {step[0]}: passkey {pk.accuracy_by_length}, {example['key']} -> {example['output']!r}"
            )
        step[0] += 1
        return demo.make_batch(
            data["train"], tok, rng, cfg.finetune_batch, T, cfg.finetune_passkey_fraction, passkey_max
        )

    demo.train(model, batches, cfg.finetune_steps, cfg.finetune_lr, f"fine-tune {arm} @ {T}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="pi-ft,direct-ft", help="comma-separated arms")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a DemoConfig field")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default="outputs/demo-bases")
    args = parser.parse_args()
    cfg = replace(demo.DemoConfig(**ROUND2), threads=args.threads)
    for item in args.set:
        name, _, value = item.partition("=")
        cfg = replace(cfg, **{name: type(getattr(cfg, name))(json.loads(value))})
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0, rng = time.time(), random.Random(cfg.seed)
    data = demo.prepare_data(cfg, rng)
    base = cached_base(cfg, data, rng, args.cache_dir)
    models = {}
    for arm in args.arms.split(","):
        torch.manual_seed(cfg.seed + 1)  # as in demo.extend: the same adapter initialisation for every arm
        models[arm] = adapter(base, cfg, arm)
        if arm.endswith("-ft"):
            finetune(models[arm], cfg, data, arm, args.eval_every)
    results, _, _ = demo.evaluate_models(cfg, data, models, {})
    print(f"\n{demo.demo_table(results, cfg)}\n\nsettings: {args.set}, wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
