"""Position Interpolation + LoRA as a peft method: `PIConfig` (a `LoraConfig` with the target RoPE) and `PIModel`
(peft's `LoraModel` plus BaseTuner hooks that apply the RoPE). Registers itself with peft as ``PI``."""

from ...integrations import register_peft_method, retry_deferred
from .config import PEFT_TYPE_NAME, PIConfig
from .model import PIModel

__all__ = ["PEFT_TYPE_NAME", "PIConfig", "PIModel"]

register_peft_method(name=PEFT_TYPE_NAME, config_cls=PIConfig, model_cls=PIModel, prefix="lora_")
retry_deferred()  # registration deferred by a first `import peft` from this package runs now
