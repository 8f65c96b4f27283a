"""`pi-peft export merged|lora`: outputs that plain transformers/peft (no pi_peft) load with the adapter's logits."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from _share_helpers import L, load_base, make_adapter, make_base
from peft import get_peft_model

from pi_peft import PIConfig
from pi_peft.cli import main as pi_peft_main
from pi_peft.cli.export import cli_main
from pi_peft.sharing.export import export_lora, export_merged
from pi_peft.testing import tiny_model

# Runs in a fresh interpreter that never imports pi_peft: loads every exported model the way a user without pi_peft
# would, and also tries to load the original PI adapter with plain peft.
CHILD = textwrap.dedent(
    """
    import json, re, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    jobs = json.loads(sys.argv[1])
    x = torch.load(jobs["x"])
    out = {}
    with torch.no_grad():
        for name, folder in jobs["merged"].items():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            out[name] = model(x, use_cache=False).logits
        readme = open(jobs["lora"] + "/README.md").read()
        overrides = json.loads(re.search(r"--hf-overrides '(.*)'", readme).group(1))  # exactly what vLLM gets
        for name, kwargs in (("lora", overrides), ("lora_without_flags", {})):
            base = AutoModelForCausalLM.from_pretrained(jobs["base"], **kwargs)
            out[name] = PeftModel.from_pretrained(base, jobs["lora"])(x, use_cache=False).logits
    try:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(jobs["base"]), jobs["pi"])
        out["pi_without_pi_peft"] = "loaded"
    except Exception as exc:
        out["pi_without_pi_peft"] = f"{type(exc).__name__}: {exc}"
    out["pi_peft_imported"] = "pi_peft" in sys.modules
    torch.save(out, jobs["result"])
    """
)


def _saved_weights(folder):
    from safetensors.torch import load_file

    weights = {}
    for shard in folder.glob("*.safetensors"):
        weights.update(load_file(shard))
    return weights


def _logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base_dir = make_base(root / "base")
    x = torch.randint(0, 128, (1, 3 * L), generator=torch.Generator().manual_seed(1))  # 3x the original window
    plain = make_adapter(base_dir, root / "pi")
    longlora = make_adapter(base_dir, root / "pi-longlora", seed=1, train_embeddings=True, train_norms=True)
    refs = {"plain": _logits(plain, x), "longlora": _logits(longlora, x)}
    with torch.no_grad(), plain.disable_adapter():
        refs["base"] = plain(x, use_cache=False).logits

    merged = {
        "f32": export_merged(root / "pi", root / "merged-f32", dtype="float32", max_shard_size="100KB"),
        "bf16": export_merged(root / "pi", root / "merged-bf16"),  # auto: float32 base -> bfloat16
        "longlora": export_merged(root / "pi-longlora", root / "merged-longlora", dtype="float32"),
    }
    lora = export_lora(root / "pi", root / "lora")
    torch.save(x, root / "x.pt")
    jobs = {
        "x": str(root / "x.pt"),
        "merged": {k: str(v) for k, v in merged.items()},
        "lora": str(lora),
        "base": base_dir,
        "pi": str(root / "pi"),
        "result": str(root / "child.pt"),
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(root / "child.pt")
    return {"root": root, "base": base_dir, "refs": refs, "child": child, "merged": merged, "lora": lora}


def test_child_process_never_imported_pi_peft(exported):
    assert exported["child"]["pi_peft_imported"] is False


def test_pi_adapter_without_pi_peft_fails_with_keyerror(exported):
    # the model card and README promise exactly this error
    assert exported["child"]["pi_without_pi_peft"] == "KeyError: 'PI'"


def test_merged_config_carries_the_new_window(exported):
    folder = exported["merged"]["f32"]
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4.0
    assert config["max_position_embeddings"] == 4 * L
    assert "quantization_config" not in config
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((folder / s).is_file() for s in shards)
    assert not list(folder.glob("*.bin"))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 4 * L and (folder / "tokenizer.json").is_file()
    assert "4" in (folder / "README.md").read_text()


def test_merged_float32_logits_equal_adapter_logits(exported):
    torch.testing.assert_close(exported["child"]["f32"], exported["refs"]["plain"], atol=1e-5, rtol=1e-5)


def test_merged_bf16_is_16_bit_and_within_rounding(exported):
    config = json.loads((exported["merged"]["bf16"] / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    ref = exported["refs"]["plain"]
    err = (exported["child"]["bf16"] - ref).abs().max().item()
    wrong_rope = (exported["refs"]["base"] - ref).abs().max().item()  # what losing the adapter would cost
    assert err < 0.02 * ref.abs().max().item()
    assert err < wrong_rope / 5


def test_merged_with_trained_embeddings_and_norms(exported):
    torch.testing.assert_close(exported["child"]["longlora"], exported["refs"]["longlora"], atol=1e-5, rtol=1e-5)
    # the trained embeddings really are in the export (not the base's)
    exported_emb = _saved_weights(exported["merged"]["longlora"])["model.embed_tokens.weight"]
    base_emb = load_base(exported["base"]).model.embed_tokens.weight
    assert not torch.allclose(exported_emb, base_emb)


def test_plain_lora_export_with_readme_flags_matches_adapter(exported):
    config = json.loads((exported["lora"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert not {"context_length", "scaling_factor", "rope_type", "base_rope_parameters"} & set(config)
    torch.testing.assert_close(exported["child"]["lora"], exported["refs"]["plain"], atol=1e-5, rtol=1e-5)
    # and without the README's flags the output is wrong, which is why the README insists on them
    assert (exported["child"]["lora_without_flags"] - exported["refs"]["plain"]).abs().max() > 1e-2


def test_plain_lora_readme_states_exact_flags(exported):
    readme = (exported["lora"] / "README.md").read_text()
    assert f"--max-model-len {4 * L}" in readme
    overrides = json.loads(re.search(r"--hf-overrides '(.*)'", readme).group(1))
    assert overrides == {"rope_parameters": {"factor": 4.0, "rope_theta": 10000.0, "rope_type": "linear"}}
    assert f"--rope-scaling linear --rope-scale 4 -c {4 * L}" in readme


def test_plain_lora_refuses_trained_embeddings_and_norms(exported, tmp_path):
    with pytest.raises(ValueError, match=r"`train_embeddings`, `train_norms`.*Use `pi-peft export merged`"):
        export_lora(exported["root"] / "pi-longlora", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_then_replaced_atomically(exported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match=r"`output`=.* already exists.*`--overwrite`"):
        export_lora(exported["root"] / "pi", out)
    export_lora(exported["root"] / "pi", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup folder left


def test_failed_export_leaves_nothing(exported, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def broken_save(self, folder, **kwargs):
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_merged(exported["root"] / "pi", tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_qlora_adapter_is_merged_into_16_bit_base_weights(exported, tmp_path):
    from transformers import BitsAndBytesConfig

    quantized = load_base(exported["base"], quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    adapter = make_adapter(exported["base"], tmp_path / "qlora", base_model=quantized, seed=2)
    layer = adapter.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.get_delta_weight("default").float()  # (out, in): scaling * B @ A
    import bitsandbytes as bnb

    dequantized = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    out = export_merged(tmp_path / "qlora", tmp_path / "merged", dtype="bfloat16")

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    weight = _saved_weights(out)["model.layers.0.self_attn.q_proj.weight"]
    assert weight.dtype == torch.bfloat16
    original = load_base(exported["base"]).model.layers[0].self_attn.q_proj.weight.float()
    expected = (original + delta).to(torch.bfloat16).float()
    err_16bit = (weight.float() - expected).abs().mean().item()  # bf16 rounding only
    err_if_dequantized = (dequantized.float() + delta - expected).abs().mean().item()  # + NF4 quantisation error
    assert err_16bit < 0.1 * err_if_dequantized, (
        err_16bit,
        err_if_dequantized,
    )  # merged into the 16-bit weights, not the 4-bit ones


def test_prequantized_base_refused(exported, tmp_path):
    import shutil

    base = tmp_path / "base-4bit"
    shutil.copytree(exported["base"], base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"`base`=.* is a pre-quantised checkpoint \(bitsandbytes\).*16-bit"):
        export_merged(exported["root"] / "pi", tmp_path / "out", base=str(base))


def test_cli(exported, tmp_path, capsys):
    assert cli_main(["lora", str(exported["root"] / "pi"), str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert pi_peft_main(["export", "lora", str(exported["root"] / "pi-longlora"), str(tmp_path / "x")]) == 2
    assert "pi-peft export: error:" in capsys.readouterr().err
    assert cli_main(["merged", str(exported["root"] / "pi"), str(tmp_path / "m"), "--dtype", "float16"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"


def test_export_never_overwrites_its_own_adapter(tmp_path):
    from pi_peft.sharing.export import export_lora

    adapter = tmp_path / "a"
    get_peft_model(tiny_model(), PIConfig(scaling_factor=4.0, target_modules=["q_proj"])).save_pretrained(adapter)
    before = sorted(p.name for p in adapter.iterdir())
    for output in (adapter, tmp_path):
        with pytest.raises(ValueError, match=r"`output`=.* would overwrite the adapter"):
            export_lora(adapter, output, overwrite=True)
    assert sorted(p.name for p in adapter.iterdir()) == before
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "PI"


def _python_block(readme: str) -> str:
    return readme.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_commands_run_from_the_export_parent_folder(exported, tmp_path):
    """The exported READMEs say their commands run from the export's parent folder; their transformers snippets do
    (in a process without pi_peft) and fail from anywhere else, which is why the README says so."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for folder in (exported["lora"], exported["merged"]["f32"]):
        readme = (folder / "README.md").read_text()
        assert f"from the folder that holds `{folder.name}/` (the export's parent folder)" in readme
        code = _python_block(readme) + "\nimport sys\nprint('pi_peft' in sys.modules)\n"
        ok = subprocess.run([sys.executable, "-c", code], cwd=folder.parent, capture_output=True, text=True, env=env)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert ok.stdout.strip().endswith("False")
        elsewhere = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
        assert elsewhere.returncode != 0


def test_readmes_state_what_vllm_does(exported):
    lora = (exported["lora"] / "README.md").read_text()
    assert "silently" not in lora  # vLLM refuses instead (measured: benchmarks/results/real_model_vllm.md)
    assert f"vLLM refuses a `--max-model-len` above the base's {L}-token window" in lora
    assert "--lora-modules pi=./lora \\" in lora and "--base <base model folder> ./lora --outfile" in lora
    rank = json.loads((exported["root"] / "pi" / "adapter_config.json").read_text())["r"]
    assert f"--max-lora-rank {rank} \\" in lora and f"at least the adapter's rank ({rank}" in lora
    merged = (exported["merged"]["f32"] / "README.md").read_text()
    assert f"vllm serve ./merged-f32 --max-model-len {4 * L}\n" in merged
    # config.json: max_position_embeddings = the new window AND factor 4; vLLM multiplies them without the flag
    assert f"({4 * L:,} x 4): without the flag it would accept {16 * L:,}-token prompts" in merged
