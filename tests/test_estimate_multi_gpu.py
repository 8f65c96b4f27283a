"""`pi-peft estimate` past one GPU (issue 20): DDP / FSDP2 / ZeRO-3 sharding, Ulysses sequence parallelism, offload.

One GPU must stay exactly what it was: `tests/test_estimate_golden.json` holds the single-GPU outputs of the
estimator before the multi-GPU terms (commit 245c099; regenerate only for an intended change of the one-GPU model:
`python tests/test_estimate_multi_gpu.py --regenerate`).
"""

import glob
import itertools
import json
import os
import sys

import pytest

from pi_peft.cli.estimate import cli_main
from pi_peft.training.estimate import (
    GIB,
    estimate_memory,
    format_estimate,
    max_context,
    parallelism_from_accelerate_config,
    recipe_row,
    recipes_table,
)

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "test_estimate_golden.json")
LLAMA2, LLAMA2_13B, LLAMA3 = "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Meta-Llama-3-8B"
MODELS = [LLAMA2, LLAMA3, "mistralai/Mistral-7B-v0.1"]
VARIANTS = [
    {},
    {"quantization": "none"},
    {"attention": "eager"},
    {"loss": "chunked"},
    {"loss": "full"},
    {"gradient_checkpointing": False},
    {"activation_offloading": True, "tiled_mlp": True},
    {"tiled_mlp": True, "tile_tokens": 1024, "lora_dropout": 0.05},
    {"r": 64, "batch_size": 2, "train_embeddings": False, "train_norms": False},
    {"dtype_bytes": 4, "device": "cpu", "double_quant": False},
]
ONE_GPU_RECIPES = list(json.load(open(GOLDEN))["recipe_rows"])  # the five one-GPU recipes


def single_gpu_outputs() -> dict:
    """Every single-GPU output the fixture pins: breakdowns, texts, max contexts, the recipes' rows and table."""
    cases = []
    for model, kwargs, T in itertools.product(MODELS, VARIANTS, (8192, 32768)):
        e = estimate_memory(model, T, **kwargs)
        largest = max_context(model, 24.0, **kwargs) if T == 8192 else None
        cases.append(dict(model=model, context_length=T, kwargs=kwargs, estimate=e.as_dict(),
                          text=format_estimate(e, 24.0), max_context=largest))  # fmt: skip
    rows = {path: recipe_row(path) for path in ONE_GPU_RECIPES}
    rows = {path: {k: row[k] for k in ("max_context", "model", "recipe")} | {"estimate": row["estimate"].as_dict()}
            for path, row in rows.items()}  # fmt: skip
    return dict(cases=cases, recipes_table=recipes_table(ONE_GPU_RECIPES), recipe_rows=rows)


ONE_GPU_KEYS = ("weights", "trainable", "checkpoints", "layer", "logits", "overhead", "activations", "total")


def test_one_gpu_is_exactly_the_estimate_before_multi_gpu():
    golden, now = json.load(open(GOLDEN)), single_gpu_outputs()
    assert len(golden["cases"]) == len(now["cases"]) == 60
    for old, new in zip(golden["cases"], now["cases"]):
        assert {k: new["estimate"][k] for k in old["estimate"]} == old["estimate"], old["kwargs"]
        assert (new["text"], new["max_context"]) == (old["text"], old["max_context"]), old["kwargs"]
        explicit = estimate_memory(old["model"], old["context_length"], **old["kwargs"], num_gpus=1, sp_size=1,
                                   sharding="none", offload=False)  # fmt: skip
        assert explicit.as_dict() == new["estimate"]
        assert explicit.gathered == explicit.all_to_all == explicit.offloaded == 0
    assert now["recipes_table"] == golden["recipes_table"]
    for path, row in golden["recipe_rows"].items():
        assert {k: now["recipe_rows"][path]["estimate"][k] for k in row["estimate"]} == row["estimate"], path
        assert now["recipe_rows"][path]["max_context"] == row["max_context"], path


def test_cli_one_gpu_json_and_text_unchanged_by_the_new_flags(capsys):
    argv = [LLAMA2, "--context-length", "16384", "--tiled-mlp"]
    assert cli_main(argv) == 0
    plain = capsys.readouterr().out
    assert cli_main(argv + ["--num-gpus", "1", "--sp-size", "1"]) == 0
    assert capsys.readouterr().out == plain and "assumptions" not in plain and "per GPU" not in plain


