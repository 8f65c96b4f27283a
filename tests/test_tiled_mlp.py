"""Sequence-tiled MLP (`apply_memory_savers(model, tiled_mlp=True)`): exact loss and gradients, bounded intermediates,
checkpointing, packing, 4-bit, clear errors."""

import types

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict

from pi_peft import PIConfig
from pi_peft.ops.tiled_mlp import (
    MIN_TILE_TOKENS,
    apply_tiled_mlp,
    auto_tile_tokens,
    find_mlp_modules,
    remove_tiled_mlp,
)
from pi_peft.testing import tiny_model
from pi_peft.training.memory import apply_memory_savers

TILE = 16
IDS = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(1))  # 100 tokens: 6 full tiles + 4


def _pi_model(dropout=0.0, family="llama"):
    config = PIConfig(context_length=256, r=4, target_modules="all-linear", init_lora_weights=False,
                      lora_dropout=dropout, train_norms=True)  # fmt: skip
    return get_peft_model(tiny_model(family), config).train()


def _step(model, ids=IDS, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # same dropout draws for every run
    loss = model(input_ids=ids, labels=ids, use_cache=False, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(run, ref, rtol=1e-5):
    torch.testing.assert_close(run[0], ref[0], rtol=rtol, atol=1e-6)
    assert run[1].keys() == ref[1].keys() and run[1]
    for name, grad in ref[1].items():
        err = ((run[1][name] - grad).norm() / grad.norm().clamp(min=1e-12)).item()
        assert err < rtol * 10, (name, err)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiled_equals_untiled_lora(checkpointing, family):
    untiled = apply_memory_savers(_pi_model(family=family), gradient_checkpointing=checkpointing)
    tiled = apply_memory_savers(_pi_model(family=family), gradient_checkpointing=checkpointing, tiled_mlp=True,
                                tile_tokens=TILE)  # fmt: skip
    assert len(find_mlp_modules(tiled)) == 2
    _assert_same(_step(tiled), _step(untiled))


def test_tiled_equals_untiled_full_finetuning():
    untiled, tiled = tiny_model().train(), tiny_model().train()
    apply_tiled_mlp(tiled, TILE)
    run, ref = _step(tiled), _step(untiled)
    assert len(ref[1]) == sum(1 for _ in untiled.parameters())  # every weight, MLP ones included, gets a gradient
    _assert_same(run, ref)


def test_tiled_with_dropout_matches_the_tiled_graph_without_recompute():
    """LoRA dropout draws per tile: the recomputed tiles must reuse the forward's masks (RNG restored)."""
    tiled = apply_memory_savers(_pi_model(dropout=0.3), tiled_mlp=True, tile_tokens=TILE)
    reference = apply_memory_savers(_pi_model(dropout=0.3))
    # the same tiles, kept in autograd's graph (no no-grad forward, no recompute)
    for mlp in find_mlp_modules(reference):

        def forward(self, x):
            cls_forward = type(self).forward
            return torch.cat([cls_forward(self, x[:, s : s + TILE]) for s in range(0, x.shape[1], TILE)], dim=1)

        mlp.forward = types.MethodType(forward, mlp)
    _assert_same(_step(tiled), _step(reference))


def test_only_one_tile_of_intermediates_is_alive():
    model = apply_memory_savers(_pi_model(), tiled_mlp=True, tile_tokens=TILE)
    rows = []
    for mlp in find_mlp_modules(model):  # down_proj's input is the (B, rows, intermediate) product
        mlp.down_proj.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[1]))
    _step(model)
    # forward, checkpoint recompute and backward recompute: every `x x intermediate` tensor has at most TILE rows
    assert rows and max(rows) == TILE and sum(rows) == 3 * 2 * 100  # 3 passes x 2 layers x 100 tokens


def test_packed_rows_and_checkpointing():
    """Two documents packed into each row (position ids restart): tiling is per token, so nothing changes."""
    position_ids = torch.cat([torch.arange(60), torch.arange(40)]).repeat(2, 1)  # (2, 100)
    untiled = apply_memory_savers(_pi_model())
    tiled = apply_memory_savers(_pi_model(), tiled_mlp=True, tile_tokens=TILE)
    _assert_same(_step(tiled, position_ids=position_ids), _step(untiled, position_ids=position_ids))


def test_tiling_before_get_peft_model_keeps_the_state_dict_and_can_be_removed():
    base = tiny_model()
    keys = set(base.state_dict())
    assert apply_tiled_mlp(base, TILE) == 2
    assert set(base.state_dict()) == keys  # no wrapper module: the same checkpoint keys
    model = get_peft_model(base, PIConfig(context_length=256, r=4, target_modules="all-linear",
                                          init_lora_weights=False)).train()  # fmt: skip
    assert all(".mlp." in k or "mlp" not in k for k in get_peft_model_state_dict(model))
    run = _step(model)
    assert remove_tiled_mlp(model) == 2 and not any("forward" in vars(m) for m in find_mlp_modules(model))
    _assert_same(run, _step(model))


def test_auto_tile_size():
    assert auto_tile_tokens(100_000, 4096) == 4000  # 25 equal tiles of ~hidden_size tokens
    assert auto_tile_tokens(16384, 512) == MIN_TILE_TOKENS  # never below 1024 tokens
    assert auto_tile_tokens(800, 4096) == 800  # shorter than one tile: untiled
    assert auto_tile_tokens(10_000, 4096) == 3334  # ceil(10000 / 3)


def test_eval_forward_without_grad_is_tiled_and_equal():
    model, ref = _pi_model().eval(), _pi_model().eval()
    apply_tiled_mlp(model, TILE)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ref(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -16, 1.5, True, "big"])
def test_bad_tile_size_is_a_clear_error(bad):
    expected = r"`tile_tokens` must be a positive int .*got " + repr(bad).replace(".", r"\.")
    with pytest.raises(ValueError, match=expected):
        apply_memory_savers(_pi_model(), tiled_mlp=True, tile_tokens=bad)


def test_tile_size_without_tiling_and_models_without_mlp_are_errors():
    with pytest.raises(ValueError, match=r"`tile_tokens`=64 has no effect without `tiled_mlp=True`"):
        apply_memory_savers(_pi_model(), tile_tokens=64)
    with pytest.raises(ValueError, match="found no MLP in Linear"):
        apply_tiled_mlp(torch.nn.Linear(4, 4))


def test_4bit_tiled_equals_untiled(tiny_checkpoint):
    pytest.importorskip("bitsandbytes", reason="4-bit test needs bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def load():
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, quantization_config=quant, device_map="cpu")
        torch.manual_seed(0)
        config = PIConfig(context_length=256, r=4, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(base, config).train()

    untiled = apply_memory_savers(load())
    tiled = apply_memory_savers(load(), tiled_mlp=True, tile_tokens=TILE)
    assert type(tiled.base_model.model.model.layers[0].mlp.gate_proj.base_layer).__name__ == "Linear4bit"
    _assert_same(_step(tiled), _step(untiled), rtol=1e-4)
