"""Passkey retrieval (Mohtashami & Jaggi 2023), as used by the Position Interpolation paper.

A random 5-digit key is hidden at a chosen depth inside repeated filler text; the model must repeat it after the
question. Decoding is greedy and a trial counts only on an exact match. A grid of prompt lengths (in tokens of the
model's own tokenizer) x needle depths with ``trials`` keys per cell gives an accuracy per cell, and the paper's
*effective context window* ``k_max``: the largest tested length such that every tested length up to it succeeds at
least 20% of the time.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..utils import check_positive_int, is_positive_int

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLER_SENTENCES = tuple(s.strip() + "." for s in FILLER.split(".") if s.strip())  # 5 sentences, the unit of length
QUESTION = "What is the pass key? The pass key is"
K_MAX_THRESHOLD = 0.2  # the paper's "succeeds at least 20% of the time"


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def filler_text(n_sentences: int) -> str:
    """The first ``n_sentences`` sentences of the endlessly repeated filler, space separated."""
    return " ".join(FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(n_sentences))


def build_prompt(key: str, n_before: int, n_after: int) -> str:
    """The passkey prompt with ``n_before`` filler sentences before the needle and ``n_after`` after it."""
    return "\n".join([TASK_DESCRIPTION, filler_text(n_before), needle(key), filler_text(n_after), QUESTION])


def random_key(rng: random.Random, digits: int = 5) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def split_filler(n_total: int, depth: float) -> tuple[int, int]:
    """Sentences before / after the needle so that a fraction ``depth`` of the filler comes first."""
    n_before = int(round(depth * n_total))
    return n_before, n_total - n_before


def token_length(tokenizer, text: str) -> int:
    """Tokens the model sees for ``text`` (special tokens such as BOS included)."""
    return len(tokenizer(text)["input_ids"])


def fit_prompt(tokenizer, key: str, length: int, depth: float) -> str:
    """The longest prompt with at most ``length`` tokens and the needle at ``depth`` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"`depths` must lie in [0, 1] (fraction of filler before the needle), got {depth!r}.")

    def n_tokens(n_total: int) -> int:
        return token_length(tokenizer, build_prompt(key, *split_filler(n_total, depth)))

    if n_tokens(0) > length:
        raise ValueError(
            f"`lengths` contains {length}, shorter than the passkey prompt without filler ({n_tokens(0)} tokens); "
            "use longer lengths."
        )
    lo, hi = 0, 1
    while n_tokens(hi) <= length:  # exponential search for an upper bound
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # largest n_total with n_tokens(n_total) <= length
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if n_tokens(mid) <= length else (lo, mid)
    return build_prompt(key, *split_filler(lo, depth))


def extract_answer(text: str) -> str:
    """The number the model answered: the first run of digits at the start of its continuation ('' if none)."""
    match = re.match(r"\s*(\d+)", text)
    return match.group(1) if match else ""


def effective_context_window(accuracy_by_length: dict[int, float], threshold: float = K_MAX_THRESHOLD) -> int:
    """k_max: the largest tested length such that every tested length up to it has accuracy >= ``threshold``.

    Returns 0 when even the shortest tested length fails.
    """
    k_max = 0
    for length in sorted(accuracy_by_length):
        if accuracy_by_length[length] < threshold:
            break
        k_max = length
    return k_max


@dataclass
class PasskeyResult:
    """Accuracy per (length, depth) cell, per length (mean over depths), and k_max."""

    lengths: list[int]
    depths: list[float]
    trials: int
    accuracy: list[list[float]]  # [length][depth]
    accuracy_by_length: dict[int, float]
    k_max: int
    records: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["accuracy_by_length"] = {str(k): v for k, v in self.accuracy_by_length.items()}  # JSON keys
        return out


def _check_grid(lengths: Sequence[int], depths: Sequence[float], trials: int) -> None:
    if not lengths or not all(is_positive_int(n) for n in lengths):
        raise ValueError(f"`lengths` must be positive token counts, got {list(lengths)!r}.")
    if not depths:
        raise ValueError("`depths` must not be empty; e.g. [0.0, 0.25, 0.5, 0.75, 1.0].")
    check_positive_int("trials", trials, "keys per cell")


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of prompts that all have the same token length, in one batch."""
    enc = tokenizer(prompts, return_tensors="pt")
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)  # (B, T)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad,
    )  # (B, T + max_new_tokens)
    return tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)


def evaluate_passkey(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 5,
    seed: int = 0,
    batch_size: int = 8,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> PasskeyResult:
    """Passkey accuracy on a ``lengths`` x ``depths`` grid with ``trials`` random keys per cell (greedy, exact match).

    ``progress`` wraps the iterable of cells (e.g. ``tqdm``). Cells whose prompts tokenize to the same length run
    as one batch of up to ``batch_size``.
    """
    _check_grid(lengths, depths, trials)
    lengths, depths = sorted(int(n) for n in lengths), [float(d) for d in depths]
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    cells = [(n, d) for n in lengths for d in depths]
    records: list[dict] = []
    for length, depth in progress(cells) if progress else cells:
        keys = [random_key(rng) for _ in range(trials)]
        prompts = [fit_prompt(tokenizer, key, length, depth) for key in keys]
        max_new = max(token_length(tokenizer, " " + key) for key in keys) + 1  # keys may tokenize unequally
        by_len: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_len.setdefault(token_length(tokenizer, prompt), []).append(i)
        answers: list[str] = [""] * trials
        for idx in by_len.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                for i, text in zip(chunk, greedy_answers(model, tokenizer, [prompts[i] for i in chunk], max_new)):
                    answers[i] = text
        for key, prompt, text in zip(keys, prompts, answers):
            records.append(
                dict(
                    length=length,
                    depth=depth,
                    tokens=token_length(tokenizer, prompt),
                    key=key,
                    output=text,
                    correct=extract_answer(text) == key,
                )
            )
    model.train(was_training)
    accuracy = [
        [sum(r["correct"] for r in records if r["length"] == n and r["depth"] == d) / trials for d in depths]
        for n in lengths
    ]
    by_length = {n: sum(row) / len(row) for n, row in zip(lengths, accuracy)}
    return PasskeyResult(lengths, depths, trials, accuracy, by_length, effective_context_window(by_length), records)
