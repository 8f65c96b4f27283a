"""Crash-safe resume: SIGKILL a real training run after its first checkpoint, resume, compare with an unbroken run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from _train_helpers import make_jsonl, make_tiny_llama
from safetensors.torch import load_file
from trl import SFTTrainer

from pi_peft.cli.train import parse_train_args
from pi_peft.training.sft import (
    PIProgressCallback,
    is_complete_checkpoint,
    last_complete_checkpoint,
    main,
    resolve_resume,
)

MAX_STEPS, SAVE_STEPS = 8, 2


def _argv(model, data, output_dir, *extra):
    return [
        "--model_name_or_path", model, "--data_files", data, "--output_dir", str(output_dir),
        "--context_length", "128", "--lora_r", "4", "--lora_alpha", "8",
        "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS), "--logging_steps", "1",
        "--learning_rate", "1e-3", "--warmup_steps", "2", "--per_device_train_batch_size", "2", "--seed", "0",
        "--use_cpu", "--bf16", "false", "--dtype", "float32", *extra,
    ]  # fmt: skip


def _run_until_first_checkpoint_then_kill(argv, output_dir, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pi_peft.cli", "train", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + timeout
    try:
        while last_complete_checkpoint(str(output_dir)) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    return proc.returncode


def _pi_settings(path):
    config = json.load(open(os.path.join(path, "adapter_config.json")))
    return config["peft_type"], config["context_length"], config["scaling_factor"], config["original_context_length"]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    model = make_tiny_llama(str(tmp_path / "model"))
    data = make_jsonl(str(tmp_path / "data" / "train.jsonl"), n_docs=6, words_per_doc=120)
    killed, unbroken = tmp_path / "killed", tmp_path / "unbroken"

    assert _run_until_first_checkpoint_then_kill(_argv(model, data, killed), killed) == -signal.SIGKILL
    assert not os.path.exists(killed / "adapter_model.safetensors")  # it really died before the end
    first = last_complete_checkpoint(str(killed))
    assert int(first.split("-")[-1]) < MAX_STEPS

    done_at_kill = int(first.split("-")[-1])
    calls = []
    original_step = SFTTrainer.training_step
    monkeypatch.setattr(
        SFTTrainer, "training_step", lambda self, *a, **k: calls.append(1) or original_step(self, *a, **k)
    )
    resume = _argv(model, data, killed, "--resume_from_checkpoint", "true")
    resumed = main(*parse_train_args(resume))
    assert len(calls) == MAX_STEPS - done_at_kill and resumed.state.global_step == MAX_STEPS  # continued, not redone
    main(*parse_train_args(_argv(model, data, unbroken)))

    got = load_file(str(killed / "adapter_model.safetensors"))
    want = load_file(str(unbroken / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and any("lora_B" in k for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)

    checkpoints = sorted(p for d in (killed, unbroken) for p in d.iterdir() if p.name.startswith("checkpoint-"))
    assert len(checkpoints) >= 2 * MAX_STEPS // SAVE_STEPS - 1
    for path in [*checkpoints, killed, unbroken]:
        assert _pi_settings(path) == ("PI", 128, 2.0, 64), path


# ---- a finished run: a resume leaves it as it is (issue 19, items 4, 5, 13) -----------------------------------------
FINISHED_STEPS = 4


def _finished_argv(model, data, output_dir, *extra):
    return [
        "--model_name_or_path", model, "--data_files", data, "--output_dir", str(output_dir),
        "--context_length", "128", "--lora_r", "4", "--lora_alpha", "8",
        "--max_steps", str(FINISHED_STEPS), "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3",
        "--warmup_steps", "2", "--lr_scheduler_type", "constant_with_warmup",  # the recipes' schedule
        "--per_device_train_batch_size", "2", "--seed", "0", "--use_cpu", "--bf16", "false", "--dtype", "float32",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 4-step run (checkpoints at steps 2 and 4, final adapter), and the bytes of every file it wrote."""
    root = tmp_path_factory.mktemp("finished")
    model = make_tiny_llama(str(root / "model"))
    data = make_jsonl(str(root / "data" / "train.jsonl"), n_docs=6, words_per_doc=120)
    main(*parse_train_args(_finished_argv(model, data, root / "out")))
    return SimpleNamespace(model=model, data=data, out=root / "out", files=_contents(root / "out"))


