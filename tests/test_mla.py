"""MHA2MLA adapter (pi_peft.tuners.mla): exact conversion, latent cache, generation, save/load, PI on kept dims,
errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from pi_peft.testing import TINY_DIMS, tiny_model
from pi_peft.tuners.mla import MLAAttention, MLACache, MLAConfig, MLAModel, initialize_mla_weights, joint_svd
from pi_peft.tuners.mla.selection import fixed_pairs, nope_dims, pair_dims, pair_norms, top_pairs, two_norm_scores

L = TINY_DIMS["max_position_embeddings"]
HEAD_DIM = TINY_DIMS["hidden_size"] // TINY_DIMS["num_attention_heads"]  # 16
KV_HEADS = TINY_DIMS["num_key_value_heads"]  # 2
FULL_RANK = 2 * KV_HEADS * HEAD_DIM  # 64 = hidden_size: the stacked [W_k; W_v] of a tiny layer


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def mla_model(family="llama", seed=0, **kwargs):
    kwargs.setdefault("kv_rank", 24)
    kwargs.setdefault("rope_dims", 4)
    return get_peft_model(tiny_model(family, seed=seed), MLAConfig(**kwargs))


def perturb(model, seed=3):
    """Move every trainable weight (MLA matrices, LoRA A and B) away from its initial value, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))


# ---- the conversion itself ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])  # qwen2: k/v biases go to the up-projections
def test_all_rotary_dims_and_full_rank_reproduce_the_original_logits(family, ids):
    reference = logits(tiny_model(family), ids)
    model = mla_model(family, kv_rank=2 * KV_HEADS * HEAD_DIM - KV_HEADS * HEAD_DIM, rope_dims=HEAD_DIM)
    assert all(isinstance(layer.self_attn, MLAAttention) for layer in model.base_model.model.model.layers)
    torch.testing.assert_close(logits(model, ids), reference, atol=2e-5, rtol=1e-4)


def test_compressed_model_differs_and_disable_adapter_gives_the_original(ids):
    reference = logits(tiny_model("llama"), ids)
    model = mla_model(kv_rank=8, rope_dims=4)
    assert (logits(model, ids) - reference).abs().max() > 1e-3  # partial RoPE + rank 8 is a different model
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), reference)
    torch.testing.assert_close(logits(model.unload(), ids), reference)


def test_joint_svd_is_exact_at_full_rank_and_optimal_below():
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(20, 64, generator=gen), torch.randn(32, 64, generator=gen)
    down, k_up, v_up = joint_svd(k, v, 52)
    torch.testing.assert_close(torch.cat([k_up, v_up]) @ down, torch.cat([k, v]), atol=1e-4, rtol=1e-4)
    down, k_up, v_up = joint_svd(k, v, 10)
    assert down.shape == (10, 64) and k_up.shape == (20, 10) and v_up.shape == (32, 10)
    s = torch.linalg.svdvals(torch.cat([k, v]))
    error = torch.linalg.matrix_norm(torch.cat([k_up, v_up]) @ down - torch.cat([k, v]))
    torch.testing.assert_close(error, s[10:].square().sum().sqrt(), atol=1e-3, rtol=1e-4)  # Eckart-Young


def test_fixed_selections_and_dim_layout():
    assert fixed_pairs("high", 16, 4, 2).tolist() == [[0, 1], [0, 1]]
    assert fixed_pairs("low", 16, 4, 1).tolist() == [[6, 7]]
    assert fixed_pairs("uniform", 16, 8, 1).tolist() == [[0, 2, 4, 6]]
    pairs = torch.tensor([[1, 5]])
    assert pair_dims(pairs, 16).tolist() == [[1, 5, 9, 13]]  # rotate_half pairs (1, 9) and (5, 13) as transformers
    assert nope_dims(pairs, 16).tolist() == [[0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15]]


def test_two_norm_scores_sum_query_heads_of_a_group():
    q = torch.zeros(4, 3)  # 4 query heads, 3 pairs; 2 kv heads -> groups {0, 1} and {2, 3}
    q[0, 2], q[1, 2], q[2, 0] = 1.0, 2.0, 5.0
    k = torch.ones(2, 3)
    k[1, 1] = 10.0
    scores = two_norm_scores(q, k)
    assert scores.tolist() == [[0.0, 0.0, 3.0], [5.0, 0.0, 0.0]]
    assert top_pairs(scores, 2).tolist() == [[2], [0]]  # rope_dims=2: one pair per kv head
    states = torch.tensor([[3.0, 0.0, 4.0, 1.0]])  # pairs (0, 2) and (1, 3)
    assert pair_norms(states).tolist() == [[5.0, 1.0]]


