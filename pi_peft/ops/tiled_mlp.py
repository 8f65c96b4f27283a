"""Sequence-tiled MLPs (ALST's TiledMLP, arXiv 2506.13996): the MLP of every decoder layer runs over tiles of the
sequence, each tile recomputed in its own backward, so only one tile's `tile x intermediate` tensors are ever alive
instead of the whole sequence's.

What is exact: without dropout inside the MLP, the loss and gradients equal the untiled MLP's to float rounding. With
dropout there (LoRA dropout on the MLP's projections), each tile draws its own masks, so a tiled step does not see the
masks an untiled step would; its gradients are still exactly those of its own forward (the backward replays the
forward's RNG state, as `torch.utils.checkpoint` does).

What is refused: mixture-of-experts blocks (Mixtral, Qwen2/3-MoE, DeepSeek, GPT-OSS, ...: any MLP with `experts` or a
router). A tile's no-grad forward would record the router logits that `output_router_logits` /
`router_aux_loss_coef` turn into the load-balancing loss without their graph (loss unchanged, router and LoRA
gradients wrong), and these blocks reshape the whole batch with `view` and scale their input in place
(`router_jitter_noise`), which a tile of a batch cannot serve. `apply_tiled_mlp` raises, naming the block; the dense
MLPs of such a model (e.g. Qwen3-MoE's `mlp_only_layers`, Llama 4's shared expert) can be tiled with `modules=`.

Under DeepSpeed ZeRO-3 (parameters partitioned across ranks: each holds a `ds_id`), a parameter seen by the autograd
function is its empty local shard, so its gradient cannot be returned through the function. There the parameters are
not inputs of the function: each tile's recomputation runs `torch.autograd.backward`, so the gradients accumulate in
`.grad` through ZeRO-3's own gather / reduce hooks, and the parameters are marked `ds_grad_is_ready` on the last tile
only (DeepSpeed reduces a gradient once, when it is complete). Every rank must call the MLP's modules the same number
of times (each call all-gathers the parameters), so the number of tiles is the maximum over the ranks of the
partition group; a rank with a shorter sequence runs empty tiles. (This is the scheme of DeepSpeed's own TiledMLP.)
Everywhere else (one process, DDP, FSDP2) the parameters stay inputs of the function, so a step's gradients are
returned once, as DDP's reducer expects, and `torch.autograd.grad` sees them.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

from ..utils import is_positive_int

MIN_TILE_TOKENS = 1024  # the automatic tile never goes below this (large matmuls stay efficient)
TILED_ATTR = "_pi_tiled_mlp"  # set on a wrapped MLP: its tile size (`None` = automatic)


def auto_tile_tokens(seq_len: int, hidden_size: int) -> int:
    """The automatic tile of [`apply_tiled_mlp`]: as ALST, about `hidden_size` tokens per tile (at least
    `MIN_TILE_TOKENS`), the sequence split into equal tiles: `ceil(T / ceil(T / max(hidden_size, 1024)))`.

    One tile's MLP intermediates are then `tile x intermediate` elements, which at long T is a small part of the
    layer's `T x hidden` tensors; a sequence no longer than one tile runs untiled."""
    target = max(int(hidden_size), MIN_TILE_TOKENS)
    n_tiles = max(1, math.ceil(seq_len / target))
    return math.ceil(seq_len / n_tiles)


