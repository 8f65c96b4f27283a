import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from pi_peft import PIConfig, PIModel
from pi_peft.testing import TINY_DIMS, tiny_model

ORIGINAL = {"rope_type": "default", "rope_theta": 10000.0}

L = 64


def pi_model(base, **kwargs):
    """A PI model whose LoRA weights are random (B != 0), so the adapter changes outputs."""
    kwargs = {"scaling_factor": 4.0, "target_modules": "all-linear", "init_lora_weights": False, **kwargs}
    return get_peft_model(base, PIConfig(**kwargs))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def run_fresh_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def test_get_peft_model_gives_a_pi_model(base):
    model = pi_model(base)
    assert isinstance(model.base_model, PIModel)
    assert model.peft_type == "PI"
    assert model.config.rope_parameters["factor"] == 4.0 and model.config.max_position_embeddings == 4 * L
    assert model.peft_config["default"].base_rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_disable_adapter_and_unload_equal_the_untouched_base(long_input):
    reference = logits(tiny_model("llama"), long_input)
    model = pi_model(tiny_model("llama"))
    adapted = logits(model, long_input)
    assert not torch.allclose(adapted, reference, atol=1e-4)
    with model.disable_adapter():
        assert torch.equal(logits(model, long_input), reference)
        assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
        assert model.config.max_position_embeddings == L
    assert torch.equal(logits(model, long_input), adapted)  # RoPE is back on after the context
    unloaded = model.unload()
    assert type(unloaded).__name__ == "LlamaForCausalLM"
    assert unloaded.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert torch.equal(logits(unloaded, long_input), reference)


