"""What a new user reads and sees first (issue 19, item 15): the README's set-up says what CPU and GPU users run,
`pi-peft train --help` shows the tiled-MLP options, no bitsandbytes `kernels` line on import, and `pi-peft train`
leaves no training-only memory saver on the model it returns."""

import os
import re
import subprocess
import sys

from _train_helpers import make_jsonl, make_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_section() -> str:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]


def test_readme_setup_says_what_cpu_and_gpu_users_run_and_keeps_the_ci_line():
    setup = _setup_section()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in setup  # CPU only
    assert re.search(r"GPU.*default package index.*CUDA build", setup, re.S)
    assert "may pull a multi-GB CUDA build" not in setup  # the old claim: the pin alone does not avoid it
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    for line in ("pip install torch==2.13.0", 'pip install -e ".[test]"'):
        assert line in ci and line in setup  # CI runs the README's line


def test_train_help_shows_the_tiled_mlp_options_in_pi_peft_section(capsys):
    from pi_peft.cli.train import cli_main

    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    pi_section = out.split("pi_peft options:", 1)[1].split("common training options:", 1)[0]
    assert "--tiled_mlp" in pi_section and "--tile_tokens" in pi_section
    assert "with `lora_dropout` 0 (with dropout, other random masks)" in " ".join(pi_section.split())


def test_importing_pi_peft_then_peft_prints_no_bitsandbytes_kernels_line():
    code = "import pi_peft, peft, bitsandbytes; from peft import get_peft_model"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gemm_4bit_forward" not in result.stderr and "kernels-community" not in result.stderr


def test_the_filter_drops_only_that_line():
    import logging

    from pi_peft import integrations

    integrations.filter_bnb_kernels_notice()
    integrations.filter_bnb_kernels_notice()  # idempotent
    bnb_logger = logging.getLogger(integrations.BNB_CPU_LOGGER)
    assert sum(isinstance(f, integrations._DropBnbKernelsNotice) for f in bnb_logger.filters) == 1

    def passes(msg: str) -> bool:
        return bnb_logger.filter(logging.LogRecord(bnb_logger.name, logging.WARNING, "", 0, msg, (), None))

    assert not passes("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...")
    assert passes("some other bitsandbytes warning")


def test_train_undoes_tiled_mlp_and_checkpointing_when_it_ends(tmp_path):
    from pi_peft.cli.train import parse_train_args
    from pi_peft.ops.tiled_mlp import TILED_ATTR, find_mlp_modules
    from pi_peft.training.sft import main

    model = make_tiny_llama(str(tmp_path / "model"))
    data = make_jsonl(str(tmp_path / "data" / "train.jsonl"), n_docs=4, words_per_doc=120)
    argv = [
        "--model_name_or_path", model, "--data_files", data, "--output_dir", str(tmp_path / "out"),
        "--context_length", "128", "--lora_r", "4", "--max_steps", "1", "--save_strategy", "no",
        "--per_device_train_batch_size", "1", "--use_cpu", "--bf16", "false", "--dtype", "float32",
        "--tiled_mlp", "true", "--tile_tokens", "32",
    ]  # fmt: skip
    trainer = main(*parse_train_args(argv))
    base = trainer.model.get_base_model()
    mlps = find_mlp_modules(base)
    assert len(mlps) == 2 and not [m for m in mlps if hasattr(m, TILED_ATTR) or "forward" in vars(m)]
    assert not base.is_activation_checkpointing
    merged = trainer.model.merge_and_unload()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in merged.modules())
