"""pi_peft: extend the context window of a RoPE LLM with Position Interpolation + (Q)LoRA, as a peft method.

``import pi_peft`` registers the ``PI`` method with peft, so that ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and trl's ``SFTTrainer(peft_config=PIConfig(...))`` all understand it.

The import itself is cheap: registration happens as soon as peft is imported (at once when it already is), and the
public names below are loaded on first use. So ``pi-peft --help`` needs neither torch nor peft, and a program that
imports pi_peft before or after peft gets the same registered method.
"""

from . import integrations
from ._version import __version__

# public name -> module that defines it (PEP 562 lazy attributes)
_LAZY = {
    "PIConfig": ".tuners.pi",
    "PIModel": ".tuners.pi",
    "MLAConfig": ".tuners.mla",
    "MLAModel": ".tuners.mla",
    "pi_inv_freq": ".rope",
    "rope_cos_sin": ".rope",
    "scaled_rope_parameters": ".rope",
    "set_rope_parameters": ".rope",
}

__all__ = [*_LAZY, "__version__"]

integrations.install()  # every change to another library, each when that library is imported (see integrations)


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
