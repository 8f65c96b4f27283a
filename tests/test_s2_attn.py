"""S²-Attn (LongLoRA's shifted sparse attention): exact semantics against an independent eager reference, the
training-only switch in PIModel, save/load, errors, and that it never runs attention over more than one block."""

import json
import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

import pi_peft
from pi_peft.ops import s2_attn
from pi_peft.testing import tiny_model


# ---- the independent reference: eager softmax with the rule's (T x T) masks -----------------------------------------
def reference_mask(num_heads, seq_len, ratio, valid=None, docs=None):
    """(B or 1, H, T, T) bool: may query i attend key j, written out from the rule, one head at a time."""
    group = int(ratio * seq_len)
    batch = 1 if valid is None and docs is None else (valid if valid is not None else docs).shape[0]
    mask = torch.zeros(batch, num_heads, seq_len, seq_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(num_heads):
            shift = group // 2 if h >= num_heads // 2 else 0
            for i in range(seq_len):
                for j in range(i + 1):
                    same_block = (i + shift) // group == (j + shift) // group
                    same_doc = docs is None or docs[b, i] == docs[b, j]
                    key_ok = valid is None or bool(valid[b, j])
                    mask[b, h, i, j] = same_block and same_doc and key_ok
    return mask


def reference_attention(q, k, v, ratio, valid=None, docs=None, scale=None):
    """(B, H, T, D) queries, (B, Hkv, T, D) keys/values -> (B, T, H, D), in float64."""
    num_heads, seq_len, dim = q.shape[1], q.shape[2], q.shape[3]
    n_rep = num_heads // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = q.double() @ k.double().transpose(-1, -2) * (scale or 1 / math.sqrt(dim))
    scores = scores.masked_fill(~reference_mask(num_heads, seq_len, ratio, valid, docs), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padding queries with no key: 0
    return (probs @ v.double()).transpose(1, 2)


def docs_from_positions(position_ids):
    """Document index from position_ids that restart: a new document wherever the position is not previous + 1."""
    docs = torch.zeros_like(position_ids)
    for b in range(position_ids.shape[0]):
        for t in range(1, position_ids.shape[1]):
            step = position_ids[b, t] != position_ids[b, t - 1] + 1
            docs[b, t] = docs[b, t - 1] + int(step)
    return docs


HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1), "gqa-6-3": (6, 3), "gqa-12-3": (12, 3)}


def qkv(heads, seq_len, batch=2, dim=8, requires_grad=False):
    num_heads, num_kv = HEADS[heads]
    g = torch.Generator().manual_seed(seq_len * 7 + num_heads * 3 + num_kv)
    shapes = [(batch, num_heads, seq_len, dim), (batch, num_kv, seq_len, dim), (batch, num_kv, seq_len, dim)]
    return [torch.randn(s, generator=g).requires_grad_(requires_grad) for s in shapes]


def rows(kind, batch, seq_len):
    """(valid, docs, position_ids) of plain, right/left-padded (plus a hole), or packed rows."""
    valid = docs = None
    position_ids = torch.arange(seq_len).expand(batch, -1).clone()
    if kind == "padded":
        valid = torch.ones(batch, seq_len, dtype=torch.bool)
        valid[0, -5:] = False  # right padding
        valid[1, :3] = False  # left padding
        valid[1, 10] = False  # and a hole
    elif kind == "packed":
        position_ids[0, 7:] -= 7
        position_ids[0, 20:] -= 13
        position_ids[1, 15:] -= 15
        docs = docs_from_positions(position_ids)
    return valid, docs, position_ids