# ---- compressed cache and generation -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_caches_only_the_latent_and_kept_rope_keys(family):
    kv_rank, rope_dims = 8, 4
    model = mla_model(family, kv_rank=kv_rank, rope_dims=rope_dims).eval()
    prompt = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    assert isinstance(cache, MLACache)
    tokens = out.sequences.shape[1] - 1  # the last token is generated, never fed back
    for layer_idx, layer in enumerate(cache.layers):
        per_token = sum(t.numel() for t in (layer.keys, layer.values)) // (2 * tokens)
        assert per_token == cache.values_per_token(layer_idx) == kv_rank + KV_HEADS * rope_dims  # 16
        assert per_token < 2 * KV_HEADS * HEAD_DIM  # 64 for the original K/V
        assert cache.latent(layer_idx).shape == (2, tokens, kv_rank)
        assert cache.rope_keys(layer_idx).shape == (2, KV_HEADS, tokens, rope_dims)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_with_the_latent_cache_equals_full_recomputation(family, attn):
    model = mla_model(family, kv_rank=12, rope_dims=6, rope_selection="uniform").eval()
    perturb(model)
    model.config._attn_implementation = attn
    assert_cached_greedy_equals_recomputation(model)


def test_batched_generation_with_left_padding_matches_single_rows():
    model = mla_model(kv_rank=12, rope_dims=4).eval()
    perturb(model)
    a = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(6))
    b = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(7))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.cat([torch.ones(1, 7), torch.cat([torch.zeros(1, 3), torch.ones(1, 4)], dim=1)]).long()
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    assert torch.equal(together[0, 7:], model.generate(a, **kwargs)[0, 7:])
    assert torch.equal(together[1, 7:], model.generate(b, **kwargs)[0, 4:])


def test_beam_search_with_the_latent_cache_equals_recomputation():
    model = mla_model(kv_rank=12, rope_dims=4).eval()
    perturb(model)
    prompt = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(8))
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=3, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_cache_implementation_dynamic_works_and_others_are_refused_by_name():
    """Regression (issue 19, item 12): `generate(cache_implementation="static")` complained about a cache (the
    MLACache pi_peft passes) that the user never passed."""
    from transformers import GenerationConfig

    model = mla_model(kv_rank=12, rope_dims=4).eval()
    perturb(model)
    prompt = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    reference = model.generate(prompt, **kwargs)
    assert torch.equal(model.generate(prompt, cache_implementation="dynamic", **kwargs), reference)
    assert torch.equal(model.generate(prompt, generation_config=GenerationConfig(cache_implementation="dynamic",
                                                                                 **kwargs)), reference)  # fmt: skip
    for name in ("static", "offloaded", "quantized", "sliding_window"):
        expected = rf"`cache_implementation`='{name}': an MLA model caches .* drop `cache_implementation`"
        with pytest.raises(ValueError, match=expected):
            model.generate(prompt, cache_implementation=name, **kwargs)
    with pytest.raises(ValueError, match=r"`cache_implementation`='static'"):
        model.generate(prompt, generation_config=GenerationConfig(cache_implementation="static", **kwargs))
    model.get_base_model().generation_config.cache_implementation = "static"  # the model's default, not the user's
    out = model.generate(prompt, return_dict_in_generate=True, **kwargs)
    assert isinstance(getattr(out, "cache", None) or out.past_key_values, MLACache)
    assert torch.equal(out.sequences, reference)


def test_output_attentions_gives_the_mla_layers_attention_weights():
    """Regression (issue 19, item 12): `output_attentions=True` (eager) returned `()` silently: transformers records
    the weights of the model's own attention class, which MLA replaces."""
    base = tiny_model("llama", attn_implementation="eager")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = base(ids, output_attentions=True).attentions
    exact = get_peft_model(base, MLAConfig(kv_rank=KV_HEADS * HEAD_DIM, rope_dims=HEAD_DIM)).eval()
    with torch.no_grad():
        got = exact(ids, output_attentions=True).attentions
    assert len(got) == len(want) == TINY_DIMS["num_hidden_layers"]
    for g, w in zip(got, want):  # every rotary dim and a full-rank latent: the original attention, weights included
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    model = mla_model(kv_rank=12, rope_dims=4).eval()
    model.get_base_model().set_attn_implementation("eager")
    perturb(model)
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions
    assert len(weights) == 2 and weights[0].shape == (2, 4, 12, 12)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 4, 12))
    out = model.generate(ids[:1, :6], max_new_tokens=3, do_sample=False, pad_token_id=0, output_attentions=True,
                         return_dict_in_generate=True)  # fmt: skip
    assert [tuple(step[0].shape) for step in out.attentions] == [(1, 4, 6, 6), (1, 4, 1, 7), (1, 4, 1, 8)]


def test_static_cache_is_refused():
    from transformers import StaticCache

    model = mla_model().eval()
    cache = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(ValueError, match=r"needs a dynamic cache with plain `DynamicLayer`s; got StaticLayer"):
        model(torch.zeros(1, 4, dtype=torch.long), past_key_values=cache, use_cache=True)