def _layer_weights(r=16, h=4096, i=11008, q=4096, kv=4096, w_q=0.5 + 1 / 64 + 4 / (64 * 256), a=2):
    linears = dict(q=(h, q), k=(h, kv), v=(h, kv), o=(q, h), gate=(h, i), up=(h, i), down=(i, h))
    return sum(x * y for x, y in linears.values()) * w_q + (2 * h + sum(r * (x + y) for x, y in linears.values())) * a


def test_fsdp_and_zero3_shard_weights_and_trainable_state_ddp_copies_them():
    one = estimate_memory(LLAMA2, 16384)
    ddp = estimate_memory(LLAMA2, 16384, num_gpus=2)
    fsdp = estimate_memory(LLAMA2, 16384, num_gpus=4, sharding="fsdp")
    zero3 = estimate_memory(LLAMA2, 16384, num_gpus=4, sharding="zero3")
    # DDP: full copies + its gradient buckets (one more copy of the gradients: param + grad + 2 moments -> +1/4)
    assert ddp.weights == one.weights and ddp.trainable == one.trainable * 5 // 4 and ddp.gathered == 0
    # FSDP2: everything / N, + the root unit (embeddings, head, final norm in bf16) + 2 decoder layers
    V, h, n = 32000, 4096, 32
    assert fsdp.weights == int(one.weights / 4) and fsdp.trainable == int(one.trainable / 4)
    assert fsdp.gathered == int((2 * V * h + h) * 2 + 2 * _layer_weights())
    # ZeRO-3: 16 bytes per trainable parameter (bf16 param + grad, fp32 master + 2 moments) / N; the embeddings
    # (V * h in bf16) are the largest module it fetches
    p_train = (
        n * sum(16 * (x + y) for x, y in ((h, h),) * 4 + ((h, 11008),) * 2 + ((11008, h),)) + V * h + (2 * n + 1) * h
    )
    assert zero3.trainable == int(p_train * 16 / 4) and zero3.gathered == V * h * 2
    for e in (ddp, fsdp, zero3):  # activations are per sequence, unchanged by data parallelism / sharding
        assert (e.checkpoints, e.layer, e.logits, e.all_to_all) == (one.checkpoints, one.layer, one.logits, 0)
    assert fsdp.total < one.total < ddp.total
    # more GPUs, less per GPU
    assert estimate_memory(LLAMA2_13B, 32768, num_gpus=8, sharding="fsdp").weights < fsdp.weights * 2


def test_qlora_under_fsdp2_or_zero3_must_also_fit_while_loading():
    """transformers loads a quantized model whole on every rank (its FSDP rank-0 loading and ZeRO-3 zero.Init skip
    quantized models), so the whole 4-bit model must fit each GPU once before the engine shards it: a 70B in 4 bit
    does not load on 24 GB."""
    one = estimate_memory(LLAMA2_13B, 32768, tiled_mlp=True, activation_offloading=True)
    fsdp = estimate_memory(LLAMA2_13B, 32768, num_gpus=2, sharding="fsdp", tiled_mlp=True, activation_offloading=True)
    assert fsdp.load_weights == one.weights and fsdp.fits(24) and one.load_weights == 0
    assert estimate_memory(LLAMA2_13B, 32768, num_gpus=2, sharding="fsdp", quantization="none").load_weights == 0
    assert estimate_memory(LLAMA2_13B, 32768, num_gpus=2, sharding="zero3").load_weights == one.weights
    assert estimate_memory(LLAMA2_13B, 32768, num_gpus=2).load_weights == 0  # DDP: the weights stay whole anyway
    llama2_70b = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000)  # fmt: skip
    kw = dict(num_gpus=2, sharding="fsdp", tiled_mlp=True, activation_offloading=True)
    e = estimate_memory(llama2_70b, 1024, **kw)
    assert e.total < 24 * GIB < e.load_weights and not e.fits(24)  # the step would fit, the loading does not
    assert max_context(llama2_70b, 24, **kw) == 0 and max_context(llama2_70b, 48, **kw) > 0
    text = format_estimate(e)
    assert "loading: transformers loads a 4-bit model whole on every GPU before FSDP2 shards it" in text
    assert "-> does NOT fit in 24 GiB per GPU (loading: the whole 4-bit model + CUDA, 34.87 GiB)" in text
    assert estimate_memory("meta-llama/Llama-2-70b-hf", 1024, **kw).load_weights == e.load_weights  # known config
    # fp32 training under ZeRO-3: parameter + gradient + 2 moments, no master copy
    fp32 = estimate_memory(LLAMA2, 4096, quantization="none", dtype_bytes=4, num_gpus=2, sharding="zero3")
    bf16 = estimate_memory(LLAMA2, 4096, quantization="none", num_gpus=2, sharding="zero3")
    assert fp32.trainable == bf16.trainable