def test_merge_unmerge_and_merge_and_unload(long_input, tmp_path):
    model = pi_model(tiny_model("llama"), train_norms=True)
    adapted = logits(model, long_input)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, long_input), adapted, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, long_input), adapted, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert merged.config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert merged.config.max_position_embeddings == 4 * L
    merged_logits = logits(merged, long_input)
    torch.testing.assert_close(merged_logits, adapted, atol=1e-4, rtol=1e-4)

    merged.save_pretrained(tmp_path / "merged")
    torch.save(long_input, tmp_path / "ids.pt")
    torch.save(merged_logits, tmp_path / "expected.pt")
    code, out = run_fresh_python(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}).eval()
        assert "pi_peft" not in sys.modules and "peft" not in sys.modules
        with torch.no_grad():
            got = model(torch.load({str(tmp_path / "ids.pt")!r}), use_cache=False).logits
        print("MAXDIFF", (got - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item())
    """)
    assert code == 0, out
    assert float(out.split("MAXDIFF")[1].split()[0]) <= 1e-5


def test_save_load_roundtrip_in_process_and_fresh_process(long_input, tiny_checkpoint, tmp_path):
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    model = pi_model(base, train_embeddings=True, train_norms=True)
    expected = logits(model, long_input)
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in files and "adapter_model.bin" not in files
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PI"
    assert (saved["scaling_factor"], saved["context_length"], saved["original_context_length"]) == (4.0, 256, 64)
    assert saved["base_model_name_or_path"] == tiny_checkpoint
    assert {"embed_tokens", "norm", "input_layernorm"} <= set(saved["modules_to_save"])

    assert type(PeftConfig.from_pretrained(tmp_path / "adapter")) is PIConfig
    torch.manual_seed(123)  # reseeding must not matter: everything comes from the files
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    assert fresh_base.config.rope_parameters["rope_type"] == "default"
    loaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter")
    assert loaded.config.rope_parameters["factor"] == 4.0
    assert torch.equal(logits(loaded, long_input), expected)

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(auto.base_model, PIModel)
    assert torch.equal(logits(auto.eval(), long_input), expected)

    torch.save(long_input, tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    code, out = run_fresh_python(f"""
        import torch, pi_peft
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            got = model(torch.load({str(tmp_path / "ids.pt")!r}), use_cache=False).logits
        print("MAXDIFF", (got - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item())
    """)
    assert code == 0, out
    assert float(out.split("MAXDIFF")[1].split()[0]) == 0.0


def test_fresh_process_without_pi_peft_fails_loudly(base, tmp_path):
    pi_model(base).save_pretrained(tmp_path / "adapter")
    loaders = (
        "PeftConfig.from_pretrained(path)",
        "AutoPeftModelForCausalLM.from_pretrained(path)",
        "PeftModel.from_pretrained(base, path)",
    )
    # one fresh process tries each loader in turn (a fresh interpreter per loader costs ~3x the time)
    code, out = run_fresh_python(f"""
        import sys, traceback
        from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM
        base = LlamaForCausalLM(LlamaConfig(**{TINY_DIMS!r}))
        path = {str(tmp_path / "adapter")!r}
        for loader in {loaders!r}:
            assert not any(m.startswith("pi_peft") for m in sys.modules)
            try:
                eval(loader)
                print("LOADED WITHOUT PI:", loader)
            except Exception as exc:
                print("REFUSED:", loader, "|", type(exc).__name__, repr(str(exc)))
    """)
    assert code == 0, out
    assert "LOADED WITHOUT PI" not in out, out
    for loader in loaders:
        assert f"REFUSED: {loader} | KeyError \"'PI'\"" in out, out  # peft's type registry has no 'PI'


def test_adapter_onto_an_already_extended_base_is_refused(long_input, tmp_path):
    model = pi_model(tiny_model("llama"))
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    with pytest.raises(ValueError, match=r"trained on a base model with `rope_parameters`=.*'default'.*'linear'"):
        PeftModel.from_pretrained(merged, tmp_path / "adapter")


def test_only_adapter_embedding_and_norm_parameters_train(long_input):
    for switches, extra in [({}, ()), ({"train_embeddings": True, "train_norms": True}, ("embed_tokens", "norm"))]:
        model = pi_model(tiny_model("llama"), **switches)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(3):
            loss = model(long_input, labels=long_input, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed, "nothing trained"
        for name in changed:
            assert "lora_" in name or any(f"{e}.modules_to_save" in name or f"{e}." in name for e in extra), name
            assert "base_layer" not in name and "original_module" not in name, name
        if extra:
            assert any("embed_tokens.modules_to_save" in n for n in changed)
            assert any("layernorm.modules_to_save" in n for n in changed)
            assert any(n.endswith("model.norm.modules_to_save.default.weight") for n in changed)


def test_two_adapters_switch_rope(long_input):
    model = pi_model(tiny_model("llama"))
    model.add_adapter("eight", PIConfig(scaling_factor=8.0, target_modules="all-linear"))
    assert model.config.rope_parameters["factor"] == 4.0  # adding does not activate
    model.set_adapter("eight")
    assert model.config.rope_parameters["factor"] == 8.0 and model.config.max_position_embeddings == 8 * L
    model.set_adapter("default")
    assert model.config.rope_parameters["factor"] == 4.0
    model.delete_adapter("default")
    assert model.config.rope_parameters["factor"] == 8.0


def test_sft_trainer_with_pi_config(tmp_path, tiny_tokenizer):
    from _train_helpers import tiny_sft_trainer
    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": torch.randint(3, len(tiny_tokenizer), (8, 3 * L)).tolist()})
    config = PIConfig(context_length=4 * L, target_modules="all-linear", train_norms=True)
    trainer = tiny_sft_trainer(
        tmp_path, tiny_tokenizer, config, dataset, max_steps=2, max_length=3 * L, logging_steps=1
    )
    assert isinstance(trainer.model.base_model, PIModel)
    assert trainer.model.config.rope_parameters["factor"] == 4.0
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["peft_type"] == "PI"


def _rope(model):
    return dict(model.config.rope_parameters), model.config.max_position_embeddings


def _inv_freq(model):
    return next(m.inv_freq.clone() for m in model.modules() if "inv_freq" in getattr(m, "_buffers", {}))


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


def test_refused_set_adapter_changes_nothing(base):
    model = get_peft_model(base, PIConfig(scaling_factor=4.0, target_modules=["q_proj"]))
    model.add_adapter("two", PIConfig(scaling_factor=2.0, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="extend RoPE differently"):
        model.base_model.set_adapter(["default", "two"])
    assert layer.active_adapters == ["default"] and model.base_model.active_adapters == ["default"]
    assert model.config.rope_parameters["factor"] == 4.0
