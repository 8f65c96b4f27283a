"""The command line: one error policy for every subcommand (pi_peft.cli.run), cheap --help / --version."""

import subprocess
import sys
import textwrap

import pytest

from pi_peft.cli import main as pi_peft_main


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
