"""pi_peft.integrations: every change pi_peft makes to another library, and registration with peft.

The fingerprint test imports peft, trl, transformers, torch, accelerate and datasets, records every object they
define (module attributes, class attributes, enum members, the keys of module-level dicts), then imports pi_peft and
every one of its modules and compares: the changes must be exactly those that `integrations.PATCHES` lists. A new
patch anywhere else in pi_peft (or a listed one that no longer happens) fails it.
"""

import importlib
import json
import subprocess
import sys
import textwrap

import peft
import pytest
from peft import mapping
from peft.utils.peft_types import PeftType

import pi_peft
from pi_peft import PIConfig, PIModel, integrations


def register_pi():
    integrations.register_peft_method(name="PI", config_cls=PIConfig, model_cls=PIModel, prefix="lora_")


def run_fresh(code: str, timeout: int = 300) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


FINGERPRINT = """
import enum, importlib, json, logging, pkgutil, sys, warnings

LIBRARIES = ("peft", "trl", "transformers", "torch", "accelerate", "datasets")


def fingerprint():
    with warnings.catch_warnings():  # reading deprecated module attributes warns; the filters are restored after
        warnings.simplefilter("ignore")
        return _fingerprint()


def _fingerprint():
    # state: (kind, object id, name) -> a value that changes when the object is patched; aliases: id -> its names
    state, aliases = {}, {}
    for modname, module in list(sys.modules.items()):
        if module is None or modname.split(".")[0] not in LIBRARIES:
            continue
        for attr, value in list(vars(module).items()):
            where = f"{modname}:{attr}"
            aliases.setdefault(id(value), set()).add(where)
            state[("attr", id(module), where)] = id(value)
            if isinstance(value, type) and getattr(value, "__module__", None) == modname:
                for key, item in list(vars(value).items()):
                    if key != "__annotations__":  # Python creates it lazily on first read
                        state[("member", id(value), key)] = id(item)
                if isinstance(value, enum.EnumMeta):
                    state[("enum", id(value), "")] = tuple(value.__members__)
            if isinstance(value, dict) and len(value) < 10_000:
                state[("keys", id(value), "")] = tuple(sorted(map(repr, value.keys())))
    hooks = tuple(f"{type(f).__module__}.{type(f).__qualname__}" for f in sys.meta_path)
    state[("global", 0, "sys:meta_path")] = hooks
    state[("global", 0, "warnings:filters")] = tuple(map(repr, warnings.filters))
    loggers = sorted(logging.Logger.manager.loggerDict.items())
    state[("global", 0, "logging:filters")] = tuple(
        (name, tuple(type(f).__qualname__ for f in lg.filters)) for name, lg in loggers if getattr(lg, "filters", None)
    )
    return state, aliases


import peft, trl.trainer.sft_trainer, transformers, torch, accelerate, datasets  # noqa: E401
import peft.peft_model, peft.mapping, peft.utils.peft_types  # noqa: E401
before, aliases = fingerprint()

import pi_peft
for info in pkgutil.walk_packages(pi_peft.__path__, "pi_peft."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
after, _ = fingerprint()

changes = []  # each change: every name the changed object is known by
for key in set(before) | set(after):
    kind, obj, name = key
    if key in before and before[key] == after.get(key, before[key]):
        continue
    if key not in before and (kind != "member" or obj not in aliases):  # lazy loading, new submodules and classes
        continue
    if kind == "global":
        changes.append([name])
    elif kind == "attr":
        changes.append([name])
    elif kind == "member":
        changes.append(sorted(f"{n}.{name}" for n in aliases[obj]))
    else:
        changes.append(sorted(aliases[obj]))
print(json.dumps(sorted(changes)))
"""


def test_every_import_time_patch_is_listed_in_integrations():
    changes = json.loads(run_fresh(FINGERPRINT, timeout=600))  # each change: the names of the changed object
    listed = {patch.target for patch in integrations.PATCHES if patch.target != "sys:meta_path"}  # (hooks: below)

    def covers(target: str, name: str) -> bool:  # "peft.utils.peft_types:PeftType" covers "...:PeftType.PI"
        return name == target or name.startswith(target + ".")

    unlisted = [names for names in changes if not any(covers(t, n) for t in listed for n in names)]
    unmade = [t for t in listed if not any(covers(t, n) for names in changes for n in names)]
    assert not unlisted, f"import-time changes that integrations.PATCHES does not list: {unlisted}"
    assert not unmade, f"listed in integrations.PATCHES but not made: {unmade}"


