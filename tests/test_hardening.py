"""Regression tests for the defects found by the adversarial review (issue 13): each failed before the fix."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model

from pi_peft import PIConfig
from pi_peft.cli import main as pi_peft_main
from pi_peft.loading import load_adapter
from pi_peft.rope import ROPE_TYPES
from pi_peft.tiny import tiny_model

L = 64
ORIGINAL = {"rope_type": "default", "rope_theta": 10000.0}


def _rope(model):
    return dict(model.config.rope_parameters), model.config.max_position_embeddings


def _inv_freq(model):
    return next(m.inv_freq.clone() for m in model.modules() if "inv_freq" in getattr(m, "_buffers", {}))


# ---- 1, 2: never scale twice -------------------------------------------------------------------------------------
def test_failed_get_peft_model_leaves_rope_untouched_and_a_retry_scales_once(base):
    inv_freq = _inv_freq(base)
    with pytest.raises(ValueError, match="does_not_exist"):
        get_peft_model(base, PIConfig(scaling_factor=4.0, target_modules=["does_not_exist"]))
    assert _rope(base) == (ORIGINAL, L)
    assert torch.equal(_inv_freq(base), inv_freq)
    model = get_peft_model(base, PIConfig(scaling_factor=4.0, target_modules=["q_proj"]))
    assert model.config.rope_parameters["factor"] == 4.0
    assert model.peft_config["default"].base_rope_parameters == ORIGINAL
    torch.testing.assert_close(_inv_freq(model), inv_freq / 4)


def test_get_peft_model_twice_on_one_base_scales_once(base):
    inv_freq = _inv_freq(base)
    first = get_peft_model(base, PIConfig(scaling_factor=4.0, target_modules=["q_proj"]))
    with pytest.warns(UserWarning):  # peft's own "modify a model with PEFT for a second time"
        second = get_peft_model(base, PIConfig(scaling_factor=4.0, target_modules=["q_proj"]))
    for model in (first, second):
        assert model.config.rope_parameters["factor"] == 4.0 and model.config.max_position_embeddings == 4 * L
    assert second.peft_config["default"].base_rope_parameters == ORIGINAL
    torch.testing.assert_close(_inv_freq(second), inv_freq / 4)


def test_failed_from_pretrained_then_retry_scales_once(base, tmp_path):
    get_peft_model(tiny_model(), PIConfig(scaling_factor=4.0, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "a"
    )
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "a", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(Exception, match="(?i)header|deserializ"):  # fails after the adapter was injected
        PeftModel.from_pretrained(base, str(broken))
    model = PeftModel.from_pretrained(base, str(tmp_path / "a"))
    assert model.config.rope_parameters["factor"] == 4.0
    assert model.peft_config["default"].base_rope_parameters == ORIGINAL


def test_unload_and_merge_forget_the_recorded_original(base):
    model = get_peft_model(base, PIConfig(scaling_factor=4.0, target_modules=["q_proj"]))
    merged = model.merge_and_unload()
    assert merged.config.rope_parameters["factor"] == 4.0
    # a merged (extended) model is a new base: a PI adapter made for the original base is refused on it
    adapter = PIConfig(scaling_factor=4.0, target_modules=["q_proj"], base_rope_parameters=ORIGINAL)
    with pytest.raises(ValueError, match="scale RoPE twice or not at all"):
        get_peft_model(merged, adapter)
    plain = get_peft_model(tiny_model(), PIConfig(scaling_factor=4.0, target_modules=["q_proj"])).unload()
    assert _rope(plain) == (ORIGINAL, L) and "_pi_peft_original_rope" not in plain.__dict__


# ---- 3: trl's default max_length -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_parts():
    from pi_peft.tiny import train_tokenizer

    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 40], vocab_size=300)
    tokenizer.pad_token, tokenizer.eos_token = "<pad>", "</s>"
    return tokenizer, Dataset.from_dict({"text": ["the quick brown fox jumps " * 120] * 4})


@pytest.mark.parametrize(
    "max_length, expected",
    [(None, 4 * L), (1024, 4 * L), (100, 100), (4 * L + 1, "longer than the PI adapter's window")],
)
def test_sft_trainer_trains_at_the_pi_window(sft_parts, tmp_path, max_length, expected):
    from trl import SFTConfig, SFTTrainer

    tokenizer, data = sft_parts
    kwargs = {} if max_length is None else {"max_length": max_length}
    args = SFTConfig(str(tmp_path), report_to="none", use_cpu=True, **kwargs)
    make = lambda: SFTTrainer(  # noqa: E731
        model=tiny_model(vocab_size=len(tokenizer)),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=PIConfig(scaling_factor=4.0, target_modules=["q_proj"]),
    )
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=rf"`max_length`={max_length} is {expected}.*`context_length`={4 * L}"):
            make()
        return
    trainer = make()
    assert trainer.args.max_length == expected
    assert max(len(row["input_ids"]) for row in trainer.train_dataset) == expected


def test_sft_trainer_without_pi_is_left_alone(sft_parts, tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer, data = sft_parts
    args = SFTConfig(str(tmp_path), report_to="none", use_cpu=True)
    trainer = SFTTrainer(
        model=tiny_model(vocab_size=len(tokenizer)),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(target_modules=["q_proj"]),
    )
    assert trainer.args.max_length == 1024


# ---- 4: an adapter for fewer layers ------------------------------------------------------------------------------
def test_adapter_onto_a_deeper_base_is_a_clear_error(tmp_path):
    config = PIConfig(scaling_factor=4.0, target_modules=["q_proj"], train_norms=True)
    get_peft_model(tiny_model(), config).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"this base has `model\.layers\.2\..*no weights for \(more layers\?\)"):
        load_adapter(tmp_path / "a", tiny_model(num_hidden_layers=3))
    load_adapter(tmp_path / "a", tiny_model())  # the right base still loads


# ---- 5: a refused set_adapter changes nothing --------------------------------------------------------------------
def test_refused_set_adapter_changes_nothing(base):
    model = get_peft_model(base, PIConfig(scaling_factor=4.0, target_modules=["q_proj"]))
    model.add_adapter("two", PIConfig(scaling_factor=2.0, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="extend RoPE differently"):
        model.base_model.set_adapter(["default", "two"])
    assert layer.active_adapters == ["default"] and model.base_model.active_adapters == ["default"]
    assert model.config.rope_parameters["factor"] == 4.0


# ---- 6: one error policy for every subcommand --------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "passkey", "--model", "./no/such/model", "--lengths", "64", "--output-dir", "x"], "no such folder"),
        (["export", "lora", "./no/such/adapter", "out"], "neither an existing folder nor a valid Hub repo id"),
        (["push", "./no/such/adapter", "me/x"], "offline mode"),  # the tests run with HF_HUB_OFFLINE=1
        (["estimate", "./no/such/config.json", "--context-length", "1024"], "config"),
        (["train", "--context_lenght", "256"], r"unknown option `--context_lenght` \(did you mean `context_length`"),
        (["demo", "--set", "nope=1"], "unknown field 'nope'"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pi_peft_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"pi-peft {argv[0]}: error: ")
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_yaml_typo_names_the_key_and_the_fix(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: x\ncontext_lenght: 256\n")
    assert pi_peft_main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "`context_lenght` in" in err and "did you mean `context_length`" in err
    assert "fail_with_unknown_args" not in err  # trl's advice, which a CLI user cannot follow


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="unknown field"):
        pi_peft_main(["--debug", "demo", "--set", "nope=1"])


def test_help_and_version_import_neither_torch_nor_peft():
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from pi_peft.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(["--help"]) == 0 and main(["--version"]) == 0
        heavy = sorted(m for m in ("torch", "peft", "transformers", "trl") if m in sys.modules)
        print(heavy, out.getvalue().count("pi-peft"))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    heavy, mentions = result.stdout.strip().rsplit(" ", 1)
    assert heavy == "[]" and int(mentions) >= 2


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


# ---- 7, 8: pi-peft train options are PIConfig's -------------------------------------------------------------------
def test_train_options_are_derived_from_piconfig():
    from pi_peft.cli.train import parse_train_args
    from pi_peft.train import PIArguments, make_pi_config, pi_config_fields

    assert {f.name for f in pi_config_fields()} <= set(PIArguments.__dataclass_fields__)
    argv = ["--model_name_or_path", "x", "--context_length", "256", "--rope_type", "yarn", "--beta_fast", "16"]
    argv += ["--use_cpu", "--bf16", "false", "--no-train-norms", "--learning-rate=1e-4"]  # dashed and negated forms
    script, training, model, pi = parse_train_args(argv)
    assert (pi.rope_type, pi.beta_fast, pi.train_norms, training.learning_rate) == ("yarn", 16.0, False, 1e-4)
    config = make_pi_config(model, pi, type("C", (), {"max_position_embeddings": L})())
    assert (config.rope_type, config.beta_fast, config.scaling_factor) == ("yarn", 16.0, 4.0)


def test_train_help_puts_pi_options_first_and_hides_what_does_not_apply(capsys):
    assert pi_peft_main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.index("--config") < text.index("--context_length") < text.index("--learning_rate")
    assert "--use_peft" not in text and "--load_in_8bit" not in text
    assert len(text.splitlines()) < 200 and "--help-all" in text
    assert pi_peft_main(["train", "--help-all"]) == 0
    everything = capsys.readouterr().out
    assert "--lr_scheduler_type" in everything and "--use_peft" not in everything


# ---- 11: dynamic NTK caveat where it is offered --------------------------------------------------------------------
def test_dynamic_caveat_is_documented_where_dynamic_is_offered():
    assert "KV cache" in ROPE_TYPES["dynamic"].note
    assert "KV cache" in " ".join(PIConfig.__doc__.split())


# ---- no command destroys its own input ----------------------------------------------------------------------------
def test_export_never_overwrites_its_own_adapter(tmp_path):
    from pi_peft.export import export_lora

    adapter = tmp_path / "a"
    get_peft_model(tiny_model(), PIConfig(scaling_factor=4.0, target_modules=["q_proj"])).save_pretrained(adapter)
    before = sorted(p.name for p in adapter.iterdir())
    for output in (adapter, tmp_path):
        with pytest.raises(ValueError, match=r"`output`=.* would overwrite the adapter"):
            export_lora(adapter, output, overwrite=True)
    assert sorted(p.name for p in adapter.iterdir()) == before
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "PI"


def test_train_refuses_to_write_into_its_base_model(tmp_path, tiny_checkpoint, capsys):
    argv = ["train", "--model_name_or_path", tiny_checkpoint, "--output_dir", tiny_checkpoint]
    argv += ["--scaling_factor", "2", "--use_cpu", "--bf16", "false", "--dtype", "float32", "--data_files", "x.txt"]
    assert pi_peft_main(argv) == 2
    assert "`output_dir`=" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "passkey", "--model", "m", "--lengths", "0", "--output-dir", "o"], "--lengths: must be a positive"),
        (["eval", "passkey", "--model", "m", "--lengths", "8", "--depths", "1.5", "--output-dir", "o"], r"\[0, 1\]"),
        (["eval", "ppl", "--model", "m", "--lengths", "8", "--stride", "0", "--output-dir", "o"], "--stride: must be"),
        (["demo", "--threads", "0"], "--threads: must be a positive integer"),
    ],
)
def test_bad_numbers_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pi_peft_main(argv)
    assert exit_info.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_bad_demo_setting_names_the_field_and_an_example(capsys):
    assert pi_peft_main(["demo", "--set", "pretrain_steps=abc"]) == 2
    assert "`--set pretrain_steps=abc`: the value must be JSON" in capsys.readouterr().err


def test_missing_data_file_is_named(tmp_path):
    from pi_peft.data import load_raw_dataset

    with pytest.raises(ValueError, match=r"`data_files`: no such file\(s\) \['.*missing.jsonl'\]"):
        load_raw_dataset(data_files=[str(tmp_path / "missing.jsonl")])


def test_get_peft_model_and_sft_trainer_raise_no_future_warning(tmp_path):
    code = textwrap.dedent(
        f"""
        import pi_peft
        from datasets import Dataset
        from peft import get_peft_model
        from trl import SFTConfig, SFTTrainer
        from pi_peft import PIConfig
        from pi_peft.tiny import tiny_model, train_tokenizer

        get_peft_model(tiny_model(), PIConfig(scaling_factor=4.0, target_modules=["q_proj"]))
        tok = train_tokenizer(["the quick brown fox " * 40], vocab_size=300)
        tok.pad_token, tok.eos_token = "<pad>", "</s>"
        SFTTrainer(
            model=tiny_model(vocab_size=len(tok)),
            args=SFTConfig({str(tmp_path)!r}, report_to="none", use_cpu=True, activation_checkpointing=True),
            train_dataset=Dataset.from_dict({{"text": ["the quick brown fox " * 30] * 2}}),
            processing_class=tok,
            peft_config=PIConfig(scaling_factor=4.0, target_modules=["q_proj"]),
        )
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_pi_peft_train_arguments_use_current_checkpointing_names():
    import warnings

    from pi_peft.cli.train import parse_train_args

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        script, training, model, pi = parse_train_args(["--model_name_or_path", "x", "--use_cpu", "--bf16", "false"])
    assert training.activation_checkpointing and training.activation_checkpointing_kwargs == {"use_reentrant": False}


@pytest.mark.parametrize(
    "first_line",
    ["from pi_peft.config import PIConfig", "from pi_peft.model import PIModel", "from pi_peft.train import main"],
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


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from pi_peft.utils import atomic_output_dir, atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