def _contents(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    return out


def _count_steps(monkeypatch) -> list:
    calls = []
    original_step = SFTTrainer.training_step
    monkeypatch.setattr(
        SFTTrainer, "training_step", lambda self, *a, **k: calls.append(1) or original_step(self, *a, **k)
    )
    return calls


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_adapter(finished, tmp_path, monkeypatch, caplog):
    out = _copy(finished, tmp_path)
    calls = _count_steps(monkeypatch)
    for _ in range(2):  # re-running the finished command, twice
        result = main(
            *parse_train_args(_finished_argv(finished.model, finished.data, out, "--resume_from_checkpoint", "true"))
        )
        assert result is None and calls == []
    assert _contents(out) == finished.files  # no checkpoint-5, not one byte of the adapter changed
    assert "Nothing to resume" in caplog.text and "left as it is" in caplog.text


def test_crash_between_the_last_checkpoint_and_the_final_save_saves_that_checkpoint(finished, tmp_path, monkeypatch):
    out = _copy(finished, tmp_path)
    final = [name for name in finished.files if "/" not in name]
    for name in final:
        (out / name).unlink()  # killed after checkpoint-4, before the final adapter was written
    calls = _count_steps(monkeypatch)
    result = main(
        *parse_train_args(_finished_argv(finished.model, finished.data, out, "--resume_from_checkpoint", "true"))
    )
    assert result is None and calls == []  # no extra step
    got, want = _contents(out), dict(finished.files)
    assert json.loads(got.pop("training_args.json"))["output_dir"] == str(out)  # (the copy's own folder)
    want.pop("training_args.json")
    assert got == want  # the final adapter (and tokenizer, card) of the unbroken run, byte for byte


def test_resume_with_no_checkpoint_refuses_to_train_over_a_finished_adapter(finished, tmp_path):
    out = _copy(finished, tmp_path)
    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    argv = _finished_argv(finished.model, finished.data, out, "--resume_from_checkpoint", "true")
    with pytest.raises(ValueError, match=r"holds a finished adapter and no complete checkpoint to resume from"):
        main(*parse_train_args(argv))
    assert _contents(out) == {k: v for k, v in finished.files.items() if "/" not in k}


@pytest.mark.parametrize(
    "name, damage",
    [
        ("trainer_state.json", b""),  # killed as the Trainer opened it
        ("trainer_state.json", None),  # cut in half
        ("adapter_model.safetensors", None),
        ("adapter_config.json", b"{"),
        ("optimizer.pt", None),
        ("rng_state.pth", None),
    ],
)
def test_a_checkpoint_with_a_file_that_does_not_parse_is_incomplete(finished, tmp_path, name, damage, caplog):
    out = _copy(finished, tmp_path)
    file = out / "checkpoint-4" / name
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2] if damage is None else damage)
    assert not is_complete_checkpoint(str(out / "checkpoint-4"))
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert "Skipping incomplete checkpoint" in caplog.text and name.split(".")[0] in caplog.text
    with pytest.raises(ValueError, match=r"is not a complete checkpoint directory"):
        resolve_resume(str(out / "checkpoint-4"), str(out))


def test_resume_after_a_truncated_trainer_state_uses_the_previous_checkpoint(finished, tmp_path, monkeypatch):
    out = _copy(finished, tmp_path)
    (out / "checkpoint-4" / "trainer_state.json").write_bytes(b"")
    for name in [n for n in finished.files if "/" not in n]:
        (out / name).unlink()  # the run died while writing checkpoint-4
    calls = _count_steps(monkeypatch)
    trainer = main(
        *parse_train_args(_finished_argv(finished.model, finished.data, out, "--resume_from_checkpoint", "true"))
    )
    assert len(calls) == FINISHED_STEPS - 2 and trainer.state.global_step == FINISHED_STEPS
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(finished.out / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # bit-equal

    # item 13: the resumed run's throughput is measured from its own tokens (trl's count restarts at 0)
    logs = [e for e in trainer.state.log_history if "loss" in e and e["step"] > 2]
    assert len(logs) == 2 and all(e["tokens_per_second"] > 0 for e in logs)


def test_tokens_per_second_after_a_resume_counts_the_tokens_since_the_last_log(monkeypatch):
    from transformers import TrainerState

    import pi_peft.training.sft as sft

    clock = iter([100.0, 102.0, 106.0])
    monkeypatch.setattr(sft.time, "perf_counter", lambda: next(clock))
    progress = PIProgressCallback(128, 2.0, 64, tokens_per_step=256)
    state = TrainerState(global_step=4)  # resumed at step 4; trl's num_tokens restarts at 0
    progress.on_train_begin(None, state, None)
    state.global_step = 5
    logs = {"loss": 1.0, "num_tokens": 200}
    progress.on_log(None, state, None, logs=logs)
    assert logs["tokens_per_second"] == 100.0  # 200 tokens in 2 s
    state.global_step = 6
    logs = {"loss": 1.0, "num_tokens": 600}
    progress.on_log(None, state, None, logs=logs)
    assert logs["tokens_per_second"] == 100.0  # 400 more in 4 s
    state.global_step = 8
    logs = {"loss": 1.0}  # no trl count: the steps since the last log x tokens per step
    clock = iter([110.0])
    progress.on_log(None, state, None, logs=logs)
    assert logs["tokens_per_second"] == 128.0  # 2 x 256 tokens in 4 s


def test_a_fresh_run_into_a_finished_output_dir_is_refused(finished, tmp_path):
    out = _copy(finished, tmp_path)
    with pytest.raises(ValueError, match=r"already holds a run \(a final adapter and checkpoints at steps 2, 4\)"):
        main(*parse_train_args(_finished_argv(finished.model, finished.data, out)))
    assert _contents(out) == finished.files


def test_a_kill_during_the_final_save_leaves_no_temporary_folder_after_the_resume(finished, tmp_path):
    out = _copy(finished, tmp_path)
    for name in [n for n in finished.files if "/" not in n]:
        (out / name).unlink()
    stale = out / ".tmp-final-99999"  # what a process killed while moving the final adapter in leaves
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    main(*parse_train_args(_finished_argv(finished.model, finished.data, out, "--resume_from_checkpoint", "true")))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]