# ---- exact semantics --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("seq_len,ratio", [(32, 0.25), (37, 0.25), (30, 0.3), (24, 1.0)])
@pytest.mark.parametrize("kind", ["plain", "padded", "packed"])
def test_equals_reference(heads, seq_len, ratio, kind):
    q, k, v = qkv(heads, seq_len)
    valid, docs, _ = rows(kind, 2, seq_len)
    expected = reference_attention(q, k, v, ratio, valid, docs)
    rows_kept = valid if valid is not None else torch.ones(2, seq_len, dtype=torch.bool)
    for force_segments in (False, True):  # the reshaped fast path and the gathered general path
        out = s2_attn.s2_attention(q, k, v, ratio, padding_mask=valid, docs=docs, force_segments=force_segments)
        assert out.shape == (2, seq_len, q.shape[1], q.shape[3])
        torch.testing.assert_close(out.double()[rows_kept], expected[rows_kept], atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads", ["mha", "mqa"])
@pytest.mark.parametrize("kind", ["plain", "packed", "padded"])
def test_gradients_equal_reference(heads, kind):
    q, k, v = qkv(heads, 37, requires_grad=True)
    valid, docs, _ = rows(kind, 2, 37)
    weights = torch.randn(2, 37, q.shape[1], q.shape[3], generator=torch.Generator().manual_seed(5))
    if valid is not None:
        weights = weights * valid[:, :, None, None]
    grads = []
    for fn in (
        lambda: s2_attn.s2_attention(q, k, v, 0.25, padding_mask=valid, docs=docs),
        lambda: reference_attention(q, k, v, 0.25, valid, docs),
    ):
        (fn().double() * weights).sum().backward()
        grads.append([x.grad.clone() for x in (q, k, v)])
        for x in (q, k, v):
            x.grad = None
    for got, want in zip(*grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=0)


def test_no_wrap_around_and_half_blocks():
    """The shifted heads' first G/2 tokens form their own block: they never see the row's last tokens."""
    seq_len, ratio = 16, 0.25  # G = 4, shift 2
    mask = reference_mask(2, seq_len, ratio)[0]
    assert not mask[1, :2, seq_len - 2 :].any() and mask[1, :2, :2].any()
    q, k, v = qkv("mha", seq_len, batch=1)
    base = s2_attn.s2_attention(q, k, v, ratio)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -2:] += 10.0
    v2[:, :, -2:] += 10.0
    changed = s2_attn.s2_attention(q, k2, v2, ratio)
    torch.testing.assert_close(changed[:, : seq_len - 2], base[:, : seq_len - 2])  # LongLoRA's roll would differ
    assert s2_attn.s2_block_ids(10, 4, shifted=True).tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert s2_attn.s2_block_ids(10, 4, shifted=False).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_segments_are_what_flash_varlen_runs():
    """The (document x block) segments that the FlashAttention path hands to `flash_attn_varlen_func`, run here as
    one causal SDPA per segment, give the reference (the kernel itself needs a GPU: see the test below)."""
    q, k, v = qkv("gqa", 37)
    for kind in ("plain", "padded", "packed"):
        valid, docs, _ = rows(kind, 2, 37)
        expected = reference_attention(q, k, v, 0.25, valid, docs)
        out = torch.zeros(2 * 37, 4, 8, dtype=torch.float64)
        group = s2_attn.s2_group_size(37, 0.25)
        for shifted, (h0, h1) in zip((False, True), s2_attn.head_halves(4)):
            blocks = s2_attn.s2_block_ids(37, group, shifted)
            token_index, cu = s2_attn.s2_segments(blocks, docs, valid, 2)
            assert int((cu[1:] - cu[:-1]).max()) <= group
            flat = [x.transpose(1, 2).reshape(2 * 37, x.shape[1], 8) for x in (q, k, v)]
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
                idx = token_index[s:e]
                qs = flat[0][idx, h0:h1].transpose(0, 1)
                ks, vs = (x[idx, h0 // 2 : h1 // 2].transpose(0, 1) for x in flat[1:])
                o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                out[idx, h0:h1] = o.transpose(0, 1).double()
        kept = (valid if valid is not None else torch.ones(2, 37, dtype=torch.bool)).reshape(-1)
        torch.testing.assert_close(out[kept], expected.reshape(2 * 37, 4, 8)[kept], atol=1e-5, rtol=0)


def test_attention_calls_never_exceed_a_block(monkeypatch):
    """It computes less: every SDPA call sees at most G keys (never a (T x T) score matrix)."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(k.shape[-2])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(s2_attn.F, "scaled_dot_product_attention", spy)
    q, k, v = qkv("gqa", 256, batch=1)
    for kind in ("plain", "packed"):
        seen.clear()
        docs = None if kind == "plain" else torch.cat([torch.zeros(1, 100), torch.ones(1, 156)], 1).long()
        s2_attn.s2_attention(q, k, v, 0.25, docs=docs)
        assert seen and max(seen) <= 64, seen


# ---- the registered attention function inside real models -------------------------------------------------------
def register_reference(ratio):
    """An eager reference implementation of the rule, registered like any transformers attention."""
    name = f"test_s2_reference_{ratio}"

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
        docs = None if position_ids is None else docs_from_positions(position_ids.expand(query.shape[0], -1))
        if docs is not None and not docs.any():
            docs = None
        valid = None if attention_mask is None else attention_mask.bool()
        return reference_attention(query, key, value, ratio, valid, docs, scaling).to(query.dtype), None

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def s2_model(family="llama", ratio=0.25, seed=0, **overrides):
    torch.manual_seed(seed)
    base = tiny_model(family, seed=seed, **overrides)
    config = pi_peft.PIConfig(
        scaling_factor=4.0, r=4, lora_dropout=0.0, target_modules="all-linear", s2_attn=True, s2_group_size_ratio=ratio
    )
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():  # non-zero LoRA B, so the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_training_model_equals_reference_model(family, kv_heads):
    model = s2_model(family, num_key_value_heads=kv_heads).train()
    inner = model.base_model.model
    assert s2_attn.is_s2_implementation(inner.config._attn_implementation)
    ids = torch.randint(0, 128, (2, 45), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 45, dtype=torch.long)
    mask[1, -6:] = 0
    _, _, position_ids = rows("packed", 2, 45)
    reference = register_reference(0.25)
    for kwargs in (dict(), dict(attention_mask=mask), dict(position_ids=position_ids)):
        got = model(input_ids=ids, **kwargs).logits
        inner.set_attn_implementation(reference)
        want = model(input_ids=ids, **kwargs).logits
        inner.set_attn_implementation("sdpa")  # the model's own again (a user's switch is kept: see below)
        model.train()  # back to S²
        kept = mask.bool() if "attention_mask" in kwargs else torch.ones(2, 45, dtype=torch.bool)
        torch.testing.assert_close(got[kept], want[kept], atol=1e-5, rtol=0)


def test_cu_seq_lens_packing_equals_position_ids():
    model = s2_model().train()
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(3))
    lengths = [12, 30, 8]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 12, 42, 50], dtype=torch.int32)
    by_positions = model(input_ids=ids, position_ids=position_ids).logits
    by_cu = model(
        input_ids=ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=30, max_length_k=30
    ).logits
    torch.testing.assert_close(by_cu, by_positions)
    # nothing crosses a document border: changing the middle document leaves the other two alone
    perturbed = ids.clone()
    perturbed[0, 12:42] = (perturbed[0, 12:42] + 1) % 128
    out = model(input_ids=perturbed, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=30, max_length_k=30).logits
    torch.testing.assert_close(out[:, :12], by_positions[:, :12], atol=0, rtol=0)
    torch.testing.assert_close(out[:, 42:], by_positions[:, 42:], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, 12:42], by_positions[:, 12:42])


def test_causal_in_training():
    model = s2_model().train()
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(4))
    base = model(input_ids=ids).logits
    for t in (0, 5, 13, 30, 47):
        perturbed = ids.clone()
        perturbed[0, t] = (perturbed[0, t] + 1) % 128
        out = model(input_ids=perturbed).logits
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=0, rtol=0)
        assert not torch.equal(out[:, t], base[:, t])


def test_eval_generate_disable_merge_use_full_attention():
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    with_s2 = s2_model()
    without = s2_model()
    without.peft_config["default"].s2_attn = False
    without.base_model._pi_sync_attention()
    with_s2.train()
    train_logits = with_s2(input_ids=ids).logits
    with_s2.eval(), without.eval()
    assert with_s2.base_model.model.config._attn_implementation == "sdpa"
    eval_logits = with_s2(input_ids=ids).logits
    assert torch.equal(eval_logits, without(input_ids=ids).logits)
    assert not torch.allclose(train_logits, eval_logits, atol=1e-4)  # S² really was on in training

    with_s2.train()
    with with_s2.disable_adapter():
        assert with_s2.base_model.model.config._attn_implementation == "sdpa"
    assert s2_attn.is_s2_implementation(with_s2.base_model.model.config._attn_implementation)

    gen_train = with_s2.generate(input_ids=ids[:, :20], max_new_tokens=5, do_sample=False)
    assert s2_attn.is_s2_implementation(with_s2.base_model.model.config._attn_implementation)
    gen_eval = without.generate(input_ids=ids[:, :20], max_new_tokens=5, do_sample=False)
    assert torch.equal(gen_train, gen_eval)

    merged = with_s2.merge_and_unload()
    assert merged.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_an_attention_the_user_switches_to_is_kept_by_eval_generate_and_unload(mode):
    """`set_attn_implementation("eager")` after `get_peft_model` (for `output_attentions`) was undone by the next
    `eval()`/`train()`/`generate()`, which restored the implementation recorded at creation ("sdpa")."""
    model = s2_model()
    inner = model.base_model.model
    getattr(model, mode)()
    inner.set_attn_implementation("eager")
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(5))
    seen = []
    hook = inner.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(inner.config._attn_implementation)
    )
    model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    hook.remove()
    assert set(seen) == {"eager"}  # generate ran the user's attention
    model.train()
    assert inner.config._attn_implementation == s2_attn.s2_implementation_name("eager", 0.25)  # S² wraps it
    model.eval()
    assert inner.config._attn_implementation == "eager"
    assert model.merge_and_unload().config._attn_implementation == "eager"


def test_attention_outside_training_is_full(monkeypatch):
    """The registered function itself falls back to full attention for a module that is not training."""
    model = s2_model().train()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :5] = 0
    inner = model.base_model.model
    for module in inner.modules():
        module.training = False  # eval() below pi_peft's hook: the implementation stays S²
    assert s2_attn.is_s2_implementation(inner.config._attn_implementation)
    got = model(input_ids=ids, attention_mask=mask).logits
    model.eval()
    want = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)


def test_training_step_changes_only_adapter_parameters():
    model = s2_model().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(7))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n


def test_save_load_keeps_setting(tmp_path):
    model = s2_model(ratio=0.5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["s2_attn"] is True and saved["s2_group_size_ratio"] == 0.5
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].s2_attn and loaded.peft_config["default"].s2_group_size_ratio == 0.5
    inner = loaded.base_model.model
    assert inner.config._attn_implementation == "sdpa"  # loaded in eval mode: full attention
    loaded.train()
    assert inner.config._attn_implementation == s2_attn.s2_implementation_name("sdpa", 0.5)
    for_inference = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).train()
    assert for_inference.base_model.model.config._attn_implementation == "sdpa"  # inference adapters never use S²


# ---- errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, -0.25, 1.5, float("nan"), "0.25", None])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"`s2_group_size_ratio` must be a number in \(0, 1\]"):
        pi_peft.PIConfig(scaling_factor=2.0, s2_attn=True, s2_group_size_ratio=ratio)


def test_bad_s2_attn_flag():
    with pytest.raises(TypeError, match="`s2_attn` must be True or False"):
        pi_peft.PIConfig(scaling_factor=2.0, s2_attn="yes")


def test_row_too_short_for_blocks_of_two_gets_full_attention_and_trains():
    """Regression (issue 19, item 9): a row shorter than 2 / ratio tokens (blocks of < 2 tokens) stopped training with
    a ValueError at that step; it gets full causal attention (LongLoRA's rule), longer rows still get S²."""
    model = s2_model().train()
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    for length in (1, 2, 7):  # int(0.25 * 7) = 1
        loss = model(input_ids=ids[:, :length], labels=ids[:, :length]).loss
        if length > 1:
            loss.backward()
        model.eval()
        with torch.no_grad():
            want = model(input_ids=ids[:, :length]).logits
        model.train()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids[:, :length]).logits, want, atol=1e-5, rtol=0)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        full = model(input_ids=ids).logits
    model.train()
    with torch.no_grad():  # 8 tokens: blocks of 2, S² again
        assert (model(input_ids=ids).logits - full).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"`s2_group_size_ratio`=0.25 gives S²-Attn blocks of 1 token"):
        s2_attn.s2_group_size(7, 0.25)  # the rule itself still says why (the estimator and direct callers use it)


