"""Memory savers for long-context (Q)LoRA training, usable with trl's `SFTTrainer` or a plain training loop.

- [`apply_memory_savers`]: non-reentrant gradient checkpointing (+ `enable_input_require_grads` for k-bit bases) and
  the bitsandbytes CPU fix below, in one call.
- [`attn_implementation`]: `"flash_attention_2"` when it is installed and a GPU is there, else `"sdpa"`.
- [`causal_lm_loss`] / [`fused_causal_lm_loss`]: next-token cross entropy that never builds the full
  `(tokens x vocab)` fp32 logits. It uses liger-kernel's fused linear cross entropy or cut-cross-entropy when they are
  installed (GPU), else trl's chunked log-prob kernel, else a chunked loss of our own. trl's `SFTTrainer` (>= 1.0)
  already computes its loss with that chunked kernel, so nothing needs to be passed to it.
- [`fix_bnb_cpu_repack`]: bitsandbytes 0.50 on CPUs with avx512_bf16 repacks a `Linear4bit` weight for an inference
  kernel after any eval forward under `torch.no_grad()`; training steps after that get wrong LoRA gradients.
- Activation offload to CPU: trl's `SFTConfig(activation_offloading=True)`, or [`activation_offload`] in a plain loop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LOSS_BACKENDS = ("auto", "liger", "cce", "trl", "chunked")
DEFAULT_CHUNK_TOKENS = 1024  # rows per chunk: one (1024, V) fp32 block, ~125 MiB at a 32k vocabulary


# ---- attention ---------------------------------------------------------------------------------------------------
def attn_implementation(device: Optional[str] = None) -> str:
    """The attention kernel to load a model with: `"flash_attention_2"` when `flash_attn` is installed and the model
    goes to a CUDA device, else `"sdpa"` (PyTorch's fused attention: O(T) memory on GPU, never the eager T x T)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# ---- bitsandbytes CPU trap ---------------------------------------------------------------------------------------
def fix_bnb_cpu_repack(model: nn.Module) -> int:
    """Keep every bitsandbytes `Linear4bit` of `model` on its training-safe kernel on CPU.

    bitsandbytes 0.50 on CPUs with avx512_bf16 repacks a 4-bit weight for a fast inference kernel the first time the
    layer runs in eval mode on an input without grad (any `torch.no_grad()` evaluation). That kernel has no autograd
    path, so later training steps compute LoRA gradients that are silently wrong (relative error ~1) while the loss
    looks normal. This sets `support_avx512bf16_for_cpu = False` on every `Linear4bit` and unpacks weights that were
    already repacked (best effort: the repack rounded their absmax to bf16, so call this before any evaluation, as
    `pi-peft train` does when it loads the model). Harmless on GPU and on models without 4-bit layers.

    Returns:
        `int`: the number of `Linear4bit` modules fixed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state
                )
            count += 1
    return count


def is_kbit_model(model: nn.Module) -> bool:
    """Whether `model` (or the base model under a peft wrapper) was loaded in 4 or 8 bit."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


# ---- checkpointing -----------------------------------------------------------------------------------------------
def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing (one checkpoint per decoder layer).

    Non-reentrant checkpointing works with frozen inputs, but a k-bit base has no trainable tensor before the first
    LoRA layer, so the embedding output is made to require grad (`enable_input_require_grads`) as peft does.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if is_kbit_model(model) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing


def apply_memory_savers(model: nn.Module, *, gradient_checkpointing: bool = True) -> nn.Module:
    """Apply pi_peft's memory savers to a (peft) causal LM for training, in place, and return it.

    - non-reentrant gradient checkpointing (+ `enable_input_require_grads` for k-bit bases), unless
      `gradient_checkpointing=False`;
    - the bitsandbytes CPU repack fix ([`fix_bnb_cpu_repack`]), so evaluation between training steps stays safe.

    The attention kernel is chosen at load time (`attn_implementation=attn_implementation()`), the loss with
    [`causal_lm_loss`], and activation offload with [`activation_offload`].
    """
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    fix_bnb_cpu_repack(model)
    return model


@contextlib.contextmanager
def activation_offload(model: nn.Module):
    """Context manager that offloads saved activations to CPU memory during forward and brings them back for backward
    (trl's implementation; on GPU only, a no-op context on CPU). Wrap `loss = ...; loss.backward()` in it."""
    if not torch.cuda.is_available():
        yield
        return
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    with get_act_offloading_ctx_manager(model=model):
        yield


# ---- loss --------------------------------------------------------------------------------------------------------
def available_loss_backends(device: Optional[torch.device] = None) -> list[str]:
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


def _chunk_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # hidden: (n, H), weight: (V, H), targets: (n,) -> summed NLL, the (n, V) logits live only inside this chunk
    logits = (hidden @ weight.t()).float()  # (n, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Summed next-token NLL of `hidden @ weight.T` in chunks of `chunk_tokens` rows, each recomputed in backward
    (activation checkpointing), so at most one `(chunk_tokens, V)` fp32 block is alive at a time."""
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_nll_sum, hidden[start:end], weight, targets[start:end], use_reentrant=False)
    return total


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: Optional[int | torch.Tensor] = None,
    backend: str = "auto",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
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

    Returns:
        `torch.Tensor`: the scalar loss (fp32), equal to `F.cross_entropy` on the full logits.
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

        total = LigerFusedLinearCrossEntropyLoss(reduction="sum")(lm_head_weight, hidden, targets)
    elif backend == "cce":
        from cut_cross_entropy import linear_cross_entropy

        total = linear_cross_entropy(hidden, lm_head_weight, targets, reduction="sum")
    elif backend == "trl":
        from trl.kernels import ChunkedLogProbFunction

        log_probs = ChunkedLogProbFunction.apply(hidden, lm_head_weight, None, targets, 1.0, 32768, None, 1.0, ())[0]
        total = -log_probs.sum()
    else:
        total = chunked_nll(hidden, lm_head_weight, targets, chunk_tokens)
    return total.float() / denom


def fused_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs):
    """Run `model`'s backbone and [`causal_lm_loss`] on its output: a drop-in for `model(input_ids, labels=...).loss`
    in a plain training loop that never builds the full logits. Works on peft-wrapped models. Extra keyword arguments
    (`attention_mask`, `position_ids`, ...) go to the backbone; `backend`/`chunk_tokens`/`num_items_in_batch` to the
    loss."""
    loss_kwargs = {k: kwargs.pop(k) for k in ("backend", "chunk_tokens", "num_items_in_batch") if k in kwargs}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state  # (B, T, H)
    weight = base.get_output_embeddings().weight  # (V, H)
    return causal_lm_loss(hidden, weight, input_ids if labels is None else labels, **loss_kwargs)
