"""End to end: `pi-peft train` / `recipes/train.py` on a locally saved tiny Llama and a local dataset."""

import json
import os
import runpy
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from _train_helpers import make_jsonl, make_tiny_llama
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file

import pi_peft.training.sft
from pi_peft.cli import main as pi_peft_main
from pi_peft.cli.train import cli_main, parse_train_args
from pi_peft.ops.bnb import fix_bnb_cpu_repack
from pi_peft.training.estimate import KNOWN_CONFIGS
from pi_peft.training.sft import main, make_pi_config

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "train.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-e2e")
    return SimpleNamespace(
        model=make_tiny_llama(str(root / "model")),
        data=make_jsonl(str(root / "data" / "train.jsonl"), n_docs=6, words_per_doc=120),
    )


def _argv(assets, output_dir, *extra):
    return [
        "--model_name_or_path", assets.model, "--data_files", assets.data, "--output_dir", str(output_dir),
        "--context_length", "128", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
        "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--learning_rate", "1e-3",
        "--warmup_steps", "1", "--per_device_train_batch_size", "1", "--seed", "0",
        "--use_cpu", "--bf16", "false", "--dtype", "float32", *extra,
    ]  # fmt: skip


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _check_saved_adapter(output_dir):
    config = json.load(open(os.path.join(output_dir, "adapter_config.json")))
    assert config["peft_type"] == "PI" and config["context_length"] == 128 and config["scaling_factor"] == 2.0
    weights = load_file(os.path.join(output_dir, "adapter_model.safetensors"))
    assert any("embed_tokens" in k for k in weights) and any("norm" in k for k in weights)  # LongLoRA extras
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # trained away from B = 0
    assert not [n for n in os.listdir(output_dir) if n.startswith(".tmp")]
    assert not [n for n in os.listdir(output_dir) if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickle
    assert json.load(open(os.path.join(output_dir, "training_args.json")))["max_length"] == 128


def test_train_lora_end_to_end_and_load_back_with_pi(assets, tmp_path):
    out = tmp_path / "lora"
    trainer = main(*parse_train_args(_argv(assets, out)))
    assert trainer.args.max_length == 128  # the target context, not trl's 1024
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    assert all(e["context_length"] == 128 and e["pi_factor"] == 2.0 and e["tokens_per_second"] > 0 for e in logs)
    _check_saved_adapter(out)

    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert loaded.config.rope_parameters["factor"] == 2.0 and loaded.config.max_position_embeddings == 128
    ids = torch.randint(3, 256, (1, 128))
    torch.testing.assert_close(_logits(loaded, ids), _logits(trainer.model, ids), rtol=1e-5, atol=1e-5)


def test_recipe_script_qlora_end_to_end(assets, tmp_path, monkeypatch):
    out = tmp_path / "qlora"
    captured = {}
    real_main = pi_peft.training.sft.main
    monkeypatch.setattr(pi_peft.training.sft, "main", lambda *args: captured.setdefault("trainer", real_main(*args)))
    argv = _argv(assets, out, "--load_in_4bit", "--dtype", "bfloat16")  # QLoRA: NF4 + bf16 compute, as on a GPU
    monkeypatch.setattr(sys, "argv", ["recipes/train.py", *argv])
    runpy.run_path(RECIPE, run_name="__main__")
    trainer = captured["trainer"]
    assert trainer.model.base_model.model.is_loaded_in_4bit
    _check_saved_adapter(out)

    from transformers import AutoModelForCausalLM

    from pi_peft.training.sft import PIModelConfig, quantization_config

    base = AutoModelForCausalLM.from_pretrained(
        assets.model, quantization_config=quantization_config(PIModelConfig(load_in_4bit=True)),
        device_map="cpu", dtype=torch.bfloat16,
    )  # fmt: skip
    fix_bnb_cpu_repack(base)  # same 4-bit kernel as in training (the CPU inference repack rounds differently)
    loaded = PeftModel.from_pretrained(base, str(out))
    assert loaded.config.rope_parameters["factor"] == 2.0
    ids = torch.randint(3, 256, (1, 128))
    got, want = _logits(loaded, ids).float(), _logits(trainer.model, ids).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)  # peft runs the bf16-trained adapters in fp32


def test_max_length_defaults_to_the_target_and_cannot_exceed_it():
    from pi_peft.training.sft import training_window

    assert training_window(None, 16384) == 16384 and training_window(4096, 16384) == 4096
    with pytest.raises(ValueError, match="`max_length`=32768 is longer than the extended window"):
        training_window(32768, 16384)


def test_qlora_needs_bf16_compute(assets, tmp_path):
    with pytest.raises(ValueError, match="`dtype`='float32' with `load_in_4bit`"):
        cli_main(_argv(assets, tmp_path / "out", "--load_in_4bit"))


