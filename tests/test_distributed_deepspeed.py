"""DeepSpeed ZeRO-3 (with the tiled MLP) and Ulysses sequence parallelism + ZeRO-3 (with a PI adapter) through
`pi-peft train` (`pi_peft.training.sft.main`) in 2 CPU processes, compared with one process on the same batch; the
sequence-parallel checks (`pi_peft.training.sequence_parallel`) and the ZeRO-3 path of the tiled MLP as fast tests.

The 2-process tests are `slow` (run them with `python -m pytest -m slow tests/test_distributed_deepspeed.py`)."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model

import pi_peft.ops.tiled_mlp as tiled_mlp
from pi_peft import PIConfig
from pi_peft.ops import s2_attn
from pi_peft.ops.tiled_mlp import apply_tiled_mlp, find_mlp_modules, tile_bounds
from pi_peft.testing import tiny_model
from pi_peft.training.sequence_parallel import (
    check_sequence_parallel,
    check_training_sequence_parallel,
    sp_settings,
)

WORKER = os.path.join(os.path.dirname(__file__), "dist_workers", "deepspeed_train.py")
NEEDS_DEEPSPEED = "needs `pip install -e .[distributed]` (deepspeed)"
IDS = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


# ---- the ZeRO-3 path of the tiled MLP, in one process ------------------------------------------------------------
def _pi_model(target_modules="all-linear", **kwargs):
    config = PIConfig(context_length=256, r=4, target_modules=target_modules, init_lora_weights=False, **kwargs)
    return get_peft_model(tiny_model(), config).train()


def _grads(model, ids=IDS):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _as_if_zero3(monkeypatch, extra_tiles: int):
    """Make the tiled MLP take its ZeRO-3 path in one process: every MLP parameter counts as partitioned, and the
    'other rank' needs `extra_tiles` more tiles (this rank then runs empty ones)."""
    monkeypatch.setattr(tiled_mlp, "zero3_params", lambda module: list(module.parameters()))
    monkeypatch.setattr(tiled_mlp, "agreed_tile_count", lambda n, device, group=None: n + extra_tiles)


@pytest.mark.parametrize("extra_tiles", [0, 3])
def test_zero3_path_of_the_tiled_mlp_equals_untiled(monkeypatch, extra_tiles):
    ref = _grads(_pi_model())
    model = _pi_model()
    apply_tiled_mlp(model, 16)
    _as_if_zero3(monkeypatch, extra_tiles)
    # ds_grad_is_ready at each accumulation into .grad: DeepSpeed must see only the last tile's as ready
    ready: list[bool] = []
    probe = find_mlp_modules(model)[0].down_proj.lora_A["default"].weight
    probe.register_post_accumulate_grad_hook(lambda p: ready.append(p.ds_grad_is_ready))
    run = _grads(model)
    n_tiles = math.ceil(100 / 16) + extra_tiles
    assert ready == [False] * (n_tiles - 1) + [True]
    torch.testing.assert_close(run[0], ref[0], rtol=1e-6, atol=0)
    assert run[1].keys() == ref[1].keys()
    assert max(_rel(run[1][n], g) for n, g in ref[1].items()) < 1e-5


def test_zero3_path_trains_mlp_lora_whose_input_needs_no_grad(monkeypatch):
    """Only the MLPs have LoRA and nothing before the first MLP is trainable: its input needs no grad, yet its LoRA
    weights (not inputs of the autograd function on this path) must get their gradients."""
    kwargs = dict(target_modules=["gate_proj", "up_proj", "down_proj"], train_embeddings=False, train_norms=False)
    ref = _grads(_pi_model(**kwargs))
    model = _pi_model(**kwargs)
    apply_tiled_mlp(model, 16)
    _as_if_zero3(monkeypatch, 1)
    run = _grads(model)
    assert any(".layers.0.mlp." in n for n in ref[1]) and run[1].keys() == ref[1].keys()
    assert max(_rel(run[1][n], g) for n, g in ref[1].items()) < 1e-5


def test_tile_bounds():
    assert tile_bounds(100, 16) == [(s, min(s + 16, 100)) for s in range(0, 100, 16)]
    assert tile_bounds(100, 16, 7) == tile_bounds(100, 16)  # the local count: unchanged
    assert tile_bounds(10, 4, 5) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]  # more tiles agreed: smaller ones
    assert tile_bounds(3, 4, 5) == [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)]  # shorter than the count: empty tiles


# ---- the sequence-parallel checks ---------------------------------------------------------------------------------
GOOD = dict(num_attention_heads=32, num_key_value_heads=8, max_length=32768, zero_stage=3,
            sp_attn_implementation="sdpa", attn_implementation="sdpa")  # fmt: skip


@pytest.mark.parametrize("sp_size", [1, 2, 4, 8, 16, 32])
def test_good_sequence_parallel_settings_pass(sp_size):
    check_sequence_parallel(sp_size, **GOOD)  # kv 8 < sp 16 / 32: DeepSpeed replicates the kv heads


@pytest.mark.parametrize(
    "sp_size, change, match",
    [
        (3, {}, r"`sp_size`=3 does not divide the model's `num_attention_heads`=32.*Pick an `sp_size`"),
        (4, dict(num_attention_heads=12, num_key_value_heads=6),
         r"`sp_size`=4 and the model's `num_key_value_heads`=6.*neither holds"),
        (4, dict(max_length=32770), r"`max_length`=32770 is not a multiple of `sp_size`=4.*Set `max_length` to 32768 "
                                    r"or 32772"),
        (2, dict(zero_stage=2), r"DeepSpeed ZeRO stage 2 with `sp_size`=2: .*multiplied by sp_size \(x2; DeepSpeed "
                                r"#5248\).*Use ZeRO stage 3"),
        (2, dict(zero_stage=1), r"ZeRO stage 1 .*#5248"),
        (2, dict(zero_stage=None), r"`sp_size`=2 needs DeepSpeed.*--deepspeed"),
        (2, dict(sp_attn_implementation="eager", attn_implementation="eager"),
         r"`sp_attn_implementation`='eager' cannot be wrapped by Ulysses"),
        (2, dict(sp_attn_implementation="flex_attention"), r"'flex_attention' cannot be wrapped"),
        (2, dict(sp_attn_implementation=None), r"`sp_attn_implementation` is not set.*PARALLELISM_CONFIG_SP_ATTN"),
        (2, dict(attn_implementation="flash_attention_2"),
         r"`sp_attn_implementation`='sdpa' but the model is loaded with `attn_implementation`='flash_attention_2'"),
        (2, dict(s2_attn=True), r"`s2_attn=True` with `sp_size`=2: .*wrong heads. Set `s2_attn=False`"),
        (2, dict(data_mode="sft", pad_to_multiple_of=None), r"`pad_to_multiple_of`=None with `sp_size`=2.*Set "
                                                             r"`pad_to_multiple_of` to 2"),
        (4, dict(data_mode="sft", pad_to_multiple_of=6), r"`pad_to_multiple_of`=6 with `sp_size`=4"),
        (2, dict(data_mode="sft", pad_to_multiple_of=8, packing=True),
         r"`packing=True` with `sp_size`=2 and `sp_attn_implementation`='sdpa'.*attend each other"),
        (2, dict(world_size=3), r"`sp_size`=2 does not divide the 3 processes"),
        (2, dict(sp_backend="torch"), r"`sp_backend`='torch'.*set `sp_backend='deepspeed'`"),
        (0, {}, r"`sp_size` must be a positive int"),
    ],
)  # fmt: skip
def test_bad_sequence_parallel_settings_are_refused(sp_size, change, match):
    with pytest.raises(ValueError, match=match):
        check_sequence_parallel(sp_size, **{**GOOD, **change})


def test_what_sequence_parallelism_allows():
    check_sequence_parallel(2, **GOOD, data_mode="sft", pad_to_multiple_of=8)  # SFT rows padded to a multiple
    flash = dict(GOOD, sp_attn_implementation="flash_attention_2", attn_implementation="flash_attention_2")
    check_sequence_parallel(2, **flash, data_mode="sft", pad_to_multiple_of=2, packing=True)  # varlen keeps docs apart
    check_sequence_parallel(2, **GOOD, packing=True)  # pretrain rows: trl's packing is off, nothing to keep apart
    check_sequence_parallel(1, **{**GOOD, "zero_stage": 2, "s2_attn": True, "max_length": 3})  # no SP: no check


def test_packed_documents_are_apart_in_one_process_without_a_cache():
    """The premise of refusing SFT packing under Ulysses with sdpa: in one process transformers keeps packed
    documents apart by the restarting `position_ids` (no KV cache built), which Ulysses' dropped mask cannot."""
    model = tiny_model().train()
    a, b = torch.randint(0, 128, (1, 20)), torch.randint(0, 128, (1, 12))
    row, positions = torch.cat([a, b], 1), torch.cat([torch.arange(20), torch.arange(12)]).unsqueeze(0)
    with torch.no_grad():
        alone = model(input_ids=b, use_cache=False).logits
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[:, 20:]
        with_cache = model(input_ids=row, position_ids=positions, use_cache=True).logits[:, 20:]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert (with_cache - alone).abs().max() > 1e-2  # with a cache: one causal row, the documents attend each other