def check_tile_tokens(tile_tokens: Any) -> Optional[int]:
    if tile_tokens is None or tile_tokens == "auto":
        return None
    if not is_positive_int(tile_tokens):
        raise ValueError(
            f"`tile_tokens` must be a positive int or None/'auto' (tokens per MLP tile; None: the automatic size), "
            f"got {tile_tokens!r}. Pass e.g. `tile_tokens=4096`, or leave it unset."
        )
    return tile_tokens


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class TiledMLPFunction(torch.autograd.Function):
    """`forward_fn(x)` over tiles of `x`'s token axis (dim -2) under no grad; in backward each tile is recomputed with
    grad and its input and parameter gradients accumulated (exact). Only one tile's intermediates are ever alive.

    `bounds` are the tiles' `(start, stop)` token ranges (some may be empty, see [`tile_bounds`]). The parameters
    `params` are inputs of the function and their gradients are returned; `hook_params` (ZeRO-3 partitioned ones) are
    not inputs: each tile's `torch.autograd.backward` accumulates their gradients in `.grad` through the parameters'
    own hooks, with `ds_grad_is_ready` set on the last tile only (`params` is then one scalar leaf that needs grad,
    so that the backward runs even when `x` needs none, and gets no gradient).

    The RNG state (dropout, e.g. LoRA's) and the autocast state of the forward are restored for the recomputation,
    as `torch.utils.checkpoint` does, so that the recomputed tiles are the ones the forward computed."""

    @staticmethod
    def forward(ctx, forward_fn: Callable, bounds: list, hook_params: tuple, x: torch.Tensor, *params: torch.Tensor):
        # x: (..., T, H_in) -> (..., T, H_out)
        ctx.forward_fn, ctx.bounds, ctx.params, ctx.hook_params = forward_fn, bounds, params, hook_params
        ctx.autocast = _autocast_state(x.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        return _tiled_apply(forward_fn, x, bounds)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # grad_out: (..., T, H_out)
        (x,) = ctx.saved_tensors
        params, hook_params, bounds = ctx.params, ctx.hook_params, ctx.bounds
        x_needs_grad = ctx.needs_input_grad[3]
        grad_x = torch.empty_like(x) if x_needs_grad else None  # (..., T, H_in)
        grad_params: list[Optional[torch.Tensor]] = [None] * len(params)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices, device_type=device_type if devices else "cuda"):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            for i, (start, stop) in enumerate(bounds):
                for p in hook_params:  # ZeRO-3: reduce a gradient once, after its last tile
                    p.ds_grad_is_ready = i == len(bounds) - 1
                x_tile = x[..., start:stop, :].detach().requires_grad_(x_needs_grad)  # (..., t, H_in)
                with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                    y_tile = ctx.forward_fn(x_tile)  # (..., t, H_out), with its own graph
                g_tile = grad_out[..., start:stop, :]
                if hook_params:
                    # the gradients of x_tile and of every parameter accumulate in `.grad` (the hooks see each tile)
                    if y_tile.requires_grad:
                        torch.autograd.backward(y_tile, g_tile)
                    if x_needs_grad:
                        grad_x[..., start:stop, :] = 0 if x_tile.grad is None else x_tile.grad
                else:
                    inputs = ([x_tile] if x_needs_grad else []) + list(params)
                    grads = torch.autograd.grad(y_tile, inputs, g_tile, allow_unused=True)
                    if x_needs_grad:
                        grad_x[..., start:stop, :] = grads[0]
                        grads = grads[1:]
                    for k, g in enumerate(grads):
                        if g is not None:
                            grad_params[k] = g if grad_params[k] is None else grad_params[k] + g
                    del grads
                del y_tile, x_tile
        if hook_params:
            grad_params = [None] * len(params)  # the trigger's: the parameters' gradients are in `.grad`
        return (None, None, None, grad_x, *grad_params)


def tile_bounds(seq_len: int, tile_tokens: int, n_tiles: Optional[int] = None) -> list[tuple[int, int]]:
    """The `(start, stop)` token ranges of the tiles: `tile_tokens` each, the last one shorter. With `n_tiles` larger
    than `ceil(seq_len / tile_tokens)` (the count agreed across ZeRO-3 ranks), the sequence is split into `n_tiles`
    nearly equal tiles, empty ones at the end if `seq_len < n_tiles`."""
    if n_tiles is None or n_tiles <= math.ceil(seq_len / tile_tokens):
        return [(s, min(s + tile_tokens, seq_len)) for s in range(0, seq_len, tile_tokens)]
    size = max(1, math.ceil(seq_len / n_tiles))
    return [(min(i * size, seq_len), min((i + 1) * size, seq_len)) for i in range(n_tiles)]