def test_sft_chat_data_trains_with_the_target_window(assets, tmp_path):
    from transformers import AutoTokenizer

    from pi_peft.training.data import write_jsonl

    model_dir = tmp_path / "chat-model"
    shutil.copytree(assets.model, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(model_dir)
    turn = [{"role": "user", "content": "the river stone " * 8}, {"role": "assistant", "content": "old road " * 8}]
    data = write_jsonl(({"messages": turn} for _ in range(12)), tmp_path / "chat.jsonl")
    argv = _argv(assets, tmp_path / "out", "--model_name_or_path", str(model_dir), "--data_files", data, "--packing")
    trainer = main(*parse_train_args(argv))
    assert trainer.args.max_length == 128 and trainer.state.global_step == 3
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[-1] <= 128  # packed chat turns fill (at most) the target window
    assert json.load(open(tmp_path / "out" / "adapter_config.json"))["peft_type"] == "PI"


def test_too_short_dataset_is_a_clear_error(assets, tmp_path):
    short = make_jsonl(str(tmp_path / "short" / "train.jsonl"), n_docs=2, words_per_doc=5)
    argv = _argv(assets, tmp_path / "out", "--data_files", short)
    with pytest.raises(ValueError, match=r"too short for one window.*`max_length`=128"):
        cli_main(argv)


@pytest.mark.parametrize(
    "name, factor, original",
    [("llama2-7b-16k", 4.0, 4096), ("llama2-7b-32k", 8.0, 4096), ("llama3-8b-32k", 4.0, 8192),
     ("mistral-7b-32k", 4.0, 8192)],
)  # fmt: skip
def test_recipe_yamls_parse_with_trl_parser(name, factor, original):
    path = os.path.join(os.path.dirname(RECIPE), f"{name}.yaml")
    script, training, model, pi = parse_train_args(["--config", path, "--use_cpu", "--bf16", "false"])
    assert training.max_length is None  # main() sets it to the target context
    assert (training.learning_rate, training.warmup_steps, training.max_steps) == (2e-5, 20, 1000)
    assert model.load_in_4bit and model.use_bnb_nested_quant and pi.train_embeddings and pi.train_norms
    base = SimpleNamespace(**KNOWN_CONFIGS[model.model_name_or_path])
    config = make_pi_config(model, pi, base)
    assert (config.scaling_factor, config.original_context_length) == (factor, original)
    assert config.target_modules == "all-linear"


def test_train_options_are_derived_from_piconfig():
    from pi_peft.cli.train import parse_train_args
    from pi_peft.training.sft import PIArguments, make_pi_config, pi_config_fields

    assert {f.name for f in pi_config_fields()} <= set(PIArguments.__dataclass_fields__)
    argv = ["--model_name_or_path", "x", "--context_length", "256", "--rope_type", "yarn", "--beta_fast", "16"]
    argv += ["--use_cpu", "--bf16", "false", "--no-train-norms", "--learning-rate=1e-4"]  # dashed and negated forms
    script, training, model, pi = parse_train_args(argv)
    assert (pi.rope_type, pi.beta_fast, pi.train_norms, training.learning_rate) == ("yarn", 16.0, False, 1e-4)
    config = make_pi_config(model, pi, type("C", (), {"max_position_embeddings": 64})())
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


def test_pi_peft_train_arguments_use_current_checkpointing_names():
    import warnings

    from pi_peft.cli.train import parse_train_args

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        script, training, model, pi = parse_train_args(["--model_name_or_path", "x", "--use_cpu", "--bf16", "false"])
    assert training.activation_checkpointing and training.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_train_refuses_to_write_into_its_base_model(tmp_path, tiny_checkpoint, capsys):
    argv = ["train", "--model_name_or_path", tiny_checkpoint, "--output_dir", tiny_checkpoint]
    argv += ["--scaling_factor", "2", "--use_cpu", "--bf16", "false", "--dtype", "float32", "--data_files", "x.txt"]
    assert pi_peft_main(argv) == 2
    assert "`output_dir`=" in capsys.readouterr().err


def test_activation_offloading_on_cpu_is_turned_off_with_one_line(assets, tmp_path, caplog):
    # issue 19 item 8: the Llama-3 recipes set it; on CPU trl's offloader died with an AttributeError (no CUDA)
    out = tmp_path / "offload"
    trainer = main(*parse_train_args(_argv(assets, out, "--activation_offloading", "true", "--max_steps", "1")))
    assert trainer.state.global_step == 1 and os.path.exists(out / "adapter_model.safetensors")
    lines = [r.getMessage() for r in caplog.records if "activation_offloading" in r.getMessage()]
    assert lines == [
        "`activation_offloading` has no effect when training on CPU (activations already live in CPU memory): "
        "off for this run."
    ]
    assert trainer.args.activation_offloading is False


def test_activation_offloading_on_a_gpu_is_passed_through():
    from pi_peft.training.memory import offloading_for_device

    args = SimpleNamespace(activation_offloading=True)
    offloading_for_device(args, on_cpu=False)
    assert args.activation_offloading is True
    offloading_for_device(args, on_cpu=True)
    assert args.activation_offloading is False
