"""MHA2MLA (Ji et al. 2025, https://arxiv.org/abs/2502.14837) as a peft method: multi-head latent attention with a
compressed KV cache, partial RoPE, LoRA on the other layers and optional Position Interpolation on the kept dims."""

from ...integrations import register_peft_method, retry_deferred
from .cache import MLACache
from .config import PEFT_TYPE_NAME, MLAConfig
from .layer import MLAAttention, joint_svd, max_kv_rank
from .model import MLAModel, initialize_mla_weights
from .selection import ROPE_SELECTIONS

__all__ = [
    "ROPE_SELECTIONS",
    "MLAAttention",
    "MLACache",
    "MLAConfig",
    "MLAModel",
    "initialize_mla_weights",
    "joint_svd",
    "max_kv_rank",
]

register_peft_method(name=PEFT_TYPE_NAME, config_cls=MLAConfig, model_cls=MLAModel, prefix="lora_")
retry_deferred()  # registration deferred by a first `import peft` from this package runs now