def test_settings_are_read_from_training_args_and_the_environment(tmp_path, monkeypatch):
    for name in ("ACCELERATE_USE_PARALLELISM_CONFIG", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert sp_settings(None)["sp_size"] == 1
    from accelerate import ParallelismConfig

    pc = ParallelismConfig(sp_size=2, sp_backend="deepspeed")
    assert sp_settings(SimpleNamespace(parallelism_config=pc))["sp_size"] == 2
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")  # what `accelerate launch` exports
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "4")
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION", "sdpa")
    assert sp_settings(None) == {"sp_size": 4, "sp_backend": "deepspeed", "sp_attn_implementation": "sdpa"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("WORLD_SIZE", "4")

    # a `pi-peft train` run: the model's heads, the SFTConfig's max_length, the adapter's s2_attn
    from pi_peft.testing import tiny_config

    args = SimpleNamespace(deepspeed=str(path), max_length=128, packing=False, pad_to_multiple_of=None)
    with pytest.raises(ValueError, match=r"ZeRO stage 2 with `sp_size`=4"):
        check_training_sequence_parallel(args, tiny_config(), PIConfig(context_length=128))
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert check_training_sequence_parallel(args, tiny_config(), PIConfig(context_length=128)) == 4  # kv 2: copied
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "3")
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match=r"`sp_size`=3 does not divide the model's `num_attention_heads`=4"):
        check_training_sequence_parallel(args, tiny_config(), PIConfig(context_length=128))
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "2")
    assert check_training_sequence_parallel(args, tiny_config(), PIConfig(context_length=128)) == 2
    with pytest.raises(ValueError, match=r"`s2_attn=True` with `sp_size`=2"):
        check_training_sequence_parallel(args, tiny_config(), PIConfig(context_length=128, s2_attn=True))


