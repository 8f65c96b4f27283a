from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from torch import nn

from ...integrations import retry_deferred
from ...rope import model_rope_config
from ..pi.model import PIModel
from .cache import MLACache
from .config import MLAConfig
from .layer import MLAAttention, check_rms_norm, max_kv_rank
from .selection import fixed_pairs, pair_norms, top_pairs, two_norm_scores

_KV_NAMES = ("k_proj", "v_proj")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every self-attention module with separate q/k/v/o projections, in layer order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MLAAttention):
            found.append((name, module))
        elif all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(
            module, "layer_idx"
        ):
            found.append((name, module))
    return found


def _fused_qkv_names(model: nn.Module) -> list[str]:
    return [
        n
        for n, _ in model.named_modules()
        if n.rsplit(".", 1)[-1] in ("qkv_proj", "query_key_value", "c_attn", "Wqkv")
    ]


def _unused_kv_names(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the ``k_proj``/``v_proj`` of attention that MLA replaces (never trained, never saved)."""
    return tuple(
        f"{n}.{'base_layer.' if isinstance(m, MLAAttention) else ''}{p}."
        for n, m in attention_modules(model)
        for p in _KV_NAMES
    )


def _check_qk_norms(name: str, attn: nn.Module) -> None:
    """A query/key norm before RoPE must normalise one head or the whole projection; a key norm must be an RMSNorm
    (``weight * x / rms(x)``), which MLA splits exactly (see `MLAAttention`)."""
    base = attn.base_layer if isinstance(attn, MLAAttention) else attn
    d, config = base.head_dim, base.config
    for norm_name, heads in (("q_norm", config.num_attention_heads), ("k_norm", config.num_key_value_heads)):
        norm = getattr(base, norm_name, None)
        if norm is None:
            continue
        width = getattr(norm, "weight", torch.empty(0)).numel()
        if width not in (d, heads * d):
            raise ValueError(
                f"`{name}.{norm_name}` normalises {width} values, neither head_dim={d} nor heads x head_dim="
                f"{heads * d}; MLA supports per-head (Qwen3) or whole-projection (OLMo 2) query/key norms only."
            )
        if norm_name == "k_norm":
            check_rms_norm(norm, width, f"`{name}.k_norm`")


def _generate_cache_kwarg() -> str:
    """``cache`` where transformers' `generate` takes it (5.24+), else ``past_key_values``."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


class MLAModel(PIModel):
    """
    MHA2MLA as a peft method: every attention layer becomes an [`MLAAttention`] (latent KV cache, partial RoPE), the
    other linear layers get LoRA (peft's own layers), and PI fields of the config extend the kept rotary dims.

    The conversion is recorded in the config (`rope_pairs`) and the MLA matrices are adapter weights, so
    `save_pretrained` / `PeftModel.from_pretrained` re-apply it exactly. `disable_adapter()` and `unload()` give the
    original model (original attention and RoPE); merging is refused (MLA has no standard-attention equivalent).

    Args:
        model ([`~transformers.PreTrainedModel`]): A RoPE model with separate q/k/v projections (Llama, Mistral,
            Qwen2, Qwen3, OLMo 2).
        config ([`MLAConfig`]): The configuration of the adapter.
        adapter_name (`str`, defaults to `"default"`): The name of the adapter.

    Example:

        ```py
        >>> import pi_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, pi_peft.MLAConfig(kv_rank=512, rope_dims=8, rope_selection="high"))
        >>> out = model.generate(input_ids, max_new_tokens=32)  # caches 512 + kv_heads * 8 values per token and layer
        ```
    """

    # ---- BaseTuner hooks -------------------------------------------------------------------------------------------
    def _prepare_model(self, peft_config: MLAConfig, model: nn.Module):
        if any(isinstance(m, MLAAttention) for m in model.modules()):
            raise ValueError("This model already has an MLA adapter; pi_peft supports one MLA adapter per model.")
        if getattr(peft_config, "full_finetune", False):
            frozen = next((n for n, p in model.named_parameters() if not p.dtype.is_floating_point), None)
            if frozen is not None:
                raise ValueError(
                    f"`full_finetune=True` trains every weight, but `{frozen}` is quantised "
                    f"({dict(model.named_parameters())[frozen].dtype}); load the base unquantised (bf16/fp32), or "
                    "set `full_finetune=False` (MLA matrices + LoRA, which works on a 4-bit base)."
                )
        self._mla_check_model(peft_config, model)
        targets = peft_config.target_modules
        if isinstance(targets, (list, set, tuple)) and set(targets) & set(_KV_NAMES):
            raise ValueError(
                f"`target_modules`={sorted(targets)} names {sorted(set(targets) & set(_KV_NAMES))}, which MLA "
                "replaces (keys and values come from the latent); remove them. The MLA matrices train without LoRA."
            )
        super()._prepare_model(peft_config, model)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(peft_config, MLAConfig) and target_name in _KV_NAMES:
            return  # unused while MLA is active (e.g. matched by "all-linear")
        return super()._create_and_replace(
            peft_config, adapter_name, target, target_name, parent, current_key, **kwargs
        )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if isinstance(config, MLAConfig):
            self._mla_convert(model, adapter_name, config)
            self._mark_only_adapters_as_trainable(model)  # again: the MLA layers exist only now

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """peft's rule (adapter weights only), or with `full_finetune` every weight except the unused k/v."""
        super()._mark_only_adapters_as_trainable(model)
        configs = [self.peft_config[n] for n in self.active_adapters if n in self.peft_config]
        if any(isinstance(c, MLAConfig) and c.full_finetune and not c.inference_mode for c in configs):
            unused = _unused_kv_names(model)
            for name, param in model.named_parameters():
                if param.dtype.is_floating_point and not name.startswith(unused):
                    param.requires_grad_(True)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """peft's selection of adapter weights; with `full_finetune`, every weight but the unused k/v projections."""
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if isinstance(config, MLAConfig) and config.full_finetune:
            unused = _unused_kv_names(model)
            to_return.update({k: v for k, v in state_dict.items() if not k.startswith(unused)})
        return to_return

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge and any(isinstance(m, MLAAttention) for m in self.model.modules()):
            next(m for m in self.model.modules() if isinstance(m, MLAAttention)).merge()  # raises with the reason
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    # ---- generation ------------------------------------------------------------------------------------------------
    def generate(self, *args, **kwargs):
        """`PIModel.generate` (full attention, also while training with S²-Attn) with a fresh `MLACache` (latents +
        kept RoPE keys) unless ``past_key_values`` is given.

        `cache_implementation="dynamic"` is what the `MLACache` is; any other cache implementation (static, sliding,
        quantised, offloaded) cannot hold latents and is refused. A `cache_implementation` that only the model's own
        `generation_config` sets (e.g. Gemma's "hybrid") is replaced by the `MLACache`."""
        given = any(kwargs.get(name) is not None for name in ("cache", "past_key_values"))
        if not given and kwargs.get("use_cache", True) and self._mla_active():
            generation_config = kwargs.get("generation_config")
            requested = kwargs.pop("cache_implementation", None) or getattr(
                generation_config, "cache_implementation", None
            )
            if requested is not None and requested != "dynamic":
                raise ValueError(
                    f"`cache_implementation`={requested!r}: an MLA model caches one latent and the kept rotary keys "
                    "per token, which only a dynamic cache can hold; drop `cache_implementation` (MLAModel.generate "
                    "passes a `pi_peft.tuners.mla.MLACache`) or pass `cache_implementation='dynamic'`."
                )
            kwargs[_generate_cache_kwarg()] = MLACache()
            if generation_config is not None:  # "dynamic" there: the MLACache it is
                kwargs["generation_config"] = copy.copy(generation_config)
                kwargs["generation_config"].cache_implementation = None
            elif requested is not None or getattr(
                getattr(self.model, "generation_config", None), "cache_implementation", None
            ):
                kwargs["cache_implementation"] = None  # "dynamic", or the model's default cache: the MLACache it is
        return super().generate(*args, **kwargs)

    def _mla_active(self) -> bool:
        return any(
            isinstance(m, MLAAttention) and not m.disable_adapters and m.adapter_name in m.active_adapters
            for m in self.model.modules()
        )

    # ---- conversion ------------------------------------------------------------------------------------------------
    @staticmethod
    def _mla_check_model(config: MLAConfig, model: nn.Module) -> None:
        model_rope_config(model)  # raises for models without RoPE
        layers = attention_modules(model)
        if not layers:
            fused = _fused_qkv_names(model)
            detail = f" It has fused projections ({fused[0]}, ...)." if fused else ""
            raise ValueError(
                f"MLA needs attention layers with separate `q_proj`/`k_proj`/`v_proj`/`o_proj` (Llama, Mistral, "
                "Qwen2, Qwen3); "
                f"{type(model).__name__} has none.{detail} Split a fused qkv projection into three first."
            )
        attn = layers[0][1]
        head_dim, model_config = attn.head_dim, attn.config
        for name, a in layers:
            _check_qk_norms(name, a)
        if getattr(model_config, "partial_rotary_factor", 1.0) not in (None, 1, 1.0):
            raise ValueError("MLA expects RoPE on the whole head (`partial_rotary_factor` = 1).")
        if config.rope_dims > head_dim:
            raise ValueError(
                f"`rope_dims`={config.rope_dims} is larger than the model's head_dim={head_dim}; pick an even value "
                f"in [2, {head_dim}]."
            )
        limit = max_kv_rank(attn.q_proj.in_features, model_config.num_key_value_heads, head_dim, config.rope_dims)
        if config.kv_rank > limit:
            raise ValueError(
                f"`kv_rank`={config.kv_rank} is larger than a layer can hold: the stacked [W_k (no-RoPE rows); W_v] "
                f"has rank at most min(hidden_size, kv_heads * (2 * head_dim - rope_dims)) = {limit}; pick "
                f"`kv_rank` <= {limit}."
            )
        if config.rope_pairs is not None:
            expected = (len(layers), model_config.num_key_value_heads, config.rope_dims // 2)
            shape = tuple(torch.as_tensor(config.rope_pairs).shape)
            if shape != expected:
                raise ValueError(
                    f"`rope_pairs` has shape {shape} but this model needs (layers, kv_heads, rope_dims/2) = "
                    f"{expected}; the adapter was made for a different base model."
                )

    def _mla_convert(self, model: nn.Module, adapter_name: str, config: MLAConfig) -> None:
        layers = attention_modules(model)
        attn0 = layers[0][1]
        kv_heads = attn0.config.num_key_value_heads
        pairs = None
        if config.rope_pairs is not None:
            pairs = torch.as_tensor(config.rope_pairs, dtype=torch.long)
        elif config.rope_selection != "2-norm":
            one = fixed_pairs(config.rope_selection, attn0.head_dim, config.rope_dims, kv_heads)
            pairs = one.unsqueeze(0).expand(len(layers), -1, -1).clone()
            config.rope_pairs = pairs.tolist()
        for i, (name, attn) in enumerate(layers):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = MLAAttention(attn, adapter_name, config.kv_rank, config.rope_dims)
            if pairs is not None:
                layer.init_from_base(pairs[i])
            # the wrapped attention keeps its trainability (frozen base, LoRA on q_proj/o_proj trainable)
            for module_dict in (layer.mla_kv_down, layer.mla_k_rope, layer.mla_k_up, layer.mla_v_up):
                module_dict.requires_grad_(not config.inference_mode)
            setattr(parent, child, layer)


_CALIBRATION_FORMS = (
    "a list of batches, each a tensor of token ids ((batch, tokens) or (tokens,)), a list of ids, or a dict with "
    "`input_ids` (and optional `attention_mask`) as tensors or lists, e.g. `[tokenizer(text, return_tensors='pt')]`"
)


def _as_rows(value, field: str, index: int) -> list[torch.Tensor]:
    """``value`` (tensor or (nested) list of ints) as rows of a batch: one ``(B, T)`` tensor, or one ``(1, T)`` tensor
    per row when a list's rows differ in length (a tokenizer called without padding)."""
    if isinstance(value, torch.Tensor):
        rows = [value]
    elif isinstance(value, (list, tuple)) and value and all(isinstance(r, (list, tuple, torch.Tensor)) for r in value):
        rows = [torch.as_tensor(r) for r in value]
        if len({tuple(r.shape) for r in rows}) == 1:
            rows = [torch.stack(rows)]  # (B, T); rows of unequal length stay one (T_i,) row each
    elif (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        rows = [torch.as_tensor(value)]
    else:
        raise TypeError(
            f"`calibration_data` batch {index}: `{field}` is {type(value).__name__} {str(value)[:60]!r}; expected "
            f"{_CALIBRATION_FORMS}."
        )
    out = []
    for row in rows:
        if row.dim() == 1:
            row = row[None]  # (T,) -> (1, T)
        ids_dtype_ok = not (row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool)
        if row.dim() != 2 or row.shape[1] == 0 or (field == "input_ids" and not ids_dtype_ok):
            raise ValueError(
                f"`calibration_data` batch {index}: `{field}` has shape {tuple(row.shape)} and dtype {row.dtype}; "
                "expected (batch, tokens) or (tokens,), at least one token"
                + (", of integer token ids." if field == "input_ids" else ".")
            )
        out.append(row)
    return out


def calibration_batches(calibration_data):
    """``(batch index, input_ids (B, T), attention_mask (B, T) or None)`` of every batch of ``calibration_data`` (see
    [`initialize_mla_weights`]); one batch (a tensor or a dict) is accepted in place of a list of batches."""
    if isinstance(calibration_data, (torch.Tensor, Mapping)) or (
        isinstance(calibration_data, (list, tuple)) and calibration_data and isinstance(calibration_data[0], int)
    ):
        calibration_data = [calibration_data]  # one batch, not a list of them
    if isinstance(calibration_data, str) or not isinstance(calibration_data, Iterable):
        raise TypeError(f"`calibration_data` must be {_CALIBRATION_FORMS}; got {type(calibration_data).__name__}.")
    for index, batch in enumerate(calibration_data):
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise ValueError(
                    f"`calibration_data` batch {index} is a dict without `input_ids` (keys: {sorted(batch)}); "
                    f"expected {_CALIBRATION_FORMS}."
                )
            ids, mask = batch["input_ids"], batch.get("attention_mask")
        else:
            ids, mask = batch, None
        if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], str)):
            raise TypeError(
                f"`calibration_data` batch {index} is text; tokenize it first, e.g. "
                "`[tokenizer(text, return_tensors='pt') for text in texts]`."
            )
        id_rows = _as_rows(ids, "input_ids", index)
        mask_rows = _as_rows(mask, "attention_mask", index) if mask is not None else [None] * len(id_rows)
        if len(mask_rows) != len(id_rows) or any(
            m is not None and m.shape != i.shape for i, m in zip(id_rows, mask_rows)
        ):
            shapes = [tuple(i.shape) for i in id_rows], [tuple(m.shape) for m in mask_rows if m is not None]
            raise ValueError(
                f"`calibration_data` batch {index}: `attention_mask` has shape(s) {shapes[1]} but `input_ids` "
                f"{shapes[0]}; they must match."
            )
        for ids_row, mask_row in zip(id_rows, mask_rows):
            yield index, ids_row, mask_row


