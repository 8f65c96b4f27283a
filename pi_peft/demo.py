"""The Position Interpolation paper in miniature, on CPU, offline: ``pi-peft demo`` (``--quick`` for a smoke run).

1. Corpus: Python's own standard library sources (on every machine), split by file into train / held-out text, plus
   passkey documents (the prompt of :mod:`pi_peft.evaluation.passkey` followed by its answer) mixed into
   pretraining. A byte-level BPE tokenizer with one token per digit is trained on it.
2. Pretrain a small Llama at a short window ``L`` (``rope_theta`` scaled down so that ``L / rope_theta`` is close to
   Llama 2's ``4096 / 10000``: the low-frequency RoPE dimensions matter as they do at full scale).
3. Extend it to ``4L`` four ways, all through pi_peft's own code path:
   ``extrapolation`` (the base as is), ``pi`` (``get_peft_model(base, PIConfig(scaling_factor=4))``, no training),
   ``direct-ft`` (the same LoRA + embeddings + norms adapter with ``scaling_factor=1``, i.e. no PI, fine-tuned at
   ``4L``) and ``pi-ft`` (PI + LoRA + embeddings + norms, fine-tuned at ``4L``). Both fine-tunings get the same batches
   (``4L`` crops of the training code; half of the rows start with a passkey document of at most ``L`` tokens, a
   replay of the pretraining mix, so that no model is ever trained to retrieve past ``L``), steps and learning rate.
4. Evaluate: perplexity (sliding window) at ``L``, ``2L``, ``4L`` on held-out files; passkey accuracy on a grid of
   lengths x needle depths, and ``k_max``. Prints the table and writes into ``--output-dir``:
   ``demo.json`` (settings, timings, every number), ``demo.md`` (the table), and the evaluation files of
   :mod:`pi_peft.evaluation.cli` (``ppl.json/.md/.png``, ``passkey.json/.md/.png``).

Usage::

    pi-peft demo                # about 6-8 minutes on 2 CPU cores
    pi-peft demo --quick        # under 2 minutes, a smoke test of the whole pipeline
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import random
import sysconfig
import time
from dataclasses import asdict, dataclass, replace

import torch

DEMO_MODELS = ("extrapolation", "pi", "direct-ft", "pi-ft")


@dataclass
class DemoConfig:
    context_length: int = 128  # L, the pretraining window
    factor: int = 4  # extend to factor * L
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    rope_theta: float = 500.0  # L / theta ~ Llama 2's 4096 / 10000
    vocab_size: int = 1024
    corpus_chars: int = 3_000_000
    heldout_every: int = 10  # every 10th file is held out for perplexity
    pretrain_steps: int = 1000
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    passkey_fraction: float = 0.5  # of pretraining rows that start with a passkey document
    finetune_steps: int = 120
    finetune_batch: int = 4  # 4 x 4L tokens = pretraining tokens per step
    finetune_lr: float = 1e-3
    finetune_passkey_fraction: float = 0.5  # replay of the pretraining mix: passkey documents of at most L tokens
    finetune_passkey_max_tokens: int = 0  # 0: L (never teach retrieval past L); 4L teaches it directly
    lora_r: int = 16
    ppl_tokens: int = 16384  # held-out tokens scored at each length
    ppl_stride: int = 64
    passkey_depths: tuple = (0.0, 0.25, 0.5, 0.75)  # 1.0 (needle next to the question) tests no long context
    passkey_trials: int = 4
    passkey_step: int = 64  # passkey lengths L, L + step, ..., factor * L
    seed: int = 0
    threads: int = 2

    @property
    def target_length(self) -> int:
        return self.factor * self.context_length

    @property
    def passkey_lengths(self) -> list[int]:
        return list(range(self.context_length, self.target_length + 1, self.passkey_step))


QUICK = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    vocab_size=512,
    corpus_chars=400_000,
    pretrain_steps=40,
    pretrain_batch=8,
    finetune_steps=8,
    finetune_batch=2,
    ppl_tokens=2048,
    passkey_depths=(0.0, 1.0),
    passkey_trials=2,
    passkey_step=192,
)


# ---- data ----------------------------------------------------------------------------------------------------------
def stdlib_files(max_chars: int, seed: int) -> list[str]:
    """Texts of Python standard-library ``.py`` files (no tests), shuffled with ``seed``, up to ``max_chars``."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py")))
    paths = [p for p in paths if "test" not in os.path.relpath(p, root).split(os.sep)[0].lower()]
    random.Random(seed).shuffle(paths)
    texts, total = [], 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if len(text) < 2000:
            continue
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