# ---- PI on the kept dims -----------------------------------------------------------------------------------------
def test_pi_scales_only_the_kept_rotary_dims(ids):
    positions = torch.arange(ids.shape[1]).expand(2, -1)
    mask = torch.ones_like(ids)  # with a mask, position_ids are positions (not packed-sequence boundaries)
    plain, extended = mla_model(kv_rank=16, rope_dims=4), mla_model(kv_rank=16, rope_dims=4, scaling_factor=4.0)
    assert extended.config.rope_parameters["factor"] == 4.0 and extended.config.max_position_embeddings == 4 * L
    assert plain.config.rope_parameters.get("rope_type", "default") == "default"
    perturb(plain), perturb(extended)

    def run(model, pos):
        return logits(model, ids, position_ids=pos, attention_mask=mask)

    # kept dims turn at inv_freq / 4: position 4p under PI is position p without it
    torch.testing.assert_close(run(extended, 4 * positions), run(plain, positions))
    assert (run(extended, positions) - run(plain, positions)).abs().max() > 1e-4  # and PI does change the model
    # the other dims do not turn at all: without the RoPE keys, positions do not matter (PI or not)
    for model in (plain, extended):
        assert (run(model, positions) - run(model, 7 * positions + 3)).abs().max() > 1e-4
        for m in model.modules():
            if isinstance(m, MLAAttention):
                torch.nn.init.zeros_(m.mla_k_rope["default"].weight)
        torch.testing.assert_close(run(model, positions), run(model, 7 * positions + 3))
    with extended.disable_adapter():  # original attention and original RoPE
        assert extended.config.rope_parameters.get("factor") is None
        torch.testing.assert_close(logits(extended, ids), logits(tiny_model("llama"), ids))


# ---- save / load -------------------------------------------------------------------------------------------------
def test_save_then_fresh_process_gives_equal_logits(tmp_path, tiny_checkpoint, ids):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    model = get_peft_model(base, MLAConfig(kv_rank=10, rope_dims=6, rope_selection="low", scaling_factor=2.0))
    perturb(model)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MLA" and saved["kv_rank"] == 10 and saved["rope_pairs"][0] == [[5, 6, 7]] * 2
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k.split(".")[-2] for k in weights if ".mla_" in k} == {"mla_kv_down", "mla_k_rope", "mla_k_up", "mla_v_up"}
    assert not any("k_proj" in k or "v_proj" in k for k in weights)
    printed = 'type(model.base_model).__name__, model.config.rope_parameters["factor"]'
    result = load_in_fresh_process(tmp_path, ids, printed)
    assert "MLAModel 2.0" in result.stdout
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)
    # in this process too, through PeftModel.from_pretrained, trainable again
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint), tmp_path / "adapter", is_trainable=True
    )
    torch.testing.assert_close(logits(loaded, ids), expected)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if ".mla_" in n)


