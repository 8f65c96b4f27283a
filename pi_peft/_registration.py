"""Register the ``PI`` method with peft.

peft keeps its methods in a closed ``PeftType`` enum, and ``peft.utils.register_peft_method`` only accepts names
that are already members of it. It also refuses a second method with the ``lora_`` prefix, which pi_peft needs
because its layers *are* LoRA layers. This module is the one place where pi_peft reaches into peft internals:

1. it adds a ``PI`` member to ``peft.utils.peft_types.PeftType`` (so ``"peft_type": "PI"`` in ``adapter_config.json``
   resolves), and
2. it writes ``PIConfig``/``PIModel``/``"lora_"`` into the three lookup tables in ``peft.mapping`` that
   ``register_peft_method`` would have filled.

Because the saved adapter says ``"peft_type": "PI"``, a process that never imported pi_peft cannot load it as a
plain LoRA with the original RoPE: peft fails with ``KeyError: 'PI'`` instead (see the README).

:func:`register` is idempotent (safe under repeated import and ``importlib.reload``) and checks the internals it
relies on first, so a future peft that changes them fails at ``import pi_peft`` with a message, not later with a
silently wrong model.
"""

from __future__ import annotations

import enum

import peft

PEFT_TYPE_NAME = "PI"
"""The value stored as ``peft_type`` in ``adapter_config.json``."""

PREFIX = "lora_"
"""Parameter prefix of the method: pi_peft adapters are made of peft's own LoRA layers."""

_ENUM_INTERNALS = ("_member_map_", "_value2member_map_", "_member_names_")
_MAPPINGS = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def _incompatible(what: str) -> ImportError:
    return ImportError(
        f"pi_peft cannot register its `PI` method with peft {peft.__version__}: {what}. This peft changed internals "
        "that pi_peft relies on; install a pi_peft release that supports it, or `pip install 'peft==0.21.2'`."
    )


def _check_internals():
    from peft import mapping
    from peft.utils import peft_types

    peft_type = getattr(peft_types, "PeftType", None)
    if not (isinstance(peft_type, enum.EnumMeta) and issubclass(peft_type, str)):
        raise _incompatible("`peft.utils.peft_types.PeftType` is no longer a `str` enum")
    for name in _ENUM_INTERNALS:
        if not hasattr(peft_type, name):
            raise _incompatible(f"`PeftType.{name}` is missing")
    for name in _MAPPINGS:
        if not isinstance(getattr(mapping, name, None), dict):
            raise _incompatible(f"`peft.mapping.{name}` is missing or not a dict")
    if "LORA" not in peft_type.__members__:
        raise _incompatible("`PeftType.LORA` is missing")
    return peft_type, mapping


def _add_enum_member(peft_type: type[enum.Enum], name: str) -> enum.Enum:
    """Add ``name`` to the closed ``PeftType`` enum (no-op when it is already there)."""
    if name in peft_type.__members__:
        return peft_type[name]
    member = str.__new__(peft_type, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = peft_type
    member.__init__(name)
    type.__setattr__(peft_type, name, member)  # `EnumType.__setattr__` refuses member names
    peft_type._member_map_[name] = member
    peft_type._value2member_map_[name] = member
    peft_type._member_names_.append(name)
    if peft_type(name) is not member:  # the lookups peft uses (`PeftType("PI")`, `PeftType.PI`) must resolve
        raise _incompatible("adding a member to `PeftType` did not take effect")
    return member


def register(config_cls: type, model_cls: type) -> None:
    """Make ``config_cls``/``model_cls`` peft's ``PI`` method. Idempotent; raises if ``PI`` belongs to someone else."""
    peft_type_enum, mapping = _check_internals()
    peft_type = _add_enum_member(peft_type_enum, PEFT_TYPE_NAME)

    current = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if current is not None and current.__module__ != config_cls.__module__:
        raise ImportError(
            f"peft already has a `{PEFT_TYPE_NAME}` method ({current.__module__}.{current.__qualname__}); pi_peft "
            "cannot register over it. Is another package using the same name?"
        )
    if getattr(model_cls, "prefix", PREFIX) != PREFIX:
        raise ValueError(f"`{model_cls.__name__}.prefix` must be {PREFIX!r}, got {model_cls.prefix!r}.")
    # Same module (first import or `importlib.reload`): (re)point the tables at the current classes.
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX


def is_registered() -> bool:
    """Whether peft resolves ``peft_type="PI"`` to pi_peft's classes."""
    from peft import mapping
    from peft.utils.peft_types import PeftType

    return PEFT_TYPE_NAME in PeftType.__members__ and PeftType[PEFT_TYPE_NAME] in mapping.PEFT_TYPE_TO_TUNER_MAPPING
