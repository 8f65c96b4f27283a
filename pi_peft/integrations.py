"""Every change pi_peft makes to another library, in one module.

pi_peft is a plugin: a user's ``import pi_peft`` must make peft, transformers and trl understand PI adapters, and
nothing else in the package reaches into those libraries at import time (``tests/test_integrations.py`` takes a
fingerprint of peft, trl, transformers, torch, accelerate and the interpreter before and after importing every
pi_peft module, and fails on any change that :data:`PATCHES` does not list). The changes:

.. list of PATCHES (kept in sync with the tuple below by that test)

1. ``sys.meta_path``: two one-shot import hooks (:func:`call_when_imported`), so that registration waits for peft and
   the trl guard for trl's trainer module; ``import pi_peft`` itself imports neither (``pi-peft --help`` stays fast).
2. ``peft.utils.peft_types.PeftType``: the members ``PI`` and ``MLA``. peft keeps its methods in a closed enum and its
   ``register_peft_method`` accepts only names already in it (and refuses a second method with the ``lora_`` prefix,
   which PI needs because its layers *are* LoRA layers).
3. ``peft.mapping.PEFT_TYPE_TO_{CONFIG,TUNER,PREFIX}_MAPPING``: the two tuners' rows, what
   ``register_peft_method`` would have written. Each tuner calls :func:`register_peft_method` from its own
   ``__init__`` (``pi_peft/tuners/pi``, ``pi_peft/tuners/mla``), as peft's ``tuners/<method>/__init__.py`` do.
4. ``peft.PeftModel.push_to_hub``: routed to ``pi_peft.sharing.hub.push_to_hub`` for a model with a PI adapter (the
   card and evaluation files; peft's route overwrites the card), unchanged for every other model. The sharing layer
   is imported only when a PI model is pushed.
5. ``trl.SFTTrainer.__init__``: for a PI adapter, ``max_length`` left at trl's default becomes the adapter's window,
   and a longer one is refused; padding-free rows (untruncated by trl) must fit it (``pi_peft.training.window``);
   every other trainer is untouched.
6. ``warnings.filters``: one filter for transformers' ``is_gradient_checkpointing`` deprecation, which peft 0.21 and
   trl 1.16 trigger on every ``get_peft_model`` / ``SFTTrainer`` and no user can act on.
7. ``logging`` filters: one on bitsandbytes' CPU-backend logger (set at ``import pi_peft``, before bitsandbytes is
   imported, which ``import peft`` does), dropping only its import-time line ``Failed to load CPU gemm_4bit_forward
   from kernels-community: No module named 'kernels'``. It means: the optional ``kernels`` package, which would
   download a faster CPU 4-bit inference kernel from the Hugging Face Hub, is not installed, so bitsandbytes uses
   its own CPU kernels. Nothing is wrong (training and results are the same); pi_peft never downloads code.

Because a saved adapter says ``"peft_type": "PI"``, a process that never imported pi_peft cannot load it as a plain
LoRA with the original RoPE: peft fails with ``KeyError: 'PI'`` instead (see the README). The registration checks
the internals it relies on first and is idempotent (repeated import, ``importlib.reload``), so a future peft that
changes them fails at ``import pi_peft`` with a message, not later with a silently wrong model.

Changes made at run time to one object a user asked to change (the rotary buffers of a model given to
``get_peft_model``, S²-Attn's entry in transformers' attention registry, a wrapped MLP's ``forward``) live with the
code that makes them.
"""

from __future__ import annotations

import enum
import functools
import importlib.abc
import importlib.util
import inspect
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

_ENUM_INTERNALS = ("_member_map_", "_value2member_map_", "_member_names_")
_MAPPINGS = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


class Patch(NamedTuple):
    """One change pi_peft makes to another library's objects at import time."""

    target: str  # the object changed, as ``module:qualname`` (what the fingerprint test diffs)
    change: str  # what pi_peft does to it, and when


PATCHES: tuple[Patch, ...] = (
    Patch("sys:meta_path", "one-shot import hooks for `peft` and `trl.trainer.sft_trainer` (until they are imported)"),
    Patch("peft.utils.peft_types:PeftType", "members `PI` and `MLA` (when peft is imported)"),
    Patch("peft.mapping:PEFT_TYPE_TO_CONFIG_MAPPING", "rows `PI` -> PIConfig, `MLA` -> MLAConfig"),
    Patch("peft.mapping:PEFT_TYPE_TO_TUNER_MAPPING", "rows `PI` -> PIModel, `MLA` -> MLAModel"),
    Patch("peft.mapping:PEFT_TYPE_TO_PREFIX_MAPPING", "rows `PI`, `MLA` -> 'lora_'"),
    Patch(
        "peft.peft_model:PeftModel.push_to_hub",
        "PI models go to sharing.hub.push_to_hub (when peft is imported)",
    ),
    Patch(
        "trl.trainer.sft_trainer:SFTTrainer.__init__",
        "PI adapters train at their window (with trl's trainer)",
    ),
    Patch("warnings:filters", "ignore one transformers FutureWarning (when peft is imported)"),
    Patch("logging:filters", "drop bitsandbytes' `Failed to load CPU gemm_4bit_forward from kernels-community` line"),
)
"""Every import-time change, in the order :func:`install` makes them."""

