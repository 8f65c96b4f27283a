"""S²-Attn quality at miniature scale: does PI + LoRA fine-tuned with S²-Attn, then evaluated with full attention,
reach the perplexity of the same fine-tune with full attention (LongLoRA's claim, within 5 % at 4L)?

1. Corpus: Python's standard-library sources (`pi_peft.demo.stdlib_files`), split by file into training and held-out
   text; a byte-level BPE tokenizer (`pi_peft.testing.train_tokenizer`).
2. Pretrain a small Llama (the demo's size: hidden 128, 4 layers, 4 heads, vocab 1024) at L = 128 tokens.
3. For each seed, two arms from the same base, the same adapter initialisation and the same batches: PI (factor 4)
   + LoRA (r 16, all linear layers) + trainable embeddings and norms (LongLoRA's setting), fine-tuned at 4L = 512
   tokens with `s2_attn=False` (full) or `s2_attn=True, s2_group_size_ratio=0.25` (blocks of 128 = L tokens).
4. Evaluate every model in eval mode, i.e. with full attention: perplexity on held-out tokens in non-overlapping
   windows of L, 2L and 4L tokens.

Usage (one thread; 40 minutes on the shared 2-core machine of the committed run, load average ~10):

    OMP_WAIT_POLICY=PASSIVE python experiments/s2/quality.py --out experiments/s2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time

import torch

L = 128
FACTOR = 4
MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, vocab_size=1024)


def train(model, batches, steps, lr, label):
    """The demo's training loop (`pi_peft.demo.train`: AdamW, warm-up, cosine decay); returns the losses and the
    median step time."""
    from pi_peft.demo import train as demo_train

    times = []
    losses = demo_train(model, batches, steps, lr, label, step_times=times)
    return losses, sorted(times)[len(times) // 2]


def crops(stream, rng, batch, length):
    starts = [rng.randrange(0, len(stream) - length) for _ in range(batch)]
    return torch.tensor([stream[s : s + length] for s in starts], dtype=torch.long)


@torch.no_grad()
def perplexity(model, stream, length, batch=8):
    """exp(mean NLL) over non-overlapping windows of `length` tokens (every token but each window's first)."""
    n = len(stream) // length
    windows = torch.tensor(stream[: n * length], dtype=torch.long).view(n, length)
    nll, count = 0.0, 0
    for i in range(0, n, batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def attention_implementation(model):
    return model.base_model.model.config._attn_implementation if hasattr(model, "base_model") else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/s2")
    parser.add_argument("--corpus-chars", type=int, default=2_000_000)
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--finetune-batch", type=int, default=4)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    import pi_peft
    from pi_peft.demo import stdlib_files
    from pi_peft.testing import train_tokenizer

    started = time.time()
    texts = stdlib_files(args.corpus_chars, seed=0)
    train_texts = [t for i, t in enumerate(texts) if i % 10]
    heldout_texts = [t for i, t in enumerate(texts) if i % 10 == 0]
    tokenizer = train_tokenizer(train_texts, vocab_size=MODEL["vocab_size"])

    def stream_of(docs):
        return [t for ids in tokenizer(docs)["input_ids"] for t in ids + [tokenizer.eos_token_id]]

    train_stream, heldout = stream_of(train_texts), stream_of(heldout_texts)[: args.eval_tokens]
    print(f"{len(train_stream)} training tokens, {len(heldout)} held-out tokens", flush=True)

    config = LlamaConfig(**MODEL, num_key_value_heads=MODEL["num_attention_heads"], max_position_embeddings=L)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    rng = random.Random(0)
    pre_losses, _ = train(base, lambda: crops(train_stream, rng, 8, L), args.pretrain_steps, 1e-3, f"pretrain @ {L}")
    lengths = [L, 2 * L, FACTOR * L]
    results = {"base": {n: perplexity(base, heldout, n) for n in lengths}}
    print("base", results["base"], flush=True)

    runs = []
    for seed in args.seeds:
        for s2 in (False, True):
            torch.manual_seed(seed + 1)  # the same adapter initialisation for both arms
            pi_config = pi_peft.PIConfig(
                scaling_factor=float(FACTOR),
                r=16,
                lora_alpha=32,
                lora_dropout=0.0,
                target_modules="all-linear",
                train_embeddings=True,
                train_norms=True,
                s2_attn=s2,
                s2_group_size_ratio=0.25,
            )
            model = get_peft_model(copy.deepcopy(base), pi_config)
            if seed == args.seeds[0] and not s2:
                results["pi, no fine-tuning"] = {n: perplexity(model.eval(), heldout, n) for n in lengths}
            data_rng = random.Random(seed + 100)  # the same batches for both arms
            model.train()
            training_attention = attention_implementation(model)
            label = f"seed {seed} {'s2' if s2 else 'full'}"
            losses, step_s = train(
                model,
                lambda rng=data_rng: crops(train_stream, rng, args.finetune_batch, FACTOR * L),
                args.finetune_steps,
                args.finetune_lr,
                label,
            )
            eval_attention = attention_implementation(model)
            ppl = {n: perplexity(model, heldout, n) for n in lengths}
            print(label, ppl, flush=True)
            runs.append(
                dict(
                    seed=seed,
                    s2_attn=s2,
                    training_attention=training_attention,
                    eval_attention=eval_attention,
                    final_train_loss=sum(losses[-20:]) / len(losses[-20:]),
                    median_step_s=step_s,
                    ppl=ppl,
                )
            )

    checks = {}
    for seed in args.seeds:
        full, s2 = (next(r for r in runs if r["seed"] == seed and r["s2_attn"] == f) for f in (False, True))
        ratio = s2["ppl"][FACTOR * L] / full["ppl"][FACTOR * L]
        checks[f"seed {seed}: ppl@{FACTOR * L} S² / full = {ratio:.4f} within 5 %"] = abs(ratio - 1) <= 0.05
    elapsed = time.time() - started

    head = ["model", "training attention"] + [f"ppl@{n}" for n in lengths] + ["final train loss", "step (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ppl in results.items():
        lines.append(f"| {name} | - | " + " | ".join(f"{ppl[n]:.3f}" for n in lengths) + " | - | - |")
    for r in runs:
        arm = f"PI + LoRA, seed {r['seed']}"
        attn = "S² (ratio 1/4)" if r["s2_attn"] else "full"
        cells = [arm, attn] + [f"{r['ppl'][n]:.3f}" for n in lengths]
        cells += [f"{r['final_train_loss']:.3f}", f"{r['median_step_s']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    summary = "\n".join(f"- {'PASS' if ok else 'FAIL'}: {claim}" for claim, ok in checks.items())
    report = (
        f"{table}\n\nEvaluated in eval mode (full attention: {sorted({r['eval_attention'] for r in runs})}); "
        f"trained with {sorted({r['training_attention'] for r in runs})}. {len(heldout)} held-out tokens, "
        f"non-overlapping windows. Pretraining {args.pretrain_steps} steps x 8 x {L} tokens (final loss "
        f"{sum(pre_losses[-20:]) / len(pre_losses[-20:]):.3f}); fine-tuning {args.finetune_steps} steps x "
        f"{args.finetune_batch} x {FACTOR * L} tokens, lr {args.finetune_lr}; {args.threads} thread(s); "
        f"{elapsed / 60:.1f} min in all.\n\n"
        f"{summary}\n"
    )
    print("\n" + report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(dict(args=vars(args), model=MODEL, L=L, results=results, runs=runs, checks=checks), f, indent=2)


if __name__ == "__main__":
    main()
