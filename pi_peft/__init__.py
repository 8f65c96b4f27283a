"""pi_peft: extend the context window of a RoPE LLM with Position Interpolation + (Q)LoRA, as a peft method.

``import pi_peft`` registers the ``PI`` method with peft, so that ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and trl's ``SFTTrainer(peft_config=PIConfig(...))`` all understand it.
"""

from . import _registration
from .config import PIConfig
from .model import PIModel
from .rope import pi_inv_freq, rope_cos_sin, scaled_rope_parameters, set_rope_parameters

__version__ = "0.1.0"

_registration.register(PIConfig, PIModel)

from . import hub  # noqa: E402,F401  (routes `PeftModel.push_to_hub` of PI models through `hub.push_to_hub`)

__all__ = [
    "PIConfig",
    "PIModel",
    "__version__",
    "pi_inv_freq",
    "rope_cos_sin",
    "scaled_rope_parameters",
    "set_rope_parameters",
]