_PI_PEFT_MARK = "_pi_peft"  # set on every function pi_peft installs in another library's class (idempotence)


def _incompatible(what: str, name: str = "PI") -> ImportError:
    import peft

    return ImportError(
        f"pi_peft cannot register its `{name}` method with peft {peft.__version__}: {what}. This peft changed "
        "internals that pi_peft relies on; install a pi_peft release that supports it, or "
        "`pip install 'peft==0.21.2'`."
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


def register_peft_method(*, name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Make ``config_cls``/``model_cls`` peft's method ``name`` with parameter ``prefix``: what peft's own
    ``register_peft_method`` does for its built-in methods, called by each tuner's ``__init__``. Idempotent; raises
    if ``name`` belongs to someone else."""
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


def is_registered(name: str = "PI") -> bool:
    """Whether peft resolves ``peft_type=name`` to one of pi_peft's tuners."""
    from peft import mapping
    from peft.utils.peft_types import PeftType

    return name in PeftType.__members__ and PeftType[name] in mapping.PEFT_TYPE_TO_TUNER_MAPPING


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


# ---- the patches -------------------------------------------------------------------------------------------------
def _has_pi_adapter(model: Any) -> bool:
    from peft.utils.peft_types import PeftType

    configs = getattr(model, "peft_config", None) or {}
    return any(getattr(c, "peft_type", None) == PeftType.PI for c in configs.values() if "PI" in PeftType.__members__)


def install_push_to_hub() -> None:
    """Route ``PeftModel.push_to_hub`` of PI models to ``pi_peft.sharing.hub.push_to_hub`` (idempotent; other models
    unchanged). Why: transformers' ``push_to_hub`` saves, then overwrites ``README.md`` with the repo's current card,
    with no hook in between, so a PI adapter's card and evaluation files would never reach the Hub."""
    from peft import PeftModel

    original = PeftModel.push_to_hub
    if getattr(original, _PI_PEFT_MARK, False):
        return

    @functools.wraps(original)
    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any):
        if args or not _has_pi_adapter(self):
            return original(self, repo_id, *args, **kwargs)
        from .sharing.hub import push_to_hub as push_pi_adapter

        return push_pi_adapter(self, repo_id, **kwargs)

    setattr(push_to_hub, _PI_PEFT_MARK, True)
    PeftModel.push_to_hub = push_to_hub


def install_sft_trainer_guard() -> None:
    """Wrap ``trl.SFTTrainer.__init__`` so that a PI adapter trains at its window (idempotent; see
    :mod:`pi_peft.training.window`). Every other trainer is left exactly as trl made it."""
    from trl import SFTTrainer

    original = SFTTrainer.__init__
    if getattr(original, _PI_PEFT_MARK, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any):
        from .training.window import align_sft_arguments, check_padding_free_rows

        bound = signature.bind(self, *args, **kwargs)
        window = align_sft_arguments(bound.arguments)
        original(*bound.args, **bound.kwargs)
        check_padding_free_rows(self, window)

    setattr(__init__, _PI_PEFT_MARK, True)
    SFTTrainer.__init__ = __init__


def filter_warnings() -> None:
    """peft 0.21 (``PeftModel.__init__``) and trl 1.16 read transformers' deprecated ``is_gradient_checkpointing``
    on every ``get_peft_model`` / ``SFTTrainer``; the FutureWarning is theirs to fix. Only that message."""
    warnings.filterwarnings(
        "ignore",
        message="`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module="transformers.modeling_utils",
    )


BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropBnbKernelsNotice(logging.Filter):
    """Drops bitsandbytes' import-time notice that the optional `kernels` package is absent (item 7 above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_KERNELS_NOTICE)


def filter_bnb_kernels_notice() -> None:
    """Install :class:`_DropBnbKernelsNotice` on bitsandbytes' CPU-backend logger (idempotent; bitsandbytes itself
    is not imported)."""
    bnb_logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropBnbKernelsNotice) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropBnbKernelsNotice())


def _on_peft_import() -> None:
    # Each tuner registers itself in its own __init__ (a half-imported tuner finishes and registers on its own).
    import pi_peft.tuners.mla  # noqa: F401
    import pi_peft.tuners.pi  # noqa: F401

    install_push_to_hub()
    filter_warnings()


def install() -> None:
    """What ``import pi_peft`` does: every patch in :data:`PATCHES`, each when its library is imported."""
    call_when_imported("peft", _on_peft_import)
    call_when_imported("trl.trainer.sft_trainer", install_sft_trainer_guard)
    filter_bnb_kernels_notice()  # now: `import peft` imports bitsandbytes before the hook above runs