def test_offload_keeps_only_the_gathered_weights_on_the_gpu():
    zero3 = estimate_memory(LLAMA3, 65536, num_gpus=1, sharding="zero3")
    off = estimate_memory(LLAMA3, 65536, num_gpus=1, sharding="zero3", offload=True)
    assert off.weights == off.trainable == 0 and off.gathered == zero3.gathered > 0
    assert off.offloaded == zero3.weights + zero3.trainable
    assert off.total == zero3.total - zero3.weights - zero3.trainable
    assert max_context(LLAMA3, num_gpus=1, sharding="zero3", offload=True) > max_context(LLAMA3)


def test_ulysses_gives_each_rank_T_over_S_tokens_plus_the_all_to_all_buffers():
    T, S, a = 262144, 8, 2
    kw = dict(r=32, train_embeddings=False, train_norms=False, tiled_mlp=True, tile_tokens=4096)
    sp = estimate_memory(LLAMA3, T, num_gpus=8, sharding="zero3", sp_size=S, **kw)
    local = estimate_memory(LLAMA3, T // S, num_gpus=8, sharding="zero3", **kw)  # one rank's tokens, no SP
    assert (sp.checkpoints, sp.layer, sp.logits) == (local.checkpoints, local.layer, local.logits)
    assert sp.tokens_per_rank == T // S and sp.as_dict()["tokens_per_rank"] == T // S
    q, kv = 4096, 1024  # Llama-3-8B: 32 heads, 8 kv heads of 128
    assert sp.all_to_all == 2 * 1 * (T // S) * a * (q + 2 * kv)
    assert sp.total == local.total + sp.all_to_all  # the buffers are alive with the recomputed layer
    # 16 ranks > 8 kv heads: the kv heads are replicated 2x before the all-to-all
    sp16 = estimate_memory(LLAMA3, T, num_gpus=16, sharding="zero3", sp_size=16, **kw)
    assert sp16.all_to_all == 2 * (T // 16) * a * (q + 2 * 2 * kv)
    # eager attention: each rank's heads / S heads over the whole sequence
    e_sp = estimate_memory(LLAMA2, 16384, num_gpus=4, sharding="zero3", sp_size=4, attention="eager")
    e_local = estimate_memory(LLAMA2, 4096, num_gpus=4, sharding="zero3")
    assert e_sp.layer - e_local.layer == (32 // 4) * 16384**2 * (a + 4)
    # SP + data parallel: 8 GPUs, SP 4 -> two groups, same per-GPU sharding over all 8
    assert estimate_memory(LLAMA3, T, num_gpus=8, sharding="zero3", sp_size=4, **kw).weights == sp.weights


def test_max_context_with_sequence_parallelism_is_a_multiple_of_the_sp_size():
    kw = dict(num_gpus=6, sharding="zero3", sp_size=2)
    largest = max_context(LLAMA2, 24, **kw)
    assert largest % 256 == 0 and largest % 2 == 0
    assert (
        estimate_memory(LLAMA2, largest, **kw).total <= 24 * GIB < estimate_memory(LLAMA2, largest + 256, **kw).total
    )
    assert max_context(LLAMA3, 24, num_gpus=8, sharding="zero3", sp_size=8) > 4 * max_context(LLAMA3, 24)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_gpus=0), r"`num_gpus` must be a positive int \(GPUs of the run\), got 0. Use --num-gpus 1"),
        (dict(num_gpus=2.5), r"`num_gpus` must be a positive int .*got 2.5"),
        (dict(sp_size=0, sharding="zero3"), r"`sp_size` must be a positive int .*got 0. Use --sp-size 1"),
        (
            dict(num_gpus=8, sp_size=3, sharding="zero3"),
            r"`sp_size`=3 must divide `num_gpus`=8 .*use one of \[1, 2, 4, 8\]",
        ),
        (
            dict(num_gpus=4, sp_size=4, sharding="fsdp"),
            r"`sp_size`=4 needs DeepSpeed ZeRO-3 \(`--zero3`\), got FSDP2.*#5248",
        ),
        (dict(num_gpus=4, sp_size=4), r"`sp_size`=4 needs DeepSpeed ZeRO-3 \(`--zero3`\), got DDP"),
        (dict(sharding="zero2"), r"`sharding` must be one of \('none', 'fsdp', 'zero3'\), got 'zero2'"),
        (dict(offload=True), r"`offload` .* needs sharding: add --zero3 .* or --fsdp"),
        (dict(offload=True, num_gpus=2), r"`offload` .* needs sharding"),
    ],
)
def test_bad_parallel_settings_name_the_setting_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory(LLAMA2, 32768, **kwargs)


