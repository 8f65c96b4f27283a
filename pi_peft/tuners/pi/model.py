from __future__ import annotations

import copy
from typing import Optional

from peft.tuners.lora import LoraModel
from torch import nn

from ...integrations import retry_deferred
from ...ops import s2_attn
from ...ops.bnb import fix_bnb_cpu_repack
from ...rope import ROPE_TYPES, model_rope_config, rope_parameters_of, scaled_rope_parameters, set_rope_parameters
from .config import PIConfig

_NORM_CLASS_MARKERS = ("RMSNorm", "LayerNorm")

ORIGINAL_ROPE_ATTR = "_pi_peft_original_rope"
"""Set on a base model while pi_peft runs it with an extended RoPE: its own ``(rope_parameters, window)``."""


def original_rope(model: nn.Module) -> tuple[dict, int]:
    """The base model's own ``(rope_parameters, max_position_embeddings)``, also while pi_peft has extended it (a
    failed or repeated ``get_peft_model`` on the same object then starts from the original, never scales twice)."""
    recorded = model.__dict__.get(ORIGINAL_ROPE_ATTR)
    if recorded is not None:
        return copy.deepcopy(recorded)
    rope_config = model_rope_config(model)
    return rope_parameters_of(rope_config), rope_config.max_position_embeddings


def _params_equal(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, (int, float)) and isinstance(other, (int, float)) and not isinstance(value, bool):
            if abs(float(value) - float(other)) > 1e-9 * max(1.0, abs(float(value))):
                return False
        elif value != other:
            return False
    return True


