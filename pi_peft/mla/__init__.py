"""MHA2MLA (Ji et al. 2025, https://arxiv.org/abs/2502.14837) as a peft method: multi-head latent attention with a
compressed KV cache, partial RoPE, LoRA on the other layers and optional Position Interpolation on the kept dims."""

import peft  # noqa: F401  (first: pi_peft registers MLA when peft loads, before this package's modules run)

from .. import _registration
from .cache import MLACache
from .config import MLAConfig
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


_registration.retry_deferred()  # registration deferred by a first `import peft` from this module runs now
