import importlib

import peft
import pytest
from peft import mapping
from peft.utils.peft_types import PeftType

import pi_peft
from pi_peft import PIConfig, PIModel, _registration


def test_pi_is_a_peft_type_with_all_tables_filled():
    assert PeftType("PI") is PeftType.PI is PeftType["PI"]
    assert "PI" in list(PeftType)
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["PI"] is PIConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["PI"] is PIModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["PI"] == "lora_"
    assert _registration.is_registered()
    assert PeftType.LORA in mapping.PEFT_TYPE_TO_TUNER_MAPPING  # LoRA untouched


def test_register_is_idempotent_and_survives_reload():
    members = list(PeftType)
    _registration.register(PIConfig, PIModel)
    _registration.register(PIConfig, PIModel)
    assert list(PeftType) == members
    reloaded = importlib.reload(pi_peft)
    assert list(PeftType) == members
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["PI"] is reloaded.PIConfig


def test_someone_elses_pi_method_is_not_overwritten(monkeypatch):
    class OtherConfig:
        __module__ = "other_package.config"

    monkeypatch.setitem(mapping.PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.PI, OtherConfig)
    with pytest.raises(ImportError, match=r"already has a `PI` method \(other_package\.config"):
        _registration.register(PIConfig, PIModel)


def test_wrong_prefix_is_refused():
    class Model(PIModel):
        prefix = "pi_"

    with pytest.raises(ValueError, match=r"`Model.prefix` must be 'lora_', got 'pi_'"):
        _registration.register(PIConfig, Model)


@pytest.mark.parametrize("table", _registration._MAPPINGS)
def test_changed_peft_internals_fail_at_import_with_a_message(monkeypatch, table):
    monkeypatch.delattr(mapping, table)
    with pytest.raises(ImportError, match=rf"peft {peft.__version__}: `peft.mapping.{table}` is missing"):
        _registration.register(PIConfig, PIModel)


def test_peft_type_that_is_no_longer_an_enum_fails_clearly(monkeypatch):
    from peft.utils import peft_types

    monkeypatch.setattr(peft_types, "PeftType", dict)
    with pytest.raises(ImportError, match=r"no longer a `str` enum.*pip install 'peft==0.21.2'"):
        _registration.register(PIConfig, PIModel)
