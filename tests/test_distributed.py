"""Several processes: no silent fallback (pi_peft.training.distributed), and DDP / FSDP2 equal to one process.

The refusals are pure functions of (environment, arguments) and run in the default suite. The `slow` tests launch
2 CPU processes (gloo) with `python -m torch.distributed.run --nproc_per_node 2` (tests/dist_workers/common.py) and
compare one training step (loss, LoRA and trainable-embedding/norm gradients) with a one-process run on the same
global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from _train_helpers import make_jsonl, make_tiny_llama

from pi_peft.training.distributed import check_engine, check_launch, check_rope_across_ranks, deepspeed_config
from pi_peft.training.sft import PIModelConfig

TORCHRUN_CPU = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
# what `accelerate launch --cpu --num_processes 2 script.py` (accelerate 1.15) sets for its ONE process
ACCELERATE_CPU_2 = {
    "ACCELERATE_USE_CPU": "True",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_DYNAMO_BACKEND": "NO",
}
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}


def _args(**overrides):
    """The fields of a `TrainingArguments` that check_launch / check_engine read: `use_cpu`, `deepspeed`, `fsdp`."""
    return SimpleNamespace(**{"use_cpu": False, "deepspeed": None, "fsdp": None, **overrides})


# ---- check_launch: the launch ------------------------------------------------------------------------------------


def test_torchrun_on_cpu_without_use_cpu_is_refused():
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 but there is no GPU and neither `use_cpu` nor "):
        check_launch(_args(), env=TORCHRUN_CPU, cuda_available=False)
    check_launch(_args(use_cpu=True), env=TORCHRUN_CPU, cuda_available=False)  # gloo DDP: fine
    check_launch(_args(), env={**TORCHRUN_CPU, "ACCELERATE_USE_CPU": "true"}, cuda_available=False)
    check_launch(_args(), env=TORCHRUN_CPU, cuda_available=True)  # GPUs: accelerate builds MULTI_GPU
    check_launch(_args(), env={}, cuda_available=False)  # one plain process


def test_the_one_process_accelerate_cpu_launch_is_refused():
    with pytest.raises(RuntimeError, match=r"`accelerate launch` started ONE process \(WORLD_SIZE is not set\)"):
        check_launch(_args(use_cpu=True), env=ACCELERATE_CPU_2, cuda_available=False)
    one = {k: v for k, v in ACCELERATE_CPU_2.items() if not k.startswith("MASTER_")}  # `--num_processes 1`
    check_launch(_args(use_cpu=True), env=one, cuda_available=False)
    check_launch(_args(use_cpu=True), env={**ACCELERATE_CPU_2, **TORCHRUN_CPU}, cuda_available=False)  # --multi_gpu


def test_world_size_must_be_a_positive_integer():
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' is not a positive integer"):
        check_launch(_args(), env={"WORLD_SIZE": "two"}, cuda_available=False)


def test_pi_peft_train_refuses_a_cpu_torchrun_launch_before_loading(monkeypatch, tmp_path):
    from pi_peft.cli.train import parse_train_args
    from pi_peft.training.sft import main

    missing = tmp_path / "no-such-model"  # the refusal comes before anything is read or loaded
    argv = ["--model_name_or_path", str(missing), "--output_dir", str(tmp_path / "out"), "--dtype", "float32"]
    parsed = parse_train_args(argv + ["--bf16", "false"])  # parsed in one process: TrainingArguments sets up devices
    for name, value in TORCHRUN_CPU.items():  # then main() sees a 2-process torchrun launch on CPU
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on any CPU machine
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 but there is no GPU .* Pass `--use_cpu`"):
        main(*parsed)
    assert not (tmp_path / "out").exists()


# ---- check_launch: engine settings that would lose something ----------------------------------------------------


def test_deepspeed_on_cpu_is_not_refused_by_check_launch():
    # `Trainer(deepspeed=..., use_cpu=True)` under a 2-process torchrun builds DistributedType.DEEPSPEED (tried with
    # transformers 5.2x, accelerate 1.15, deepspeed 0.19); an engine other than DeepSpeed is refused by check_engine
    check_launch(_args(use_cpu=True, deepspeed=ZERO3), env=TORCHRUN_CPU, cuda_available=False)
    check_launch(_args(deepspeed=ZERO3), env=TORCHRUN_CPU, cuda_available=False)  # DeepSpeed's own CPU accelerator


def test_zero3_without_16bit_weights_on_save_is_refused(tmp_path):
    bad = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match=r"`stage3_gather_16bit_weights_on_model_save`=None: the final adapter"):
        check_launch(_args(deepspeed=bad), env=TORCHRUN_CPU, cuda_available=True)
    path = tmp_path / "zero3.json"
    path.write_text(
        json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}})
    )
    with pytest.raises(ValueError, match=r"ZeRO-3 \(`deepspeed`='.*zero3.json'\) has .*=False"):
        check_launch(_args(deepspeed=str(path)), env=TORCHRUN_CPU, cuda_available=True)
    # accelerate's DeepSpeed config, exported by `accelerate launch` (zero3_save_16bit_model: false)
    env = {**TORCHRUN_CPU, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    with pytest.raises(ValueError, match=r"ACCELERATE_DEEPSPEED_\* .*`zero3_save_16bit_model: true`"):
        check_launch(_args(), env={**env, "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false"}, cuda_available=True)
    check_launch(_args(), env={**env, "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}, cuda_available=True)
    check_launch(_args(deepspeed=ZERO3), env=TORCHRUN_CPU, cuda_available=True)
    check_launch(_args(deepspeed={"zero_optimization": {"stage": 2}}), env=TORCHRUN_CPU, cuda_available=True)
    auto = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": "auto"}}
    with pytest.raises(ValueError, match=r"=\'auto\': the final adapter"):
        check_launch(_args(deepspeed=auto), env=TORCHRUN_CPU, cuda_available=True)
    save16 = {**TORCHRUN_CPU, "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}
    check_launch(_args(deepspeed=auto), env=save16, cuda_available=True)


def test_unreadable_deepspeed_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"`deepspeed`='.*missing.json' is not a readable JSON file \(.*No such file"):
        deepspeed_config(_args(deepspeed=str(tmp_path / "missing.json")), env={})
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"holds a JSON list, not a DeepSpeed config \(an object\); pass the path"):
        deepspeed_config(_args(deepspeed=str(tmp_path / "list.json")), env={})
    with pytest.raises(ValueError, match=r"`zero_optimization.stage`='three'"):
        check_launch(_args(deepspeed={"zero_optimization": {"stage": "three"}}), env={}, cuda_available=True)


def test_qlora_fsdp_needs_quant_storage_equal_to_the_compute_dtype():
    qlora = PIModelConfig(load_in_4bit=True)  # dtype bfloat16, bnb_4bit_quant_storage unset (uint8)
    with pytest.raises(ValueError, match=r"`bnb_4bit_quant_storage`=None with `load_in_4bit` and FSDP \(`fsdp`="):
        check_launch(_args(fsdp="full_shard"), qlora, env=TORCHRUN_CPU, cuda_available=True)
    uint8 = PIModelConfig(load_in_4bit=True, bnb_4bit_quant_storage="uint8")
    fsdp_env = {**TORCHRUN_CPU, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    with pytest.raises(ValueError, match=r"'uint8' .*ACCELERATE_USE_FSDP=true.*--bnb_4bit_quant_storage bfloat16"):
        check_launch(_args(), uint8, env=fsdp_env, cuda_available=True)
    same = PIModelConfig(load_in_4bit=True, bnb_4bit_quant_storage="bfloat16")
    check_launch(_args(fsdp="full_shard"), same, env=TORCHRUN_CPU, cuda_available=True)
    check_launch(_args(), qlora, env=TORCHRUN_CPU, cuda_available=True)  # DDP QLoRA: no storage constraint


# ---- check_engine / check_rope_across_ranks -----------------------------------------------------------------------


def _built(distributed_type, num_processes, **args):
    """What check_engine reads of a trainer: its accelerator's engine and its arguments."""
    accelerator = SimpleNamespace(distributed_type=distributed_type, num_processes=num_processes)
    return SimpleNamespace(accelerator=accelerator, args=_args(**args))


