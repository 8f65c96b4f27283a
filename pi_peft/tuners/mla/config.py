from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.utils.peft_types import PeftType

from ...integrations import retry_deferred
from ...utils import check_positive_int, is_positive_int
from ..pi.config import PIConfig
from .selection import ROPE_SELECTIONS

MHA2MLA_PAPER = "https://arxiv.org/abs/2502.14837"
PEFT_TYPE_NAME = "MLA"
"""The value stored as ``peft_type`` in ``adapter_config.json`` of an MHA2MLA adapter."""


@dataclass
class MLAConfig(PIConfig):
    """
    Configuration of an [`MLAModel`]: converts a model's attention to multi-head latent attention (MHA2MLA,
    [Ji et al. 2025](https://arxiv.org/abs/2502.14837)) as an adapter, with LoRA on the other linear layers and,
    optionally, Position Interpolation on the rotary dimensions that are kept.

    Each layer's keys and values are rebuilt from one latent vector of `kv_rank` values per token (a joint SVD of the
    no-RoPE key rows and the value rows of `k_proj`/`v_proj`), plus `rope_dims` rotary key dimensions per key/value
    head that keep RoPE (partial RoPE). Generation caches only those: `kv_rank + kv_heads * rope_dims` values per token
    and layer instead of `2 * kv_heads * head_dim`. Models that RMS-normalise keys per head before RoPE (`k_norm`:
    Qwen3; OLMo 2 over the whole projection) convert exactly too and cache one more value per kv head and token (the
    token's `1 / rms`, which the no-RoPE keys rebuilt from the latent need): `kv_rank + kv_heads * (rope_dims + 1)`.

    Every [`PIConfig`] (and so [`~peft.LoraConfig`]) option works. Without `context_length`/`scaling_factor` the RoPE
    of the model is left as it is (`scaling_factor=1`); with them, PI rescales the kept rotary dimensions (the others
    no longer rotate).

    Args:
        kv_rank (`int`):
            Width of the joint key/value latent per token and layer; at most `min(hidden_size, kv_heads * (2 * head_dim
            - rope_dims))`, the rank the stacked projection can have. The paper's Llama-2-7B setting is 512.
        rope_dims (`int`):
            Rotary dimensions kept per key/value head: even, between 2 and `head_dim`. The paper uses 4 or 8 of 128.
        rope_selection (`str`, defaults to `"high"`):
            Which rotary frequency pairs keep RoPE: `"high"` (fastest), `"low"` (slowest), `"uniform"` (evenly spaced)
            or `"2-norm"` (largest query x key pair norms on calibration data, summed over each GQA group; the paper's
            best). `"2-norm"` needs `pi_peft.tuners.mla.initialize_mla_weights(model, calibration_batches)` after
            `get_peft_model`, like peft's EVA initialisation.
        rope_pairs (`list`, *optional*):
            Filled in when the conversion is applied: the kept frequency-pair indices, `[layer][kv_head][pair]`. A
            saved adapter re-applies exactly these, so loading needs no calibration data.
        full_finetune (`bool`, defaults to `False`):
            Train every weight of the converted model, not only the MLA matrices and LoRA: the embeddings, `q_proj`/
            `o_proj`, the MLP, the norms and the head, as MHA2MLA's own recipe does (the paper fine-tunes fully). All
            of them are saved in `adapter_model.safetensors` (about the size of the model; `k_proj`/`v_proj`, unused
            once converted, are left out) and loading re-applies them over a fresh base. The base weights are then
            changed in place, so `disable_adapter()` / `unload()` no longer give the original model. Named like the
            paper's setting rather than like `train_embeddings` / `train_norms`, which copy single modules through
            peft's `modules_to_save`: this switch trains the base weights themselves (no second copy in memory), so
            it excludes those fields and needs an unquantised (fp32/bf16/fp16) base.
    """

    kv_rank: Optional[int] = field(
        default=None,
        metadata={"help": "Width of the joint key/value latent per token and layer (MHA2MLA's d_kv x heads)."},
    )
    rope_dims: Optional[int] = field(
        default=None,
        metadata={"help": "Rotary dimensions kept per key/value head (even, 2 .. head_dim); the rest lose RoPE."},
    )
    rope_selection: str = field(
        default="high",
        metadata={"help": f"Partial-RoPE selection: one of {ROPE_SELECTIONS} ({MHA2MLA_PAPER}, Sec. 3.1)."},
    )
    rope_pairs: Optional[list] = field(
        default=None,
        metadata={"help": "Recorded when applied: kept frequency-pair indices per layer and kv head."},
    )

    full_finetune: bool = field(
        default=False,
        metadata={
            "help": "Train every weight of the converted model (MHA2MLA's full fine-tuning), all saved in the adapter "
            "file; excludes `train_embeddings`/`train_norms`/`modules_to_save`."
        },
    )

    def __post_init__(self):
        if self.context_length is None and self.scaling_factor is None:
            self.scaling_factor = 1.0  # MLA without context extension: leave RoPE as it is
        if self.target_modules is None:
            self.target_modules = "all-linear"  # k_proj/v_proj are skipped: MLA replaces them
        super().__post_init__()
        self.peft_type = PeftType[PEFT_TYPE_NAME]

        # normalise
        if isinstance(self.rope_selection, str):
            self.rope_selection = self.rope_selection.strip().lower().replace("_", "-")
            self.rope_selection = {"2norm": "2-norm", "norm": "2-norm"}.get(self.rope_selection, self.rope_selection)

        # validate
        if self.kv_rank is None or self.rope_dims is None:
            raise ValueError(
                "MLAConfig needs `kv_rank` (latent width per token, e.g. 512 for Llama-2-7B) and `rope_dims` (rotary "
                "dimensions kept per head, e.g. 4 or 8)."
            )
        check_positive_int("kv_rank", self.kv_rank, "latent values per token")
        if not is_positive_int(self.rope_dims) or self.rope_dims % 2:
            raise ValueError(
                f"`rope_dims` must be a positive even int (RoPE rotates dimensions in pairs), got {self.rope_dims!r}; "
                "use e.g. 4 or 8."
            )
        if self.rope_selection not in ROPE_SELECTIONS:
            raise ValueError(f"`rope_selection` must be one of {list(ROPE_SELECTIONS)}, got {self.rope_selection!r}.")
        if self.use_dora:
            raise ValueError("`use_dora=True` is not supported with MLAConfig; use plain LoRA on the other layers.")
        if not isinstance(self.full_finetune, bool):
            raise TypeError(f"`full_finetune` must be True or False, got {self.full_finetune!r}.")
        if self.full_finetune:
            overlapping = [n for n in ("train_embeddings", "train_norms") if getattr(self, n)]
            if self.modules_to_save:
                overlapping.append(f"modules_to_save={list(self.modules_to_save)}")
            if overlapping:
                raise ValueError(
                    f"`full_finetune=True` already trains and saves every weight; drop {', '.join(overlapping)} "
                    "(they would keep a second, separately trained copy of those modules)."
                )
        if self.rope_pairs is not None and not isinstance(self.rope_pairs, list):
            raise TypeError(
                f"`rope_pairs` must be a list [layer][kv_head][pair] or None, got {type(self.rope_pairs)}."
            )


retry_deferred()  # registration deferred by a first `import peft` from this module runs now
