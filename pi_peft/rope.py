"""RoPE math and surgery, as small named functions.

Position Interpolation (Chen et al. 2023, https://arxiv.org/abs/2306.15595) is one line::

    inv_freq / scaling_factor            # == rotating position m as if it were m / s

Everything else here is bookkeeping: building the ``rope_parameters`` dict that transformers understands, and
re-computing the rotary buffers of an *already loaded* model with transformers' own code (the model's rotary class,
which calls ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``). ``inv_freq`` is computed once at init and is
not in the state dict, so changing ``config.rope_parameters`` after ``from_pretrained`` does nothing on its own.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class RopeType:
    """Everything pi_peft needs to know about one ``rope_type``: a new type is one entry in :data:`ROPE_TYPES`."""

    name: str
    extra_parameters: tuple[str, ...] = ()
    """Optional ``rope_parameters`` keys transformers accepts for this type, besides ``factor`` (PIConfig fields)."""
    defaults: dict = field(default_factory=dict)
    """Keys transformers requires for this type, with the values written when the user gives none."""
    needs_original_window: bool = False
    """Writes ``original_max_position_embeddings`` = the base window into ``rope_parameters``."""
    keeps_base_window: bool = False
    """``max_position_embeddings`` stays the base window (dynamic NTK rescales only past it)."""
    llama_cpp: Optional[str] = None
    """llama.cpp's ``--rope-scaling`` value, ``None`` when llama.cpp has no runtime flag for this type."""
    llama_cpp_flags: tuple[tuple[str, str], ...] = ()
    """``(rope_parameters key, llama.cpp flag)`` pairs passed when the key is set."""
    llama_cpp_note: str = ""
    """What to do instead when ``llama_cpp`` is ``None``."""
    llama_cpp_ignored: tuple[str, ...] = ()
    """``rope_parameters`` keys llama.cpp's runtime flags cannot reproduce: when one is set, no flags are given."""
    note: str = ""
    """A caveat users should know, shown in PIConfig's documentation and the model card."""


ROPE_TYPES: dict[str, RopeType] = {
    "linear": RopeType("linear", llama_cpp="linear"),
    "dynamic": RopeType(
        "dynamic",
        keeps_base_window=True,
        llama_cpp_note="llama.cpp does not implement dynamic NTK scaling (`rope_type='dynamic'`), not even for a "
        "converted merged model: serve this adapter with vLLM or transformers.",
        note="transformers' dynamic NTK recomputes the frequencies from the current sequence length, so generation "
        "with the KV cache differs from generation without it (cached keys keep the frequencies they were made "
        "with); evaluate it with `use_cache=False` for exact scores.",
    ),
    "yarn": RopeType(
        "yarn",
        extra_parameters=("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
        needs_original_window=True,
        llama_cpp="yarn",
        llama_cpp_flags=(("beta_fast", "--yarn-beta-fast"), ("beta_slow", "--yarn-beta-slow")),
        # llama.cpp overwrites `--yarn-attn-factor` whenever YaRN is on and always scales attention by 0.1 ln(s) + 1
        # (llama-context.cpp; measured in tests/test_real_model.py): a custom attention scale cannot be passed
        llama_cpp_ignored=("attention_factor", "mscale", "mscale_all_dim"),
        llama_cpp_note="llama.cpp cannot apply this adapter's own YaRN attention scale (`attention_factor`, "
        "`mscale` or `mscale_all_dim`): with YaRN on it ignores `--yarn-attn-factor` and always uses "
        "0.1 * ln(factor) + 1. Serve this adapter with vLLM or transformers.",
    ),
    "llama3": RopeType(
        "llama3",
        extra_parameters=("low_freq_factor", "high_freq_factor"),
        defaults={"low_freq_factor": 1.0, "high_freq_factor": 4.0},  # Meta's Llama 3.1 values; both required
        needs_original_window=True,
        llama_cpp_note="llama.cpp has no runtime flag for `rope_type='llama3'`: serve the merged model instead "
        "(`pi-peft export merged`, then llama.cpp's `convert_hf_to_gguf.py`, which writes Llama 3.1's frequency "
        "factors into the GGUF).",
    ),
}
"""The rope types pi_peft can apply, by name; ``linear`` is Position Interpolation."""

ROPE_EXTRA_PARAMETERS: tuple[str, ...] = tuple(
    dict.fromkeys(p for t in ROPE_TYPES.values() for p in t.extra_parameters)
)
"""Every type-specific key, in registry order (each is a PIConfig field)."""


def rope_type_info(rope_type: str) -> RopeType:
    """The registry entry of ``rope_type``; ``ValueError`` listing the known types otherwise."""
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"`rope_type` must be one of {list(ROPE_TYPES)}, got {rope_type!r}.")
    return ROPE_TYPES[rope_type]