@torch.no_grad()
def initialize_mla_weights(model: nn.Module, calibration_data, max_batches: Optional[int] = None) -> torch.Tensor:
    """Data-driven initialisation for ``rope_selection="2-norm"`` (peft's EVA pattern: adapter first, then data).

    Runs the *original* attention (adapters disabled) over ``calibration_data`` (an iterable of batches: tensors or
    lists of input ids, ``(batch, tokens)`` or ``(tokens,)``, or dicts with ``input_ids``/``attention_mask``; rows
    of unequal length in one list run one at a time; one such batch alone is accepted too), takes the queries and
    keys as RoPE sees them (after ``q_norm``/``k_norm`` in Qwen3 or OLMo 2), scores every rotary pair by the mean
    query-pair norm x mean key-pair norm summed over the GQA group, keeps the top ``rope_dims / 2`` pairs per layer
    and kv head, then initialises every layer by the joint SVD and records the choice in the config
    (``rope_pairs``). Returns the kept pairs ``(layers, kv_heads, rope_dims / 2)``.

    Example:

        ```py
        >>> model = get_peft_model(base, MLAConfig(kv_rank=512, rope_dims=8, rope_selection="2-norm"))
        >>> batches = [tokenizer(t, return_tensors="pt") for t in calibration_texts]
        >>> initialize_mla_weights(model, batches)
        ```
    """
    tuner = model.base_model if hasattr(model, "base_model") and isinstance(model.base_model, MLAModel) else model
    if not isinstance(tuner, MLAModel):
        raise TypeError(
            f"`initialize_mla_weights` needs a model made by get_peft_model(..., MLAConfig), got {type(model)}."
        )
    layers = [m for m in tuner.model.modules() if isinstance(m, MLAAttention)]
    config = tuner.peft_config[layers[0].adapter_name]
    if calibration_data is None:
        raise ValueError(
            "`rope_selection='2-norm'` needs calibration data: pass `calibration_data`, e.g. a list of tokenised "
            "batches (`[tokenizer(text, return_tensors='pt'), ...]`)."
        )
    sums_q = [0.0] * len(layers)
    sums_k = [0.0] * len(layers)
    counts = [0] * len(layers)
    hooks = []

    def catch(i: int, which: str, heads: int, head_dim: int):
        def hook(module, inputs, output):
            mask = current_mask[0]
            states = output.reshape(
                *output.shape[:2], heads, head_dim
            )  # (B, T, heads, d) from (B, T, heads*d | heads, d)
            norms = pair_norms(states)  # (B, T, heads, d/2)
            if mask is not None:
                norms = norms * mask[..., None, None]
            total = norms.sum(dim=(0, 1))  # (heads, d/2)
            if which == "q":
                sums_q[i] = sums_q[i] + total
                counts[i] += int(mask.sum()) if mask is not None else norms.shape[0] * norms.shape[1]
            else:
                sums_k[i] = sums_k[i] + total

        return hook

    current_mask = [None]
    for i, layer in enumerate(layers):
        attn = layer.base_layer
        # what RoPE rotates: after q_norm/k_norm where the model has them (Qwen3, OLMo 2), else the projections
        q_src, k_src = getattr(attn, "q_norm", attn.q_proj), getattr(attn, "k_norm", attn.k_proj)
        hooks.append(q_src.register_forward_hook(catch(i, "q", layer.num_heads, layer.head_dim)))
        hooks.append(k_src.register_forward_hook(catch(i, "k", layer.num_kv_heads, layer.head_dim)))
    device = next(tuner.model.parameters()).device
    seen = 0
    tuner.disable_adapter_layers()  # the original attention (and RoPE) produce the calibration statistics
    try:
        for batch_index, ids, mask in calibration_batches(calibration_data):
            if max_batches is not None and batch_index >= max_batches:
                break
            current_mask[0] = None if mask is None else mask.to(device).float()
            tuner.model(input_ids=ids.to(device), attention_mask=current_mask[0], use_cache=False)
            seen += 1
    finally:
        tuner.enable_adapter_layers()
        for hook in hooks:
            hook.remove()
    if seen == 0 or counts[0] == 0:
        raise ValueError("`calibration_data` was empty: `rope_selection='2-norm'` needs at least one batch of tokens.")
    pairs = torch.stack(
        [
            top_pairs(two_norm_scores(sums_q[i] / counts[i], sums_k[i] / counts[i]), config.rope_dims)
            for i in range(len(layers))
        ]
    )  # (layers, G, r/2)
    for i, layer in enumerate(layers):
        layer.init_from_base(pairs[i])
    config.rope_pairs = pairs.tolist()
    return pairs


retry_deferred()  # registration deferred by a first `import peft` from this module runs now