def test_sp_size_must_fit_the_heads_and_the_context():
    with pytest.raises(ValueError, match=r"`sp_size`=16 must divide the model's `num_attention_heads`=40 .*use one of "
                       r"\[1, 2, 4, 5, 8, 10, 20, 40\]"):  # fmt: skip
        estimate_memory(LLAMA2_13B, 32768, num_gpus=16, sharding="zero3", sp_size=16)
    gqa = dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, num_hidden_layers=2, vocab_size=1000)
    with pytest.raises(ValueError, match=r"`sp_size`=6 and the model's `num_key_value_heads`=4: one must divide"):
        estimate_memory(gqa, 6144, num_gpus=6, sharding="zero3", sp_size=6)
    estimate_memory(gqa, 6144, num_gpus=4, sharding="zero3", sp_size=4)  # 4 kv heads, 1 per rank: fine
    with pytest.raises(
        ValueError, match=r"`context_length`=32769 is not a multiple of `sp_size`=8 .*use 32768 or 32776"
    ):
        estimate_memory(LLAMA3, 32769, num_gpus=8, sharding="zero3", sp_size=8)


def _cli_error(argv, capsys) -> str:
    from pi_peft.cli import main as pi_peft_main

    assert pi_peft_main(["estimate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pi-peft estimate: error: ") and "Traceback" not in err
    return err


def test_cli_flags_errors_are_one_line_naming_the_flag(capsys):
    base = [LLAMA3, "--context-length", "65536"]
    with pytest.raises(ValueError, match=r"`--zero3` and `--fsdp` are exclusive .*pick one"):
        cli_main(base + ["--zero3", "--fsdp"])
    assert "`--zero3` and `--fsdp` are exclusive" in _cli_error(base + ["--zero3", "--fsdp"], capsys)
    assert "`sp_size`=8 needs DeepSpeed ZeRO-3 (`--zero3`), got FSDP2" in _cli_error(
        base + ["--num-gpus", "8", "--sp-size", "8", "--fsdp"], capsys
    )
    assert "`sp_size`=3 must divide `num_gpus`=8" in _cli_error(
        base + ["--num-gpus", "8", "--sp-size", "3", "--zero3"], capsys
    )
    assert "`num_gpus` must be a positive int" in _cli_error(base + ["--num-gpus", "0"], capsys)
    cfg = "recipes/accelerate/ulysses-zero3.yaml"
    with pytest.raises(ValueError, match=r"`--accelerate-config` .*ulysses-zero3.yaml.* drop --zero3, --num-gpus"):
        cli_main(base + ["--accelerate-config", cfg, "--zero3", "--num-gpus", "8"])


def test_cli_prints_the_per_gpu_breakdown_with_its_assumptions(capsys):
    argv = [LLAMA3, "--context-length", "262144", "--num-gpus", "8", "--sp-size", "8", "--zero3", "--r", "32",
            "--tiled-mlp", "--no-train-embeddings", "--no-train-norms"]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    for text in ("GPUs 8 x DeepSpeed ZeRO-3 + Ulysses SP 8", "weights (1/8 shard)", "gathered (unsharded) weights",
                 "checkpointed layer inputs (32768 tokens per rank)", "Ulysses all-to-all buffers",
                 "total per GPU", "fits in 24 GiB per GPU", "assumptions:", "16 bytes per trainable param",
                 "all-to-all = 2 * B * (T/S) * a * (q + 2*kv')", "1-way data parallel",
                 "not measured on a multi-GPU machine"):  # fmt: skip
        assert text in out, text
    assert cli_main(argv + ["--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert (js["num_gpus"], js["sp_size"], js["sharding"], js["tokens_per_rank"]) == (8, 8, "zero3", 32768)
    layer = js["layer"] + js["all_to_all"]
    assert js["total"] == sum(js[k] for k in ("weights", "gathered", "trainable", "checkpoints", "overhead")) + max(
        layer, js["logits"]
    )
    assert js["max_context"] % 256 == 0 and js["max_context"] > 262144


def test_cli_takes_the_layout_from_an_accelerate_config(capsys):
    argv = [LLAMA2_13B, "--context-length", "32768", "--tiled-mlp", "--activation-offloading", "--json"]
    assert cli_main(argv + ["--accelerate-config", "recipes/accelerate/fsdp2-qlora.yaml"]) == 0
    via_config = json.loads(capsys.readouterr().out)
    assert cli_main(argv + ["--num-gpus", "2", "--fsdp"]) == 0
    assert json.loads(capsys.readouterr().out) == via_config and via_config["sharding"] == "fsdp"


ACCELERATE_CONFIGS = sorted(glob.glob("recipes/accelerate/*.yaml"))
EXPECTED_LAYOUT = {
    "ddp.yaml": dict(num_gpus=2, sharding="none", sp_size=1, offload=False),
    "fsdp2-qlora.yaml": dict(num_gpus=2, sharding="fsdp", sp_size=1, offload=False),
    "zero3.yaml": dict(num_gpus=2, sharding="zero3", sp_size=1, offload=False),
    "zero3-offload.yaml": dict(num_gpus=1, sharding="zero3", sp_size=1, offload=True),
    "ulysses-zero3.yaml": dict(num_gpus=8, sharding="zero3", sp_size=8, offload=False),
}


def test_every_accelerate_config_loads_with_accelerates_own_loader_and_is_estimated():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    assert sorted(os.path.basename(p) for p in ACCELERATE_CONFIGS) == sorted(EXPECTED_LAYOUT)
    kinds = {"none": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP, "zero3": DistributedType.DEEPSPEED}
    for path in ACCELERATE_CONFIGS:
        layout = EXPECTED_LAYOUT[os.path.basename(path)]
        cfg = load_config_from_file(path)  # accelerate launch's loader: unknown keys are an error there
        assert cfg.distributed_type == kinds[layout["sharding"]] and cfg.num_processes == layout["num_gpus"], path
        assert parallelism_from_accelerate_config(path) == layout, path
        header = open(path).read().split("\n")
        assert header[0].startswith("# ") and any(
            f"accelerate launch --config_file {path} -m pi_peft train --config recipes/" in line for line in header
        ), path
        if layout["sharding"] == "zero3":
            assert cfg.deepspeed_config["zero_stage"] == 3
            assert cfg.deepspeed_config["zero3_save_16bit_model"] is True  # gathered 16-bit weights on save
        if layout["sp_size"] > 1:
            pc = cfg.parallelism_config
            assert pc["parallelism_config_sp_backend"] == "deepspeed" and pc["parallelism_config_sp_size"] == 8
            assert pc["parallelism_config_sp_attn_implementation"] in ("flash_attention_2", "sdpa")
        if layout["sharding"] == "fsdp":
            f = cfg.fsdp_config
            assert f["fsdp_version"] == 2 and f["fsdp_reshard_after_forward"] is True
            assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
            assert f["fsdp_cpu_ram_efficient_loading"] is True and f["fsdp_sync_module_states"] is True


@pytest.mark.parametrize(
    "config, expected",
    [
        ("ulysses-zero3.yaml", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                                "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
                                "ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_SP_SIZE": "8",
                                "PARALLELISM_CONFIG_SP_BACKEND": "deepspeed",
                                "PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION": "flash_attention_2"}),
        pytest.param("fsdp2-qlora.yaml", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                              "FSDP_RESHARD_AFTER_FORWARD": "true",
                              "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_SYNC_MODULE_STATES": "true",
                              "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}),  # needs no extra install
    ],
)  # fmt: skip
def test_accelerate_launch_starts_the_processes_with_the_configs_settings(config, expected, tmp_path):
    """The real `accelerate launch --config_file recipes/accelerate/<cfg>` (torchrun underneath; each process here
    is a tiny script writing its environment): the right number of processes, and the environment the Accelerator
    (and so the Trainer) builds its plugin / ParallelismConfig from. ~5 s."""
    import subprocess

    if expected.get("ACCELERATE_USE_DEEPSPEED"):  # accelerate imports deepspeed to launch a DeepSpeed config
        pytest.importorskip("deepspeed", reason="needs `pip install -e .[distributed]` (deepspeed)")
    path = f"recipes/accelerate/{config}"
    n = EXPECTED_LAYOUT[config]["num_gpus"]
    script = "import json, os; env = {k: v for k, v in os.environ.items() if k.isupper()}\n"
    script += f"open(os.path.join({str(tmp_path)!r}, 'env' + env['RANK'] + '.json'), 'w').write(json.dumps(env))\n"
    (tmp_path / "show_env.py").write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(["accelerate", "launch", "--config_file", path, str(tmp_path / "show_env.py")],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    envs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("env*.json"))]
    assert len(envs) == n and sorted(int(e["RANK"]) for e in envs) == list(range(n))
    for e in envs:
        assert e["WORLD_SIZE"] == str(n) and {k: e.get(k) for k in expected} == expected
    if config == "ulysses-zero3.yaml":  # what the Trainer's Accelerator reads from that environment
        from accelerate.parallelism_config import ParallelismConfig

        saved = dict(os.environ)
        try:
            os.environ.update({k: v for k, v in envs[0].items() if k.startswith("PARALLELISM_CONFIG_")})
            pc = ParallelismConfig()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert (pc.sp_size, pc.sp_backend, pc.sp_handler.sp_attn_implementation) == (
            8,
            "deepspeed",
            "flash_attention_2",
        )


MULTI_GPU_RECIPES = {
    "recipes/llama2-13b-32k-fsdp2.yaml": ("recipes/accelerate/fsdp2-qlora.yaml", "meta-llama/Llama-2-13b-hf", 32768),
    "recipes/llama3-8b-256k-sp8.yaml": ("recipes/accelerate/ulysses-zero3.yaml", LLAMA3, 262144),
}


def _check_estimate_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_estimate", "recipes/check_estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recipe_header_is_what_the_estimator_prints():
    """The two estimate lines of every recipe's header are `recipes/check_estimate.py --headers`' output now (per GPU
    under its accelerate config for the multi-GPU recipes), not typed by hand."""
    header_lines = _check_estimate_module().header_lines
    recipes = sorted(glob.glob("recipes/*.yaml"))
    assert set(MULTI_GPU_RECIPES) < set(recipes) and len(recipes) == 7
    for path in recipes:
        lines = open(path).read().split("\n")
        at = next(k for k, line in enumerate(lines) if line.startswith("# Estimated peak GPU memory"))
        assert lines[at : at + 2] == header_lines(path), path


@pytest.mark.parametrize("recipe", sorted(MULTI_GPU_RECIPES))
def test_multi_gpu_recipes_run_under_their_accelerate_config_and_fit(recipe):
    config, model, context = MULTI_GPU_RECIPES[recipe]
    row = recipe_row(recipe)
    assert row["accelerate_config"].endswith(config) and row["model"] == model
    e = row["estimate"]
    assert e.context_length == context and e.total < 24 * GIB
    # what several GPUs buy: less per GPU, and a longer largest context than one GPU with the same settings
    one = recipe_row(recipe, parallel={})
    assert e.total < one["estimate"].total and row["max_context"] > one["max_context"]
    layout = parallelism_from_accelerate_config(config)
    assert (e.num_gpus, e.sharding, e.sp_size, e.offload) == tuple(
        layout[k] for k in ("num_gpus", "sharding", "sp_size", "offload")
    )
    text = open(recipe).read()
    assert f"accelerate launch --config_file {config} -m pi_peft train --config {recipe}" in text
    import yaml

    r = yaml.safe_load(text)
    assert r["bnb_4bit_quant_storage"] == r["dtype"] == "bfloat16"  # QLoRA under FSDP / ZeRO-3: one dtype to shard
    if e.sp_size > 1:  # the model's attention is the one Ulysses wraps
        sp_attn = yaml.safe_load(open(config))["parallelism_config"]["parallelism_config_sp_attn_implementation"]
        assert r["attn_implementation"] == sp_attn and not r.get("s2_attn") and r["context_length"] % e.sp_size == 0
    # the recipe's training arguments parse with pi-peft train's own parser (no key trl would reject)
    from pi_peft.cli.train import parse_train_args

    _, _, model_args, pi_args = parse_train_args(["--config", recipe, "--bf16", "false"])  # no bf16 GPU here
    assert model_args.bnb_4bit_quant_storage == "bfloat16" and pi_args.context_length == context


def test_explicit_flags_override_a_recipes_own_accelerate_config(capsys):
    recipe = "recipes/llama2-13b-32k-fsdp2.yaml"
    assert cli_main(["--recipes", recipe]) == 0
    own = capsys.readouterr().out
    assert "| GPUs |" in own and "2 x FSDP2" in own and "total (GiB) per GPU" in own
    assert cli_main(["--recipes", recipe, "--num-gpus", "4", "--zero3"]) == 0
    assert "4 x DeepSpeed ZeRO-3" in capsys.readouterr().out
    assert cli_main(["--recipes", recipe, "--num-gpus", "1"]) == 0  # the same recipe on one GPU
    one = capsys.readouterr().out
    assert "| GPUs |" not in one and one.split("\n")[2].split(" | ")[-2] == _gib_cell(recipe_row(recipe, parallel={}))


def _gib_cell(row) -> str:
    return f"{row['estimate'].total / GIB:.2f}"


def test_a_recipe_whose_accelerate_config_is_missing_is_named(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    text = open("recipes/llama3-8b-256k-sp8.yaml").read().replace("ulysses-zero3.yaml", "nope.yaml")
    recipe.write_text(text)
    with pytest.raises(ValueError, match=r"is launched with `accelerate launch --config_file recipes/accelerate/nope"
                       r".yaml` \(its header\), and .* is neither in the working directory nor at"):  # fmt: skip
        recipe_row(str(recipe))
    assert cli_main(["--recipes", str(recipe), "--accelerate-config", "recipes/accelerate/zero3.yaml"]) == 0
    assert "2 x DeepSpeed ZeRO-3" in capsys.readouterr().out  # an explicit config needs no header lookup


def test_bad_accelerate_configs_are_named(tmp_path):
    path = tmp_path / "cfg.yaml"
    for text, message in (
        ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 2}\n", r"`distributed_type: DEEPSPEED` with "
         r"`zero_stage: 2` is not a GPU layout the estimator models"),
        ("distributed_type: MULTI_CPU\n", r"`distributed_type: MULTI_CPU` is not a GPU layout"),
        ("num_processes: 2\n", r"has no `distributed_type`"),
        ("[1, 2", r"cannot be read as YAML"),
    ):  # fmt: skip
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"accelerate config {str(path)!r}.*{message}|{message}"):
            parallelism_from_accelerate_config(str(path))