def test_s2_attention_on_a_head_slice_is_refused():
    """What Ulysses hands the attention after its all-to-all: the whole sequence, H / sp_size heads. S² decides the
    shifted half by the global head index, so on a slice it would be wrong: refused inside the attention."""
    model = get_peft_model(tiny_model(), PIConfig(scaling_factor=2.0, r=4, s2_attn=True)).train()
    attn = model.base_model.model.model.layers[0].self_attn
    q = torch.randn(1, 2, 32, 16)  # 2 of the 4 heads
    kv = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match=r"S²-Attn got 2 of this model's 4 query heads .*over 2 ranks.*wrong heads"):
        s2_attn.s2_attention_forward(attn, q, kv, kv, None, s2_base="sdpa", s2_ratio=0.25)
    out, _ = s2_attn.s2_attention_forward(attn, torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16),
                                          torch.randn(1, 2, 32, 16), None, s2_base="sdpa", s2_ratio=0.25)  # fmt: skip
    assert out.shape == (1, 32, 4, 16)  # all the heads: S² as usual


# ---- 2 processes: DeepSpeed ZeRO-3 and Ulysses SP + ZeRO-3 through `pi-peft train` -----------------------------
ZERO3 = {
    # tiny model: partition everything (threshold 0); the final adapter gathered for the save
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "zero_allow_untested_optimizer": True,
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
}


@pytest.fixture(scope="module")
def ds_assets(tmp_path_factory):
    pytest.importorskip("deepspeed", reason=NEEDS_DEEPSPEED)
    from _train_helpers import make_jsonl, make_tiny_llama

    root = tmp_path_factory.mktemp("deepspeed")
    (root / "z3.json").write_text(json.dumps(ZERO3))
    return SimpleNamespace(
        root=root,
        model=make_tiny_llama(str(root / "model")),
        data=make_jsonl(str(root / "data" / "train.jsonl"), n_docs=6, words_per_doc=120),
        z3=str(root / "z3.json"),
    )