def passkey_document(tokenizer, rng: random.Random, max_tokens: int) -> list[int]:
    """A passkey prompt of random length and depth followed by its answer, at most ``max_tokens`` tokens."""
    from .evaluation.passkey import build_prompt, fit_prompt, random_key

    key = random_key(rng)
    answer = f" {key}."
    budget = max_tokens - len(tokenizer(answer)["input_ids"]) - 1
    shortest = len(tokenizer(build_prompt(key, 0, 0))["input_ids"])
    prompt = fit_prompt(tokenizer, key, rng.randint(shortest, budget), rng.random())
    return tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id]


def make_batch(
    stream: list[int],
    tokenizer,
    rng: random.Random,
    batch: int,
    length: int,
    passkey_fraction: float,
    passkey_max: int,
):
    """``(batch, length)`` ids: random crops of ``stream``; a share of rows starts with a passkey document of at most
    ``passkey_max`` tokens (the pretraining window, also when fine-tuning: no model is taught retrieval past L)."""
    rows = []
    for _ in range(batch):
        row = passkey_document(tokenizer, rng, passkey_max) if rng.random() < passkey_fraction else []
        start = rng.randrange(0, len(stream) - length)
        rows.append((row + stream[start : start + length])[:length])
    return torch.tensor(rows, dtype=torch.long)


# ---- training ------------------------------------------------------------------------------------------------------
def train(model, batches, steps: int, lr: float, label: str, log_every: int = 100) -> list[float]:
    """AdamW with linear warmup and cosine decay; returns the loss of every step."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=label, leave=False)
    for step in bar:
        ids = batches()  # (B, T)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            tqdm.write(f"{label} step {step}: loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.3f}")
    model.eval()
    return losses


def pi_adapter(base, cfg: DemoConfig, scaling_factor: float):
    """The demo's adapter through pi_peft's real path: LoRA on all linear layers + embeddings + norms."""
    from peft import get_peft_model

    from . import PIConfig

    config = PIConfig(
        scaling_factor=scaling_factor,
        r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        target_modules="all-linear",
        train_embeddings=True,
        train_norms=True,
    )
    return get_peft_model(copy.deepcopy(base), config)


# ---- report --------------------------------------------------------------------------------------------------------
def demo_table(results: dict, cfg: DemoConfig) -> str:
    lengths = [cfg.context_length, 2 * cfg.context_length, cfg.target_length]
    pk = cfg.passkey_lengths
    head = ["model"] + [f"ppl@{n}" for n in lengths] + [f"passkey@{n}" for n in pk] + ["k_max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        ppl = {p["context_length"]: p["ppl"] for p in r["ppl"]}
        acc = r["passkey"]["accuracy_by_length"]
        cells = [name] + [f"{ppl[n]:.2f}" if ppl[n] < 1e4 else f"{ppl[n]:.2e}" for n in lengths]
        cells += [f"{acc[str(n)]:.2f}" for n in pk] + [str(r["passkey"]["k_max"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def depth_table(results: dict, cfg: DemoConfig) -> str:
    """Passkey accuracy at the longest length, per needle depth (0 = needle farthest from the question)."""
    depths = list(cfg.passkey_depths)
    head = ["model"] + [f"depth {d:g}" for d in depths]
    lines = [f"Passkey accuracy at {cfg.target_length} tokens by needle depth:", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        row = r["passkey"]["accuracy"][-1]
        lines.append("| " + " | ".join([name] + [f"{a:.2f}" for a in row]) + " |")
    return "\n".join(lines)


def claims(results: dict, cfg: DemoConfig) -> dict[str, bool]:
    """The paper's claims, checked on the measured numbers."""

    def ppl(name, n):
        return {p["context_length"]: p["ppl"] for p in results[name]["ppl"]}[n]

    L, T = cfg.context_length, cfg.target_length
    return {
        "extrapolation blows up past L (ppl@4L > 2 x ppl@L)": ppl("extrapolation", T) > 2 * ppl("extrapolation", L),
        "PI+FT ppl@4L <= ppl@L": ppl("pi-ft", T) <= ppl("pi-ft", L),
        "PI+FT passkey holds to 4L (k_max = 4L)": results["pi-ft"]["passkey"]["k_max"] == T,
        "direct FT k_max well below 4L (<= 3L)": results["direct-ft"]["passkey"]["k_max"] <= 3 * L,
    }