if __name__ == "__main__" and sys.argv[1:] == ["--regenerate"]:
    with open(GOLDEN, "w", encoding="utf-8") as f:
        about = "single-GPU outputs of pi_peft.training.estimate (tests/test_estimate_multi_gpu.py --regenerate)"
        f.write(json.dumps({**single_gpu_outputs(), "_about": about}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


# ---- benchmarks/gpu_multi.py: the multi-GPU measurement script (not run here: no machine with 2 GPUs) -------------
def _gpu_multi():
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
    import gpu_multi

    return gpu_multi


@pytest.mark.parametrize("count", [0, 1])
def test_gpu_multi_without_two_gpus_exits_with_a_clear_message(count, monkeypatch, capsys, tmp_path):
    import torch

    gpu_multi = _gpu_multi()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    out = tmp_path / "gpu_multi.json"
    assert gpu_multi.main(["--json-out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"needs a machine with at least 2 CUDA GPUs; torch.cuda.device_count() is {count} here" in err
    assert not out.exists()  # nothing written without a measurement


def test_gpu_multi_plans_the_users_commands_for_each_config(tmp_path):
    """Each config's accelerate file loads with accelerate's loader and sets the layout it names; the worker's
    `pi-peft train` options parse with pi-peft train's parser; the estimate beside it is estimate_memory's."""
    from accelerate.commands.config.config_args import load_config_from_file

    from pi_peft.cli.train import parse_train_args

    gpu_multi = _gpu_multi()
    args = gpu_multi.parse_args(["--context-length", "65536", "--load-in-4bit"])
    config = dict(gpu_multi.GPU_BENCH_DIMS)
    assert set(args.configs) == {"fsdp2", "cp_ring", "ulysses_fa2", "zero3", "ddp"}
    for name in args.configs:
        path, flags = gpu_multi.accelerate_config(name, 8, str(tmp_path))
        cfg = load_config_from_file(path)
        assert flags[:2] == ["--num_processes", "8"]
        if name == "cp_ring":
            assert cfg.distributed_type.value == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
            assert cfg.parallelism_config == dict(parallelism_config_dp_shard_size=1, parallelism_config_cp_size=8,
                                                  parallelism_config_cp_backend="torch")  # fmt: skip
        if name == "ulysses_fa2":
            assert flags[2:] == ["--parallelism_config_sp_size", "8"] and cfg.distributed_type.value == "DEEPSPEED"
        argv = gpu_multi.train_argv(args, name, "some/model", "data.jsonl", str(tmp_path / "out"))
        _, training_args, model_args, pi_args = parse_train_args(argv + ["--bf16", "false"])
        assert (pi_args.context_length, training_args.max_steps, model_args.lora_r) == (65536, 5, 16)
        assert model_args.bnb_4bit_quant_storage == "bfloat16" and model_args.attn_implementation == (
            "flash_attention_2" if name == "ulysses_fa2" else "sdpa"
        )
        est = gpu_multi.estimate(name, config, args, 8)
        sharding = gpu_multi.CONFIGS[name]["sharding"]
        kw = dict(r=16, lora_dropout=0.0, train_embeddings=False, train_norms=False, tiled_mlp=True, num_gpus=8,
                  sharding=sharding, attention=gpu_multi.CONFIGS[name]["attention"])  # fmt: skip
        T = 65536 // 8 if name == "cp_ring" else 65536
        direct = estimate_memory(config, T, sp_size=8 if name == "ulysses_fa2" else 1, **kw)
        assert est["total"] == direct.total and est["without_cuda_overhead"] == direct.total - direct.overhead
        assert (est["note"] is not None) == (name == "cp_ring")
    # what cannot run is said, not swapped for something else
    import importlib.util

    no_fa2 = importlib.util.find_spec("flash_attn") is None
    reason = gpu_multi.skip_reason("ulysses_fa2", 8, args, 16) or ""
    assert ("flash-attn is not installed" in reason) == (no_fa2 and importlib.util.find_spec("deepspeed") is not None)
    assert "3 GPUs must divide the context length 32768 and the 16 heads" in gpu_multi.skip_reason(
        "cp_ring", 3, gpu_multi.parse_args([]), 16
    )
    assert gpu_multi.skip_reason("cp_ring", 3, gpu_multi.parse_args(["--context-length", "32769"]), 16)
    assert gpu_multi.skip_reason("fsdp2", 3, gpu_multi.parse_args([]), 16) is None


def test_gpu_multi_summary_is_the_peak_per_gpu_and_the_median_speed():
    gpu_multi = _gpu_multi()

    def steps(peak, times):  # allocated peaks rise by 1 per step: the last is the largest
        return [dict(time=t, allocated=peak - 10 + k, reserved=peak + 100) for k, t in enumerate(times)]

    result = dict(ranks=[dict(rank=1, steps=steps(500, [9.0, 2.0, 2.0, 2.2])),
                         dict(rank=0, steps=steps(700, [8.0, 1.0, 3.0, 2.0]))])  # fmt: skip
    s = gpu_multi.summarize(result, tokens_per_step=8192)
    assert s["peak_allocated_per_gpu"] == [693, 493] and s["peak_reserved_per_gpu"] == [800, 600]
    assert s["tokens_per_second"] == 8192 / 2.0  # rank 0's steps after the first: median of 1, 3, 2


def test_recipes_readme_tables_are_the_commands_output(capsys):
    """recipes/README.md's tables are what `pi-peft estimate --recipes recipes/*.yaml` (both tables) and
    `python recipes/check_estimate.py --engines recipes/llama3-8b-112k.yaml` print now."""
    readme = open("recipes/README.md").read()
    assert cli_main(["--recipes", *sorted(glob.glob("recipes/*.yaml"))]) == 0
    one, several = capsys.readouterr().out.strip().split("\n\n")
    assert one in readme and several in readme and "| GPUs |" in several and "| GPUs |" not in one
    assert _check_estimate_module().engines_table("recipes/llama3-8b-112k.yaml") in readme