def _launch(assets, name, extra_env=(), *extra_args, expect_failure=False):
    """`pi-peft train --deepspeed ds.json --use_cpu` in 2 processes (`dist_workers.common.launch`: torchrun, gloo) on
    DeepSpeed's CPU accelerator; returns each rank's steps (see
    tests/dist_workers/deepspeed_train.py), the output folder and the wall time; the launch's output if
    `expect_failure`."""
    from dist_workers.common import launch, launch_process

    out, records = assets.root / name / "out", assets.root / name / "records"
    argv = [
        "--model_name_or_path", assets.model, "--data_files", assets.data, "--output_dir", str(out),
        "--context_length", "128", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
        "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--learning_rate", "1e-3",
        "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--per_device_train_batch_size", "1", "--seed", "0", "--bf16", "false", "--dtype", "float32",
        "--report_to", "none", "--deepspeed", assets.z3, "--use_cpu", *extra_args,
    ]  # fmt: skip
    env = {"ACCELERATE_USE_CPU": None, "DS_ACCELERATOR": "cpu", "PI_TEST_LORA_B_NONZERO": "1", **dict(extra_env)}
    if expect_failure:
        proc = launch_process(WORKER, 2, argv, records, env)
        assert proc.returncode != 0, proc.stdout[-3000:]
        return proc.stdout
    ranks = launch(WORKER, 2, argv, records, env)
    return [_steps(r) for r in ranks], out, ranks[0]["wall_s"]


def _steps(result: dict) -> dict:
    """One rank's records as `{"sp_size", "agreed_tiles", "steps": [{"loss", "inputs", "grads", "params",
    "inv_freq", ...}]}` (the float64 of `write_result` back to the dtypes recorded: exact)."""
    steps = []
    for i, meta in enumerate(result["steps"]):
        steps.append({
            **meta,
            "loss": torch.tensor(meta["loss"]),
            "inputs": {k: v.long() for k, v in result[f"step{i}_inputs"].items()},
            "grads": {k: v.float() for k, v in result[f"step{i}_grads"].items()},
            "params": {k: v.float() for k, v in result[f"step{i}_params"].items()},
            "inv_freq": result[f"step{i}_rope"]["inv_freq"].float(),
        })  # fmt: skip
    return {"sp_size": result["sp_size"], "agreed_tiles": result["agreed_tiles"], "steps": steps}


def _reference(assets, out, params, input_ids, shift_labels=None):
    """One process, no DeepSpeed: the saved PI adapter's config on the same base, the recorded trainable values,
    the loss and the gradients on `input_ids` (the whole global batch)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(assets.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out), is_trainable=True).train()
    named = dict(model.named_parameters())
    assert set(params) == {n for n, p in named.items() if p.requires_grad}
    with torch.no_grad():
        for n, value in params.items():
            named[n].copy_(value)
    labels = input_ids if shift_labels is None else None
    kwargs = {"labels": labels} if labels is not None else {"shift_labels": shift_labels, "labels": shift_labels}
    loss = model(input_ids=input_ids, use_cache=False, **kwargs).loss
    loss.backward()
    inv_freq = model.base_model.model.model.rotary_emb.inv_freq
    return loss.detach(), {n: named[n].grad for n in params}, inv_freq


def _assert_step_equal(step, ref_loss, ref_grads):
    from dist_workers.common import compare_grads, rel_error

    assert rel_error(step["loss"], ref_loss) < 1e-5, (step["loss"], ref_loss)
    errs = compare_grads(step["grads"], ref_grads, rtol=1e-5)
    assert any("lora_A" in n for n in errs) and all(ref_grads[n].norm() > 0 for n in errs if "lora_" in n)
    return max(errs.values())


def _assert_trained(ranks, tiles):
    """Two steps, the second from parameters the first one's DeepSpeed optimizer step moved; every MLP call took
    the tiled MLP's ZeRO-3 path with `tiles` tiles agreed across the ranks."""
    steps = ranks[0]["steps"]
    assert len(steps) == 2
    assert all(not torch.equal(steps[1]["params"][n], p) for n, p in steps[0]["params"].items() if "lora_" in n)
    for r in ranks:  # 2 layers x (forward + backward recompute) x 2 steps, at least
        assert len(r["agreed_tiles"]) >= 8 and set(r["agreed_tiles"]) == {tiles}


