import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

import pi_peft.ops.losses as losses
from pi_peft import PIConfig
from pi_peft.ops.bnb import fix_bnb_cpu_repack
from pi_peft.ops.losses import causal_lm_loss, chunked_nll, fused_causal_lm_loss
from pi_peft.training.memory import apply_memory_savers, attn_implementation


def _reference_loss(hidden, weight, labels):
    logits = hidden @ weight.t()  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, weight.shape[0]), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("backend", ["trl", "chunked"])
def test_causal_lm_loss_equals_full_cross_entropy_with_grads(backend):
    hidden = torch.randn(2, 40, 16, requires_grad=True)
    weight = torch.randn(96, 16, requires_grad=True)
    labels = torch.randint(0, 96, (2, 40))
    labels[0, :7] = -100
    ref = _reference_loss(hidden, weight, labels)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss = causal_lm_loss(hidden, weight, labels, backend=backend, chunk_tokens=9)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_builds_more_than_one_chunk_of_logits(monkeypatch):
    seen = []
    original = F.cross_entropy

    def spy(logits, *args, **kwargs):
        seen.append(tuple(logits.shape))
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(losses.F, "cross_entropy", spy)
    hidden, weight = torch.randn(1, 101, 8, requires_grad=True), torch.randn(50, 8)
    causal_lm_loss(hidden, weight, torch.randint(0, 50, (1, 101)), backend="chunked", chunk_tokens=16).backward()
    assert seen and max(rows for rows, _ in seen) <= 16  # 100 scored tokens, never more than 16 rows of logits
    assert sum(rows for rows, _ in seen) >= 100


def test_causal_lm_loss_rejects_unknown_backend():
    with pytest.raises(ValueError, match="`backend`.*'fast'"):
        causal_lm_loss(torch.randn(1, 4, 8), torch.randn(10, 8), torch.zeros(1, 4, dtype=torch.long), backend="fast")


