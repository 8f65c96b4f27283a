"""Shared fixtures of the training tests: a tiny Llama with its own tokenizer and a local long-document dataset."""

from __future__ import annotations

import os
import random

from pi_peft.data import write_jsonl
from pi_peft.tiny import save_tiny_checkpoint, train_tokenizer

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
