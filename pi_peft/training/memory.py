"""Memory savers for long-context (Q)LoRA training, usable with trl's `SFTTrainer` or a plain training loop.

- [`apply_memory_savers`]: non-reentrant activation checkpointing (+ `enable_input_require_grads` for k-bit bases),
  sequence-tiled MLPs (`tiled_mlp=True`, [`apply_tiled_mlp`]) and the bitsandbytes CPU fix below, in one call;
  [`remove_memory_savers`] undoes the first two when training ends.
- sequence-tiled MLPs: `pi_peft.ops.tiled_mlp` (ALST's TiledMLP).
- [`attn_implementation`]: `"flash_attention_2"` when it is installed and a GPU is there, else `"sdpa"`.
- the bitsandbytes CPU fix: `pi_peft.ops.bnb.fix_bnb_cpu_repack`.
- Activation offload to CPU: trl's `SFTConfig(activation_offloading=True)`, or [`activation_offload`] in a plain loop;
  both GPU only ([`offloading_for_device`]: on CPU the activations already live in CPU memory).

The losses that never build the full `(tokens x vocab)` logits are in `pi_peft.ops.losses`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
from torch import nn

from ..ops.bnb import fix_bnb_cpu_repack
from ..ops.tiled_mlp import apply_tiled_mlp, check_tile_tokens
from ..utils import is_kbit_model

logger = logging.getLogger(__name__)


# ---- attention ---------------------------------------------------------------------------------------------------
def attn_implementation(device: Optional[str] = None) -> str:
    """The attention kernel to load a model with: `"flash_attention_2"` when `flash_attn` is installed and the model
    goes to a CUDA device, else `"sdpa"` (PyTorch's fused attention: O(T) memory on GPU, never the eager T x T)."""
    from transformers.utils import is_flash_attn_2_available

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


# ---- checkpointing -----------------------------------------------------------------------------------------------
def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (one checkpoint per decoder layer).

    Uses transformers' current name (`activation_checkpointing_enable`, transformers >= 5.20) and falls back to the
    deprecated `gradient_checkpointing_enable` only where the current one is missing, so no `FutureWarning` is raised.
    Non-reentrant checkpointing works with frozen inputs, but a k-bit base has no trainable tensor before the first
    LoRA layer, so the embedding output is made to require grad (`enable_input_require_grads`) as peft does.
    """
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if is_kbit_model(model) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing


def apply_memory_savers(
    model: nn.Module,
    *,
    gradient_checkpointing: bool = True,
    tiled_mlp: bool = False,
    tile_tokens: Optional[int | str] = None,
) -> nn.Module:
    """Apply pi_peft's memory savers to a (peft) causal LM for training, in place, and return it.

    - non-reentrant activation checkpointing (+ `enable_input_require_grads` for k-bit bases), unless
      `gradient_checkpointing=False`;
    - with `tiled_mlp=True`, every decoder layer's MLP over sequence tiles of `tile_tokens` tokens (default
      automatic), see [`apply_tiled_mlp`];
    - the bitsandbytes CPU repack fix ([`fix_bnb_cpu_repack`]), so evaluation between training steps stays safe.

    The attention kernel is chosen at load time (`attn_implementation=attn_implementation()`), the loss with
    `pi_peft.ops.losses.causal_lm_loss`, and activation offload with [`activation_offload`].
    """
    tile_tokens = check_tile_tokens(tile_tokens)
    if tile_tokens is not None and not tiled_mlp:
        raise ValueError(f"`tile_tokens`={tile_tokens} has no effect without `tiled_mlp=True`; set both or neither.")
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if tiled_mlp:
        apply_tiled_mlp(model, tile_tokens)
    fix_bnb_cpu_repack(model)
    return model


def remove_memory_savers(model: nn.Module) -> nn.Module:
    """Undo the training-only memory savers when training ends, in place: tiled MLPs get their own `forward` back
    ([`remove_tiled_mlp`]) and activation checkpointing (with the k-bit `enable_input_require_grads` hook) is turned
    off, so that the model then evaluates, generates, merges (`merge_and_unload`) and exports as an ordinary one.
    `pi-peft train` calls it after saving the adapter."""
    from ..ops.tiled_mlp import remove_tiled_mlp

    remove_tiled_mlp(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_activation_checkpointing", False):
        base.activation_checkpointing_disable()
    if getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None):
        base.disable_input_require_grads()
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


def offloading_for_device(training_args, on_cpu: bool) -> None:
    """trl's `activation_offloading` moves saved activations from the GPU to CPU memory (with CUDA streams). Training
    on CPU they already live there, so it is turned off, with one log line (trl's offloader would fail without
    CUDA); on a GPU it is left as it is."""
    if on_cpu and getattr(training_args, "activation_offloading", False):
        logger.warning(
            "`activation_offloading` has no effect when training on CPU (activations already live in CPU memory): "
            "off for this run."
        )
        training_args.activation_offloading = False
