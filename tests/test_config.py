import copy
import json
import pickle

import pytest
from peft import LoraConfig, PeftConfig
from peft.utils.peft_types import PeftType

from pi_peft import PIConfig


def make(**kwargs):
    return PIConfig(**{"scaling_factor": 4.0, "target_modules": ["q_proj", "v_proj"], **kwargs})


def test_is_a_lora_config_with_pi_type():
    config = make()
    assert isinstance(config, LoraConfig)
    assert config.peft_type == PeftType.PI == "PI"
    assert config.task_type == "CAUSAL_LM"
    assert config.rope_type == "linear"


def test_lengths_are_derived_from_each_other():
    assert make(original_context_length=4096).context_length == 16384
    config = PIConfig(context_length=32768, original_context_length=4096)
    assert config.scaling_factor == 8.0
    config = PIConfig(context_length=16384)  # original comes from the model later
    assert config.scaling_factor is None
    config.resolve_context(4096)
    assert (config.original_context_length, config.scaling_factor, config.context_length) == (4096, 4.0, 16384)


def test_scaling_factor_one_resolves_to_the_original_window_and_stays_valid():
    config = PIConfig(scaling_factor=1.0, original_context_length=4096)
    assert config.context_length == 4096
    assert config.resolve_context(4096).context_length == 4096  # resolving again (e.g. in PIModel) is fine
    with pytest.raises(ValueError, match="`context_length`=4096 must be larger"):
        PIConfig(context_length=4096, original_context_length=4096)


def test_lora_options_pass_through():
    config = make(r=16, lora_alpha=32, lora_dropout=0.05, use_rslora=True, target_modules="all-linear")
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (16, 32, 0.05, True)


def test_json_copy_deepcopy_pickle_roundtrips(tmp_path):
    config = make(
        original_context_length=4096, rope_type="yarn", beta_fast=16.0, train_norms=True, modules_to_save=["lm_head"]
    )
    for clone in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PI"
    assert (saved["context_length"], saved["scaling_factor"], saved["rope_type"]) == (16384, 4.0, "yarn")
    for loaded in (PeftConfig.from_pretrained(tmp_path), PIConfig.from_pretrained(tmp_path)):
        assert type(loaded) is PIConfig
        assert loaded.to_dict() == config.to_dict()
    assert PeftConfig.from_peft_type(**saved).to_dict() == config.to_dict()


def test_pi_fields_double_as_a_cli():
    # peft 0.21's LoraConfig itself is not HfArgumentParser-compatible (Union-of-generics fields), so recipes
    # parse PIConfig's own fields; they must all be argparse-friendly.
    from dataclasses import fields, make_dataclass

    from transformers import HfArgumentParser

    own = [f for f in fields(PIConfig) if f.name not in {g.name for g in fields(LoraConfig)} and f.type is not dict]
    args_cls = make_dataclass("PIArgs", [(f.name, f.type, f) for f in own if "Optional[dict]" not in str(f.type)])
    (args,) = HfArgumentParser(args_cls).parse_args_into_dataclasses(
        ["--context_length", "16384", "--rope_type", "yarn", "--beta_fast", "16", "--train_norms", "true"]
    )
    config = PIConfig(**vars(args))
    assert (config.context_length, config.rope_type, config.beta_fast, config.train_norms) == (16384, "yarn", 16, True)


def test_every_pi_field_is_documented():
    doc = PIConfig.__doc__
    from dataclasses import fields

    own = [f for f in fields(PIConfig) if f.name not in {g.name for g in fields(LoraConfig)}]
    assert len(own) >= 15
    for f in own:
        assert f"{f.name} (`" in doc, f"`{f.name}` has no Args: entry"
        assert f.metadata.get("help"), f"`{f.name}` has no metadata help"
    assert "https://arxiv.org/abs/2306.15595" in doc


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scaling_factor": 0.5}, ValueError, r"`scaling_factor` must be >= 1.*0\.5"),
        ({"scaling_factor": float("nan")}, ValueError, r"`scaling_factor` must be >= 1.*nan"),
        ({"scaling_factor": "4"}, TypeError, r"`scaling_factor` must be a number.*'4'"),
        ({"scaling_factor": True}, TypeError, r"`scaling_factor` must be a number.*True"),
        ({"scaling_factor": None}, ValueError, r"`context_length`.*`scaling_factor`"),
        (
            {"context_length": 20000, "original_context_length": 4096},
            ValueError,
            r"`context_length`=20000 and `scaling_factor`=4.0 disagree.*16384",
        ),
        (
            {"scaling_factor": None, "context_length": 4096, "original_context_length": 4096},
            ValueError,
            r"`context_length`=4096 must be larger than the original window.*4096",
        ),
        ({"context_length": 16384.5}, TypeError, r"`context_length` must be a positive int.*16384\.5"),
        ({"original_context_length": -1}, TypeError, r"`original_context_length` must be a positive int.*-1"),
        ({"rope_type": "ntk"}, ValueError, r"`rope_type` must be one of.*'ntk'"),
        ({"rope_type": "longrope"}, ValueError, r"`rope_type` must be one of.*'longrope'"),
        ({"beta_fast": 32.0}, ValueError, r"`beta_fast`=32.0 is not a parameter of rope_type='linear'.*yarn"),
        (
            {"rope_type": "yarn", "low_freq_factor": 1.0},
            ValueError,
            r"`low_freq_factor`=1.0 is not a parameter of rope_type='yarn'.*llama3",
        ),
        ({"r": 0}, ValueError, r"`r` must be a positive integer.*0"),
        ({"r": -8}, ValueError, r"`r` must be a positive integer.*-8"),
    ],
)
def test_bad_input_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        make(**kwargs)


def test_rope_type_is_normalised():
    assert make(rope_type=" YaRN ").rope_type == "yarn"
    assert make(rope_type="llama3").rope_extra_parameters == {}
    assert make(rope_type="yarn", beta_fast=16).rope_extra_parameters == {"beta_fast": 16}
