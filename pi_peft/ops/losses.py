"""Next-token losses that never build the full `(tokens x vocab)` fp32 logits, shared by training and perplexity.

- [`chunked_nll`]: summed NLL of `head(hidden)` in row chunks; with grad enabled each chunk is recomputed in backward
  (activation checkpointing), so at most one `(chunk_tokens, V)` fp32 block is alive. `pi-peft eval`'s perplexity
  uses it under `torch.no_grad()`.
- [`causal_lm_loss`] / [`fused_causal_lm_loss`]: the mean next-token cross entropy of a training step. They use
  liger-kernel's fused linear cross entropy or cut-cross-entropy when installed (GPU), else trl's chunked log-prob
  kernel, else [`chunked_nll`]. trl's `SFTTrainer` (>= 1.0) already computes its loss with that chunked kernel.

Every path honours Gemma-style `final_logit_softcapping` (`logits = c * tanh(logits / c)`): [`fused_causal_lm_loss`]
reads it from the model config, the others take `softcap=`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import check_positive_int

IGNORE_INDEX = -100
LOSS_BACKENDS = ("auto", "liger", "cce", "trl", "chunked")
DEFAULT_CHUNK_TOKENS = 1024  # rows per chunk: one (1024, V) fp32 block, ~125 MiB at a 32k vocabulary
TRL_CHUNK_ROWS = 32768  # rows per chunk handed to trl's kernel (it tiles further inside)

Head = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def softcap_logits(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """`softcap * tanh(logits / softcap)` (Gemma 2's `final_logit_softcapping`); unchanged when `softcap` is falsy."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def available_loss_backends(device: Optional[torch.device | str] = None) -> list[str]:
    """Loss backends usable on `device`, best first (liger and cut-cross-entropy need CUDA + Triton).

    Off CUDA, trl's kernel falls back to a path that keeps about eight fp32 `(4096, vocab)` tiles alive (~4 GiB at a
    32k vocabulary, measured by `benchmarks/memory_vs_context.py`), so there the own chunked loss comes first."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    names = []
    if on_cuda and importlib.util.find_spec("liger_kernel") is not None:
        names.append("liger")
    if on_cuda and importlib.util.find_spec("cut_cross_entropy") is not None:
        names.append("cce")
    try:
        from trl.kernels import ChunkedLogProbFunction  # noqa: F401

        names.append("trl")
    except ImportError:
        pass
    names.insert(len(names) if on_cuda else 0, "chunked")
    return names


def _head_logits(head: Head, hidden: torch.Tensor) -> torch.Tensor:
    # hidden: (n, H) -> (n, V); `head` is the (V, H) output weight or the output module itself (bias, LoRA, ...)
    return hidden @ head.t() if isinstance(head, torch.Tensor) else head(hidden)


def _chunk_nll_sum(
    hidden: torch.Tensor, head: Head, targets: torch.Tensor, softcap: Optional[float] = None
) -> torch.Tensor:
    # hidden: (n, H), targets: (n,) -> summed NLL; the (n, V) logits live only inside this chunk
    logits = softcap_logits(_head_logits(head, hidden).float(), softcap)  # (n, V) fp32
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_nll(
    hidden: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    *,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Summed next-token NLL (fp32 scalar) of `head(hidden)` against `targets`, `chunk_tokens` rows at a time.

    Args:
        hidden (`torch.Tensor` of shape `(n, H)`): hidden states of the scored positions.
        head (`torch.Tensor` of shape `(V, H)`, or a module): the output embedding weight, or the output module.
        targets (`torch.Tensor` of shape `(n,)`): the token each row predicts (no `-100` here: select rows first).
        chunk_tokens (`int`): rows per chunk; with grad enabled each chunk is recomputed in its backward.
        softcap (`float`, *optional*): `final_logit_softcapping` of the model.
    """
    check_positive_int("chunk_tokens", chunk_tokens)
    from torch.utils.checkpoint import checkpoint

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_nll_sum, h, head, t, softcap, use_reentrant=False)
        else:
            total = total + _chunk_nll_sum(h, head, t, softcap)
    return total


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: Optional[int | torch.Tensor] = None,
    backend: str = "auto",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Mean next-token cross entropy from the last hidden states, without the full `(tokens x vocab)` fp32 logits.

    Args:
        hidden_states (`torch.Tensor` of shape `(batch, seq, hidden)`): the backbone's last hidden states (after the
            final norm).
        lm_head_weight (`torch.Tensor` of shape `(vocab, hidden)`): the output embedding weight.
        labels (`torch.Tensor` of shape `(batch, seq)`): token ids, `-100` where ignored; shifted here by one.
        num_items_in_batch: divide the summed loss by this (gradient accumulation) instead of the valid-token count.
        backend (`str`): one of `"auto"`, `"liger"`, `"cce"`, `"trl"`, `"chunked"`. `"auto"` picks the first of
            [`available_loss_backends`].
        chunk_tokens (`int`): rows per chunk for the `"chunked"` backend.
        softcap (`float`, *optional*): the model's `final_logit_softcapping` (Gemma 2), applied before the softmax.

    Returns:
        `torch.Tensor`: the scalar loss (fp32), equal to `F.cross_entropy` on the full (soft-capped) logits.
    """
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"`backend` must be one of {LOSS_BACKENDS}, got {backend!r}.")
    if backend == "auto":
        backend = available_loss_backends(hidden_states.device)[0]
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])  # (N, H)
    targets = labels[:, 1:].reshape(-1).to(hidden.device)  # (N,)
    mask = targets != IGNORE_INDEX
    hidden, targets = hidden[mask], targets[mask]  # only scored positions: (n, H), (n,)
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    if hidden.shape[0] == 0:
        return hidden_states.sum() * 0.0
    if backend == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        total = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=softcap)(lm_head_weight, hidden, targets)
    elif backend == "cce":
        from cut_cross_entropy import linear_cross_entropy

        total = linear_cross_entropy(hidden, lm_head_weight, targets, reduction="sum", softcap=softcap)
    elif backend == "trl":
        from trl.kernels import ChunkedLogProbFunction

        args = (hidden, lm_head_weight, None, targets, 1.0, TRL_CHUNK_ROWS, softcap or None, 1.0, ())
        total = -ChunkedLogProbFunction.apply(*args)[0].sum()
    else:
        total = chunked_nll(hidden, lm_head_weight, targets, chunk_tokens, softcap=softcap)
    return total.float() / denom


def fused_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs):
    """Run `model`'s backbone and [`causal_lm_loss`] on its output: a drop-in for `model(input_ids, labels=...).loss`
    in a plain training loop that never builds the full logits. Works on peft-wrapped models and honours the config's
    `final_logit_softcapping`. Extra keyword arguments (`attention_mask`, `position_ids`, ...) go to the backbone;
    `backend`/`chunk_tokens`/`num_items_in_batch` to the loss."""
    loss_kwargs = {k: kwargs.pop(k) for k in ("backend", "chunk_tokens", "num_items_in_batch") if k in kwargs}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state  # (B, T, H)
    weight = base.get_output_embeddings().weight  # (V, H)
    softcap = getattr(getattr(base, "config", None), "final_logit_softcapping", None)
    labels = input_ids if labels is None else labels
    return causal_lm_loss(hidden, weight, labels, softcap=softcap, **loss_kwargs)