def load_in_fresh_process(tmp_path, ids, printed: str) -> subprocess.CompletedProcess:
    """Load ``tmp_path/adapter`` with ``AutoPeftModelForCausalLM`` in a new Python process, save its logits on
    ``ids`` to ``tmp_path/out.pt`` and print ``printed`` (an expression of ``model``)."""
    torch.save({"ids": ids}, tmp_path / "ids.pt")
    code = f"""
        import torch, pi_peft
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r}).eval()
        ids = torch.load({str(tmp_path / "ids.pt")!r})["ids"]
        with torch.no_grad():
            torch.save(model(ids, use_cache=False).logits, {str(tmp_path / "out.pt")!r})
        print({printed})
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_cached_greedy_equals_recomputation(model):
    """Greedy generation with the latent cache equals greedy by full recomputation, and one decoding step's logits
    agree three ways: absorbed decoding, keys/values rebuilt from the latent, and no cache."""
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, **kwargs)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))
    seq = cached[:, :-1]
    full = logits(model, seq)[:, -1]
    for absorb in (True, False):
        for m in model.modules():
            if isinstance(m, MLAAttention):
                m.absorb = absorb
        cache = MLACache()
        with torch.no_grad():
            model(seq[:, :-1], past_key_values=cache, use_cache=True)
            step = model(seq[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


def two_norm_reference(base, batches, q_module: str, k_module: str) -> torch.Tensor:
    """The 2-norm choice computed independently on the original model: per layer, mean pair norms of the queries
    and keys (outputs of ``q_module``/``k_module``, i.e. what RoPE sees), their product summed over each GQA group,
    the top 2 pairs per kv head. ``-> (layers, kv_heads, 2)``."""
    expected = []
    for layer in base.model.layers:
        attn, states = layer.self_attn, {}
        hooks = [
            getattr(attn, q_module).register_forward_hook(lambda m, i, o, s=states: s.setdefault("q", []).append(o)),
            getattr(attn, k_module).register_forward_hook(lambda m, i, o, s=states: s.setdefault("k", []).append(o)),
        ]
        with torch.no_grad():
            for batch in batches:
                base(batch)
        for hook in hooks:
            hook.remove()
        q = torch.cat(states["q"]).view(-1, 4, HEAD_DIM)  # (tokens, heads, head_dim)
        k = torch.cat(states["k"]).view(-1, KV_HEADS, HEAD_DIM)  # (tokens, kv_heads, head_dim)
        qn = (q[..., :8] ** 2 + q[..., 8:] ** 2).sqrt().mean(0)  # (4, 8)
        kn = (k[..., :8] ** 2 + k[..., 8:] ** 2).sqrt().mean(0)  # (2, 8)
        expected.append((qn.view(2, 2, 8) * kn[:, None]).sum(1).topk(2).indices.sort().values)
    return torch.stack(expected)


def test_two_norm_selection_uses_calibration_data_and_is_saved(tmp_path, ids):
    model = mla_model(kv_rank=16, rope_dims=4, rope_selection="2-norm")
    with pytest.raises(RuntimeError, match=r"rope_selection='2-norm' and has not seen calibration data.*initialize"):
        model(ids)
    with pytest.raises(ValueError, match=r"needs calibration data: pass `calibration_data`"):
        initialize_mla_weights(model, None)
    with pytest.raises(ValueError, match=r"`calibration_data` was empty"):
        initialize_mla_weights(model, [])
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pairs = initialize_mla_weights(model, batches)
    as_dicts = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches]
    assert torch.equal(initialize_mla_weights(model, as_dicts, max_batches=3), pairs)
    assert torch.equal(pairs, two_norm_reference(tiny_model("llama"), batches, "q_proj", "k_proj"))
    assert model.peft_config["default"].rope_pairs == pairs.tolist()
    out = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)  # no calibration data needed to load
    torch.testing.assert_close(logits(loaded, ids), out)


def test_calibration_data_in_every_common_form_gives_the_same_pairs():
    """Regression (issue 19, item 12): a 1-D id tensor or a dict of lists crashed with a shape/attribute error."""
    model = mla_model(kv_rank=16, rope_dims=4, rope_selection="2-norm")
    a, b = (torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (16, 11))
    reference = initialize_mla_weights(model, [a[None], b[None]]).clone()  # two (1, T) tensors, one row each
    padded = torch.stack([a, torch.cat([b, torch.zeros(5, dtype=torch.long)])])  # (2, 16), b right-padded
    mask = torch.stack([torch.ones(16, dtype=torch.long), (torch.arange(16) < 11).long()])
    forms = {
        "1-D tensors": [a, b],
        "lists of ids": [a.tolist(), b.tolist()],
        "dict of lists, ragged (a tokenizer without padding)": {"input_ids": [a.tolist(), b.tolist()]},
        "dict of lists, padded with a mask": {"input_ids": padded.tolist(), "attention_mask": mask.tolist()},
        "dicts of 1-D tensors": [{"input_ids": a}, {"input_ids": b, "attention_mask": torch.ones(11)}],
    }
    for name, data in forms.items():
        assert torch.equal(initialize_mla_weights(model, data), reference), name
    bad = [
        ("the pass key is", TypeError, r"`calibration_data` must be .* got str"),
        (["some text"], TypeError, r"batch 0 is text; tokenize it first"),
        ([{"ids": a}], ValueError, r"batch 0 is a dict without `input_ids` \(keys: \['ids'\]\)"),
        ([a.float()], ValueError, r"batch 0: `input_ids` has shape \(1, 16\) and dtype torch.float32.*integer"),
        ([torch.zeros(1, 2, 3, dtype=torch.long)], ValueError, r"`input_ids` has shape \(1, 2, 3\)"),
        ([{"input_ids": a, "attention_mask": torch.ones(5)}], ValueError, r"`attention_mask` has shape\(s\) \[\(1, 5"),
        ([[a.tolist(), "x"]], TypeError, r"batch 0: `input_ids` is list"),
    ]
    for data, error, match in bad:
        with pytest.raises(error, match=match):
            initialize_mla_weights(model, data)


# ---- training ----------------------------------------------------------------------------------------------------
def test_only_mla_and_lora_weights_train():
    model = mla_model(kv_rank=16, rope_dims=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all((".mla_" in n) or ("lora_" in n) for n in trainable)
    assert any(".mla_kv_down." in n for n in trainable) and not any("k_proj" in n or "v_proj" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = torch.randint(0, 128, (2, 16))
    for _ in range(2):
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".mla_k_up." in n for n in changed) and any("lora_B" in n for n in changed)
    # LoRA inside the wrapped attention trains too (q_proj, o_proj), not only the MLP's
    for proj in ("q_proj", "o_proj"):
        assert any(f"self_attn.base_layer.{proj}.lora_B" in n for n in changed), proj
    assert not any(".base_layer.weight" in n or "norm" in n or "embed" in n for n in trainable)


@pytest.mark.parametrize("family", ["llama", "qwen3", "olmo2"])
def test_bf16_model_with_fp32_mla_weights_runs_and_caches_in_bf16(family, ids):
    """peft keeps adapter weights of a bf16 model in fp32 (`autocast_adapter_dtype`); OLMo 2's RoPE tables are fp32."""
    make = (lambda: tiny_model("llama")) if family == "llama" else (lambda: qk_norm_model(family))
    fp32, bf16 = logits(make(), ids), logits(make().to(torch.bfloat16), ids).float()
    model = get_peft_model(make().to(torch.bfloat16), MLAConfig(kv_rank=KV_HEADS * HEAD_DIM, rope_dims=HEAD_DIM))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".mla_" in n)
    error = (logits(model, ids).float() - bf16).abs().max()
    assert error <= 3 * (bf16 - fp32).abs().max()  # the conversion adds no more than bf16's own rounding
    out = model.eval().generate(
        ids[:1, :9], max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    cache, tokens = out.past_key_values, out.sequences.shape[1] - 1
    assert all(t.dtype == torch.bfloat16 for layer in cache.layers for t in (layer.keys, layer.values))
    assert cache.nbytes() == 2 * tokens * sum(cache.values_per_token(i) for i in range(len(cache.layers)))


# ---- LongLoRA's S²-Attn in training -------------------------------------------------------------------------------
def test_s2_attn_training_equals_the_reference_rule_and_trains(ids):
    from test_s2_attn import docs_from_positions, reference_attention, rows
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from pi_peft.ops import s2_attn

    seen = []

    def reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
        docs = None if position_ids is None else docs_from_positions(position_ids.expand(query.shape[0], -1))
        seen.append(docs is not None and bool(docs.any()))
        valid = None if attention_mask is None else attention_mask.bool()
        return reference_attention(query, key, value, 0.25, valid, docs, scaling).to(query.dtype), None

    AttentionInterface.register("test_mla_s2_reference", reference)
    AttentionMaskInterface.register("test_mla_s2_reference", flash_attention_mask)
    config = MLAConfig(kv_rank=12, rope_dims=4, scaling_factor=4.0, s2_attn=True, lora_dropout=0.0)
    model = get_peft_model(tiny_model("llama"), config).train()
    perturb(model)
    inner = model.get_base_model()
    assert s2_attn.is_s2_implementation(inner.config._attn_implementation)
    batch = torch.randint(0, 128, (2, 45), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 45, dtype=torch.long)
    mask[1, -6:] = 0
    packed_positions = rows("packed", 2, 45)[2]
    for kwargs in (dict(), dict(attention_mask=mask), dict(position_ids=packed_positions)):
        kept = mask.bool() if "attention_mask" in kwargs else torch.ones(2, 45, dtype=torch.bool)
        got = model(input_ids=batch, **kwargs).logits
        inner.set_attn_implementation("test_mla_s2_reference")
        want = model(input_ids=batch, **kwargs).logits
        inner.set_attn_implementation("sdpa")  # the model's own (a user's switch is kept by eval/train)
        model.eval()  # the model's own full attention
        full = model(input_ids=batch, **kwargs).logits
        model.train()  # back to S²
        assert s2_attn.is_s2_implementation(inner.config._attn_implementation)
        torch.testing.assert_close(got[kept], want[kept], atol=1e-5, rtol=0)
        assert (got[kept] - full[kept]).abs().max() > 1e-3  # S² really ran: blocks, not full attention
    assert seen[-1]  # packed rows reached the attention function (MLA passes position_ids on)
    loss = model(input_ids=batch, labels=batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for part in (".mla_kv_down.", ".mla_k_rope.", "q_proj.lora_B", "mlp.up_proj.lora_B"):
        grads = [p.grad for n, p in model.named_parameters() if part in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), part


def test_generate_in_train_mode_with_s2_attn_uses_full_attention(monkeypatch):
    """Regression (issue 19, item 6): `MLAModel.generate` skipped `PIModel.generate`'s switch to full attention, so a
    train-mode `generate()` (e.g. a sample during training) ran its prefill with S²-Attn and gave other tokens."""
    from pi_peft.ops import s2_attn

    calls = []
    kernel = s2_attn.s2_attention
    monkeypatch.setattr(s2_attn, "s2_attention", lambda *a, **kw: calls.append(a[0].shape[2]) or kernel(*a, **kw))
    model = get_peft_model(tiny_model("llama"), MLAConfig(kv_rank=12, rope_dims=4, scaling_factor=4.0,
                                                          s2_attn=True, lora_dropout=0.0))  # fmt: skip
    perturb(model)
    prompt = torch.randint(3, 128, (2, 2 * L), generator=torch.Generator().manual_seed(4))  # S² blocks of 32 tokens
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    eval_tokens = model.eval().generate(prompt, **kwargs)
    model.train()
    with torch.no_grad():
        model(prompt, use_cache=False)
    assert calls == [2 * L] * TINY_DIMS["num_hidden_layers"]  # the spy sees S² when it runs: in a training forward
    calls.clear()
    train_tokens = model.generate(prompt, **kwargs)
    assert calls == []  # the prefill (and every decoding step) ran full attention
    assert torch.equal(train_tokens, eval_tokens)
    assert s2_attn.is_s2_implementation(model.get_base_model().config._attn_implementation)  # S² again after it
    assert model.training


# ---- 4-bit base (QLoRA-style) -------------------------------------------------------------------------------------
def four_bit_llama(path):
    """The tiny Llama at ``path`` quantised to NF4 by bitsandbytes on CPU, or a skip saying why it cannot be."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu").eval()
    except Exception as error:  # no bitsandbytes, or a build without CPU 4-bit support
        pytest.skip(f"bitsandbytes cannot quantise to 4 bit on this CPU: {type(error).__name__}: {error}")
    assert type(model.model.layers[0].self_attn.k_proj).__name__ == "Linear4bit"
    return model


@pytest.mark.parametrize("forward_first", [False, True])  # True: bitsandbytes has repacked weights for its CPU kernel
def test_four_bit_base_converts_from_dequantised_weights_and_generates(tiny_checkpoint, ids, forward_first):
    base = four_bit_llama(tiny_checkpoint)
    if forward_first:
        logits(base, ids)  # a no-grad eval forward: bitsandbytes repacks the weights (undone at injection)
    full = get_peft_model(base, MLAConfig(kv_rank=KV_HEADS * HEAD_DIM, rope_dims=HEAD_DIM))
    with full.disable_adapter():
        reference = logits(full, ids)  # the 4-bit model's own logits, through the kernel the MLA model uses
    assert all(p.dtype == torch.float32 for n, p in full.named_parameters() if ".mla_" in n)
    assert type(full.get_base_model().model.layers[0].self_attn.base_layer.q_proj.base_layer).__name__ == "Linear4bit"
    unquantised = logits(tiny_model("llama"), ids)
    error = (logits(full, ids) - reference).abs().max()
    assert error < 0.1 * (unquantised - reference).abs().max()  # far closer to the 4-bit model than 4-bit is to fp32
    model = get_peft_model(four_bit_llama(tiny_checkpoint), MLAConfig(kv_rank=12, rope_dims=4))
    prompt = ids[:1, :9]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(prompt, return_dict_in_generate=True, **kwargs)
    assert isinstance(out.past_key_values, MLACache) and out.sequences.shape == (1, 17)
    assert out.past_key_values.values_per_token(0) == 12 + KV_HEADS * 4
    assert torch.equal(out.sequences, model.generate(prompt, use_cache=False, **kwargs))


def test_full_finetune_on_a_four_bit_base_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"`full_finetune=True` trains every weight, but `.*` is quantised"):
        get_peft_model(four_bit_llama(tiny_checkpoint), MLAConfig(kv_rank=12, rope_dims=4, full_finetune=True))


# ---- full fine-tuning (full_finetune=True) -----------------------------------------------------------------------
def test_full_finetune_trains_every_weight_but_the_replaced_kv_and_saves_them(tmp_path, tiny_checkpoint, ids):
    from transformers import AutoModelForCausalLM

    config = MLAConfig(kv_rank=12, rope_dims=4, full_finetune=True)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".k_proj." in n or ".v_proj." in n for n in frozen)  # replaced by the latent: unused
    assert any("embed_tokens" in n for n in trainable) and any("q_proj.base_layer.weight" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))
    model(batch, labels=batch).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for part in ("embed_tokens", "q_proj.base_layer", "mlp.down_proj.base_layer", "input_layernorm", "lm_head"):
        assert any(part in n for n in changed), part
    assert changed <= trainable
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.weight" in saved and "base_model.model.lm_head.weight" in saved
    assert not any(".k_proj." in k or ".v_proj." in k for k in saved)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["full_finetune"] is True
    fresh = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    original_embeddings = fresh.model.embed_tokens.weight.detach().clone()
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected)
    trained_embeddings = model.get_base_model().model.embed_tokens.weight
    assert torch.equal(loaded.get_base_model().model.embed_tokens.weight, trained_embeddings)  # the trained weights
    assert not torch.equal(original_embeddings, trained_embeddings)  # came back, not the fresh ones
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode: nothing trains
    again = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint), tmp_path, is_trainable=True
    )
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trainable


def test_default_adapter_file_holds_only_mla_and_lora_weights(tmp_path):
    model = mla_model(kv_rank=12, rope_dims=4)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".mla_" in k or ".lora_" in k for k in saved)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(full_finetune="yes"), r"`full_finetune` must be True or False, got 'yes'"),
        (dict(full_finetune=True, train_norms=True), r"`full_finetune=True` already trains .* drop train_norms"),
        (
            dict(full_finetune=True, modules_to_save=["lm_head"]),
            r"drop modules_to_save=\['lm_head'\]",
        ),
    ],
)
def test_full_finetune_bad_combinations_fail_clearly(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MLAConfig(kv_rank=8, rope_dims=4, **kwargs)


def test_sft_trainer_with_mla_config(tmp_path, tiny_tokenizer):
    from _train_helpers import tiny_sft_trainer
    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": torch.randint(3, len(tiny_tokenizer), (8, 2 * L)).tolist()})
    config = MLAConfig(kv_rank=16, rope_dims=4, context_length=2 * L)
    trainer = tiny_sft_trainer(tmp_path, tiny_tokenizer, config, dataset, max_steps=2, max_length=2 * L)
    assert isinstance(trainer.model.base_model, MLAModel)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".mla_" in n}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["peft_type"] == "MLA"


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(kv_rank=8, rope_dims=3), ValueError, r"`rope_dims` must be a positive even int .* got 3"),
        (dict(kv_rank=8, rope_dims=0), ValueError, r"`rope_dims` must be a positive even int .* got 0"),
        (dict(kv_rank=0, rope_dims=4), ValueError, r"`kv_rank` must be a positive int .* got 0"),
        (dict(kv_rank=-2, rope_dims=4), ValueError, r"`kv_rank` must be a positive int .* got -2"),
        (dict(kv_rank=8), ValueError, r"needs `kv_rank` .* and `rope_dims`"),
        (dict(kv_rank=8, rope_dims=4, rope_selection="middle"), ValueError, r"`rope_selection` must be one of"),
    ],
)
def test_bad_config_values_fail_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        MLAConfig(**kwargs)


def test_selection_spelling_is_normalised():
    assert MLAConfig(kv_rank=8, rope_dims=4, rope_selection=" 2_Norm ").rope_selection == "2-norm"
    config = MLAConfig(kv_rank=8, rope_dims=4)
    assert config.peft_type == "MLA" and config.scaling_factor == 1.0 and config.target_modules == "all-linear"


def test_bad_values_for_this_model_fail_clearly():
    with pytest.raises(ValueError, match=r"`rope_dims`=18 is larger than the model's head_dim=16"):
        mla_model(rope_dims=18)
    # rank of [W_k no-RoPE rows; W_v] <= min(hidden 64, 2 heads x (16 - 4) + 2 heads x 16 = 56)
    with pytest.raises(ValueError, match=r"`kv_rank`=57 is larger than a layer can hold.*pick `kv_rank` <= 56"):
        mla_model(kv_rank=57, rope_dims=4)
    mla_model(kv_rank=56, rope_dims=4)
    with pytest.raises(ValueError, match=r"`target_modules`=\['k_proj', 'q_proj'\] names \['k_proj'\]"):
        mla_model(target_modules=["q_proj", "k_proj"])


def test_models_mla_cannot_convert_fail_clearly():
    from transformers import AutoModelForCausalLM, GPT2Config, Phi3Config, Qwen3Config

    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ValueError, match=r"has no rotary position embeddings"):
        get_peft_model(gpt2, MLAConfig(kv_rank=8, rope_dims=4, target_modules=["c_proj"]))
    phi3 = AutoModelForCausalLM.from_config(
        Phi3Config(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=64,
            pad_token_id=0,
        )
    )
    with pytest.raises(ValueError, match=r"separate `q_proj`/`k_proj`/`v_proj`/`o_proj`.*fused projections"):
        get_peft_model(phi3, MLAConfig(kv_rank=8, rope_dims=4))
    qwen3 = AutoModelForCausalLM.from_config(Qwen3Config(**{**TINY_DIMS, "head_dim": 16}))
    qwen3.model.layers[1].self_attn.k_norm = torch.nn.LayerNorm(16)  # subtracts the mean: not an RMSNorm
    with pytest.raises(ValueError, match=r"`model.layers.1.self_attn.k_norm` \(LayerNorm\) is not weight \* x / rms"):
        get_peft_model(qwen3, MLAConfig(kv_rank=8, rope_dims=4))
    qwen3.model.layers[1].self_attn.k_norm = torch.nn.RMSNorm(8)
    with pytest.raises(
        ValueError, match=r"`model.layers.1.self_attn.k_norm` normalises 8 values, neither head_dim=16"
    ):
        get_peft_model(qwen3, MLAConfig(kv_rank=8, rope_dims=4))
    assert not any(isinstance(m, MLAAttention) for m in qwen3.modules())  # refused before anything was replaced


def test_merge_is_refused_with_the_reason():
    model = mla_model()
    with pytest.raises(ValueError, match=r"MLA adapter cannot be merged into the base model: partial RoPE"):
        model.merge_and_unload()


def test_adapter_for_another_base_is_refused(tmp_path):
    model = mla_model(kv_rank=8, rope_dims=4)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"`rope_pairs` has shape \(2, 2, 2\) but this model needs .* = \(3, 2, 2\)"):
        PeftModel.from_pretrained(tiny_model("llama", num_hidden_layers=3), tmp_path)


@pytest.mark.parametrize(
    "code",
    [
        "import pi_peft; print(pi_peft.MLAConfig(kv_rank=8, rope_dims=4).peft_type)",
        "from pi_peft.tuners.mla import MLAConfig; print(MLAConfig(kv_rank=8, rope_dims=4).peft_type)",
    ],
)
def test_mla_is_usable_as_the_first_import_of_a_fresh_process(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("PeftType.MLA")


# ---- models that RMS-normalise queries and keys before RoPE (Qwen3 per head, OLMo 2 over the projection) ---------
def qk_norm_model(family="qwen3", seed=0, **overrides):
    """A tiny Qwen3 or OLMo 2 with q_norm/k_norm weights moved away from 1 (so that the norm weights matter)."""
    from transformers import AutoModelForCausalLM, Olmo2Config, Qwen3Config

    dims = {**TINY_DIMS, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    config = Qwen3Config(**dims, head_dim=HEAD_DIM) if family == "qwen3" else Olmo2Config(**dims)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


QK_NORM_CASES = {"qwen3": ("qwen3", {}), "qwen3-bias": ("qwen3", {"attention_bias": True}), "olmo2": ("olmo2", {})}


@pytest.fixture
def qwen3():
    return qk_norm_model("qwen3")


@pytest.mark.parametrize("case", list(QK_NORM_CASES))
def test_key_norm_models_all_rotary_dims_and_full_rank_reproduce_the_original_logits(case, ids):
    family, overrides = QK_NORM_CASES[case]
    reference = logits(qk_norm_model(family, **overrides), ids)
    model = get_peft_model(qk_norm_model(family, **overrides), MLAConfig(kv_rank=KV_HEADS * HEAD_DIM, rope_dims=16))
    assert all(
        m.k_norm_kind == ("head" if family == "qwen3" else "all")
        for m in model.modules()
        if isinstance(m, MLAAttention)
    )
    torch.testing.assert_close(logits(model, ids), reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(QK_NORM_CASES))
@pytest.mark.parametrize("selection", ["high", "low"])
def test_key_norm_partial_rope_at_full_rank_equals_the_original_with_dropped_pairs_unrotated(case, selection, ids):
    """The no-RoPE keys are rebuilt from the latent and normalised with the rms of the whole raw key: with a full-rank
    latent the converted model is exactly the original whose dropped pairs do not rotate (inv_freq = 0 there)."""
    family, overrides = QK_NORM_CASES[case]
    rope_dims, max_rank = 4, 2 * KV_HEADS * HEAD_DIM - KV_HEADS * 4  # 56: the stack's full rank
    reference_model = qk_norm_model(family, **overrides)
    kept = fixed_pairs(selection, HEAD_DIM, rope_dims, 1)[0]
    inv_freq = reference_model.model.rotary_emb.inv_freq
    dropped = torch.ones_like(inv_freq, dtype=torch.bool)
    dropped[kept] = False
    inv_freq[dropped] = 0.0  # cos 1, sin 0: those pairs no longer rotate
    reference = logits(reference_model, ids)
    assert (reference - logits(qk_norm_model(family, **overrides), ids)).abs().max() > 1e-2  # partial RoPE matters
    config = MLAConfig(kv_rank=max_rank, rope_dims=rope_dims, rope_selection=selection)
    model = get_peft_model(qk_norm_model(family, **overrides), config)
    torch.testing.assert_close(logits(model, ids), reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3", "olmo2"])
def test_key_norm_cache_holds_latent_rope_keys_and_one_scale_per_kv_head(family):
    kv_rank, rope_dims = 8, 4
    model = get_peft_model(qk_norm_model(family), MLAConfig(kv_rank=kv_rank, rope_dims=rope_dims)).eval()
    prompt = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache, tokens = out.past_key_values, out.sequences.shape[1] - 1
    for layer_idx, layer in enumerate(cache.layers):
        per_token = sum(t.numel() for t in (layer.keys, layer.values)) // (2 * tokens)
        assert per_token == cache.values_per_token(layer_idx) == kv_rank + KV_HEADS * (rope_dims + 1)  # 18
        assert cache.rope_keys(layer_idx).shape == (2, KV_HEADS, tokens, rope_dims)
        assert cache.key_scales(layer_idx).shape == (2, KV_HEADS, tokens, 1)
    # layer 0 sees the embeddings, so its cached scales are 1/rms of the original raw keys (full-rank latent)
    full = get_peft_model(qk_norm_model(family), MLAConfig(kv_rank=56, rope_dims=rope_dims)).eval()
    cache = MLACache()
    with torch.no_grad():
        full(prompt, past_key_values=cache, use_cache=True)
    base, caught = qk_norm_model(family), []
    hook = base.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, o: caught.append(o))
    with torch.no_grad():
        base(prompt)
    hook.remove()
    raw = caught[0]  # (B, T, G*d): layer 0's raw keys of the original model
    raw = raw.view(2, 10, KV_HEADS, HEAD_DIM).transpose(1, 2)  # (B, G, T, d)
    eps = base.config.rms_norm_eps
    if family == "qwen3":
        expected = (raw.square().mean(-1, keepdim=True) + eps).rsqrt()  # per kv head
    else:
        expected = (raw.square().mean(dim=(1, 3), keepdim=True) + eps).rsqrt().expand(-1, KV_HEADS, -1, -1)
    torch.testing.assert_close(cache.key_scales(0), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(QK_NORM_CASES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_key_norm_greedy_with_the_latent_cache_equals_full_recomputation(case, attn):
    family, overrides = QK_NORM_CASES[case]
    config = MLAConfig(kv_rank=12, rope_dims=6, rope_selection="uniform")
    model = get_peft_model(qk_norm_model(family, **overrides), config).eval()
    perturb(model)
    model.config._attn_implementation = attn
    assert_cached_greedy_equals_recomputation(model)  # with k_norm, absorbed decoding scales per key


def test_key_norm_model_save_then_fresh_process_gives_equal_logits(tmp_path, qwen3, ids):
    from transformers import AutoModelForCausalLM

    qwen3.save_pretrained(tmp_path / "base")  # the adapter records this folder as its base
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, MLAConfig(kv_rank=10, rope_dims=6, rope_selection="uniform", scaling_factor=2.0))
    perturb(model)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    printed = "type(model.get_base_model()).__name__, type(model.base_model).__name__"
    result = load_in_fresh_process(tmp_path, ids, printed)
    assert "Qwen3ForCausalLM MLAModel" in result.stdout
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)


def test_key_norm_two_norm_selection_scores_queries_and_keys_after_their_norms(qwen3):
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = get_peft_model(qwen3, MLAConfig(kv_rank=16, rope_dims=4, rope_selection="2-norm"))
    pairs = initialize_mla_weights(model, batches)
    assert torch.equal(pairs, two_norm_reference(qk_norm_model("qwen3"), batches, "q_norm", "k_norm"))
