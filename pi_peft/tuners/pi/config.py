import math
from dataclasses import dataclass, field
from typing import Any, Optional

from peft import LoraConfig
from peft.utils.peft_types import PeftType

from ...integrations import retry_deferred
from ...rope import ROPE_EXTRA_PARAMETERS, ROPE_TYPES, effective_context_length

PEFT_TYPE_NAME = "PI"
"""The value stored as ``peft_type`` in ``adapter_config.json``."""

PI_PAPER = "https://arxiv.org/abs/2306.15595"
LONGLORA_PAPER = "https://arxiv.org/abs/2309.12307"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class PIConfig(LoraConfig):
    """
    Configuration of a [`PIModel`]: a LoRA adapter that also extends the model's context window by Position
    Interpolation ([Chen et al. 2023](https://arxiv.org/abs/2306.15595)). Every [`~peft.LoraConfig`] option works;
    the fields below are added.

    Give the target window as `context_length` (L') *or* as `scaling_factor` (s); the other one is derived from
    `original_context_length` (L), which defaults to the model's `max_position_embeddings` when the adapter is
    applied. PI then divides every rotary frequency by s: `inv_freq / s`.

    Args:
        context_length (`int`, *optional*):
            Target context window L' in tokens, e.g. `16384`. Must be larger than `original_context_length`.
        scaling_factor (`float`, *optional*):
            Interpolation factor s = L' / L, at least 1. `1.0` applies the LoRA adapter and leaves RoPE unchanged.
        original_context_length (`int`, *optional*):
            Window L the base model was trained on. Defaults to `config.max_position_embeddings` of the base model.
            Set it when the two differ (Mistral-7B-v0.1 reports 32768 but was trained on 8192 tokens).
        rope_type (`str`, defaults to `"linear"`):
            How positions are rescaled, using transformers' own implementation: `"linear"` (Position Interpolation,
            [paper](https://arxiv.org/abs/2306.15595)), `"dynamic"` (dynamic NTK), `"yarn"`
            ([paper](https://arxiv.org/abs/2309.00071)) or `"llama3"` (Llama 3.1 frequency-band scaling). The types
            and their keys are registered in `pi_peft.rope.ROPE_TYPES`. Note on `"dynamic"`: transformers recomputes
            its frequencies from the current length, so generation with the KV cache differs from generation
            without it; score it with `use_cache=False`.
        attention_factor (`float`, *optional*):
            `yarn` only: the attention temperature; transformers derives it from the factor when unset.
        beta_fast (`float`, *optional*):
            `yarn` only: rotations above which dimensions are extrapolated (transformers' default 32).
        beta_slow (`float`, *optional*):
            `yarn` only: rotations below which dimensions are interpolated (transformers' default 1).
        mscale (`float`, *optional*):
            `yarn` only: DeepSeek-style attention scale numerator.
        mscale_all_dim (`float`, *optional*):
            `yarn` only: DeepSeek-style attention scale denominator.
        truncate (`bool`, *optional*):
            `yarn` only: whether to truncate the correction range (transformers' default `True`).
        low_freq_factor (`float`, *optional*):
            `llama3` only: wavelengths above `L / low_freq_factor` are fully interpolated (default 1.0).
        high_freq_factor (`float`, *optional*):
            `llama3` only: wavelengths below `L / high_freq_factor` are left alone (default 4.0).
        train_embeddings (`bool`, defaults to `False`):
            Train the input embeddings fully, saved in the adapter through peft's `modules_to_save`. LongLoRA
            ([paper](https://arxiv.org/abs/2309.12307)) found that LoRA alone under-fits context extension and that
            trainable embeddings and norms close the gap. Costs a vocab x hidden matrix in the adapter.
        train_norms (`bool`, defaults to `False`):
            Train every normalisation layer fully (LongLoRA), saved through `modules_to_save`. Tiny.
        s2_attn (`bool`, defaults to `False`):
            Train with LongLoRA's shifted sparse attention (S²-Attn, [paper](https://arxiv.org/abs/2309.12307)): in
            training mode each half of the heads attends causally within blocks of G = int(`s2_group_size_ratio` x T)
            tokens, the second half with blocks shifted by G/2 (no wrap-around, never across packed documents).
            Attention then costs O(T x G) instead of O(T^2). `eval()`, generation, `disable_adapter()`,
            `merge_and_unload()` and exports use full attention. Needs an `sdpa`, `eager` or FlashAttention 2/3 model.
        s2_group_size_ratio (`float`, defaults to `0.25`):
            S²-Attn block size as a fraction of the training sequence length, in (0, 1] (LongLoRA's 1/4).
        base_rope_parameters (`dict`, *optional*):
            Filled in when the adapter is applied: the base model's `rope_parameters` before extension. Loading the
            adapter onto a base whose RoPE differs (e.g. an already merged model) raises instead of scaling twice.
    """

    context_length: Optional[int] = field(
        default=None,
        metadata={"help": "Target context window L' in tokens (give this or `scaling_factor`)."},
    )
    scaling_factor: Optional[float] = field(
        default=None,
        metadata={"help": "Position Interpolation factor s = L'/L >= 1 (give this or `context_length`)."},
    )
    original_context_length: Optional[int] = field(
        default=None,
        metadata={"help": "Window L the base was trained on; defaults to the model's `max_position_embeddings`."},
    )
    rope_type: str = field(
        default="linear",
        metadata={
            "help": f"RoPE scaling: one of {list(ROPE_TYPES)}; 'linear' is Position Interpolation ({PI_PAPER})."
        },
    )
    attention_factor: Optional[float] = field(default=None, metadata={"help": "yarn only: attention temperature."})
    beta_fast: Optional[float] = field(default=None, metadata={"help": "yarn only: extrapolation boundary."})
    beta_slow: Optional[float] = field(default=None, metadata={"help": "yarn only: interpolation boundary."})
    mscale: Optional[float] = field(default=None, metadata={"help": "yarn only: attention scale numerator."})
    mscale_all_dim: Optional[float] = field(default=None, metadata={"help": "yarn only: attention scale denominator."})
    truncate: Optional[bool] = field(default=None, metadata={"help": "yarn only: truncate the correction range."})
    low_freq_factor: Optional[float] = field(default=None, metadata={"help": "llama3 only: low frequency factor."})
    high_freq_factor: Optional[float] = field(default=None, metadata={"help": "llama3 only: high frequency factor."})
    train_embeddings: bool = field(
        default=False,
        metadata={"help": f"Fully train the input embeddings, saved in the adapter (LongLoRA, {LONGLORA_PAPER})."},
    )
    train_norms: bool = field(
        default=False,
        metadata={"help": f"Fully train all normalisation layers, saved in the adapter (LongLoRA, {LONGLORA_PAPER})."},
    )
    s2_attn: bool = field(
        default=False,
        metadata={
            "help": f"Train with LongLoRA's shifted sparse attention (S²-Attn, {LONGLORA_PAPER}); full attention at "
            "inference."
        },
    )
    s2_group_size_ratio: float = field(
        default=0.25,
        metadata={"help": "S²-Attn block size as a fraction of the sequence length, in (0, 1] (LongLoRA: 0.25)."},
    )
    base_rope_parameters: Optional[dict] = field(
        default=None,
        metadata={"help": "Recorded when applied: the base model's `rope_parameters` before extension."},
    )

    def __post_init__(self):
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"  # PI is for causal LMs; lets AutoPeftModelForCausalLM pick the right class
        super().__post_init__()
        self.peft_type = PeftType[PEFT_TYPE_NAME]

        # normalise
        if isinstance(self.rope_type, str):
            self.rope_type = self.rope_type.strip().lower()
        if _is_number(self.scaling_factor):
            self.scaling_factor = float(self.scaling_factor)
        if _is_number(self.s2_group_size_ratio):
            self.s2_group_size_ratio = float(self.s2_group_size_ratio)

        # validate
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer (the LoRA rank), got {self.r!r}.")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"`rope_type` must be one of {list(ROPE_TYPES)}, got {self.rope_type!r}.")
        allowed = ROPE_TYPES[self.rope_type].extra_parameters
        for name in ROPE_EXTRA_PARAMETERS:
            if getattr(self, name) is not None and name not in allowed:
                takers = [t for t, info in ROPE_TYPES.items() if name in info.extra_parameters]
                raise ValueError(
                    f"`{name}`={getattr(self, name)!r} is not a parameter of rope_type={self.rope_type!r} "
                    f"(it belongs to {takers}); remove it or set `rope_type` to one of {takers}."
                )
        if not isinstance(self.s2_attn, bool):
            raise TypeError(f"`s2_attn` must be True or False, got {self.s2_attn!r}.")
        if (
            not _is_number(self.s2_group_size_ratio)
            or not math.isfinite(self.s2_group_size_ratio)
            or not 0 < self.s2_group_size_ratio <= 1
        ):
            raise ValueError(
                f"`s2_group_size_ratio` must be a number in (0, 1] (the S²-Attn block size as a fraction of the "
                f"sequence length), got {self.s2_group_size_ratio!r}. LongLoRA uses 0.25."
            )
        if self.context_length is None and self.scaling_factor is None:
            raise ValueError(
                "PIConfig needs the target window: pass `context_length` (e.g. 16384) or `scaling_factor` (e.g. 4.0)."
            )
        for name in ("context_length", "original_context_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise TypeError(f"`{name}` must be a positive int (tokens), got {value!r}.")
        if self.scaling_factor is not None:
            if not _is_number(self.scaling_factor):
                raise TypeError(f"`scaling_factor` must be a number >= 1, got {self.scaling_factor!r}.")
            if not math.isfinite(self.scaling_factor) or self.scaling_factor < 1:
                raise ValueError(
                    f"`scaling_factor` must be >= 1 (Position Interpolation only extends the window), got "
                    f"{self.scaling_factor!r}. For a shorter window, just use shorter inputs."
                )
        if self.original_context_length is not None:
            self.resolve_context(self.original_context_length)

    def resolve_context(self, original_context_length: int) -> "PIConfig":
        """Fill in `original_context_length`, `scaling_factor` and `context_length` from the base window L."""
        length = self.original_context_length or original_context_length
        is_noop = self.scaling_factor == 1 and self.context_length in (None, length)
        if self.context_length is not None and self.context_length <= length and not is_noop:
            raise ValueError(
                f"`context_length`={self.context_length} must be larger than the original window "
                f"(`original_context_length`={length}); Position Interpolation extends the context."
            )
        if self.scaling_factor is None:
            self.scaling_factor = self.context_length / length
        expected = effective_context_length(length, self.scaling_factor)
        if self.context_length is None:
            self.context_length = expected
        elif abs(self.context_length - length * self.scaling_factor) > 0.5:
            raise ValueError(
                f"`context_length`={self.context_length} and `scaling_factor`={self.scaling_factor} disagree: with "
                f"`original_context_length`={length} the factor gives {expected} tokens. Pass only one of them."
            )
        self.original_context_length = length
        return self

    @property
    def rope_extra_parameters(self) -> dict[str, Any]:
        """The type-specific `rope_parameters` keys that were set (e.g. `beta_fast` for yarn)."""
        return {
            k: getattr(self, k) for k in ROPE_TYPES[self.rope_type].extra_parameters if getattr(self, k) is not None
        }


retry_deferred()  # registration deferred by a first `import peft` from this module runs now