def test_sft_trainer_trains_through_a_row_too_short_for_s2_blocks(tmp_path, tiny_tokenizer):
    """Regression (issue 19, item 9): one SFT row shorter than 2 / ratio tokens, batched alone, stopped `train()` at
    that step (and a resume hit the same row again); now every step trains, the short one with full attention."""
    from _train_helpers import tiny_sft_trainer
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows_ = [torch.randint(3, len(tiny_tokenizer), (n,), generator=g).tolist() for n in (40, 5, 33, 48)]
    trainer = tiny_sft_trainer(
        tmp_path,
        tiny_tokenizer,
        pi_peft.PIConfig(context_length=192, target_modules=["q_proj", "v_proj"], s2_attn=True),
        Dataset.from_dict({"input_ids": rows_}),
        per_device_train_batch_size=1,
        max_steps=4,
        logging_steps=1,
        max_length=192,
    )
    lengths = []
    attention = next(m for n, m in trainer.model.named_modules() if n.endswith("layers.0.self_attn"))
    attention.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((kwargs["hidden_states"].shape[1], module.training)),
        with_kwargs=True,
    )
    trainer.train()
    assert sorted(set(lengths)) == [(5, True), (33, True), (40, True), (48, True)]  # the 5-token row: a training step
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 4 and len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_output_attentions_in_training():
    model = s2_model().train()
    with pytest.raises(ValueError, match="`output_attentions=True` is not available with S²-Attn in training"):
        model(input_ids=torch.randint(0, 128, (1, 16)), output_attentions=True)


