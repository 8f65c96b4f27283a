"""Perplexity by context length, with a sliding window (Press et al. 2021; the PI paper used stride 256).

Every window holds exactly ``context_length`` tokens. The first window of a document scores all of its tokens
but the first; with a ``stride`` S each later window moves S tokens on and scores only its last S tokens, so that
every scored token (after the first window) sees at least ``context_length - S`` tokens of context. ``stride=None``
gives non-overlapping windows, each scoring all its tokens but the first. A tail shorter than the stride is
dropped, so every length is measured with full windows.

Memory: the model runs with ``use_cache=False`` (packed and cached paths differ) and returns only hidden states;
the loss is computed from them ``loss_chunk_size`` positions at a time, and only at the scored positions, so fp32
logits never exist for a whole long window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..ops.losses import chunked_nll


@dataclass
class PerplexityResult:
    context_length: int
    stride: int
    nll: float  # mean negative log-likelihood per scored token (nats)
    ppl: float
    tokens: int  # scored tokens
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def window_spans(n_tokens: int, context_length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """``(start, end, n_scored)`` of every full window over a document of ``n_tokens`` tokens.

    ``n_scored`` counts the targets at the end of ``[start, end)``, each predicted from inside the window: the first
    window scores ``context_length - 1``, later ones ``min(stride, context_length - 1)`` (a window's first token has
    no context inside it, so non-overlapping windows score ``context_length - 1`` tokens each).
    """
    if not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"`context_length` must be an int >= 2, got {context_length!r}.")
    stride = context_length if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= context_length:
        raise ValueError(f"`stride` must be an int in [1, context_length={context_length}], got {stride!r}.")
    if n_tokens < context_length:
        return []
    spans = [(0, context_length, context_length - 1)]
    end = context_length + stride
    while end <= n_tokens:
        spans.append((end - context_length, end, min(stride, context_length - 1)))
        end += stride
    return spans


def _causal_lm(model):
    """The transformers causal LM inside a peft model (LoRA layers stay injected) or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor, n_scored: Sequence[int], loss_chunk_size: int = 1024) -> torch.Tensor:
    """Summed NLL of the last ``n_scored[b]`` tokens of each row of ``input_ids`` ``(B, T)`` -> ``(B,)`` fp32.

    Runs the decoder once with ``use_cache=False``, then the LM head on ``loss_chunk_size`` hidden states at a time.
    """
    lm = _causal_lm(model)
    hidden = lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    totals = []
    for b, n in enumerate(n_scored):
        t = input_ids.shape[1]
        h = hidden[b, t - 1 - n : t - 1]  # (n, H): positions predicting the last n tokens
        targets = input_ids[b, t - n :]  # (n,)
        totals.append(chunked_nll(h, head, targets, loss_chunk_size, softcap=softcap))  # fp32 scalar
    return torch.stack(totals)  # (B,)


@torch.no_grad()
def evaluate_perplexity(
    model,
    documents: Sequence[Sequence[int]],
    context_length: int,
    stride: int | None = None,
    batch_size: int = 1,
    loss_chunk_size: int = 1024,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` over token-id ``documents`` at one ``context_length`` (see the module docstring)."""
    spans = [(doc, s, e, n) for doc in documents for (s, e, n) in window_spans(len(doc), context_length, stride)]
    if not spans:
        longest = max((len(d) for d in documents), default=0)
        raise ValueError(
            f"No document has `context_length`={context_length} tokens (longest: {longest}); pass longer texts, "
            "concatenate them, or use a shorter context length."
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    batches = [spans[i : i + batch_size] for i in range(0, len(spans), batch_size)]
    for batch in progress(batches) if progress else batches:
        ids = torch.tensor([list(doc[s:e]) for doc, s, e, _ in batch], dtype=torch.long, device=device)  # (B, T)
        n_scored = [n for *_, n in batch]
        nll += window_nll(model, ids, n_scored, loss_chunk_size).sum().item()
        tokens += sum(n_scored)
    model.train(was_training)
    mean = nll / tokens
    return PerplexityResult(context_length, stride or context_length, mean, math.exp(mean), tokens, len(spans))


def perplexity_by_length(
    model,
    documents: Sequence[Sequence[int]],
    context_lengths: Sequence[int],
    stride: int | None = None,
    **kwargs,
) -> list[PerplexityResult]:
    """:func:`evaluate_perplexity` at every length; ``stride`` is capped at each length."""
    return [
        evaluate_perplexity(model, documents, n, None if stride is None else min(stride, n), **kwargs)
        for n in sorted(context_lengths)
    ]
