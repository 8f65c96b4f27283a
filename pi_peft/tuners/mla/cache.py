"""The compressed KV cache of an MLA model: per layer, one latent row and the kept rotary keys per token.

`MLACache` is a transformers `DynamicCache` whose layers hold, instead of full keys and values,

    keys   slot: the latent            (batch, 1, tokens, kv_rank)
    values slot: the rotated RoPE keys (batch, kv_heads, tokens, rope_dims)
                 and, for models with a key norm (``k_norm``: Qwen3, OLMo 2), one more column per kv head: the
                 token's ``1 / rms`` of the raw key         (batch, kv_heads, tokens, rope_dims + 1)

so everything transformers does with a dynamic cache (``get_seq_length``, masks, beam reordering, cropping) works
unchanged, and `MLAAttention` rebuilds the no-RoPE keys and the values from the latent when it attends.
`MLAModel.generate` passes a fresh `MLACache` unless the caller gives one.
"""

from __future__ import annotations

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class MLACache(DynamicCache):
    """A `DynamicCache` holding the MLA latent (keys slot) and the kept rotary keys (values slot) of every layer."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("config", None)  # per-layer types (sliding windows) do not apply: the model's mask does that
        super().__init__(*args, **kwargs)
        self.rope_dims: dict[int, int] = {}  # layer -> rope_dims, recorded by MLAAttention (the rest: key scales)

    def latent(self, layer_idx: int):
        """The cached latents of layer ``layer_idx``: ``(batch, tokens, kv_rank)``."""
        return self.layers[layer_idx].keys[:, 0]

    def rope_keys(self, layer_idx: int):
        """The cached rotated RoPE keys of layer ``layer_idx``: ``(batch, kv_heads, tokens, rope_dims)``."""
        values = self.layers[layer_idx].values
        return values[..., : self.rope_dims.get(layer_idx, values.shape[-1])]

    def key_scales(self, layer_idx: int):
        """The cached ``1 / rms`` of the raw keys of a ``k_norm`` model: ``(batch, kv_heads, tokens, 1)``, or
        ``None`` for a model without a key norm."""
        values = self.layers[layer_idx].values
        r = self.rope_dims.get(layer_idx, values.shape[-1])
        return values[..., r:] if values.shape[-1] > r else None

    def values_per_token(self, layer_idx: int) -> int:
        """Cached numbers per token in layer ``layer_idx``: ``kv_rank + kv_heads * rope_dims``, plus ``kv_heads`` for a
        model with a key norm (``k_norm``)."""
        layer = self.layers[layer_idx]
        return layer.keys.shape[1] * layer.keys.shape[-1] + layer.values.shape[1] * layer.values.shape[-1]

    def nbytes(self) -> int:
        """Bytes held by all layers."""
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers
            if layer.is_initialized
            for t in (layer.keys, layer.values)
        )


def check_cache_layer(cache, layer_idx: int) -> None:
    """Refuse caches whose layers do not simply concatenate (static, sliding, quantised, offloaded)."""
    layers = getattr(cache, "layers", None)
    if layers is None or (layer_idx < len(layers) and type(layers[layer_idx]) is not DynamicLayer):
        kind = type(layers[layer_idx]).__name__ if layers is not None else type(cache).__name__
        raise ValueError(
            f"An MLA model caches latents, which needs a dynamic cache with plain `DynamicLayer`s; got {kind}. Pass "
            "`past_key_values=pi_peft.tuners.mla.MLACache()` (MLAModel.generate does this by default) instead of a "
            "static, sliding-window, quantised or offloaded cache."
        )
