"""One contract, run over every pi_peft tuner (as peft's `testing_common.py` runs one lifecycle over every method).

Each tuner is described once in `TUNERS`; every test below runs for each of them:
- save, then load in a fresh process (`import pi_peft` + `PeftModel.from_pretrained`): equal logits;
- `disable_adapter()` and `unload()` give the base model's logits and RoPE back;
- `merge_and_unload()`: equal logits and the extended RoPE kept, or refused with the tuner's reason;
- a second adapter: added, switched and deleted, or refused with the tuner's reason;
- trl's `SFTTrainer` trains at the adapter's window;
- S²-Attn only while training: `eval()` and `generate()` (also in train mode) use full attention.
A new tuner is one `TUNERS` entry.
"""

import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from pi_peft import MLAConfig, PIConfig
from pi_peft.ops import s2_attn
from pi_peft.testing import TINY_DIMS, tiny_model

L = TINY_DIMS["max_position_embeddings"]


@dataclass
class Tuner:
    name: str
    config: Callable[..., PIConfig]  # kwargs -> a config of this tuner that extends the window 4x
    merge_refused: Optional[str] = None  # the reason `merge_and_unload` gives, when the tuner cannot merge
    second_adapter_refused: Optional[str] = None  # the reason a second adapter is refused, when it is


TUNERS = [
    Tuner("pi", lambda **kw: PIConfig(scaling_factor=4.0, target_modules="all-linear", **kw)),
    Tuner(
        "mla",
        lambda **kw: MLAConfig(kv_rank=24, rope_dims=4, scaling_factor=4.0, **kw),
        merge_refused=r"MLA adapter cannot be merged into the base model: partial RoPE",
        second_adapter_refused=r"already has an MLA adapter; pi_peft supports one MLA adapter per model",
    ),
]


@pytest.fixture(params=TUNERS, ids=lambda t: t.name)
def tuner(request):
    return request.param


@pytest.fixture
def ids():
    return torch.randint(0, TINY_DIMS["vocab_size"], (2, 3 * L), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def trained(model, seed=3):
    """Move every trainable weight away from its initial value, as training would (LoRA B = 0 hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def rope_of(model):
    return dict(model.config.rope_parameters), model.config.max_position_embeddings


def test_save_then_fresh_process_load_gives_equal_logits(tuner, tiny_checkpoint, tmp_path, ids):
    from transformers import AutoModelForCausalLM

    model = trained(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), tuner.config()))
    model.save_pretrained(tmp_path / "adapter")
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    adapter, ids_file, out_file = (str(tmp_path / name) for name in ("adapter", "ids.safetensors", "out.safetensors"))
    code = f"""
        import pi_peft, torch
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({tiny_checkpoint!r})
        model = PeftModel.from_pretrained(base, {adapter!r}).eval()
        with torch.no_grad():
            out = model(load_file({ids_file!r})["ids"], use_cache=False).logits
        save_file({{"logits": out.contiguous()}}, {out_file!r})
        print(model.peft_config["default"].peft_type.value)
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == tuner.name.upper()
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["logits"], logits(model, ids))


def test_disable_adapter_and_unload_give_the_base_back(tuner, ids):
    base = tiny_model()
    reference, base_rope = logits(base, ids), rope_of(base)
    model = trained(get_peft_model(base, tuner.config()))
    assert rope_of(model)[1] == 4 * L and (logits(model, ids) - reference).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), reference)
        assert rope_of(model) == base_rope
    unloaded = model.unload()
    torch.testing.assert_close(logits(unloaded, ids), reference)
    assert rope_of(unloaded) == base_rope


def test_merge_keeps_the_logits_and_the_extended_rope_or_is_refused(tuner, ids):
    model = trained(get_peft_model(tiny_model(), tuner.config()))
    expected, extended = logits(model, ids), rope_of(model)
    if tuner.merge_refused:
        with pytest.raises(ValueError, match=tuner.merge_refused):
            model.merge_and_unload()
        torch.testing.assert_close(logits(model, ids), expected)  # the refusal changed nothing
        return
    merged = model.merge_and_unload()
    assert not isinstance(merged, PeftModel) and rope_of(merged) == extended
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=1e-4)


def test_second_adapter_switches_and_deletes_or_is_refused(tuner, ids):
    model = trained(get_peft_model(tiny_model(), tuner.config()))
    first = logits(model, ids)
    if tuner.second_adapter_refused:
        with pytest.raises(ValueError, match=tuner.second_adapter_refused):
            model.add_adapter("two", tuner.config())
        torch.testing.assert_close(logits(model, ids), first)
        return
    model.add_adapter("two", tuner.config())
    model.set_adapter("two")  # the active adapter is the trainable one
    second = logits(trained(model, seed=4), ids)
    assert (second - first).abs().max() > 1e-4
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, ids), first)
    model.delete_adapter("two")
    assert list(model.peft_config) == ["default"] and rope_of(model)[1] == 4 * L


def test_sft_trainer_trains_at_the_adapter_window(tuner, tmp_path, tiny_tokenizer):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=tiny_model(vocab_size=len(tiny_tokenizer)),
        args=SFTConfig(str(tmp_path), report_to="none", use_cpu=True, max_steps=1),
        train_dataset=Dataset.from_dict({"input_ids": torch.randint(3, len(tiny_tokenizer), (2, 5 * L)).tolist()}),
        processing_class=tiny_tokenizer,
        peft_config=tuner.config(),
    )
    assert trainer.args.max_length == 4 * L  # trl's default 1024 became the adapter's window
    assert type(trainer.model.base_model).__name__ == f"{tuner.name.upper()}Model"


def test_s2_attention_only_while_training(tuner, ids):
    model = get_peft_model(tiny_model(), tuner.config(s2_attn=True, lora_dropout=0.0))
    inner = model.base_model.model
    model.train()
    assert s2_attn.is_s2_implementation(inner.config._attn_implementation)
    model.eval()
    assert not s2_attn.is_s2_implementation(inner.config._attn_implementation)
    eval_tokens = model.generate(input_ids=ids[:1, : 2 * L], max_new_tokens=4, do_sample=False)
    model.train()
    seen = []
    hook = inner.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(inner.config._attn_implementation)
    )
    train_tokens = model.generate(input_ids=ids[:1, : 2 * L], max_new_tokens=4, do_sample=False)
    hook.remove()
    assert seen and not any(s2_attn.is_s2_implementation(name) for name in seen)
    assert torch.equal(train_tokens, eval_tokens)
    assert s2_attn.is_s2_implementation(inner.config._attn_implementation)  # training resumes with S²-Attn
