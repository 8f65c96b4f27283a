"""Shared fixtures for the evaluation tests: a tiny tokenizer (one token per digit) and a tiny checkpoint using it."""

from __future__ import annotations

import pytest

from pi_peft.evaluation.passkey import FILLER, QUESTION, TASK_DESCRIPTION, needle

CORPUS = [TASK_DESCRIPTION, FILLER * 20, needle("12345"), QUESTION, "def f(x):\n    return x + 1\n" * 20]


@pytest.fixture(scope="session")
def eval_tokenizer():
    from pi_peft.testing import train_tokenizer

    return train_tokenizer(CORPUS * 5, vocab_size=400)


@pytest.fixture(scope="session")
def eval_checkpoint(tmp_path_factory, eval_tokenizer):
    """A tiny Llama saved with the tokenizer above, usable as ``--model PATH``."""
    from pi_peft.testing import save_tiny_checkpoint

    path = tmp_path_factory.mktemp("eval-tiny")
    save_tiny_checkpoint(path, "llama", seed=0, tokenizer=eval_tokenizer)
    return str(path)