def zero3_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module` that DeepSpeed ZeRO-3 partitions (they carry a `ds_id`)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def agreed_tile_count(n_tiles: int, device: torch.device, group=None) -> int:
    """The largest `n_tiles` over the ranks of `group` (one all-reduce), so that every rank calls the MLP's modules
    (and ZeRO-3 all-gathers their parameters) the same number of times; `n_tiles` itself without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n_tiles
    count = torch.tensor([n_tiles], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return int(count.item())


def _tiled_apply(forward_fn: Callable, x: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    # x: (..., T, H_in) -> (..., T, H_out), one tile at a time into a preallocated output
    out = None
    for start, stop in bounds:
        y = forward_fn(x[..., start:stop, :])  # (..., t, H_out)
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"`tiled_mlp` needs an MLP whose forward returns one tensor, got {type(y).__name__} from "
                f"{getattr(forward_fn, '__qualname__', forward_fn)}; call `apply_tiled_mlp(model, modules=[...])` "
                "with the MLPs to tile, or leave `tiled_mlp` off for this model."
            )
        if out is None:
            out = y.new_empty((*x.shape[:-1], y.shape[-1]))
        out[..., start:stop, :] = y
    return out


def _tiled_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Instance `forward` of a wrapped MLP (the class's `forward` stays untouched and runs every tile)."""
    forward_fn = types.MethodType(type(self).forward, self)
    if args or kwargs or x.dim() < 2:
        return forward_fn(x, *args, **kwargs)  # not the plain `mlp(hidden_states)` call: run it untiled
    tile = getattr(self, TILED_ATTR) or auto_tile_tokens(x.shape[-2], x.shape[-1])
    n_tiles = math.ceil(x.shape[-2] / tile)
    partitioned = zero3_params(self)
    if partitioned:  # ZeRO-3: the same number of module calls on every rank
        n_tiles = agreed_tile_count(n_tiles, x.device, getattr(partitioned[0], "ds_process_group", None))
    if n_tiles <= 1:
        return forward_fn(x)
    bounds = tile_bounds(x.shape[-2], tile, n_tiles)
    if not torch.is_grad_enabled():
        with torch.no_grad():
            return _tiled_apply(forward_fn, x, bounds)
    if partitioned:
        hook_params = tuple(p for p in partitioned if p.requires_grad)
        # a leaf that needs grad, so the output needs grad (and the backward runs) even when `x` does not
        trigger = torch.zeros((), device=x.device, requires_grad=bool(hook_params))
        return TiledMLPFunction.apply(forward_fn, bounds, hook_params, x, trigger)
    params = tuple(p for p in self.parameters() if p.requires_grad)
    return TiledMLPFunction.apply(forward_fn, bounds, (), x, *params)


def is_moe_block(module: nn.Module) -> bool:
    """Whether `module` is (or contains) a mixture-of-experts block: a submodule named `experts`, or one whose name
    or class name contains `router` (Mixtral's `MixtralTopKRouter`, GPT-OSS's `router`, Doge's `router_gate`, ...)."""
    return any(
        name.rsplit(".", 1)[-1] == "experts" or "router" in f"{name.rsplit('.', 1)[-1]} {type(sub).__name__}".lower()
        for name, sub in module.named_modules()
    )


def find_mlp_modules(model: nn.Module) -> list[nn.Module]:
    """The MLPs of `model`'s decoder layers, family-agnostic: every child named `mlp` and every module whose class
    name ends with `MLP` (outermost only; e.g. `LlamaMLP`, `Qwen2MLP`, `GPT2MLP`; a mixture-of-experts block is found
    too, and [`apply_tiled_mlp`] refuses it, see [`is_moe_block`])."""
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
    tile_tokens = check_tile_tokens(tile_tokens)
    modules = find_mlp_modules(model) if modules is None else list(modules)
    if not modules:
        raise ValueError(
            f"`tiled_mlp`: found no MLP in {type(model).__name__} (no child named `mlp`, no class ending in 'MLP'); "
            "pass `modules=[...]` to `apply_tiled_mlp`, or leave `tiled_mlp` off."
        )
    moe = [m for m in modules if is_moe_block(m)]
    if moe:
        names = {id(m): n for n, m in model.named_modules()}
        dense = len(modules) - len(moe)
        raise ValueError(
            f"`tiled_mlp` cannot tile `{names.get(id(moe[0]), '?')}` ({type(moe[0]).__name__}), a mixture-of-experts "
            f"block ({len(moe)} of the {len(modules)} MLP(s) to tile in {type(model).__name__}): inside a tile its "
            "router runs without gradient (the router logits of `output_router_logits` / `router_aux_loss_coef` "
            "would lose their graph: the aux loss "
            "would be unchanged but its gradients wrong), and the block reshapes the whole batch and scales its input "
            "in place (`router_jitter_noise`). Leave `tiled_mlp` off for this model"
            + (
                f", or tile its {dense} dense MLP(s) only: `apply_tiled_mlp(model, modules=[m for m in "
                "find_mlp_modules(model) if not is_moe_block(m)])`."
                if dense
                else "."
            )
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
