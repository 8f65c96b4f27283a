import copy

import pytest
import torch
from peft import get_peft_model

from pi_peft import PIConfig, pi_inv_freq, rope_cos_sin, scaled_rope_parameters, set_rope_parameters
from pi_peft.rope import ROPE_TYPES, rope_parameters_of, rotary_embeddings
from pi_peft.testing import FAMILIES, tiny_config, tiny_model

L = 64

ROPE_CASES = {
    "linear": {},
    "dynamic": {},
    "yarn": {"beta_fast": 16.0, "beta_slow": 2.0},
    "llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def fresh_from_scaled_config(model, weights=True):
    """A model built from scratch from `model`'s (scaled) config, with `model`'s weights."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    fresh = AutoModelForCausalLM.from_config(config).eval()
    if weights:
        fresh.load_state_dict(model.state_dict())
    return fresh


@pytest.mark.parametrize("rope_type", list(ROPE_CASES))
def test_patched_model_equals_model_built_from_scaled_config(rope_type, long_input):
    base = tiny_model("llama")
    params = scaled_rope_parameters(
        rope_parameters_of(base.config),
        rope_type=rope_type,
        scaling_factor=4.0,
        original_context_length=L,
        **ROPE_CASES[rope_type],
    )
    max_pos = L if rope_type == "dynamic" else 4 * L
    set_rope_parameters(base, params, max_pos)
    assert base.config.rope_parameters["rope_type"] == rope_type
    assert base.config.rope_parameters["rope_theta"] == 10000.0  # kept, not rebuilt by hand
    fresh = fresh_from_scaled_config(base)
    with torch.no_grad():
        patched_logits = base(long_input, use_cache=False).logits
        fresh_logits = fresh(long_input, use_cache=False).logits
    assert long_input.shape[1] > L
    assert (patched_logits - fresh_logits).abs().max() <= 1e-5
    assert torch.equal(base.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("rope_type", list(ROPE_CASES))
def test_pi_config_reproduces_the_same_rope_as_transformers(rope_type, long_input):
    """The peft entry point gives the same RoPE as a model configured with it from the start."""
    base = tiny_model("llama")
    model = get_peft_model(
        base, PIConfig(scaling_factor=4.0, rope_type=rope_type, target_modules=["q_proj"], **ROPE_CASES[rope_type])
    )
    fresh = fresh_from_scaled_config(model.get_base_model(), weights=False)
    rotary, fresh_rotary = model.get_base_model().model.rotary_emb, fresh.model.rotary_emb
    positions = torch.arange(3 * L)[None]
    x = torch.zeros(1, 3 * L, 16)
    for a, b in zip(rotary(x, positions), fresh_rotary(x, positions)):
        assert (a - b).abs().max() <= 1e-6


@pytest.mark.parametrize("s", [2, 4, 8])
def test_pi_property_position_m_at_factor_s_is_unscaled_position_m_over_s(s):
    inv_freq = tiny_model("llama").model.rotary_emb.inv_freq
    m = torch.arange(0, 8 * L, s)  # integer m / s
    cos_s, sin_s = rope_cos_sin(pi_inv_freq(inv_freq, s), m)
    cos_1, sin_1 = rope_cos_sin(inv_freq, m // s)
    torch.testing.assert_close(cos_s, cos_1, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin_s, sin_1, atol=1e-5, rtol=0)
    # and the model's own rotary module agrees after patching
    model = tiny_model("llama")
    set_rope_parameters(
        model,
        scaled_rope_parameters(
            rope_parameters_of(model.config), rope_type="linear", scaling_factor=s, original_context_length=L
        ),
        s * L,
    )
    cos_model, sin_model = model.model.rotary_emb(torch.zeros(1, len(m), 16), m[None])
    torch.testing.assert_close(cos_model[0], cos_1, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin_model[0], sin_1, atol=1e-5, rtol=0)


def test_scaling_factor_one_is_an_exact_noop(long_input):
    base = tiny_model("llama")
    with torch.no_grad():
        expected = base(long_input, use_cache=False).logits
    config_before = base.config.to_dict()
    model = get_peft_model(base, PIConfig(scaling_factor=1.0, target_modules=["q_proj"]))
    assert model.config.to_dict()["rope_parameters"] == config_before["rope_parameters"]
    assert model.config.max_position_embeddings == L
    with torch.no_grad():
        assert torch.equal(model(long_input, use_cache=False).logits, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_families(family, long_input):
    base = tiny_model(family)
    with torch.no_grad():
        before = base(long_input, use_cache=False).logits
    model = get_peft_model(base, PIConfig(context_length=4 * L, target_modules="all-linear"))
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 4.0
    assert model.config.max_position_embeddings == 4 * L
    rotary = dict(rotary_embeddings(model))
    assert rotary, "found no rotary module"
    for module in rotary.values():
        torch.testing.assert_close(module.inv_freq, module.original_inv_freq)  # rebuilt from the new config
    with torch.no_grad():
        after = model(long_input, use_cache=False).logits
    assert not torch.allclose(before, after, atol=1e-4)  # LoRA B=0, so only RoPE changed the output


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "bert"])
def test_models_without_rope_are_refused(model_type):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        model_type, hidden_size=32, n_embd=32, num_hidden_layers=1, n_layer=1, num_attention_heads=2, n_head=2
    )
    model = AutoModel.from_config(config)
    with pytest.raises(ValueError, match=rf"{model_type}.*Position Interpolation needs rotary embeddings"):
        get_peft_model(model, PIConfig(scaling_factor=2.0, target_modules="all-linear"))


def test_linear_on_linear_multiplies_factors(long_input):
    base = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    model = get_peft_model(base, PIConfig(scaling_factor=4.0, target_modules=["q_proj"]))
    assert model.config.rope_parameters["factor"] == 8.0
    reference = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0})
    torch.testing.assert_close(model.get_base_model().model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    with model.disable_adapter():  # the base's own scaling comes back, not "no scaling"
        assert model.config.rope_parameters["factor"] == 2.0


@pytest.mark.parametrize(
    ("base_rope", "rope_type"),
    [
        ({"rope_type": "linear", "factor": 2.0}, "yarn"),
        ({"rope_type": "dynamic", "factor": 2.0}, "linear"),
        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}, "linear"),
    ],
)
def test_uncomposable_base_scaling_is_refused_not_overwritten(base_rope, rope_type):
    base = tiny_model("llama", rope_parameters={**base_rope, "rope_theta": 10000.0})
    before = copy.deepcopy(base.config.rope_parameters)
    with pytest.raises(ValueError, match=rf"already uses `rope_parameters` with rope_type='{base_rope['rope_type']}'"):
        get_peft_model(base, PIConfig(scaling_factor=4.0, rope_type=rope_type, target_modules=["q_proj"]))
    assert base.config.rope_parameters == before


def test_rope_theta_and_partial_rotary_factor_survive():
    base = tiny_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    model = get_peft_model(base, PIConfig(scaling_factor=2.0, target_modules=["q_proj"]))
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    params = scaled_rope_parameters(
        {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
        rope_type="yarn",
        scaling_factor=4,
        original_context_length=4096,
    )
    assert params["partial_rotary_factor"] == 0.5 and params["rope_theta"] == 1e6
    assert params["original_max_position_embeddings"] == 4096


def test_config_without_scaling_support_gets_clear_error():
    cfg = tiny_config("llama")
    assert cfg.rope_parameters["rope_type"] == "default"
    with pytest.raises(ValueError, match="`rope_type` must be one of"):
        scaled_rope_parameters({}, rope_type="longrope", scaling_factor=2, original_context_length=64)


def test_four_bit_base_gets_the_same_rope(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    q_base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, quantization_config=quantization, device_map="cpu")
    assert type(q_base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    q_model = get_peft_model(q_base, PIConfig(scaling_factor=4.0, target_modules="all-linear"))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint),
        PIConfig(scaling_factor=4.0, target_modules="all-linear"),
    )
    assert q_model.config.rope_parameters == model.config.rope_parameters
    assert torch.equal(
        q_model.get_base_model().model.rotary_emb.inv_freq, model.get_base_model().model.rotary_emb.inv_freq
    )
    assert not any(p.requires_grad for n, p in q_model.named_parameters() if "rotary" in n)


def test_family_whose_config_refuses_the_rope_type_gets_a_clear_error():
    from transformers import Phi3Config, Phi3ForCausalLM

    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=128)
    model = Phi3ForCausalLM(Phi3Config(**dims, max_position_embeddings=64, pad_token_id=0, eos_token_id=1)).eval()
    before = copy.deepcopy(model.config.rope_parameters)
    with pytest.raises(
        ValueError, match=r"'phi3' config refuses `rope_parameters`=.*'linear'.*accepts only 'longrope'"
    ):
        get_peft_model(model, PIConfig(scaling_factor=4.0, target_modules="all-linear"))
    assert model.config.rope_parameters == before and model.config.max_position_embeddings == 64


def test_dynamic_caveat_is_documented_where_dynamic_is_offered():
    assert "KV cache" in ROPE_TYPES["dynamic"].note
    assert "KV cache" in " ".join(PIConfig.__doc__.split())


# ---- one RoPE per layer type (Gemma 3) -----------------------------------------------------------------------------
def tiny_gemma3(full_rope=None):
    """A tiny Gemma3ForCausalLM: a sliding-window layer (local RoPE, theta 1e4) and a full-attention layer (global
    RoPE, by default linearly scaled x2 as Gemma 3 4B-27B ship), each with its own rotary buffers."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from pi_peft.testing import TINY_DIMS

    full_rope = full_rope or {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    local_rope = {"rope_type": "default", "rope_theta": 1e4}
    config = Gemma3TextConfig(
        **TINY_DIMS,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": full_rope, "sliding_attention": local_rope},
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("full_rope", [None, {"rope_type": "default", "rope_theta": 1e6}])  # 4B-27B, 1B (no scaling)
def test_gemma3_pi_extends_the_full_attention_rope_only(tmp_path, full_rope, long_input):
    """Regression (issue 19, item 14): Gemma 3 was refused with the false reason "no rotary position embeddings"
    (its rotary module holds `full_attention_inv_freq` and `sliding_attention_inv_freq`). PI extends the RoPE of the
    full-attention layers, as Gemma 3's own long-context checkpoints do; the sliding-window layers keep theirs."""
    from peft import PeftModel

    base = tiny_gemma3(full_rope)
    rotary = base.model.rotary_emb
    before = {name: buffer.clone() for name, buffer in rotary.named_buffers()}
    base_factor = base.config.rope_parameters["full_attention"].get("factor", 1.0)
    with torch.no_grad():
        base_logits = base(long_input).logits
    model = get_peft_model(base, PIConfig(scaling_factor=4.0, target_modules="all-linear", init_lora_weights=False))
    params = base.config.rope_parameters
    assert params["full_attention"]["rope_type"] == "linear" and params["full_attention"]["factor"] == 4 * base_factor
    assert params["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}
    assert base.config.max_position_embeddings == 4 * L
    theta = 1e6 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16)
    torch.testing.assert_close(rotary.full_attention_inv_freq, 1 / theta / (4 * base_factor))
    torch.testing.assert_close(rotary.sliding_attention_inv_freq, before["sliding_attention_inv_freq"], rtol=0, atol=0)
    with torch.no_grad():
        logits = model(long_input).logits
        with model.disable_adapter():  # the base's own RoPE (and no LoRA): the base's logits
            torch.testing.assert_close(model(long_input).logits, base_logits, rtol=0, atol=0)
            assert base.config.rope_parameters["full_attention"].get("factor", 1.0) == base_factor
    model.train()
    model(long_input, labels=long_input).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_gemma3(full_rope), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(long_input).logits, logits, rtol=1e-5, atol=1e-5)
    merged = loaded.merge_and_unload()
    assert merged.config.rope_parameters == params  # the merged model keeps the extension, on full attention only


def test_per_layer_type_rope_without_full_attention_is_refused_with_the_reason():
    two_types = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, "chunked": None}
    expected = r"one RoPE per layer type \(\['chunked', 'sliding_attention'\]\) but none for 'full_attention' layers"
    with pytest.raises(ValueError, match=expected):
        scaled_rope_parameters(two_types, rope_type="linear", scaling_factor=2.0, original_context_length=64)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_llama_cpp_rope_scale_is_the_composed_factor_on_a_linearly_scaled_base(tmp_path, family):
    """llama.cpp's `--rope-scale` replaces the GGUF's own factor, so PI x4 on a base already scaled x2 (Gemma 3 4B-27B
    ship linear x8 on their full-attention layers) needs `--rope-scale 8`; it was given the adapter's 4."""
    import json

    from pi_peft.sharing.serving import extension_of, llama_cpp_rope_flags

    if family == "gemma3":
        base = tiny_gemma3()
    else:
        base = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    get_peft_model(base, PIConfig(scaling_factor=4.0, target_modules="all-linear")).save_pretrained(tmp_path)
    ext = extension_of(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert llama_cpp_rope_flags(ext) == f"--rope-scaling linear --rope-scale 8 -c {4 * L}"