def test_fused_causal_lm_loss_matches_model_loss_on_a_pi_model(base):
    model = get_peft_model(base, PIConfig(context_length=128, r=4, target_modules="all-linear", train_norms=True))
    ids = torch.randint(0, 128, (2, 100))
    expected = model(input_ids=ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(fused_causal_lm_loss(model, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["trl", "chunked"])
def test_softcapped_loss_equals_full_cross_entropy_of_capped_logits(backend):
    hidden = torch.randn(1, 30, 16, requires_grad=True)
    weight = torch.randn(64, 16) * 3  # logits well beyond the cap
    labels = torch.randint(0, 64, (1, 30))
    logits = 5.0 * torch.tanh((hidden @ weight.t()) / 5.0)  # (1, 30, 64)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
    loss = causal_lm_loss(hidden, weight, labels, backend=backend, chunk_tokens=7, softcap=5.0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(ref, hidden)[0])
    assert abs(causal_lm_loss(hidden, weight, labels, backend=backend).item() - ref.item()) > 0.1  # the cap matters


def test_fused_loss_reads_final_logit_softcapping_from_the_config(base):
    base.config.final_logit_softcapping = 0.5  # the model's own loss ignores it for Llama: compare by hand
    ids = torch.randint(0, 128, (1, 50))
    with torch.no_grad():
        hidden = base.model(input_ids=ids).last_hidden_state
        logits = 0.5 * torch.tanh(base.lm_head(hidden) / 0.5)  # (1, 50, V)
        ref = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        torch.testing.assert_close(fused_causal_lm_loss(base, ids, backend="chunked"), ref, rtol=1e-5, atol=1e-6)


def test_chunked_nll_without_grad_takes_the_head_module_and_checks_its_chunk():
    head = torch.nn.Linear(8, 20)  # with a bias, as an output module may have
    hidden, targets = torch.randn(33, 8), torch.randint(0, 20, (33,))
    with torch.no_grad():
        ref = F.cross_entropy(head(hidden), targets, reduction="sum")
        torch.testing.assert_close(chunked_nll(hidden, head, targets, 10), ref)
    with pytest.raises(ValueError, match="`chunk_tokens` must be a positive int, got 0"):
        chunked_nll(hidden, head, targets, 0)


def test_apply_memory_savers_enables_non_reentrant_checkpointing(base):
    model = apply_memory_savers(get_peft_model(base, PIConfig(context_length=128, r=4)))
    assert model.base_model.model.model.gradient_checkpointing
    assert attn_implementation("cpu") == "sdpa"


def test_apply_memory_savers_uses_current_checkpointing_names(base):
    """Regression (issue 13, item 12): `gradient_checkpointing_enable` is deprecated in transformers 5.2x and raised a
    FutureWarning on every call; pi_peft calls `activation_checkpointing_enable`."""
    import warnings

    model = get_peft_model(base, PIConfig(context_length=128, r=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        apply_memory_savers(model)
        model.train()
        fused_causal_lm_loss(model, torch.randint(0, 128, (1, 40))).backward()
    assert model.base_model.model.model.gradient_checkpointing


# ---- bitsandbytes 4-bit on CPU ----
def _pi_config():
    return PIConfig(context_length=128, r=4, target_modules="all-linear", init_lora_weights=False)


def _nf4_base(tiny_checkpoint):
    """The tiny Llama quantised to NF4 (double quant) by bitsandbytes on CPU."""
    pytest.importorskip("bitsandbytes", reason="4-bit tests need bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,  # bf16 compute would differ from the fp32 reference by rounding alone
    )
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, quantization_config=quant, device_map="cpu")


@pytest.fixture
def fourbit(tiny_checkpoint):
    """A 4-bit NF4 (double quant) tiny Llama with random LoRA weights."""
    return get_peft_model(_nf4_base(tiny_checkpoint), _pi_config())


def _dequantised_reference(qmodel, tiny_checkpoint):
    """An fp32 model holding the dequantised weights of `qmodel` and the same LoRA weights."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    ref_base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    n4 = 0
    for name, module in qmodel.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)  # (out, in)
            ref_base.get_submodule(name.replace(".base_layer", "")).weight.data.copy_(w.float())
            n4 += 1
    assert n4 == 14  # 7 linears x 2 layers are 4-bit
    ref = get_peft_model(ref_base, _pi_config())
    set_peft_model_state_dict(ref, get_peft_model_state_dict(qmodel))
    return ref


def _lora_grads(model, ids):
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _eval_forward(model, ids):
    model.eval()  # an evaluation between training steps, as Trainer runs it
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)


def _max_rel_error(grads, ref):
    return max(((grads[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)


def test_4bit_lora_gradients_after_eval_forward_match_dequantised_fp32(fourbit, tiny_checkpoint):
    ids = torch.randint(0, 128, (2, 100))
    apply_memory_savers(fourbit, gradient_checkpointing=False)  # what pi-peft train does when it loads the model
    _eval_forward(fourbit, ids)
    ref = _dequantised_reference(fourbit, tiny_checkpoint)
    assert _max_rel_error(_lora_grads(fourbit, ids), _lora_grads(ref, ids)) < 1e-5


def test_bnb_cpu_trap_is_real_here_and_fixing_late_unpacks_the_weights(fourbit, tiny_checkpoint):
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    ids = torch.randint(0, 128, (2, 100))
    ref_grads = _lora_grads(_dequantised_reference(fourbit, tiny_checkpoint), ids)
    for module in fourbit.modules():  # undo the tuner's fix: a 4-bit model as plain peft or transformers leave it
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    _eval_forward(fourbit, ids)  # no fix yet
    if has_avx512bf16():  # this CPU has the trap: the unfixed gradients are wrong
        assert _max_rel_error(_lora_grads(fourbit, ids), ref_grads) > 0.1
    # fixing after the repack unpacks the weights (bitsandbytes' repack rounds the absmax to bf16, so compare with
    # the dequantised weights the model now holds): the gradients are right again, and stay right after evaluation
    assert fix_bnb_cpu_repack(fourbit) == 14
    _eval_forward(fourbit, ids)
    ref = _dequantised_reference(fourbit, tiny_checkpoint)
    assert _max_rel_error(_lora_grads(fourbit, ids), _lora_grads(ref, ids)) < 1e-5


@pytest.mark.parametrize("path", ["get_peft_model", "from_pretrained", "add_adapter", "mla"])
def test_every_pi_and_mla_model_is_safe_from_the_cpu_repack_from_injection(tiny_checkpoint, tmp_path, path):
    """Regression (issue 19, item 1): `get_peft_model(nf4_model, PIConfig(...))`, an evaluation under no_grad (what
    `SFTTrainer(eval_strategy="steps")` runs) and a training step gave LoRA gradients >5% off on avx512_bf16 CPUs:
    only `pi-peft train` and `apply_memory_savers` guarded against bitsandbytes' CPU repack, not the tuner."""
    from peft import PeftModel

    from pi_peft import MLAConfig

    if path == "mla":
        model = get_peft_model(_nf4_base(tiny_checkpoint), MLAConfig(kv_rank=12, rope_dims=4, r=4,
                                                                     target_modules=["q_proj", "o_proj", "up_proj"],
                                                                     init_lora_weights=False))  # fmt: skip
    else:
        model = get_peft_model(_nf4_base(tiny_checkpoint), _pi_config())
    if path == "from_pretrained":
        model.save_pretrained(tmp_path)
        model = PeftModel.from_pretrained(_nf4_base(tiny_checkpoint), tmp_path, is_trainable=True)
    elif path == "add_adapter":
        model.add_adapter("second", _pi_config())
        model.set_adapter("second")
    ids = torch.randint(0, 128, (2, 100))
    reference = _lora_grads(model, ids)  # a training step that no evaluation preceded
    assert reference and all(g.abs().sum() > 0 for g in reference.values())
    _eval_forward(model, ids)
    assert _max_rel_error(_lora_grads(model, ids), reference) < 1e-6