def test_four_d_mask_in_training():
    model = s2_model().train()
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="S²-Attn received a 4D attention mask"):
        model(input_ids=torch.randint(0, 128, (1, 16)), attention_mask=mask)


def test_sliding_window_smaller_than_block():
    model = s2_model("mistral", sliding_window=8).train()
    with pytest.raises(ValueError, match="exceed this model's sliding window of 8 tokens"):
        model(input_ids=torch.randint(0, 128, (1, 48)))


def test_unwrappable_attention_implementation():
    def custom(module, query, key, value, attention_mask, **kwargs):
        raise AssertionError("never called")

    AttentionInterface.register("test_custom_attention", custom)
    base = tiny_model("llama")
    base.set_attn_implementation("test_custom_attention")
    config = pi_peft.PIConfig(scaling_factor=2.0, target_modules="all-linear", s2_attn=True)
    with pytest.raises(ValueError, match="`s2_attn=True` cannot wrap the model's attention implementation"):
        get_peft_model(base, config)


# ---- FlashAttention (GPU only) --------------------------------------------------------------------------------
def test_flash_attention_path_equals_reference():
    from transformers.utils import is_flash_attn_2_available

    if not (torch.cuda.is_available() and is_flash_attn_2_available()):
        pytest.skip("the FlashAttention 2 path needs a CUDA GPU and `pip install flash-attn`")
    q, k, v = qkv("gqa", 37)
    for kind in ("plain", "padded", "packed"):
        valid, docs, _ = rows(kind, 2, 37)
        expected = reference_attention(q.half().float(), k.half().float(), v.half().float(), 0.25, valid, docs)
        out = s2_attn.s2_attention(
            *(x.cuda().half() for x in (q, k, v)),
            0.25,
            padding_mask=None if valid is None else valid.cuda(),
            docs=None if docs is None else docs.cuda(),
            backend="flash_attention_2",
        )
        kept = valid if valid is not None else torch.ones(2, 37, dtype=torch.bool)
        torch.testing.assert_close(out.cpu().double()[kept], expected[kept], atol=2e-3, rtol=0)