def pi_inv_freq(inv_freq: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Position Interpolation: rotate position ``m`` by the angle of ``m / s``. ``(dim/2,) -> (dim/2,)``."""
    return inv_freq / scaling_factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``positions`` ``(T,)`` -> two ``(T, dim)`` tensors, in transformers' half-split layout."""
    freqs = positions[:, None].float() * inv_freq[None, :].float()  # (T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, dim)
    return emb.cos(), emb.sin()


LONG_RANGE_LAYER_TYPE = "full_attention"
"""The layer type whose RoPE carries the long range in a model with one RoPE per layer type (Gemma 3: its
``full_attention`` layers; the ``sliding_attention`` layers never see keys further away than their window)."""


def _inv_freq_buffers(module: nn.Module) -> list[str]:
    """``inv_freq``, or ``<layer_type>_inv_freq`` per layer type (Gemma 3), among ``module``'s own buffers."""
    buffers = getattr(module, "_buffers", {})
    return [b for b in buffers if b == "inv_freq" or (b.endswith("_inv_freq") and not b.endswith("original_inv_freq"))]


def rotary_embeddings(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every rotary embedding of a transformers model (modules holding ``inv_freq``,
    or one ``<layer_type>_inv_freq`` per layer type)."""
    for name, module in model.named_modules():
        if _inv_freq_buffers(module) and hasattr(module, "config"):
            yield name, module


def per_layer_type(params: dict) -> bool:
    """Whether ``rope_parameters`` holds one RoPE per layer type (``{"full_attention": {...}, ...}``, Gemma 3)."""
    return (
        bool(params) and "rope_type" not in params and all(isinstance(v, dict) or v is None for v in params.values())
    )


def long_range_parameters(params: dict) -> dict:
    """The RoPE of the layers that carry the long range: ``params`` itself, or its ``full_attention`` entry for a
    model with one RoPE per layer type (``ValueError`` naming the layer types when it has none)."""
    if not per_layer_type(params):
        return params
    if not isinstance(params.get(LONG_RANGE_LAYER_TYPE), dict):
        raise ValueError(
            f"This model has one RoPE per layer type ({sorted(params)}) but none for {LONG_RANGE_LAYER_TYPE!r} "
            "layers, whose RoPE pi_peft extends (the others attend within a window); pi_peft cannot tell which "
            "layers carry the long range here. Use a model whose long-range layers are `full_attention` (Gemma 3)."
        )
    return params[LONG_RANGE_LAYER_TYPE]


def _filled(params: dict, config) -> dict:
    params.setdefault("rope_type", params.pop("type", "default"))
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def rope_parameters_of(config) -> dict:
    """A standalone copy of ``config.rope_parameters`` (transformers 5) with ``rope_type``/``rope_theta`` filled in
    (in every entry of a per-layer-type dict, see [`per_layer_type`])."""
    params = getattr(config, "rope_parameters", None)
    if params is None and getattr(config, "rope_scaling", None) is not None:  # transformers 4 naming
        params = config.rope_scaling
    params = copy.deepcopy(dict(params or {}))
    if per_layer_type(params):
        return {k: None if v is None else _filled(dict(v), config) for k, v in params.items()}
    return _filled(params, config)


def scaled_rope_parameters(
    base: dict,
    *,
    rope_type: str,
    scaling_factor: float,
    original_context_length: int,
    **extra: float | bool | None,
) -> dict:
    """The ``rope_parameters`` of ``base`` extended by ``scaling_factor`` with ``rope_type``.

    ``base`` keeps every key it already has (``rope_theta``, ``partial_rotary_factor``, ...). A base that is already
    linearly scaled composes with ``linear`` by multiplying the factors; every other combination that transformers'
    config cannot express raises ``ValueError``. ``scaling_factor == 1`` returns ``base`` unchanged (an exact no-op).
    A model with one RoPE per layer type (Gemma 3) gets the extension on its ``full_attention`` entry only, as its
    own long-context checkpoints do; its sliding-window layers keep theirs (see [`long_range_parameters`]).
    """
    if per_layer_type(base):
        long_range = long_range_parameters(base)  # raises when no entry carries the long range
        extended = copy.deepcopy(base)
        extended[LONG_RANGE_LAYER_TYPE] = scaled_rope_parameters(
            long_range,
            rope_type=rope_type,
            scaling_factor=scaling_factor,
            original_context_length=original_context_length,
            **extra,
        )
        return extended
    info = rope_type_info(rope_type)
    params = copy.deepcopy(base)
    if scaling_factor == 1:
        return params
    base_type = params.get("rope_type", "default")
    factor = float(scaling_factor)
    if base_type == "linear" and rope_type == "linear":
        factor *= float(params["factor"])  # PI on PI: positions are divided twice
    elif base_type != "default":
        raise ValueError(
            f"The base model already uses `rope_parameters` with rope_type={base_type!r} "
            f"(factor={params.get('factor')}); pi_peft cannot stack rope_type={rope_type!r} on top of it, because "
            "transformers' config cannot express the combination. Use a base model without RoPE scaling, or "
            "rope_type='linear' on a linearly scaled base (the factors multiply)."
        )
    params["rope_type"] = rope_type
    params["factor"] = factor
    if info.needs_original_window:
        params["original_max_position_embeddings"] = int(original_context_length)
    params.update({k: v for k, v in info.defaults.items() if extra.get(k) is None})
    params.update({k: v for k, v in extra.items() if v is not None})
    return params


def _rotary_config(model: nn.Module):
    rotaries = list(rotary_embeddings(model))
    if not rotaries:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", type(model).__name__)
        raise ValueError(
            f"Model type {model_type!r} has no rotary position embeddings (no module holds an `inv_freq` or "
            "`<layer_type>_inv_freq` buffer). "
            "Position Interpolation needs rotary embeddings (RoPE): use a RoPE model such as Llama, Mistral or Qwen2."
        )
    configs = {id(module.config): module.config for _, module in rotaries}
    if len(configs) != 1:
        raise ValueError("pi_peft supports models whose rotary embeddings share one config; this model has several.")
    return rotaries, next(iter(configs.values()))


def model_rope_config(model: nn.Module):
    """The config object the model's rotary embeddings read (``model.config`` or its text config)."""
    return _rotary_config(model)[1]


def _rebuild_rotary(module: nn.Module) -> None:
    """Recompute ``module``'s buffers from its (updated) config, with the model's own rotary class."""
    cls = type(module)
    device = module._buffers[_inv_freq_buffers(module)[0]].device
    kwargs = {"device": device} if "device" in inspect.signature(cls.__init__).parameters else {}
    fresh = cls(module.config, **kwargs)
    for name, buffer in fresh.named_buffers(recurse=False):
        old = module._buffers.get(name)
        dtype = old.dtype if old is not None and old.is_floating_point() else buffer.dtype
        module.register_buffer(name, buffer.to(device=device, dtype=dtype), persistent=name in fresh.state_dict())
    for key, value in vars(fresh).items():
        if not key.startswith("_") and key != "training":
            setattr(module, key, value)
    module.__dict__.pop("long_inv_freq", None)  # cached by transformers' longrope/dynamic update


def set_rope_parameters(model: nn.Module, rope_parameters: dict, max_position_embeddings: int) -> None:
    """Write ``rope_parameters``/``max_position_embeddings`` into the model's config and recompute its rotary buffers.

    Never touches ``position_ids``: packed batches find sequence boundaries from them. Holds no trainable weights,
    so a 4-bit base is handled the same way.
    """
    rotaries, config = _rotary_config(model)
    previous = (config.rope_parameters, config.max_position_embeddings)
    config.rope_parameters = copy.deepcopy(rope_parameters)
    config.max_position_embeddings = int(max_position_embeddings)
    try:
        if hasattr(config, "standardize_rope_params"):
            config.standardize_rope_params()
        if hasattr(config, "validate_rope"):
            config.validate_rope()
    except (KeyError, ValueError) as exc:  # transformers raises both; leave the model as it was
        config.rope_parameters, config.max_position_embeddings = previous
        raise ValueError(
            f"The {config.model_type!r} config refuses `rope_parameters`={rope_parameters}: {exc}. This model family "
            "does not support this RoPE scaling in transformers (e.g. Phi-3 accepts only 'longrope'); pick a "
            "`rope_type` its config accepts, or a Llama/Mistral/Qwen2-style model."
        ) from exc
    for _, module in rotaries:
        _rebuild_rotary(module)
    # nanoGPT-style invariant: every rotary module now reads the config we just wrote.
    for _, module in rotaries:
        written = long_range_parameters(rope_parameters)["rope_type"]
        assert long_range_parameters(module.config.rope_parameters)["rope_type"] == written
        assert all(torch.isfinite(module._buffers[name]).all() for name in _inv_freq_buffers(module))


def effective_context_length(original_context_length: int, scaling_factor: float) -> int:
    """``L' = s * L``, rounded to the nearest token."""
    return int(round(original_context_length * scaling_factor))
