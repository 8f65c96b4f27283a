"""Shared fixtures of the training tests: a tiny Llama with its own tokenizer and a local long-document dataset."""

from __future__ import annotations

import os
import random

from pi_peft.testing import save_tiny_checkpoint, train_tokenizer
from pi_peft.training.data import write_jsonl

WORDS = "the a river stone light old house road winter letter garden morning city window quiet story".split()


def documents(n: int, words_per_doc: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_doc)) + "." for _ in range(n)]


def make_tiny_llama(path: str) -> str:
    """A locally saved tiny Llama (window L = 64) with a byte-level BPE tokenizer trained on `documents`."""
    tokenizer = train_tokenizer(documents(50, 200), vocab_size=256)
    save_tiny_checkpoint(path, "llama", seed=0, tokenizer=tokenizer)
    return str(path)


def make_jsonl(path: str, n_docs: int = 12, words_per_doc: int = 150, seed: int = 1) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return write_jsonl(({"text": t} for t in documents(n_docs, words_per_doc, seed)), path)


def tiny_sft_trainer(tmp_path, tokenizer, peft_config, train_dataset, *, eval_dataset=None, **sft_args):
    """trl's `SFTTrainer` on a fresh tiny Llama sized to `tokenizer`, on CPU, no logging or saving; `sft_args`
    override `SFTConfig` (e.g. `max_steps`, `max_length`, `packing`)."""
    from trl import SFTConfig, SFTTrainer

    from pi_peft.testing import tiny_model

    defaults = dict(per_device_train_batch_size=2, use_cpu=True, bf16=False, report_to="none", save_strategy="no")
    return SFTTrainer(
        model=tiny_model("llama", vocab_size=len(tokenizer)),
        args=SFTConfig(output_dir=str(tmp_path), **{**defaults, **sft_args}),
        processing_class=tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )
