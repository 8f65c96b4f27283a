"""pi_peft: extend the context window of a RoPE LLM with Position Interpolation + (Q)LoRA, as a peft method.

``import pi_peft`` registers the ``PI`` method with peft, so that ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and trl's ``SFTTrainer(peft_config=PIConfig(...))`` all understand it.

The import itself is cheap: registration happens as soon as peft is imported (at once when it already is), and the
public names below are loaded on first use. So ``pi-peft --help`` needs neither torch nor peft, and a program that
imports pi_peft before or after peft gets the same registered method.
"""

from . import _registration
from ._version import __version__

# public name -> module that defines it (PEP 562 lazy attributes)
_LAZY = {
    "PIConfig": ".config",
    "PIModel": ".model",
    "MLAConfig": ".mla",
    "MLAModel": ".mla",
    "pi_inv_freq": ".rope",
    "rope_cos_sin": ".rope",
    "scaled_rope_parameters": ".rope",
    "set_rope_parameters": ".rope",
}

__all__ = [*_LAZY, "__version__"]


def _install() -> None:
    """Register pi_peft's methods with peft and route ``PeftModel.push_to_hub`` of PI models (called once peft is
    imported)."""
    import warnings

    from .config import PIConfig
    from .hub import install_push_to_hub
    from .mla.config import PEFT_TYPE_NAME as MLA_PEFT_TYPE_NAME
    from .mla.config import MLAConfig
    from .mla.model import MLAModel
    from .model import PIModel

    _registration.register(PIConfig, PIModel)
    _registration.register(MLAConfig, MLAModel, name=MLA_PEFT_TYPE_NAME)
    install_push_to_hub()
    # peft 0.21 (`PeftModel.__init__`) and trl 1.16 read transformers' deprecated `is_gradient_checkpointing` on every
    # get_peft_model / SFTTrainer; the FutureWarning is theirs to fix and nothing a user can act on. Only that message.
    warnings.filterwarnings(
        "ignore",
        message="`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module="transformers.modeling_utils",
    )


def _install_trl() -> None:
    """``SFTTrainer(peft_config=PIConfig(...))`` trains at the PI window (see :mod:`pi_peft.trl_integration`)."""
    from .trl_integration import install_sft_trainer_guard

    install_sft_trainer_guard()


_registration.call_when_imported("peft", _install)
_registration.call_when_imported("trl.trainer.sft_trainer", _install_trl)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        import peft  # noqa: F401  (registration runs now, not from inside the half-imported module below)

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pi_peft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