# ---- main ----------------------------------------------------------------------------------------------------------
def prepare_data(cfg: DemoConfig, rng: random.Random) -> dict:
    """Tokenizer (trained on the pretraining mix), the training token stream and the held-out stream."""
    from .evaluation.passkey import build_prompt, random_key
    from .tiny import train_tokenizer

    texts = stdlib_files(cfg.corpus_chars, cfg.seed)
    train_texts = [t for i, t in enumerate(texts) if i % cfg.heldout_every]
    heldout_texts = [t for i, t in enumerate(texts) if i % cfg.heldout_every == 0]
    # the tokenizer sees the pretraining mix: code plus passkey prompts in the same share of characters
    n_samples = int(cfg.passkey_fraction * sum(map(len, train_texts)) / 600)
    samples = [build_prompt(random_key(rng), rng.randint(0, 20), rng.randint(0, 20)) for _ in range(n_samples)]
    tokenizer = train_tokenizer(train_texts + samples, vocab_size=cfg.vocab_size)

    def stream_of(docs):
        return [t for ids in tokenizer(docs)["input_ids"] for t in ids + [tokenizer.eos_token_id]]

    heldout = stream_of(heldout_texts)[: cfg.ppl_tokens + cfg.target_length]
    return {"tokenizer": tokenizer, "train": stream_of(train_texts), "heldout": heldout}