def test_check_engine_refuses_an_engine_other_than_the_one_asked_for():
    from accelerate.utils import DistributedType

    with pytest.raises(RuntimeError, match=r"FSDP was asked for \(ACCELERATE_USE_FSDP=true .*built .*MULTI_CPU"):
        check_engine(_built(DistributedType.MULTI_CPU, 2), env={**TORCHRUN_CPU, "ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(RuntimeError, match=r"FSDP was asked for \(`fsdp`='full_shard'\)"):
        check_engine(_built(DistributedType.MULTI_CPU, 2, fsdp="full_shard"), env=TORCHRUN_CPU)
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 but accelerate built a 1-process .*NO engine"):
        check_engine(_built(DistributedType.NO, 1), env=TORCHRUN_CPU)
    with pytest.raises(RuntimeError, match=r"DeepSpeed was asked for .* but accelerate built .*MULTI_CPU"):
        check_engine(_built(DistributedType.MULTI_CPU, 2, deepspeed=ZERO3), env=TORCHRUN_CPU)
    check_engine(_built(DistributedType.MULTI_CPU, 2), env=TORCHRUN_CPU)
    check_engine(_built(DistributedType.FSDP, 2, fsdp="full_shard"), env=TORCHRUN_CPU)
    check_engine(_built(DistributedType.DEEPSPEED, 2, deepspeed=ZERO3), env=TORCHRUN_CPU)


def test_check_engine_passes_the_one_process_trainer_it_is_given(tmp_path, tiny_tokenizer):
    from _train_helpers import tiny_sft_trainer
    from datasets import Dataset

    trainer = tiny_sft_trainer(tmp_path, tiny_tokenizer, None, Dataset.from_dict({"text": ["the sky is blue"] * 2}))
    check_engine(trainer, env={})
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 but accelerate built a 1-process"):
        check_engine(trainer, env=TORCHRUN_CPU)


def test_check_rope_across_ranks_is_a_no_op_in_one_process():
    from peft import get_peft_model

    from pi_peft.testing import tiny_model
    from pi_peft.tuners.pi.config import PIConfig

    assert not torch.distributed.is_initialized()
    model = get_peft_model(tiny_model(), PIConfig(context_length=128, r=4, target_modules=["q_proj"]))
    assert check_rope_across_ranks(model) == 1


# ---- 2 processes (gloo): DDP and FSDP2 equal to one process; silent fallbacks refused in real launches ----------

WORKER = os.path.join(os.path.dirname(__file__), "dist_workers", "ddp_fsdp.py")
RTOL = 1e-5


@pytest.fixture(scope="module")
def dist_assets(tmp_path_factory):
    """A tiny Llama (window 64), a jsonl that packs into exactly 2 windows of 128 tokens (the global batch: one row
    per rank with 2 processes, both rows in one process) and those 2 rows as a safetensors file."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from pi_peft.training.data import load_raw_dataset, prepare_train_dataset

    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_llama(str(root / "model"))
    data = make_jsonl(str(root / "data" / "train.jsonl"), n_docs=1, words_per_doc=50)
    windows, _ = prepare_train_dataset(
        load_raw_dataset(None, data_files=[data]), AutoTokenizer.from_pretrained(model), 128
    )
    assert len(windows) == 2
    rows = torch.tensor(windows["input_ids"])
    save_file({"input_ids": rows}, str(root / "batch.safetensors"))
    return SimpleNamespace(root=root, model=model, data=data, batch=str(root / "batch.safetensors"), rows=rows)


def _train_argv(assets, output_dir, batch_size, *extra):
    return [
        "--model_name_or_path", assets.model, "--data_files", assets.data, "--output_dir", str(output_dir),
        "--context_length", "128", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
        "--max_steps", "1", "--logging_steps", "1", "--save_strategy", "no", "--learning_rate", "1e-3",
        "--warmup_steps", "0", "--max_grad_norm", "0", "--per_device_train_batch_size", str(batch_size),
        "--seed", "0", "--bf16", "false", "--dtype", "float32", "--report_to", "none", *extra,
    ]  # fmt: skip


def _check_adapter(output_dir, logits):
    """The saved adapter loads as a PI adapter (factor 2, window 128) whose outputs equal the trained model's."""
    from dist_workers.ddp_fsdp import LOGIT_IDS
    from peft import AutoPeftModelForCausalLM

    names = os.listdir(output_dir)
    assert "adapter_config.json" in names and not [n for n in names if n.startswith(".tmp")], names
    config = json.load(open(os.path.join(output_dir, "adapter_config.json")))
    assert config["peft_type"] == "PI" and config["context_length"] == 128 and config["scaling_factor"] == 2.0
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(output_dir)).eval()
    assert loaded.config.rope_parameters["factor"] == 2.0
    with torch.no_grad():
        got = loaded(input_ids=LOGIT_IDS, use_cache=False).logits[0]
    torch.testing.assert_close(got.double(), logits, rtol=1e-5, atol=1e-5)


def _report(name, two, one, errors):
    print(
        f"\n{name}: loss {two[0]['loss']:.6f} vs {one[0]['loss']:.6f}, max grad rel error {max(errors.values()):.2e} "
        f"over {len(errors)} tensors; wall 2 procs {two[0]['wall_s']:.0f} s, 1 proc {one[0]['wall_s']:.0f} s"
    )


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_through_pi_peft_train(dist_assets, tmp_path):
    from dist_workers.common import compare_grads, launch, rel_error

    two = launch(WORKER, 2, ["train", *_train_argv(dist_assets, tmp_path / "two", 1, "--use_cpu")], tmp_path / "r2")
    one = launch(WORKER, 1, ["train", *_train_argv(dist_assets, tmp_path / "one", 2, "--use_cpu")], tmp_path / "r1")
    for rank, result in enumerate(two):  # the engine: 2 processes, accelerate's gloo DDP
        assert (result["rank"], result["world_size"], result["num_processes"]) == (rank, 2, 2)
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["wrapped"] == "DistributedDataParallel" and result["rope_factor"] == 2.0
    assert one[0]["num_processes"] == 1 and one[0]["wrapped"] == "PeftModelForCausalLM"
    # same global batch: one row on each rank, both rows in the one process
    assert len(two[0]["rows"]) == len(two[1]["rows"]) == 1 and two[0]["rows"] != two[1]["rows"]
    assert sorted(two[0]["rows"] + two[1]["rows"]) == sorted(one[0]["rows"]) == sorted(dist_assets.rows.tolist())
    assert rel_error(two[0]["loss"], one[0]["loss"]) <= RTOL
    compare_grads(two[1]["grads"], two[0]["grads"], rtol=0.0)  # DDP: the all-reduced gradients, bit-equal on ranks
    errors = compare_grads(two[0]["grads"], one[0]["grads"], rtol=RTOL, min_nonzero=len(one[0]["grads"]))
    assert any("lora_A" in n for n in errors) and any("embed_tokens" in n for n in errors)
    _report("DDP", two, one, errors)
    _check_adapter(tmp_path / "two", two[0]["logits"]["logits"])


def _fsdp2(assets, tmp_path, *extra):
    from dist_workers.common import compare_grads, launch, rel_error

    runs = {}
    for nproc in (2, 1):
        args = ["fsdp2", assets.model, assets.batch, str(tmp_path / f"adapter{nproc}"), *extra]
        runs[nproc] = launch(WORKER, nproc, args, tmp_path / f"r{nproc}")
    two, one = runs[2], runs[1]
    for rank, result in enumerate(two):  # the engine: 2 processes, every parameter a DTensor sharded on dim 0
        assert (result["rank"], result["world_size"], result["sharded"]) == (rank, 2, True)
        assert result["placements"] == ["(Shard(dim=0),)"] and result["rope_factor"] == 2.0
        assert result["local_rows"] == [assets.rows[rank].tolist()]
    assert one[0]["sharded"] is False and one[0]["local_rows"] == assets.rows.tolist()
    assert rel_error(two[0]["loss"], one[0]["loss"]) <= RTOL and two[0]["loss"] == two[1]["loss"]
    errors = compare_grads(two[0]["grads"], one[0]["grads"], rtol=RTOL, min_nonzero=len(one[0]["grads"]))
    compare_grads(two[1]["grads"], two[0]["grads"], rtol=0.0)
    assert any("lora_A" in n for n in errors) and any("embed_tokens" in n for n in errors)
    return two, one, errors


@pytest.mark.slow
def test_fsdp2_fully_shard_two_processes_equal_one_process(dist_assets, tmp_path):
    two, one, errors = _fsdp2(dist_assets, tmp_path)
    _report("FSDP2", two, one, errors)
    _check_adapter(tmp_path / "adapter2", two[0]["logits"]["logits"])


@pytest.mark.slow
def test_fsdp2_qlora_two_processes_equal_one_process(dist_assets, tmp_path):
    pytest.importorskip("bitsandbytes", reason="pip install bitsandbytes")
    two, one, errors = _fsdp2(dist_assets, tmp_path, "--qlora")
    assert two[0]["4bit"] == one[0]["4bit"] == 14  # 7 linear layers x 2 decoder layers in NF4
    _report("FSDP2 QLoRA", two, one, errors)
    from dist_workers.ddp_fsdp import LOGIT_IDS, qlora_config
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pi_peft.ops.bnb import fix_bnb_cpu_repack

    quant = qlora_config()
    base = AutoModelForCausalLM.from_pretrained(dist_assets.model, quantization_config=quant, device_map="cpu")
    fix_bnb_cpu_repack(base)  # the training-safe 4-bit kernel, as in the worker
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter2")).eval()
    assert loaded.config.rope_parameters["factor"] == 2.0
    with torch.no_grad():
        got = loaded(input_ids=LOGIT_IDS, use_cache=False).logits[0]
    torch.testing.assert_close(got.double(), two[0]["logits"]["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torchrun_without_use_cpu_is_refused_before_loading(dist_assets, tmp_path):
    from dist_workers.common import launch_process

    argv = _train_argv(dist_assets, tmp_path / "out", 1)  # no --use_cpu, and ACCELERATE_USE_CPU removed
    proc = launch_process("-m", 2, ["pi_peft", "train", *argv], tmp_path / "r", env={"ACCELERATE_USE_CPU": None})
    assert proc.returncode != 0
    assert proc.stdout.count("RuntimeError: WORLD_SIZE=2 but there is no GPU and neither `use_cpu`") == 2, proc.stdout
    assert not (tmp_path / "out").exists()  # refused before anything was written (or a model loaded)


@pytest.mark.slow
def test_accelerate_fsdp_config_on_cpu_is_refused_not_run_as_ddp(dist_assets, tmp_path):
    from dist_workers.common import launch_process

    argv = _train_argv(dist_assets, tmp_path / "out", 1, "--use_cpu")
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what an accelerate FSDP2 config exports
    proc = launch_process("-m", 2, ["pi_peft", "train", *argv], tmp_path / "r", env=env)
    assert proc.returncode != 0
    assert "RuntimeError: FSDP was asked for (ACCELERATE_USE_FSDP=true" in proc.stdout, proc.stdout[-3000:]
    assert "silently replicates the model as DDP" in proc.stdout
    assert not os.path.exists(tmp_path / "out" / "adapter_config.json")


@pytest.mark.slow
def test_accelerate_launch_cpu_with_two_processes_is_refused(dist_assets, tmp_path):
    from dist_workers.common import child_env

    pytest.importorskip("accelerate.commands.launch")
    argv = _train_argv(dist_assets, tmp_path / "out", 1, "--use_cpu")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    cmd += ["--main_process_port", "0", "-m", "pi_peft", "train", *argv]
    env = child_env(tmp_path / "r", {"ACCELERATE_USE_CPU": None})
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode != 0
    assert proc.stdout.count("RuntimeError: `accelerate launch` started ONE process") == 1, proc.stdout[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pi_on_one_rank_only_is_refused_on_every_rank(dist_assets, tmp_path):
    from dist_workers.common import launch

    results = launch(WORKER, 2, ["rope-mismatch", dist_assets.model], tmp_path / "r")
    for result in results:
        assert result["error"] is not None and result["error"].startswith("RoPE differs across ranks: ")
        assert "`model.rotary_emb.inv_freq` on rank 1 differs from rank 0's" in result["error"]


@pytest.mark.slow
def test_ddp_resume_after_a_crash_before_the_final_save_and_a_finished_run(dist_assets, tmp_path):
    from dist_workers.common import launch_process

    out = tmp_path / "out"
    argv = _train_argv(dist_assets, out, 1, "--use_cpu", "--max_steps", "2", "--save_strategy", "steps")
    argv += ["--save_steps", "1", "--resume_from_checkpoint", "true"]

    def run(name):
        proc = launch_process("-m", 2, ["pi_peft", "train", *argv], tmp_path / name)
        assert proc.returncode == 0, f"{name}: {proc.stdout[-6000:]}"
        return proc

    def files():
        return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    run("first")  # 2 steps in 2 processes, checkpoints at steps 1 and 2, then the final adapter
    checkpoint = (out / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    assert files()["adapter_model.safetensors"] == checkpoint  # the final save: the same model as the last checkpoint
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (out / name).unlink()  # what a kill between the last checkpoint and the final save leaves
    proc = run("resumed")
    assert proc.stdout.count("Nothing to resume") == 1  # logged by the main process only
    assert files()["adapter_model.safetensors"] == checkpoint and (out / "adapter_config.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]
    before = files()
    proc = run("again")  # a finished run: nothing trained, nothing rewritten
    assert proc.stdout.count("Nothing to resume") == 1 and files() == before


@pytest.mark.slow  # two 2-process trainings: ~1-2 min on 2 cores
def test_ddp_kill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(dist_assets, tmp_path):
    """What a kill mid-run leaves (checkpoint-1 complete, checkpoint-2 half-written, no final adapter) resumes under
    2 processes to the same final adapter, byte for byte, as a run that was never interrupted."""
    import shutil

    from dist_workers.common import launch_process

    def run(out, name):
        argv = _train_argv(dist_assets, out, 1, "--use_cpu", "--max_steps", "2", "--save_strategy", "steps")
        argv += ["--save_steps", "1", "--resume_from_checkpoint", "true"]
        proc = launch_process("-m", 2, ["pi_peft", "train", *argv], tmp_path / name)
        assert proc.returncode == 0, f"{name}: {proc.stdout[-6000:]}"
        return proc

    reference = tmp_path / "reference"
    run(reference, "uninterrupted")
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(reference / "checkpoint-1", killed / "checkpoint-1")
    (killed / "checkpoint-2").mkdir()  # the kill came while the Trainer was writing checkpoint-2
    shutil.copy2(reference / "checkpoint-2" / "adapter_config.json", killed / "checkpoint-2")
    proc = run(killed, "resumed")
    assert proc.stdout.count("Skipping incomplete checkpoint") == 1, proc.stdout[-6000:]  # main process only
    name = "adapter_model.safetensors"
    assert (killed / name).read_bytes() == (reference / name).read_bytes()
    config, want = (json.loads((d / "adapter_config.json").read_text()) for d in (killed, reference))
    for key in ("target_modules", "modules_to_save"):  # sets in peft: their JSON order follows the hash seed
        config[key], want[key] = (sorted(c[key]) if c[key] else c[key] for c in (config, want))
    assert config == want
    assert not [p.name for p in killed.iterdir() if p.name.startswith(".tmp")]
