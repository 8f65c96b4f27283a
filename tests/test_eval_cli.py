import json
import os
import shutil

import pytest
from _eval_helpers import CORPUS, eval_checkpoint, eval_tokenizer  # noqa: F401  (fixtures)
from peft import get_peft_model

from pi_peft import PIConfig
from pi_peft.cli import main as pi_peft_main
from pi_peft.cli.eval import cli_main
from pi_peft.evaluation.run import parse_model_spec
from pi_peft.testing import tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


@pytest.fixture(scope="module")
def adapter_and_merged(eval_checkpoint, eval_tokenizer, tmp_path_factory):  # noqa: F811
    """A PI adapter folder (no tokenizer: it comes from the base) and the same adapter merged, with a tokenizer."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("pi")
    base = AutoModelForCausalLM.from_pretrained(eval_checkpoint)
    model = get_peft_model(base, PIConfig(scaling_factor=2.0, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(root / "adapter")
    model.merge_and_unload().save_pretrained(root / "merged")
    eval_tokenizer.save_pretrained(root / "merged")
    return str(root / "adapter"), str(root / "merged")


def test_parse_model_spec():
    assert parse_model_spec("pi=/tmp/a/b") == ("pi", "/tmp/a/b")
    assert parse_model_spec("/tmp/a/b/") == ("b", "/tmp/a/b/")
    with pytest.raises(ValueError, match="`--model`"):
        parse_model_spec("pi=")


def test_eval_passkey_cli_writes_json_markdown_and_png(eval_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "results"
    argv = ["eval", "passkey", "--model", f"tiny={eval_checkpoint}", "--lengths", "120", "90"]
    argv += ["--depths", "0", "1", "--trials", "2", "--output-dir", str(out)]
    assert pi_peft_main(argv) == 0  # through the `pi-peft` entry point
    data = json.loads((out / "passkey.json").read_text())
    assert data["task"] == "passkey"
    result = data["models"]["tiny"]
    assert result["lengths"] == [90, 120] and result["depths"] == [0.0, 1.0]
    assert len(result["accuracy"]) == 2 and all(len(row) == 2 for row in result["accuracy"])
    assert len(result["records"]) == 2 * 2 * 2
    assert isinstance(result["k_max"], int)
    md = (out / "passkey.md").read_text()
    assert "k_max" in md and "| tiny |" in md
    assert _is_png(out / "passkey.png")
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_eval_ppl_cli_base_adapter_and_merged(eval_checkpoint, adapter_and_merged, tmp_path):  # noqa: F811
    adapter, merged = adapter_and_merged
    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS) * 3)
    out = tmp_path / "results"
    argv = ["ppl", "--model", f"base={eval_checkpoint}", "--model", f"pi={adapter}", "--model", f"merged={merged}"]
    argv += ["--files", str(text), "--lengths", "64", "128", "--stride", "32", "--output-dir", str(out)]
    argv += ["--max-tokens", "600", "--dtype", "float32"]
    assert cli_main(argv) == 0
    data = json.loads((out / "ppl.json").read_text())
    assert data["settings"]["stride"] == 32
    ppl = {name: {r["context_length"]: r["ppl"] for r in m["results"]} for name, m in data["models"].items()}
    assert set(ppl) == {"base", "pi", "merged"} and all(set(v) == {64, 128} for v in ppl.values())
    # the adapter was loaded with its LoRA weights and PI RoPE: different from the base, equal to the merged model
    assert ppl["pi"][128] != pytest.approx(ppl["base"][128], rel=1e-4)
    assert ppl["merged"][128] == pytest.approx(ppl["pi"][128], rel=1e-4)
    assert ppl["merged"][64] == pytest.approx(ppl["pi"][64], rel=1e-4)
    assert "| merged |" in (out / "ppl.md").read_text()
    assert _is_png(out / "ppl.png")


def test_eval_cli_rejects_bad_input(eval_checkpoint, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="`--model` labels"):
        cli_main(["passkey", "--model", f"a={eval_checkpoint}", "--model", f"a={eval_checkpoint}"] + _rest(tmp_path))
    with pytest.raises(ValueError, match="`--files`"):
        cli_main(["ppl", "--model", eval_checkpoint, "--files", str(tmp_path / "missing.txt")] + _rest(tmp_path))
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(eval_checkpoint, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "*.jinja"))
    with pytest.raises(ValueError, match="`--tokenizer`"):
        cli_main(["passkey", "--model", str(no_tokenizer)] + _rest(tmp_path))  # a model folder with no tokenizer
    with pytest.raises(ValueError, match="`model`='.*missing': no such folder"):
        cli_main(["passkey", "--model", str(tmp_path / "missing")] + _rest(tmp_path))
    with pytest.raises(SystemExit):
        cli_main(["passkey", "--model", eval_checkpoint, "--dtype", "fp8"] + _rest(tmp_path))


def _rest(tmp_path):
    return ["--lengths", "100", "--output-dir", str(tmp_path / "x")]


def test_tiny_model_has_no_tokenizer_mismatch(eval_tokenizer):  # noqa: F811
    assert tiny_model(vocab_size=len(eval_tokenizer)).config.vocab_size == len(eval_tokenizer)