# ---- estimate and benchmark ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_len,ratio", [(64, 0.25), (37, 0.25), (100, 0.3), (16, 1.0)])
def test_pair_count_matches_the_rule(seq_len, ratio):
    from pi_peft.training.estimate import causal_attention_pairs

    mask = reference_mask(2, seq_len, ratio)[0]  # head 0 unshifted, head 1 shifted
    assert causal_attention_pairs(seq_len, ratio) == int(mask.sum()) // 2
    assert causal_attention_pairs(seq_len) == seq_len * (seq_len + 1) // 2


def test_training_flops_s2_term():
    from pi_peft.training.estimate import KNOWN_CONFIGS, training_flops

    config = KNOWN_CONFIGS["meta-llama/Llama-2-7b-hf"]
    full, s2 = training_flops(config, 32768), training_flops(config, 32768, s2_group_size_ratio=0.25)
    assert full["dense"] == s2["dense"] and full["lm_head"] == s2["lm_head"]
    assert 3.9 < full["attention"] / s2["attention"] < 4.3  # ~T/G
    assert 0.3 < full["attention"] / full["total"] < 0.7  # attention is a large share at 32k
    short = training_flops(config, 4096)
    assert short["attention"] / short["total"] < full["attention"] / full["total"]


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "s2_attention.py")
    out = tmp_path / "s2.json"
    cmd = [
        sys.executable,
        script,
        "--smoke",
        "--contexts",
        "256",
        "--threads",
        "1",
        "--attn-reps",
        "1",
        "--steps",
        "1",
    ]
    cmd += ["--json-out", out]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.read_text())
    runs = payload["runs"]
    assert {(r["part"], r["mode"]) for r in runs} == {(p, m) for p in ("attention", "step") for m in ("full", "s2")}
    for r in runs:
        assert r["time"] > 0 and r["alloc_peak"] > 0
        assert s2_attn.is_s2_implementation(r["implementation"]) == (r["mode"] == "s2")
    assert all(math.isfinite(loss) for r in runs if r["part"] == "step" for loss in r["losses"])
    assert "Llama-2-7B at 32k tokens" in proc.stdout