def test_import_hooks_are_the_listed_ones_and_go_once_used():
    out = run_fresh(
        """
        import json, sys
        before = list(sys.meta_path)
        import pi_peft
        hooks = [f.name for f in sys.meta_path if f not in before]
        import peft, trl.trainer.sft_trainer
        left = [f.name for f in sys.meta_path if isinstance(f, pi_peft.integrations._WhenImported)]
        print(json.dumps([hooks, left]))
        """
    )
    hooks, left = json.loads(out)
    assert sorted(hooks) == ["peft", "trl.trainer.sft_trainer"] and left == []
    assert any(p.target == "sys:meta_path" for p in integrations.PATCHES)


def test_import_pi_peft_and_peft_load_no_sharing_module():
    out = run_fresh(
        """
        import json, sys
        import pi_peft, peft
        from pi_peft import PIConfig, MLAConfig
        print(json.dumps(sorted(m for m in sys.modules if m.startswith(("pi_peft.sharing", "pi_peft.training")))))
        """
    )
    assert json.loads(out) == []


def test_pi_is_a_peft_type_with_all_tables_filled():
    assert PeftType("PI") is PeftType.PI is PeftType["PI"]
    assert "PI" in list(PeftType)
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["PI"] is PIConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["PI"] is PIModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["PI"] == "lora_"
    assert integrations.is_registered("PI") and integrations.is_registered("MLA")
    assert PeftType.LORA in mapping.PEFT_TYPE_TO_TUNER_MAPPING  # LoRA untouched


def test_register_is_idempotent_and_survives_reload():
    members = list(PeftType)
    register_pi()
    register_pi()
    assert list(PeftType) == members
    reloaded = importlib.reload(pi_peft)
    assert list(PeftType) == members
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["PI"] is reloaded.PIConfig


def test_someone_elses_pi_method_is_not_overwritten(monkeypatch):
    class OtherConfig:
        __module__ = "other_package.config"

    monkeypatch.setitem(mapping.PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.PI, OtherConfig)
    with pytest.raises(ImportError, match=r"already has a `PI` method \(other_package\.config"):
        register_pi()


def test_wrong_prefix_is_refused():
    class Model(PIModel):
        prefix = "pi_"

    with pytest.raises(ValueError, match=r"`Model.prefix` must be 'lora_', got 'pi_'"):
        integrations.register_peft_method(name="PI", config_cls=PIConfig, model_cls=Model, prefix="lora_")


@pytest.mark.parametrize("table", integrations._MAPPINGS)
def test_changed_peft_internals_fail_at_import_with_a_message(monkeypatch, table):
    monkeypatch.delattr(mapping, table)
    with pytest.raises(ImportError, match=rf"peft {peft.__version__}: `peft.mapping.{table}` is missing"):
        register_pi()


def test_peft_type_that_is_no_longer_an_enum_fails_clearly(monkeypatch):
    from peft.utils import peft_types

    monkeypatch.setattr(peft_types, "PeftType", dict)
    with pytest.raises(ImportError, match=r"no longer a `str` enum.*pip install 'peft==0.21.2'"):
        register_pi()


def test_import_order_does_not_matter_for_registration():
    code = textwrap.dedent(
        """
        import importlib.util, json, sys
        import pi_peft
        assert "peft" not in sys.modules
        importlib.util.find_spec("peft")  # an availability check must not use up the registration hook
        from peft import PeftType
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        print(json.dumps(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.PI].__name__))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == "PIConfig"


@pytest.mark.parametrize(
    "first_line",
    [
        "from pi_peft.tuners.pi.config import PIConfig",
        "from pi_peft.tuners.pi.model import PIModel",
        "from pi_peft.training.sft import main",
    ],
)
def test_any_pi_peft_module_as_the_first_import_registers(first_line):
    code = textwrap.dedent(
        f"""
        {first_line}
        from peft import PeftModel, PeftType
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as configs
        print(configs[PeftType.PI].__name__, configs[PeftType.MLA].__name__, PeftModel.push_to_hub._pi_peft)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["PIConfig", "MLAConfig", "True"]
