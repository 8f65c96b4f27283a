"""Crash-safe resume: SIGKILL a real training run after its first checkpoint, resume, compare with an unbroken run."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from _train_helpers import make_jsonl, make_tiny_llama
from safetensors.torch import load_file
from trl import SFTTrainer

from pi_peft.cli.train import parse_train_args
from pi_peft.training.sft import last_complete_checkpoint, main

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