@pytest.mark.slow
def test_sft_trainer_trains_with_s2_and_evaluates_with_full_attention(tmp_path, tiny_tokenizer):
    """trl's SFTTrainer with packed rows (position_ids restarting): S² in the training steps, full attention in the
    evaluation steps in between, the setting saved with the adapter."""
    from _train_helpers import tiny_sft_trainer
    from datasets import Dataset

    vocab = len(tiny_tokenizer)
    g = torch.Generator().manual_seed(0)
    docs = [
        torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(20, 120, (24,), generator=g)
    ]
    seen = {True: set(), False: set()}  # training mode of the attention module -> implementations it ran with

    packed = []

    def spy(module, args, kwargs):
        seen[module.training].add(module.config._attn_implementation)
        positions = kwargs.get("position_ids")
        packed.append(positions is not None and bool((positions[:, 1:] == 0).any()))

    trainer = tiny_sft_trainer(
        tmp_path,
        tiny_tokenizer,
        pi_peft.PIConfig(context_length=192, target_modules="all-linear", s2_attn=True),
        Dataset.from_dict({"input_ids": docs[:20]}),
        eval_dataset=Dataset.from_dict({"input_ids": docs[20:]}),
        max_steps=3,
        per_device_eval_batch_size=2,
        eval_strategy="steps",
        eval_steps=2,
        max_length=192,
        packing=True,
    )
    attention = next(m for n, m in trainer.model.named_modules() if n.endswith("layers.0.self_attn"))
    attention.register_forward_pre_hook(spy, with_kwargs=True)
    trainer.train()
    assert seen[True] == {s2_attn.s2_implementation_name("sdpa", 0.25)}
    assert seen[False] == {"sdpa"}
    assert any(packed)  # rows held several documents
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert saved["s2_attn"] is True and saved["s2_group_size_ratio"] == 0.25


def test_fallback_with_a_cache_is_full_causal_attention():
    """Outside training the registered function is the model's own attention, also for a chunk of queries after a
    cache (keys longer than queries)."""
    q, k, v = qkv("gqa", 24, batch=1)
    module = torch.nn.Module().eval()
    module.is_causal, module.num_key_value_groups = True, 2
    forward = AttentionInterface._global_mapping[s2_attn.s2_implementation_name("sdpa", 0.25)]
    out, _ = forward(module, q[:, :, -5:], k, v, None, scaling=8**-0.5)  # the last 5 queries, all 24 keys
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    mask = torch.ones(24, 24, dtype=torch.bool).tril()[-5:]
    want = torch.softmax((q[:, :, -5:] @ kk.transpose(-1, -2) * 8**-0.5).masked_fill(~mask, float("-inf")), -1) @ vv
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=0)


def test_eager_model_trains_with_s2_on_sdpa_and_evaluates_eagerly():
    model = s2_model(attn_implementation="eager")
    inner = model.base_model.model
    model.train()
    assert inner.config._attn_implementation == s2_attn.s2_implementation_name("eager", 0.25)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(8))
    got = model(input_ids=ids).logits
    inner.set_attn_implementation(register_reference(0.25))
    torch.testing.assert_close(got, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    inner.set_attn_implementation(s2_attn.s2_implementation_name("eager", 0.25))
    model.eval()
    assert inner.config._attn_implementation == "eager"


def test_estimate_cli_prints_s2_compute(capsys):
    from pi_peft.cli import main
    from pi_peft.training.estimate import training_flops

    argv = ["estimate", "meta-llama/Llama-2-7b-hf", "--context-length", "32768", "--s2-group-size-ratio", "0.25"]
    assert main([*argv, "--json"]) == 0
    flops = json.loads(capsys.readouterr().out)["flops"]
    assert flops["full"] == training_flops("meta-llama/Llama-2-7b-hf", 32768)
    assert flops["s2"] == training_flops("meta-llama/Llama-2-7b-hf", 32768, s2_group_size_ratio=0.25)
    assert flops["s2"]["attention"] < flops["full"]["attention"] / 3 and flops["s2"]["dense"] == flops["full"]["dense"]
    assert main(argv) == 0 and "S²-Attn ratio 0.25" in capsys.readouterr().out
    assert main([*argv[:-1], "1.5"]) == 2
