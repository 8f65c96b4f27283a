"""Memory savers for long-context (Q)LoRA training, usable with trl's `SFTTrainer` or a plain training loop.

- [`apply_memory_savers`]: non-reentrant activation checkpointing (+ `enable_input_require_grads` for k-bit bases),
  sequence-tiled MLPs (`tiled_mlp=True`, [`apply_tiled_mlp`]) and the bitsandbytes CPU fix below, in one call.
- [`apply_tiled_mlp`]: the MLP of every decoder layer runs over tiles of the sequence, each tile recomputed in its own
  backward (ALST's TiledMLP, arXiv 2506.13996), so only one tile's `tile x intermediate` tensors are ever alive
  instead of the whole sequence's. Exact: same loss and gradients as untiled, to float rounding.
- [`attn_implementation`]: `"flash_attention_2"` when it is installed and a GPU is there, else `"sdpa"`.
- [`fix_bnb_cpu_repack`]: bitsandbytes 0.50 on CPUs with avx512_bf16 repacks a `Linear4bit` weight for an inference
  kernel after any eval forward under `torch.no_grad()`; training steps after that get wrong LoRA gradients.
- Activation offload to CPU: trl's `SFTConfig(activation_offloading=True)`, or [`activation_offload`] in a plain loop.

The losses that never build the full `(tokens x vocab)` logits are in `pi_peft.losses`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

MIN_TILE_TOKENS = 1024  # the automatic tile never goes below this (large matmuls stay efficient)
TILED_ATTR = "_pi_tiled_mlp"  # set on a wrapped MLP: its tile size (`None` = automatic)


# ---- attention ---------------------------------------------------------------------------------------------------
def attn_implementation(device: Optional[str] = None) -> str:
    """The attention kernel to load a model with: `"flash_attention_2"` when `flash_attn` is installed and the model
    goes to a CUDA device, else `"sdpa"` (PyTorch's fused attention: O(T) memory on GPU, never the eager T x T)."""
    from transformers.utils import is_flash_attn_2_available

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and is_flash_attn_2_available():
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


# ---- sequence-tiled MLP ------------------------------------------------------------------------------------------
def auto_tile_tokens(seq_len: int, hidden_size: int) -> int:
    """The automatic tile of [`apply_tiled_mlp`]: as ALST, about `hidden_size` tokens per tile (at least
    `MIN_TILE_TOKENS`), the sequence split into equal tiles: `ceil(T / ceil(T / max(hidden_size, 1024)))`.

    One tile's MLP intermediates are then `tile x intermediate` elements, which at long T is a small part of the
    layer's `T x hidden` tensors; a sequence no longer than one tile runs untiled."""
    target = max(int(hidden_size), MIN_TILE_TOKENS)
    n_tiles = max(1, math.ceil(seq_len / target))
    return math.ceil(seq_len / n_tiles)


def _check_tile_tokens(tile_tokens: Any) -> Optional[int]:
    if tile_tokens is None or tile_tokens == "auto":
        return None
    if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens <= 0:
        raise ValueError(
            f"`tile_tokens` must be a positive int (tokens per MLP tile) or None/'auto' for the automatic size, got "
            f"{tile_tokens!r}. Pass e.g. `tile_tokens=4096`, or leave it unset."
        )
    return tile_tokens


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class TiledMLPFunction(torch.autograd.Function):
    """`forward_fn(x)` over tiles of `x`'s token axis (dim -2) under no grad; in backward each tile is recomputed with
    grad and its input and parameter gradients accumulated (exact). Only one tile's intermediates are ever alive.

    The RNG state (dropout, e.g. LoRA's) and the autocast state of the forward are restored for the recomputation,
    as `torch.utils.checkpoint` does, so that the recomputed tiles are the ones the forward computed."""

    @staticmethod
    def forward(ctx, forward_fn: Callable, tile_tokens: int, x: torch.Tensor, *params: torch.Tensor):
        # x: (..., T, H_in) -> (..., T, H_out)
        ctx.forward_fn, ctx.tile_tokens, ctx.params = forward_fn, tile_tokens, params
        ctx.autocast = _autocast_state(x.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        return _tiled_apply(forward_fn, x, tile_tokens)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # grad_out: (..., T, H_out)
        (x,) = ctx.saved_tensors
        params, tile = ctx.params, ctx.tile_tokens
        x_needs_grad = ctx.needs_input_grad[2]
        grad_x = torch.empty_like(x) if x_needs_grad else None  # (..., T, H_in)
        grad_params: list[Optional[torch.Tensor]] = [None] * len(params)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices, device_type=device_type if devices else "cuda"):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            for start in range(0, x.shape[-2], tile):
                x_tile = x[..., start : start + tile, :].detach().requires_grad_(x_needs_grad)  # (..., t, H_in)
                with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                    y_tile = ctx.forward_fn(x_tile)  # (..., t, H_out), with its own graph
                inputs = ([x_tile] if x_needs_grad else []) + list(params)
                grads = torch.autograd.grad(y_tile, inputs, grad_out[..., start : start + tile, :], allow_unused=True)
                if x_needs_grad:
                    grad_x[..., start : start + tile, :] = grads[0]
                    grads = grads[1:]
                for k, g in enumerate(grads):
                    if g is not None:
                        grad_params[k] = g if grad_params[k] is None else grad_params[k] + g
                del y_tile, x_tile, grads
        return (None, None, grad_x, *grad_params)


def _tiled_apply(forward_fn: Callable, x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    # x: (..., T, H_in) -> (..., T, H_out), one tile at a time into a preallocated output
    out = None
    for start in range(0, x.shape[-2], tile_tokens):
        y = forward_fn(x[..., start : start + tile_tokens, :])  # (..., t, H_out)
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"`tiled_mlp` needs an MLP whose forward returns one tensor, got {type(y).__name__} from "
                f"{getattr(forward_fn, '__qualname__', forward_fn)}; call `apply_tiled_mlp(model, modules=[...])` "
                "with the MLPs to tile, or leave `tiled_mlp` off for this model."
            )
        if out is None:
            out = y.new_empty((*x.shape[:-1], y.shape[-1]))
        out[..., start : start + tile_tokens, :] = y
    return out


def _tiled_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Instance `forward` of a wrapped MLP (the class's `forward` stays untouched and runs every tile)."""
    forward_fn = types.MethodType(type(self).forward, self)
    if args or kwargs or x.dim() < 2:
        return forward_fn(x, *args, **kwargs)  # not the plain `mlp(hidden_states)` call: run it untiled
    tile = getattr(self, TILED_ATTR) or auto_tile_tokens(x.shape[-2], x.shape[-1])
    if x.shape[-2] <= tile:
        return forward_fn(x)
    if not torch.is_grad_enabled():
        with torch.no_grad():
            return _tiled_apply(forward_fn, x, tile)
    params = tuple(p for p in self.parameters() if p.requires_grad)
    return TiledMLPFunction.apply(forward_fn, tile, x, *params)


def find_mlp_modules(model: nn.Module) -> list[nn.Module]:
    """The MLPs of `model`'s decoder layers, family-agnostic: every child named `mlp` and every module whose class
    name ends with `MLP` (outermost only; e.g. `LlamaMLP`, `Qwen2MLP`, `GPT2MLP`)."""
    found: dict[int, nn.Module] = {}
    nested: set[int] = set()
    for name, module in model.named_modules():
        if not (name.rsplit(".", 1)[-1] == "mlp" or type(module).__name__.endswith("MLP")):
            continue
        if id(module) in nested:
            continue
        found[id(module)] = module
        nested.update(id(m) for m in module.modules() if m is not module)
    return [m for k, m in found.items() if k not in nested]


def apply_tiled_mlp(
    model: nn.Module, tile_tokens: Optional[int | str] = None, modules: Optional[list[nn.Module]] = None
) -> int:
    """Make every MLP of `model` (or `modules`) run over sequence tiles with its own recompute (see
    [`TiledMLPFunction`]), in place. Works on a base model or a peft model, before or after `get_peft_model`, with
    LoRA and 4-bit layers inside the MLP, packed rows (an MLP is per token) and activation checkpointing. The state
    dict does not change (the class's `forward` is reused; the module gets an instance `forward`).

    Args:
        model (`nn.Module`): the (peft) causal LM.
        tile_tokens (`int` or `None`/`"auto"`): tokens per tile; `None` picks [`auto_tile_tokens`] per call from the
            sequence length and the hidden size.
        modules (`list[nn.Module]`, *optional*): the MLPs to tile; default [`find_mlp_modules`].

    Returns:
        `int`: the number of MLPs tiled.
    """
    tile_tokens = _check_tile_tokens(tile_tokens)
    modules = find_mlp_modules(model) if modules is None else list(modules)
    if not modules:
        raise ValueError(
            f"`tiled_mlp`: found no MLP in {type(model).__name__} (no child named `mlp`, no class ending in 'MLP'); "
            "pass `modules=[...]` to `apply_tiled_mlp`, or leave `tiled_mlp` off."
        )
    for module in modules:
        setattr(module, TILED_ATTR, tile_tokens)
        module.forward = types.MethodType(_tiled_forward, module)
    return len(modules)


def remove_tiled_mlp(model: nn.Module) -> int:
    """Undo [`apply_tiled_mlp`]; returns the number of MLPs restored."""
    count = 0
    for module in model.modules():
        if hasattr(module, TILED_ATTR):
            delattr(module, TILED_ATTR)
            module.__dict__.pop("forward", None)
            count += 1
    return count


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
    `pi_peft.losses.causal_lm_loss`, and activation offload with [`activation_offload`].
    """
    tile_tokens = _check_tile_tokens(tile_tokens)
    if tile_tokens is not None and not tiled_mlp:
        raise ValueError(f"`tile_tokens`={tile_tokens} has no effect without `tiled_mlp=True`; set both or neither.")
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if tiled_mlp:
        apply_tiled_mlp(model, tile_tokens)
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
