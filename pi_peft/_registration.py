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
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable

PEFT_TYPE_NAME = "PI"
"""The value stored as ``peft_type`` in ``adapter_config.json``."""

PREFIX = "lora_"
"""Parameter prefix of the method: pi_peft adapters are made of peft's own LoRA layers."""

_ENUM_INTERNALS = ("_member_map_", "_value2member_map_", "_member_names_")
_MAPPINGS = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def _incompatible(what: str) -> ImportError:
    import peft

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


def register(config_cls: type, model_cls: type, name: str = PEFT_TYPE_NAME, prefix: str = PREFIX) -> None:
    """Make ``config_cls``/``model_cls`` peft's method ``name`` (``PI``, or ``MLA`` for MHA2MLA) with parameter
    ``prefix``. Idempotent; raises if ``name`` belongs to someone else."""
    peft_type_enum, mapping = _check_internals()
    peft_type = _add_enum_member(peft_type_enum, name)

    current = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if current is not None and current.__module__ != config_cls.__module__:
        raise ImportError(
            f"peft already has a `{name}` method ({current.__module__}.{current.__qualname__}); pi_peft "
            "cannot register over it. Is another package using the same name?"
        )
    if getattr(model_cls, "prefix", prefix) != prefix:
        raise ValueError(f"`{model_cls.__name__}.prefix` must be {prefix!r}, got {model_cls.prefix!r}.")
    # Same module (first import or `importlib.reload`): (re)point the tables at the current classes.
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix


def is_registered() -> bool:
    """Whether peft resolves ``peft_type="PI"`` to pi_peft's classes."""
    from peft import mapping
    from peft.utils.peft_types import PeftType

    return PEFT_TYPE_NAME in PeftType.__members__ and PeftType[PEFT_TYPE_NAME] in mapping.PEFT_TYPE_TO_TUNER_MAPPING


class _CallAfterExec(importlib.abc.Loader):
    """Loader proxy: runs the real loader, then ``callback`` (the module is complete and in ``sys.modules``)."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[], None]):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name: str):  # resource readers, get_source, ...: the real loader's
        return getattr(self._loader, name)


class _WhenImported(importlib.abc.MetaPathFinder):
    """Meta path finder: when ``name`` is first imported, call ``callback`` right after it is executed (once).

    Only the spec used for the actual import runs the callback; a mere look-up (``importlib.util.find_spec``, as
    availability checks do) leaves the finder in place for the real import.
    """

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback, self._busy = name, callback, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._busy:
            return None
        self._busy = True  # let the real finders answer the look-up below
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is not None and spec.loader is not None:
            spec.loader = _CallAfterExec(spec.loader, self._fire)
        return spec

    def _fire(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.callback()


_deferred: list[Callable[[], None]] = []


def _inside_pi_peft_import() -> bool:
    """Whether a pi_peft submodule is being executed right now (its names may not exist yet)."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith("pi_peft.")
    )


def _run(callback: Callable[[], None]) -> None:
    """Run ``callback``; if it needs a pi_peft module that is still half-imported (peft was first imported from the
    top of that module), run it again from :func:`retry_deferred` at the end of that module instead."""
    try:
        callback()
    except ImportError:
        if not _inside_pi_peft_import():
            raise
        _deferred.append(callback)


def retry_deferred() -> None:
    """Run the callbacks deferred by :func:`_run`; called as the last line of every pi_peft module that imports peft
    or trl at its top (the innermost one finishing first, the outermost one last)."""
    while _deferred:
        callback = _deferred.pop(0)  # taken out first: the callback's own imports may call this function again
        try:
            callback()
        except ImportError:
            if _inside_pi_peft_import():
                _deferred.insert(0, callback)
                return  # an outer pi_peft module is still half-imported; its own last line retries
            raise


def call_when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` now if module ``name`` is imported, else right after its first import (at most once).

    This is how ``import pi_peft`` registers with peft without importing peft (and torch) itself: ``pi-peft --help``
    stays instant, and any later ``import peft`` (directly or through transformers/trl) registers the method first.
    When that first import comes from the top of a pi_peft module (``from pi_peft.config import PIConfig`` as a
    program's first line), the callback waits for the end of that module (:func:`retry_deferred`).
    """
    if name in sys.modules:
        _run(callback)
    elif not any(isinstance(f, _WhenImported) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenImported(name, lambda: _run(callback)))