def pretrain(cfg: DemoConfig, data: dict, rng: random.Random):
    """A small Llama trained from scratch at window L on the pretraining mix; returns ``(model, losses)``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer, L = data["tokenizer"], cfg.context_length
    model_config = LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=L,
        rope_theta=cfg.rope_theta,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_config(model_config)
    losses = train(
        base,
        lambda: make_batch(data["train"], tokenizer, rng, cfg.pretrain_batch, L, cfg.passkey_fraction, L),
        cfg.pretrain_steps,
        cfg.pretrain_lr,
        f"pretrain @ {L}",
    )
    return base, losses


def extend(cfg: DemoConfig, data: dict, base, timings: dict) -> tuple[dict, dict]:
    """The four ways to 4L: ``{name: model}`` and the fine-tuning losses of ``direct-ft`` and ``pi-ft``."""
    models = {"extrapolation": base, "pi": pi_adapter(base, cfg, cfg.factor)}
    losses = {}
    for name, factor in (("direct-ft", 1.0), ("pi-ft", float(cfg.factor))):
        torch.manual_seed(cfg.seed + 1)
        ft_rng = random.Random(cfg.seed + 1)  # the same batches for both
        model = pi_adapter(base, cfg, factor)
        t = time.time()
        losses[name] = train(
            model,
            lambda r=ft_rng: make_batch(
                data["train"],
                data["tokenizer"],
                r,
                cfg.finetune_batch,
                cfg.target_length,
                cfg.finetune_passkey_fraction,
                cfg.finetune_passkey_max_tokens or cfg.context_length,
            ),
            cfg.finetune_steps,
            cfg.finetune_lr,
            f"fine-tune {name} @ {cfg.target_length}",
        )
        timings[f"finetune {name}"] = time.time() - t
        models[name] = model
    return models, losses


def evaluate_models(cfg: DemoConfig, data: dict, models: dict, timings: dict) -> tuple[dict, dict, dict]:
    """Perplexity at L, 2L, 4L and the passkey grid for every model."""
    from .evaluation.passkey import evaluate_passkey
    from .evaluation.perplexity import perplexity_by_length

    L, T = cfg.context_length, cfg.target_length
    results, ppl_all, pk_all = {}, {}, {}
    for name, model in models.items():
        t = time.time()
        ppl = perplexity_by_length(model, [data["heldout"]], [L, 2 * L, T], stride=cfg.ppl_stride, batch_size=8)
        pk = evaluate_passkey(
            model, data["tokenizer"], cfg.passkey_lengths, cfg.passkey_depths, cfg.passkey_trials, seed=cfg.seed + 2
        )
        timings[f"eval {name}"] = time.time() - t
        ppl_all[name] = [p.to_dict() for p in ppl]
        pk_all[name] = pk.to_dict()
        results[name] = {"ppl": ppl_all[name], "passkey": {k: v for k, v in pk_all[name].items() if k != "records"}}
        print(f"{name}: ppl {[round(p.ppl, 2) for p in ppl]}, passkey {pk.accuracy_by_length}, k_max {pk.k_max}")
    return results, ppl_all, pk_all


def run_demo(cfg: DemoConfig, output_dir: str) -> dict:
    from .evaluation.report import atomic_write_text, write_passkey_report, write_ppl_report

    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    timings: dict[str, float] = {}
    data = prepare_data(cfg, rng)
    timings["data"] = time.time() - t0
    t = time.time()
    base, pre_losses = pretrain(cfg, data, rng)
    timings["pretrain"] = time.time() - t
    models, ft_losses = extend(cfg, data, base, timings)
    results, ppl_all, pk_all = evaluate_models(cfg, data, models, timings)
    checks = claims(results, cfg)
    timings["total"] = time.time() - t0

    L, T = cfg.context_length, cfg.target_length
    n_params = sum(p.numel() for p in base.parameters())
    summary = {
        "settings": {**asdict(cfg), "passkey_lengths": cfg.passkey_lengths, "target_length": T},
        "model_parameters": n_params,
        "pretrain_final_loss": sum(pre_losses[-20:]) / len(pre_losses[-20:]),
        "finetune_final_loss": {k: sum(v[-10:]) / len(v[-10:]) for k, v in ft_losses.items()},
        "results": results,
        "claims": checks,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
    }
    claim_lines = "\n".join(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items())
    markdown = (
        f"Pretrained at L={L} ({n_params / 1e6:.2f}M parameters), extended to {T} "
        f"({cfg.finetune_steps} fine-tuning steps each for direct-ft and pi-ft). "
        f"Wall time {timings['total']:.0f} s on {torch.get_num_threads()} threads.\n\n"
        f"{demo_table(results, cfg)}\n\n{depth_table(results, cfg)}\n\nPaper's claims on this run:\n\n{claim_lines}\n"
    )
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, "demo.json"), json.dumps(summary, indent=2) + "\n")
    atomic_write_text(os.path.join(output_dir, "demo.md"), markdown)
    ppl_models = {n: {"model": n, "results": v} for n, v in ppl_all.items()}
    write_ppl_report(output_dir, ppl_models, {"stride": cfg.ppl_stride, "tokens": cfg.ppl_tokens})
    write_passkey_report(output_dir, {n: {"model": n, **v} for n, v in pk_all.items()}, {"seed": cfg.seed + 2})
    print()
    print(markdown)
    print(f"Results written to {output_dir}/")
    return summary


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pi-peft demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny, fast run of the whole pipeline (< 2 minutes)")
    parser.add_argument("--output-dir", default=None, help="default: outputs/demo (outputs/demo-quick with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the demo is timed on 2)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a DemoConfig field (experiments)"
    )
    args = parser.parse_args(argv)
    cfg = replace(DemoConfig(**(QUICK if args.quick else {})), seed=args.seed, threads=args.threads)
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in DemoConfig.__dataclass_fields__:
            raise ValueError(
                f"`--set {item}`: unknown field {name!r}; fields: {sorted(DemoConfig.__dataclass_fields__)}."
            )
        cfg = replace(cfg, **{name: type(getattr(cfg, name))(json.loads(value))})
    output_dir = args.output_dir or ("outputs/demo-quick" if args.quick else "outputs/demo")
    run_demo(cfg, output_dir)
    return 0