class PIModel(LoraModel):
    """
    LoRA with Position Interpolation: peft's [`~peft.LoraModel`] plus a RoPE that follows the adapter.

    While a PI adapter is active the model runs with the adapter's `rope_parameters` and window; with
    `disable_adapter()`, `unload()` or no active adapter it runs with the base model's original RoPE, and
    `merge_and_unload()` keeps the extension in the returned model's config. Only `BaseTuner` hooks are overridden.

    Args:
        model ([`~transformers.PreTrainedModel`]): A RoPE model (Llama, Mistral, Qwen2, ...).
        config ([`PIConfig`]): The configuration of the adapter.
        adapter_name (`str`, defaults to `"default"`): The name of the adapter.

    Example:

        ```py
        >>> import pi_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, pi_peft.PIConfig(context_length=16384, target_modules="all-linear"))
        ```
    """

    # ---- BaseTuner hooks -------------------------------------------------------------------------------------------
    def _prepare_model(self, peft_config: PIConfig, model: nn.Module):
        super()._prepare_model(peft_config, model)
        if not hasattr(self, "_pi_original_rope"):
            self._pi_original_rope = original_rope(model)  # raises for models without RoPE
            self._pi_enabled = True
        base_params, base_window = self._pi_original_rope
        if peft_config.base_rope_parameters is None:
            peft_config.base_rope_parameters = copy.deepcopy(base_params)
        elif not _params_equal(peft_config.base_rope_parameters, base_params):
            raise ValueError(
                "This PI adapter was trained on a base model with "
                f"`rope_parameters`={peft_config.base_rope_parameters}, but the model it is being applied to has "
                f"{base_params}. Applying it would scale RoPE twice or not at all. "
                "Load the adapter onto the original base model (not a merged or already extended one)."
            )
        peft_config.resolve_context(base_window)
        peft_config.modules_to_save = self._pi_modules_to_save(peft_config, model)
        self._pi_target_rope(peft_config)  # validate now, before any module is replaced; applied after injection
        if not hasattr(self, "_pi_original_attn"):
            self._pi_original_attn = model.config._attn_implementation
        if peft_config.s2_attn and not peft_config.inference_mode:  # an unwrappable attention fails now, not later
            s2_attn.s2_implementation_name(self._pi_original_attn, peft_config.s2_group_size_ratio)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        # every path that adds an adapter (get_peft_model, from_pretrained, add_adapter, load_adapter) comes here:
        # from now on no evaluation can repack a 4-bit weight into bitsandbytes' gradient-less CPU kernel
        fix_bnb_cpu_repack(model)

    def _post_injection_hook(self, model: nn.Module, config: PIConfig, adapter_name: str) -> None:
        super()._post_injection_hook(model, config, adapter_name)
        self._pi_sync_rope()  # last: a failed injection leaves the base model's RoPE untouched
        self._pi_sync_attention()

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ):
        if merge:
            self._pi_sync_rope(adapter_names)  # the merged model keeps the merged adapters' RoPE
        else:
            self._pi_apply(*self._pi_original_rope)
        s2_attn.set_s2_attention(self.model, self._pi_own_attention(), None)  # S²-Attn never outlives the adapter
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        model.__dict__.pop(ORIGINAL_ROPE_ATTR, None)  # merged: its extended RoPE is now its own
        return model

    def disable_adapter_layers(self) -> None:
        super().disable_adapter_layers()
        self._pi_enabled = False
        self._pi_sync_rope()
        self._pi_sync_attention()

    def enable_adapter_layers(self) -> None:
        super().enable_adapter_layers()
        self._pi_enabled = True
        self._pi_sync_rope()
        self._pi_sync_attention()

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._pi_rope_for(names)  # refuse before any layer switches adapters
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._pi_sync_rope()
        self._pi_sync_attention()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._pi_sync_rope()
        self._pi_sync_attention()

    def train(self, mode: bool = True):
        """`nn.Module.train`; also turns S²-Attn on (training) or off (`eval()`) for adapters with `s2_attn=True`."""
        super().train(mode)
        if hasattr(self, "_pi_original_attn"):
            self._pi_sync_attention()
        return self

    def generate(self, *args, **kwargs):
        """The model's `generate`, always with its own (full) attention, also while training with S²-Attn."""
        s2_attn.set_s2_attention(self.model, self._pi_own_attention(), None)
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self._pi_sync_attention()

    # ---- helpers ---------------------------------------------------------------------------------------------------
    def _pi_target_rope(self, config: PIConfig) -> tuple[dict, int]:
        base_params, base_window = self._pi_original_rope
        params = scaled_rope_parameters(
            base_params,
            rope_type=config.rope_type,
            scaling_factor=config.scaling_factor,
            original_context_length=config.original_context_length,
            **config.rope_extra_parameters,
        )
        if config.scaling_factor == 1 or ROPE_TYPES[config.rope_type].keeps_base_window:
            return params, base_window  # e.g. dynamic NTK rescales only past `max_position_embeddings`
        return params, max(base_window, config.context_length)

    def _pi_rope_for(self, names) -> tuple[dict, int]:
        """The RoPE the model needs with adapters ``names`` active; raises if they disagree (changes nothing)."""
        configs = {n: self.peft_config[n] for n in names if isinstance(self.peft_config.get(n), PIConfig)}
        if not configs or not getattr(self, "_pi_enabled", True):
            return self._pi_original_rope
        targets = {n: self._pi_target_rope(c) for n, c in configs.items()}
        first_name, first = next(iter(targets.items()))
        for name, target in targets.items():
            if not (_params_equal(target[0], first[0]) and target[1] == first[1]):
                raise ValueError(
                    f"Adapters {first_name!r} and {name!r} extend RoPE differently ({first[0]} vs {target[0]}); "
                    "a model has one RoPE at a time, so activate them one at a time."
                )
        return first

    def _pi_sync_rope(self, adapter_names: Optional[list[str]] = None) -> None:
        """Give the model the RoPE of the active PI adapter(s), or the original one when none is in effect."""
        self._pi_apply(*self._pi_rope_for(adapter_names if adapter_names is not None else self.active_adapters))

    def _pi_sync_attention(self) -> None:
        """S²-Attn while the model trains with an enabled adapter that has `s2_attn=True`; its own attention else."""
        ratio = None
        if getattr(self, "_pi_enabled", True) and self.model.training:
            configs = [self.peft_config[n] for n in self.active_adapters if n in self.peft_config]
            ratio = s2_attn.s2_ratio_of([c for c in configs if isinstance(c, PIConfig) and not c.inference_mode])
        s2_attn.set_s2_attention(self.model, self._pi_own_attention(), ratio)

    def _pi_own_attention(self) -> str:
        """The model's own attention implementation: the one it had, or the one the user switched it to since
        (`set_attn_implementation("eager")` for `output_attentions`); S²-Attn wraps it, eval and generate use it."""
        current = self.model.config._attn_implementation
        if not s2_attn.is_s2_implementation(current):
            self._pi_original_attn = current
        return self._pi_original_attn

    def _pi_apply(self, rope_parameters: dict, max_position_embeddings: int) -> None:
        set_rope_parameters(self.model, rope_parameters, max_position_embeddings)
        original = self._pi_original_rope
        if _params_equal(rope_parameters, original[0]) and max_position_embeddings == original[1]:
            self.model.__dict__.pop(ORIGINAL_ROPE_ATTR, None)
        else:  # remembered on the base model itself, so that a second PIModel on it never scales twice
            self.model.__dict__[ORIGINAL_ROPE_ATTR] = copy.deepcopy(original)

    @staticmethod
    def _pi_modules_to_save(config: PIConfig, model: nn.Module) -> Optional[list[str]]:
        """Map `train_embeddings`/`train_norms` onto peft's own `modules_to_save` (same adapter file)."""
        names = list(config.modules_to_save or [])
        extra: list[str] = []
        if config.train_embeddings:
            embeddings = model.get_input_embeddings()
            extra += [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is embeddings]
        if config.train_norms:
            extra += [
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if n and any(marker in type(m).__name__ for marker in _NORM_CLASS_MARKERS)
            ]
        for name in extra:
            if name not in names:
                names.append(name)
        return names or None


retry_deferred()  # registration deferred by a first `import peft` from this module runs now