def _assert_partitioned(step):
    """ZeRO-3: every trainable parameter is partitioned (local tensor empty outside the forward, half its elements
    held by this rank)."""
    assert step["zero_stage"] == 3 and step["world_size"] == 2
    for name, (ds_numel, local_numel, shard_numel, status) in step["partition"].items():
        assert ds_numel is not None and local_numel == 0 and shard_numel == math.ceil(ds_numel / 2), name
        assert status == "ZeroParamStatus.NOT_AVAILABLE", (name, status)


def _check_saved_adapter(out, records):
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["peft_type"] == "PI" and config["context_length"] == 128 and config["scaling_factor"] == 2.0
    weights = load_file(os.path.join(out, "adapter_model.safetensors"))
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert loaded.config.rope_parameters["factor"] == 2.0
    assert all(w.numel() > 0 for w in weights.values())  # gathered, not empty ZeRO-3 shards
    changed = [k for k, w in weights.items() if "lora_B" in k]
    assert changed and not [n for n in os.listdir(out) if n.startswith(".tmp")]
    last = records[0]["steps"][-1]["params"]  # before the last step: the saved values moved past them
    assert any(not torch.equal(w, last[n]) for n, w in loaded.named_parameters() if n in last)


@pytest.mark.slow
def test_zero3_with_tiled_mlp_equals_one_process(ds_assets):
    ranks, out, wall = _launch(ds_assets, "zero3", (), "--tiled_mlp", "true", "--tile_tokens", "16")
    print(f"ZeRO-3 + tiled MLP, 2 processes: {wall:.0f} s")
    worst = 0.0
    for i, (s0, s1) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"])):
        _assert_partitioned(s0)
        for n in s0["params"]:  # both ranks gathered the same full values and gradients
            assert torch.equal(s0["params"][n], s1["params"][n]) and torch.equal(s0["grads"][n], s1["grads"][n])
        ids = torch.cat([s0["inputs"]["input_ids"], s1["inputs"]["input_ids"]])  # the global batch: a row per rank
        assert ids.shape == (2, 128) and not torch.equal(ids[0], ids[1])  # data parallel: different rows
        loss, grads, inv_freq = _reference(ds_assets, out, s0["params"], ids)
        s0 = dict(s0, loss=(s0["loss"] + s1["loss"]) / 2)  # equal token counts: the mean of the ranks' means
        worst = max(worst, _assert_step_equal(s0, loss, grads))
        assert torch.equal(ranks[0]["steps"][i]["inv_freq"], inv_freq)  # PI's scaled inv_freq on the ranks
    print(f"worst relative gradient error over {len(ranks[0]['steps'])} steps: {worst:.2e}")
    _assert_trained(ranks, tiles=128 // 16)
    _check_saved_adapter(out, ranks)


@pytest.mark.slow
def test_zero3_with_the_one_process_tiled_mlp_path_crashes(ds_assets):
    """The control: the parameters as inputs of the tiled MLP's autograd function (the one-process path) under
    ZeRO-3 fail as issue 20 found, so the test above exercises the ZeRO-3 path."""
    env = {"PI_TEST_TILED_MLP_NO_ZERO3_PATH": "1"}
    log = _launch(ds_assets, "zero3-control", env.items(), "--tiled_mlp", "true", "--tile_tokens", "16",
                  expect_failure=True)  # fmt: skip
    assert "LinearFunctionForZeroStage3Backward returned an invalid gradient" in log


@pytest.mark.slow
def test_zero3_tiled_mlp_agrees_on_the_tile_count_across_ranks(tmp_path):
    """Rows of 100 and 40 tokens on the two ranks (7 and 3 tiles of 16): both run 7 (the short row's last ones
    empty), and the averaged gradients equal one process's mean of the two rows' gradients."""
    pytest.importorskip("deepspeed", reason=NEEDS_DEEPSPEED)
    from dist_workers.common import compare_grads, launch

    worker = os.path.join(os.path.dirname(__file__), "dist_workers", "deepspeed_uneven.py")
    ranks = launch(worker, 2, [], tmp_path, {"ACCELERATE_USE_CPU": None, "DS_ACCELERATOR": "cpu"})
    print(f"ZeRO-3 tiled MLP, rows of 100 and 40 tokens: {ranks[0]['wall_s']:.0f} s")
    assert [r["local_tiles"] for r in ranks] == [7, 3] and all(r["partitioned"] for r in ranks)
    assert all(r["agreed_tiles"] and set(r["agreed_tiles"]) == {7} for r in ranks)  # every MLP call: 7 tiles
    params = {n: v.float() for n, v in ranks[0]["params"].items()}
    model = _pi_model()
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, value in params.items():
            named[n].copy_(value)
    for r in ranks:  # DeepSpeed averages the ranks' gradients: the mean of the two rows' mean losses
        ids = r["ids"]["ids"].long()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        assert loss.item() == pytest.approx(r["loss"], rel=1e-5)
        (loss / 2).backward()
    grads = {n: named[n].grad for n in params}
    errs = compare_grads({n: g.float() for n, g in ranks[0]["grads"].items()}, grads, rtol=1e-5)
    print(f"worst relative gradient error: {max(errs.values()):.2e}")


SP_ENV = {
    "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
    "PARALLELISM_CONFIG_SP_SIZE": "2",
    "PARALLELISM_CONFIG_SP_BACKEND": "deepspeed",
    "PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION": "sdpa",
}


@pytest.mark.slow
def test_ulysses_sp_with_zero3_equals_one_process(ds_assets):
    ranks, out, wall = _launch(ds_assets, "sp", SP_ENV.items(), "--tiled_mlp", "true", "--tile_tokens", "16")
    print(f"Ulysses SP 2 + ZeRO-3 + tiled MLP, 2 processes: {wall:.0f} s")
    assert ranks[0]["sp_size"] == 2
    worst = 0.0
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        _assert_partitioned(s0)
        # the sequence is sharded: each rank has half of the same row, with its global positions
        for r, s in enumerate((s0, s1)):
            assert s["inputs"]["input_ids"].shape == (1, 64)
            assert torch.equal(s["inputs"]["position_ids"], torch.arange(64 * r, 64 * (r + 1)).unsqueeze(0))
        ids = torch.cat([s0["inputs"]["input_ids"], s1["inputs"]["input_ids"]], dim=1)  # (1, 128): one row
        shift = torch.cat([s0["inputs"]["shift_labels"], s1["inputs"]["shift_labels"]], dim=1)
        assert torch.equal(shift[:, :-1], ids[:, 1:]) and shift[0, -1] == -100
        assert torch.equal(s0["loss"], s1["loss"])  # the loss of the whole row on both ranks
        loss, grads, inv_freq = _reference(ds_assets, out, s0["params"], ids)
        worst = max(worst, _assert_step_equal(s0, loss, grads))
        assert torch.equal(s0["inv_freq"], inv_freq) and torch.equal(s1["inv_freq"], inv_freq)
    print(f"worst relative gradient error over {len(ranks[0]['steps'])} steps: {worst:.2e}")
    _assert_trained(ranks, tiles=64 // 16)  # each rank tiles its half of the row
    _check_saved_adapter(out, ranks)


@pytest.mark.slow
def test_pi_peft_train_refuses_s2_and_zero2_under_sequence_parallelism(ds_assets, tmp_path):
    """Before any step, on both ranks: S²-Attn under Ulysses, and Ulysses on ZeRO-2 (DeepSpeed #5248: loss and
    gradients x sp_size) set through accelerate's environment."""
    log = _launch(ds_assets, "sp-s2", SP_ENV.items(), "--s2_attn", "true", expect_failure=True)
    assert "`s2_attn=True` with `sp_size`=2" in log and "'loss'" not in log
    zero2 = tmp_path / "z2.json"
    zero2.write_text(json.dumps({**ZERO3, "zero_optimization": {"stage": 2}}))
    log = _launch(SimpleNamespace(**{**vars(ds_assets), "z3": str(zero2)}), "sp-zero2", SP_ENV.items(),
                  expect_failure=True)  # fmt: skip
    assert "DeepSpeed ZeRO stage 2 with `sp_size`=2" in log and "#5248" in log and "'loss'" not in log
