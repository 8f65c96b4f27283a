"""The Position Interpolation paper in miniature, on CPU, offline: ``pi-peft demo`` (``--quick`` for a smoke run).

1. Corpus: Python's own standard library sources (on every machine; the modules of ``sys.stdlib_module_names`` only,
   so nothing installed changes it; its sha256 is recorded and compared with the committed run's), split by file
   into train / held-out text, plus
   passkey documents (the prompt of :mod:`pi_peft.evaluation.passkey` followed by its answer) mixed into
   pretraining. A byte-level BPE tokenizer (2048 tokens, digit runs merged: a 5-digit key is 3-5 tokens) is trained
   on it.
2. Pretrain a small Llama at a short window ``L`` with Llama 2's ``rope_theta`` (10000), or load it from the user's
   cache directory (``$XDG_CACHE_HOME/pi_peft/demo/<hash of the pretraining settings and tokenizer>``, written
   atomically; the first run pretrains, a re-run skips it).
3. Extend it to ``4L`` five ways (:data:`ARMS`), all through pi_peft's own code path:
   ``extrapolation`` (the base as is), ``pi`` (``get_peft_model(base, PIConfig(scaling_factor=4))``, no training),
   ``direct-ft`` (the same LoRA + embeddings + norms adapter with ``scaling_factor=1``, i.e. no PI, fine-tuned at
   ``4L``), ``pi-ft`` (PI + LoRA + embeddings + norms, fine-tuned at ``4L``: the product) and ``pi-full-ft`` (PI +
   full fine-tuning: the paper's setting). Every fine-tuning gets the same batches (``4L`` crops of the training
   code; half of the rows start with a passkey document of up to ``4L`` tokens, the long-range dependencies that the
   paper's long fine-tuning documents carry; ``finetune_passkey_max_tokens=L`` asks instead whether retrieval taught
   only up to ``L`` generalises to ``4L``) and steps; passkey accuracy at ``L``, ``2L``, ``4L`` is probed at a few
   steps (learning curves).
4. Evaluate: perplexity (sliding window) at ``L``, ``2L``, ``4L`` on held-out files; passkey accuracy on a grid of
   lengths x needle depths, and ``k_max``; the paper's claims checked on these numbers. Prints the table and writes
   into ``--output-dir``: ``demo.json`` (settings, timings, every number), ``demo.md`` (the tables), and the
   evaluation files of :mod:`pi_peft.cli.eval` (``ppl.json/.md/.png``, ``passkey.json/.md/.png``).

Usage::

    pi-peft demo                # 9 min on 2 cores with the base cached; the first run also pretrains (~5 min)
    pi-peft demo --quick        # about a minute, a smoke test of the whole pipeline that claims nothing
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass

import torch

from .utils import atomic_write_text, write_json

# arm -> (RoPE scaling factor as a multiple of ``factor`` (0: none), fine-tuning: None, "lora" or "full")
ARMS = {
    "extrapolation": (0, None),
    "pi": (1, None),
    "direct-ft": (0, "lora"),
    "pi-ft": (1, "lora"),
    "direct-full-ft": (0, "full"),
    "pi-full-ft": (1, "full"),
}
DEMO_MODELS = ("extrapolation", "pi", "direct-ft", "pi-ft", "pi-full-ft")
CACHE_FORMAT = 1  # bump when the cached base's layout or the pretraining code changes
COMMITTED_RUN = "experiments/demo/run/demo.json"
COMMITTED_CORPUS = {  # the committed run's `corpus` (tests/test_demo.py checks it against that file)
    "implementation": "cpython",
    "python": "3.11.7",
    "seed": 0,
    "corpus_chars": 3_000_000,
    "sha256": "054fb7de112a5cf527fdddf776f89a76b4e831b6c6ff4f499c8cd7ea039e2783",
}


@dataclass
class DemoConfig:
    context_length: int = 128  # L, the pretraining window
    factor: int = 4  # extend to factor * L
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    rope_theta: float = 10000.0  # Llama 2's (round 3 of experiments/demo/EXPERIMENTS.md: 500 hides PI's result)
    vocab_size: int = 2048  # with merged digits: a 5-digit key is 3-5 tokens (round 4 of EXPERIMENTS.md)
    split_digits: bool = False  # True: one token per digit, as Llama 2 (PI + FT then never copied: rounds 1-3)
    corpus_chars: int = 3_000_000
    heldout_every: int = 10  # every 10th file is held out for perplexity
    pretrain_steps: int = 3000
    pretrain_batch: int = 8
    pretrain_lr: float = 1e-3
    passkey_fraction: float = 0.3  # of pretraining rows that start with a passkey document
    finetune_steps: int = 400
    finetune_batch: int = 8  # 8 x 4L tokens per step
    finetune_lr: float = 1e-3  # LoRA arms
    full_finetune_lr: float = 5e-4  # full fine-tuning arms
    finetune_passkey_fraction: float = 0.5  # rows of fine-tuning batches that start with a passkey document
    # longest passkey document in fine-tuning; None: 4L, so fine-tuning data spans the extended window as the paper's
    # long documents do; L (128) asks the stricter question whether retrieval taught only up to L generalises to 4L
    finetune_passkey_max_tokens: int | None = None
    lora_r: int = 16
    arms: tuple = DEMO_MODELS  # keys of ARMS, in table order
    curve_steps: tuple = (100, 200, 300)  # fine-tuning steps at which passkey at L, 2L, 4L is probed
    ppl_tokens: int = 16384  # held-out tokens scored at each length
    ppl_stride: int = 64
    passkey_depths: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)  # 0 = needle farthest from the question
    passkey_trials: int = 10
    passkey_step: int = 64  # passkey lengths L, L + step, ..., factor * L
    seed: int = 0
    threads: int = 2
    smoke: bool = False  # a smoke run (``--quick``): checks no claim and never touches the user's cache

    @property
    def target_length(self) -> int:
        return self.factor * self.context_length

    @property
    def passkey_lengths(self) -> list[int]:
        return list(range(self.context_length, self.target_length + 1, self.passkey_step))


def finetune_passkey_max(cfg: DemoConfig) -> int:
    """Longest passkey document in fine-tuning batches, in tokens (``None``: the extended window, 4L)."""
    return cfg.finetune_passkey_max_tokens or cfg.target_length


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
    curve_steps=(4,),
    ppl_tokens=2048,
    passkey_depths=(0.0, 1.0),
    passkey_trials=2,
    passkey_step=192,
    smoke=True,
)


# ---- data ----------------------------------------------------------------------------------------------------------
def stdlib_paths(root: str | None = None) -> list[str]:
    """The demo corpus's candidate files, by a rule that nothing installed can change: ``<stdlib>/<name>.py`` and
    ``<stdlib>/<name>/*.py`` for the top-level names of ``sys.stdlib_module_names`` (fixed by the Python version),
    without test modules. ``site-packages`` / ``dist-packages`` (and every other folder that ``pip install`` writes
    to) are not standard-library module names, so they never enter. Sorted; ``root`` defaults to this interpreter's
    ``sysconfig`` stdlib folder."""
    root = root or sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in sys.stdlib_module_names if "test" not in n.lower())
    paths = []
    for name in names:
        module = os.path.join(root, f"{name}.py")
        if os.path.isfile(module):
            paths.append(module)
        package = os.path.join(root, name)
        if os.path.isdir(package) and not os.path.islink(package):
            paths += sorted(glob.glob(os.path.join(package, "*.py")))
    return sorted(paths)


def stdlib_corpus(max_chars: int, seed: int, root: str | None = None) -> tuple[list[str], dict]:
    """Texts of standard-library files (:func:`stdlib_paths`; files under 2000 characters skipped), shuffled with
    ``seed``, up to ``max_chars``; and the corpus's identity: Python version, file count, characters and a sha256 of
    the files used (their paths relative to the stdlib folder and their contents, in order)."""
    root = root or sysconfig.get_paths()["stdlib"]
    paths = stdlib_paths(root)
    random.Random(seed).shuffle(paths)
    texts, total, digest = [], 0, hashlib.sha256()
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if len(text) < 2000:
            continue
        texts.append(text)
        relative = os.path.relpath(path, root).replace(os.sep, "/")
        digest.update(f"{relative}\0{len(text)}\0".encode() + text.encode("utf-8", errors="replace"))
        total += len(text)
        if total >= max_chars:
            break
    identity = {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "files": len(texts),
        "chars": total,
        "sha256": digest.hexdigest(),
    }
    return texts, identity


def stdlib_files(max_chars: int, seed: int) -> list[str]:
    """The texts of :func:`stdlib_corpus` (without its identity)."""
    return stdlib_corpus(max_chars, seed)[0]


def corpus_note(corpus: dict, cfg: DemoConfig) -> str:
    """One line: which corpus this run used and whether it is the committed run's (so its numbers can be compared)."""
    committed = COMMITTED_CORPUS
    what = (
        f"Corpus: {corpus['files']} standard-library files of {corpus['implementation']} {corpus['python']}, "
        f"{corpus['chars']:,} characters, sha256 {corpus['sha256'][:16]}"
    )
    if (cfg.seed, cfg.corpus_chars) != (committed["seed"], committed["corpus_chars"]):
        return f"{what} (other `seed` / `corpus_chars` than the committed run: not comparable with its table)."
    if corpus["sha256"] == committed["sha256"]:
        return f"{what}: the committed run's corpus ({COMMITTED_RUN}), so its numbers are comparable."
    return (
        f"{what}: NOT the committed run's corpus ({committed['implementation']} {committed['python']}, sha256 "
        f"{committed['sha256'][:16]}; {COMMITTED_RUN}), so these numbers are not comparable with the committed "
        "table (another Python version has other standard-library sources)."
    )


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
    ``passkey_max`` tokens (L in pretraining; in fine-tuning :func:`finetune_passkey_max`)."""
    rows = []
    for _ in range(batch):
        row = passkey_document(tokenizer, rng, passkey_max) if rng.random() < passkey_fraction else []
        start = rng.randrange(0, len(stream) - length)
        rows.append((row + stream[start : start + length])[:length])
    return torch.tensor(rows, dtype=torch.long)


# ---- training ------------------------------------------------------------------------------------------------------
def train(
    model,
    batches,
    steps: int,
    lr: float,
    label: str,
    log_every: int = 100,
    probe_steps=(),
    probe=None,
    step_times: list | None = None,
) -> list[float]:
    """AdamW with linear warmup and cosine decay; returns the loss of every step. ``probe(model, step)`` is called
    (in eval mode, without gradients) after each step number in ``probe_steps``; ``step_times``, when given, gets the
    wall-clock seconds of each step (forward, backward, optimizer; not the batch)."""
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
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step_times is not None:
            step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            tqdm.write(f"{label} step {step}: loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.3f}")
        if probe is not None and step + 1 in probe_steps:
            model.eval()
            with torch.no_grad():
                probe(model, step + 1)
            model.train()
    model.eval()
    return losses


def pi_adapter(base, cfg: DemoConfig, scaling_factor: float, rope_type: str = "linear"):
    """The demo's adapter through pi_peft's real path: LoRA on all linear layers + embeddings + norms (on a copy of
    ``base``); ``rope_type`` other than PI's ``"linear"`` for the variants of ``experiments/demo``."""
    from peft import get_peft_model

    from . import PIConfig

    config = PIConfig(
        scaling_factor=scaling_factor,
        rope_type=rope_type,
        r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        target_modules="all-linear",
        train_embeddings=True,
        train_norms=True,
    )
    return get_peft_model(copy.deepcopy(base), config)


def arm_model(base, cfg: DemoConfig, name: str):
    """``name``'s model before fine-tuning (see :data:`ARMS`): the base, the PI / direct adapter, or, for full
    fine-tuning, the PI adapter merged into a copy of the base (pi_peft keeps the merged adapter's RoPE) with every
    weight trainable."""
    if name not in ARMS:
        raise ValueError(f"`arms` contains {name!r}; choose from {sorted(ARMS)}.")
    scaled, tuning = ARMS[name]
    factor = float(cfg.factor) if scaled else 1.0
    if name == "extrapolation":
        return base
    model = pi_adapter(base, cfg, factor)
    if tuning == "full":
        model = model.merge_and_unload()
        model.requires_grad_(True)
    return model


def finetune_arm(cfg: DemoConfig, data: dict, model, name: str) -> tuple[list[float], list[dict]]:
    """Fine-tune ``model`` at 4L on the demo's fine-tuning batches (the same for every arm: seed ``seed + 1``);
    returns the losses and the learning curve (passkey accuracy at L, 2L, 4L after each of ``curve_steps``)."""
    from .evaluation.passkey import evaluate_passkey

    L, T = cfg.context_length, cfg.target_length
    rng = random.Random(cfg.seed + 1)
    curve = []

    def probe(model, step):
        pk = evaluate_passkey(
            model, data["tokenizer"], [L, 2 * L, T], cfg.passkey_depths, cfg.passkey_trials, cfg.seed + 2
        )
        curve.append({"step": step, "accuracy_by_length": {str(k): v for k, v in pk.accuracy_by_length.items()}})
        print(f"  {name} step {step}: passkey {pk.accuracy_by_length}")

    losses = train(
        model,
        lambda: make_batch(
            data["train"],
            data["tokenizer"],
            rng,
            cfg.finetune_batch,
            T,
            cfg.finetune_passkey_fraction,
            finetune_passkey_max(cfg),
        ),
        cfg.finetune_steps,
        cfg.full_finetune_lr if ARMS[name][1] == "full" else cfg.finetune_lr,
        f"fine-tune {name} @ {T}",
        probe_steps=[s for s in cfg.curve_steps if s < cfg.finetune_steps],
        probe=probe,
    )
    return losses, curve


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


def curve_table(curves: dict, cfg: DemoConfig) -> str:
    """Passkey accuracy at L / 2L / 4L during fine-tuning (the last column is the final model)."""
    L, T = cfg.context_length, cfg.target_length
    steps = sorted({c["step"] for curve in curves.values() for c in curve["probes"]})
    head = ["model"] + [f"step {s}" for s in steps] + [f"step {cfg.finetune_steps}"]
    lines = [f"Passkey accuracy at {L} / {2 * L} / {T} tokens during fine-tuning:", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, curve in curves.items():
        cells = [name]
        for acc in [c["accuracy_by_length"] for c in curve["probes"]] + [curve["final"]]:
            cells.append(" / ".join(f"{acc[str(n)]:.2f}" if str(n) in acc else "-" for n in (L, 2 * L, T)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


BASE_RETRIEVES = "the base retrieves at L (k_max >= L), so the passkey claims can be tested"


def claims(results: dict, cfg: DemoConfig) -> dict[str, bool]:
    """The paper's claims, checked on the measured numbers of the arms that ran (none for a smoke run)."""
    if cfg.smoke:
        return {}

    def ppl(name, n):
        return {p["context_length"]: p["ppl"] for p in results[name]["ppl"]}[n]

    def k_max(name):
        return results[name]["passkey"]["k_max"]

    L, T = cfg.context_length, cfg.target_length
    checks = {}
    if "extrapolation" in results:  # the base itself: retrieval must exist at L before PI can keep it to 4L
        checks[BASE_RETRIEVES] = k_max("extrapolation") >= L
        checks["extrapolation blows up past L (ppl@4L > 2 x ppl@L)"] = ppl("extrapolation", T) > 2 * ppl(
            "extrapolation", L
        )
    for name, label in (("pi-full-ft", "PI + full FT (the paper's)"), ("pi-ft", "PI + LoRA FT (pi_peft's)")):
        if name in results:
            checks[f"{label} ppl@4L <= ppl@L"] = ppl(name, T) <= ppl(name, L)
            checks[f"{label} passkey holds to 4L (k_max = 4L)"] = k_max(name) == T
    if "direct-ft" in results:
        checks["direct FT k_max well below 4L (<= 3L)"] = k_max("direct-ft") <= 3 * L
    return checks


# ---- main ----------------------------------------------------------------------------------------------------------
def prepare_data(cfg: DemoConfig, rng: random.Random) -> dict:
    """Tokenizer (trained on the pretraining mix), the training token stream and the held-out stream."""
    from .evaluation.passkey import build_prompt, random_key
    from .testing import train_tokenizer

    texts, corpus = stdlib_corpus(cfg.corpus_chars, cfg.seed)
    train_texts = [t for i, t in enumerate(texts) if i % cfg.heldout_every]
    heldout_texts = [t for i, t in enumerate(texts) if i % cfg.heldout_every == 0]
    # the tokenizer sees the pretraining mix: code plus passkey prompts in the same share of characters
    n_samples = int(cfg.passkey_fraction * sum(map(len, train_texts)) / 600)
    samples = [build_prompt(random_key(rng), rng.randint(0, 20), rng.randint(0, 20)) for _ in range(n_samples)]
    tokenizer = train_tokenizer(train_texts + samples, vocab_size=cfg.vocab_size, split_digits=cfg.split_digits)

    def stream_of(docs):
        return [t for ids in tokenizer(docs)["input_ids"] for t in ids + [tokenizer.eos_token_id]]

    heldout = stream_of(heldout_texts)[: cfg.ppl_tokens + cfg.target_length]
    return {"tokenizer": tokenizer, "train": stream_of(train_texts), "heldout": heldout, "corpus": corpus}


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


PRETRAIN_FIELDS = (
    "context_length",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rope_theta",
    "vocab_size",
    "corpus_chars",
    "heldout_every",
    "pretrain_steps",
    "pretrain_batch",
    "pretrain_lr",
    "passkey_fraction",
    "seed",
)


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/pi_peft/demo`` (``~/.cache/pi_peft/demo`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "pi_peft", "demo")


def base_cache_key(cfg: DemoConfig, tokenizer, corpus_sha256: str) -> str:
    """A hash of everything the pretrained base depends on: the pretraining fields, the corpus and the tokenizer
    trained on it, plus :data:`CACHE_FORMAT`."""
    settings = {k: getattr(cfg, k) for k in PRETRAIN_FIELDS}
    if not cfg.split_digits:  # only when off, so that bases cached before the option existed keep their keys
        settings["split_digits"] = False
    payload = json.dumps({"format": CACHE_FORMAT, "settings": settings, "corpus": corpus_sha256}, sort_keys=True)
    payload += tokenizer.backend_tokenizer.to_str()
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pretrained_base(cfg: DemoConfig, data: dict, rng: random.Random, cache_dir: str | None):
    """The pretrained base and ``{"final_loss", "pretrain_s", "cached", "path"}``: loaded from
    ``cache_dir/<base_cache_key>`` when it holds one, else pretrained (and saved there atomically: a complete
    directory or none). ``cache_dir=None`` neither reads nor writes a cache."""
    from transformers import AutoModelForCausalLM

    key = base_cache_key(cfg, data["tokenizer"], data["corpus"]["sha256"])
    path = os.path.join(cache_dir, key) if cache_dir else None
    if path and os.path.isfile(os.path.join(path, "pretrain.json")):
        with open(os.path.join(path, "pretrain.json")) as f:
            info = json.load(f)
        base = AutoModelForCausalLM.from_pretrained(path).eval()
        print(f"Pretrained base loaded from {path} (delete it to pretrain again)")
        return base, {**info, "cached": True, "path": path}
    t = time.time()
    base, losses = pretrain(cfg, data, rng)
    info = {"final_loss": sum(losses[-20:]) / len(losses[-20:]), "pretrain_s": round(time.time() - t, 1)}
    if path:
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        base.save_pretrained(tmp)  # safetensors
        write_json(
            os.path.join(tmp, "pretrain.json"), {**info, "settings": {k: getattr(cfg, k) for k in PRETRAIN_FIELDS}}
        )
        try:
            os.replace(tmp, path)  # atomic: another run may have finished first, then keep its copy
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"Pretrained base cached in {path}")
    return base, {**info, "cached": False, "path": path}


def extend(cfg: DemoConfig, data: dict, base, timings: dict) -> tuple[dict, dict, dict]:
    """The ways to 4L in ``cfg.arms``: ``{name: model}``, the fine-tuning losses and learning curves of the
    fine-tuned arms."""
    models, losses, curves = {}, {}, {}
    for name in cfg.arms:
        torch.manual_seed(cfg.seed + 1)  # the same adapter initialisation for every arm
        models[name] = arm_model(base, cfg, name)
        if ARMS[name][1] is not None:
            t = time.time()
            losses[name], curves[name] = finetune_arm(cfg, data, models[name], name)
            timings[f"finetune {name}"] = time.time() - t
    return models, losses, curves


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


def run_demo(cfg: DemoConfig, output_dir: str, cache_dir: str | None = "auto") -> dict:
    """The whole demo; ``cache_dir`` holds pretrained bases (``"auto"``: :func:`default_cache_dir`, or none for a
    smoke run; ``None``: no cache)."""
    from .evaluation.report import write_passkey_report, write_ppl_report

    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"`arms` contains {unknown}; choose from {sorted(ARMS)}.")
    if cache_dir == "auto":
        cache_dir = None if cfg.smoke else default_cache_dir()
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    timings: dict[str, float] = {}
    data = prepare_data(cfg, rng)
    timings["data"] = time.time() - t0
    t = time.time()
    base, pre_info = pretrained_base(cfg, data, rng, cache_dir)
    timings["pretrain (cached)" if pre_info["cached"] else "pretrain"] = time.time() - t
    models, ft_losses, curves = extend(cfg, data, base, timings)
    results, ppl_all, pk_all = evaluate_models(cfg, data, models, timings)
    for name, curve in curves.items():
        curves[name] = {"probes": curve, "final": results[name]["passkey"]["accuracy_by_length"]}
    checks = claims(results, cfg)
    timings["total"] = time.time() - t0

    L, T = cfg.context_length, cfg.target_length
    n_params = sum(p.numel() for p in base.parameters())
    summary = {
        "settings": {**asdict(cfg), "passkey_lengths": cfg.passkey_lengths, "target_length": T},
        "corpus": data["corpus"],
        "model_parameters": n_params,
        "pretrain_final_loss": pre_info["final_loss"],
        "pretrain_cached": pre_info["cached"],
        "pretrain_s_when_trained": pre_info["pretrain_s"],
        "finetune_final_loss": {k: sum(v[-10:]) / len(v[-10:]) for k, v in ft_losses.items()},
        "results": results,
        "learning_curves": curves,
        "smoke_run": cfg.smoke,
        "claims": None if cfg.smoke else checks,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
    }
    tuned = [n for n in cfg.arms if ARMS[n][1] is not None]
    if cfg.smoke:
        claim_text = (
            "Smoke run (`--quick`): too small a model, trained too briefly, to test the paper; no claim is checked.\n"
        )
    else:
        claim_lines = "\n".join(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items())
        claim_text = f"Paper's claims on this run:\n\n{claim_lines}\n"
        if checks.get(BASE_RETRIEVES) is False:  # e.g. another --seed: copying did not emerge in pretraining
            claim_text += (
                "\nThe pretrained base does not retrieve a passkey even at L, so the passkey claims say nothing about "
                "PI here; at this scale copying emerges in pretraining for some seeds only (round 5 of "
                "experiments/demo/EXPERIMENTS.md): try another `--seed`.\n"
            )
    pre = (
        f"base loaded from the cache (pretraining took {pre_info['pretrain_s']:.0f} s when it ran)"
        if pre_info["cached"]
        else f"pretraining {timings['pretrain']:.0f} s"
    )
    n_threads = torch.get_num_threads()
    markdown = (
        f"{corpus_note(data['corpus'], cfg)}\n\n"
        f"Pretrained at L={L} (rope_theta {cfg.rope_theta:g}, {n_params / 1e6:.2f}M parameters, {cfg.pretrain_steps} "
        f"steps), extended to {T} ({cfg.finetune_steps} fine-tuning steps each for {', '.join(tuned)}; passkey "
        f"documents in fine-tuning up to {finetune_passkey_max(cfg)} tokens). "
        f"Wall time {timings['total']:.0f} s on {n_threads} thread{'s' * (n_threads > 1)} ({pre}).\n\n"
        f"{demo_table(results, cfg)}\n\n{depth_table(results, cfg)}\n\n{curve_table(curves, cfg)}\n\n{claim_text}"
    )
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "demo.json"), summary)
    atomic_write_text(os.path.join(output_dir, "demo.md"), markdown)
    ppl_models = {n: {"model": n, "results": v} for n, v in ppl_all.items()}
    write_ppl_report(output_dir, ppl_models, {"stride": cfg.ppl_stride, "tokens": cfg.ppl_tokens})
    write_passkey_report(output_dir, {n: {"model": n, **v} for n, v in pk_all.items()}, {"seed": cfg.seed + 2})
    print()
    print(markdown)
    print(f"Results written to {output_dir}/")
    return summary
