"""Kill/resume soak of `pi-peft train`: `kill -9` at random points, resume, compare with an uninterrupted run.

Each trial starts a fresh `pi-peft train` (tiny Llama, 8 steps, a checkpoint every 2) in its own process and kills it
with SIGKILL at one point:

- `time`: from outside (`kill -9`), after a random delay while it trains;
- `write`: from inside, halfway through writing one file of checkpoint-N (`trainer_state.json`, `optimizer.pt`,
  `adapter_model.safetensors`): the first half of the bytes is on disk, then the process gets SIGKILL;
- `before-final`: after the last checkpoint (step 8), before the final adapter is saved;
- `mid-final`: while the final adapter's files are being moved into `output_dir` (some moved, some not);
- `finished`: not killed; the run finishes (the re-runs below must then change nothing).

Then it resumes (`--resume_from_checkpoint true`) to the end, and runs the same command once more. A trial passes when
the final `adapter_model.safetensors` is byte-identical to the uninterrupted run's, and the extra run trains no step,
adds no checkpoint and leaves every byte and modification time of the finished adapter as it was.

`--chain` puts ten kill points along one run instead (each later one hits the resumed run; 13 processes rather than
30): a random-time kill before each of the three mid-write kills, one more random-time kill, one before and one during
the final save, and one during a re-run of the finished command; then the same two checks.

```bash
OMP_WAIT_POLICY=PASSIVE python -u benchmarks/kill_resume_soak.py --chain --seed 0 \
    --json-out benchmarks/results/kill_resume_soak.json
OMP_WAIT_POLICY=PASSIVE python benchmarks/kill_resume_soak.py --trials 10 --seed 0
```
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_STEPS, SAVE_STEPS = 8, 2
WRITE_FILES = ("trainer_state.json", "optimizer.pt", "adapter_model.safetensors")
SPECIFIC = [("write", f) for f in WRITE_FILES] + [("before-final", None), ("mid-final", None), ("finished", None)]


def train_argv(model: str, data: str, output_dir: str, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model, "--data_files", data, "--output_dir", output_dir,
        "--context_length", "128", "--lora_r", "4", "--lora_alpha", "8",
        "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS), "--logging_steps", "1",
        "--learning_rate", "1e-3", "--warmup_steps", "2", "--lr_scheduler_type", "constant_with_warmup",
        "--per_device_train_batch_size", "2", "--seed", "0", "--use_cpu", "--bf16", "false", "--dtype", "float32",
        *extra,
    ]  # fmt: skip


# ---- the child: `pi-peft train` with a SIGKILL planted at one point -------------------------------------------------
def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half_then_die(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    _die()


def plant(kind: str, step: Optional[int], file: Optional[str]) -> None:
    """Install the kill point `kind` in this process (see the module docstring)."""
    import io

    import peft.peft_model  # noqa: F401
    import peft.utils.save_and_load  # noqa: F401
    import safetensors.torch
    import torch
    import transformers.trainer
    from transformers import TrainerState

    import pi_peft.training.sft as sft

    target = f"checkpoint-{step}"

    def in_target(path: str) -> bool:
        return os.path.basename(os.path.dirname(os.path.abspath(path))) == target

    if kind == "write" and file == "trainer_state.json":
        original = TrainerState.save_to_json

        def save_to_json(self, json_path):
            if in_target(json_path):
                original(self, json_path + ".whole")
                with open(json_path + ".whole", "rb") as f:
                    whole = f.read()
                os.remove(json_path + ".whole")
                _write_half_then_die(json_path, whole)
            return original(self, json_path)

        TrainerState.save_to_json = save_to_json
    elif kind == "write" and file == "optimizer.pt":
        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and str(f).endswith("optimizer.pt") and in_target(str(f)):
                buffer = io.BytesIO()
                original_save(obj, buffer, *args, **kwargs)
                _write_half_then_die(str(f), buffer.getvalue())
            return original_save(obj, f, *args, **kwargs)

        torch.save = save
        transformers.trainer.torch.save = save
    elif kind == "write" and file == "adapter_model.safetensors":
        original_file = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            if str(filename).endswith("adapter_model.safetensors") and in_target(str(filename)):
                _write_half_then_die(str(filename), safetensors.torch.save(tensors, metadata=metadata))
            return original_file(tensors, filename, metadata=metadata)

        safetensors.torch.save_file = save_file
        for module in list(sys.modules.values()):  # peft binds it as `safe_save_file` in several modules
            for name in ("safe_save_file", "save_file"):
                if getattr(module, name, None) is original_file:
                    setattr(module, name, save_file)
    elif kind == "before-final":
        sft.save_adapter = lambda *a, **k: _die()
    elif kind == "mid-final":
        original_replace = os.replace
        moved = []

        def replace(src, dst, *args, **kwargs):
            if ".tmp-final-" in str(src):
                if len(moved) == 2:
                    _die()
                moved.append(dst)
            return original_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif kind not in ("time", "finished", "none"):
        raise ValueError(f"unknown kill point {kind!r}")


def child(argv: list[str]) -> int:
    kind, step, file = argv[0], argv[1], argv[2]
    plant(kind, int(step) if step != "-" else None, None if file == "-" else file)
    from pi_peft.cli import main

    return main(["train", *argv[3:]])


# ---- the parent --------------------------------------------------------------------------------------------------
def run_train(argv: list[str], kind: str = "none", step: Optional[int] = None, file: Optional[str] = None,
              delay: Optional[float] = None, timeout: float = 900,
              from_launch: bool = False) -> tuple[int, Optional[float]]:  # fmt: skip
    """Run the child; with `delay`, SIGKILL it `delay` s after the first checkpoint folder that was not there at
    launch appeared (or after launch: `from_launch`). Returns the exit code and the seconds from that moment to the
    end (`None` when it never came)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, str(step or "-"), file or "-", *argv]
    output_dir = argv[argv.index("--output_dir") + 1]
    existing = set(os.listdir(output_dir)) if os.path.isdir(output_dir) else set()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        started, deadline = (time.time() if from_launch else None), time.time() + timeout
        while proc.poll() is None:
            if started is None and os.path.isdir(output_dir):
                if any(n.startswith("checkpoint-") and n not in existing for n in os.listdir(output_dir)):
                    started = time.time()
            if delay is not None and started is not None and time.time() - started >= delay:
                os.kill(proc.pid, signal.SIGKILL)
            if time.time() > deadline:
                proc.kill()
                raise TimeoutError(f"`pi-peft train` ran past {timeout} s")
            time.sleep(0.005)
        proc.wait()
        if proc.returncode not in (0, -signal.SIGKILL):
            err.seek(0)
            raise RuntimeError(f"`pi-peft train` failed ({proc.returncode}): {err.read().decode()[-2000:]}")
    return proc.returncode, None if started is None else time.time() - started


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(output_dir: str) -> dict[str, Any]:
    """Every file directly in `output_dir` (the final adapter): sha256 and mtime; and the checkpoint folders."""
    files = {
        name: (digest(os.path.join(output_dir, name)), os.stat(os.path.join(output_dir, name)).st_mtime_ns)
        for name in sorted(os.listdir(output_dir))
        if os.path.isfile(os.path.join(output_dir, name))
    }
    checkpoints = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-"))
    return {"files": files, "checkpoints": checkpoints}


def state_at_kill(output_dir: str) -> dict[str, Any]:
    from pi_peft.training.sft import checkpoint_problem, has_final_adapter

    if not os.path.isdir(output_dir):
        return {"checkpoints": {}, "final_adapter": False}
    names = sorted((n for n in os.listdir(output_dir) if n.startswith("checkpoint-")), key=lambda n: int(n[11:]))
    return {
        "checkpoints": {n: checkpoint_problem(os.path.join(output_dir, n)) or "complete" for n in names},
        "final_adapter": has_final_adapter(output_dir),
    }


def plan(trials: int, rng: random.Random, window_s: float) -> list[dict[str, Any]]:
    """`trials` kill points: the specific ones (each write at a random checkpoint), the rest at random times within
    `window_s` (how long the uninterrupted run trained after its first checkpoint)."""
    points = []
    for kind, file in SPECIFIC[:trials]:
        step = rng.choice(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)) if kind == "write" else None
        points.append({"kind": kind, "file": file, "step": step})
    while len(points) < trials:
        points.append({"kind": "time", "delay_s": round(rng.uniform(0.0, window_s), 3)})
    rng.shuffle(points)
    return points


def latest_complete_step(output_dir: str) -> int:
    from pi_peft.training.sft import last_complete_checkpoint

    found = last_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    return int(found.split("-")[-1]) if found else 0


def chain_plan(rng: random.Random, window_s: float) -> list[dict[str, Any]]:
    """Ten kill points along ONE run, in the order it reaches them (each later one hits the resumed run): a kill at a
    random time before each mid-write kill of a checkpoint file, one before and one during the final save, and one
    during a re-run of the finished command."""
    files = list(WRITE_FILES)
    rng.shuffle(files)
    points = []
    for file in files:
        points.append({"kind": "time", "delay_s": round(rng.uniform(0.0, min(1.0, window_s / 4)), 3)})
        points.append({"kind": "write", "file": file})  # at a checkpoint the run has not reached yet (chosen then)
    points += [{"kind": "time", "delay_s": round(rng.uniform(0.0, min(1.0, window_s / 4)), 3)}]
    points += [{"kind": "before-final"}, {"kind": "mid-final"}]
    points += [{"kind": "rerun-time", "delay_s": round(rng.uniform(0.0, 10.0), 3)}]
    return points


def chain(model: str, data: str, work: str, reference: str, window_s: float, rng: random.Random) -> dict[str, Any]:
    """Run :func:`chain_plan` on one output folder, then resume to the end and re-run the finished command. When a
    kill came after the run's end (a random time can), the next point starts a new folder (a segment), whose final
    adapter must be bit-equal too."""
    from pi_peft.training.sft import has_final_adapter

    segments, rows = [], []

    def new_segment() -> str:
        folder = os.path.join(work, f"chain-{len(segments)}")
        shutil.rmtree(folder, ignore_errors=True)
        segments.append({"folder": folder})
        return folder

    out = new_segment()
    for i, point in enumerate(chain_plan(rng, window_s)):
        if point["kind"] != "rerun-time" and has_final_adapter(out):
            # a kill came after the end: this run is finished, so the next point needs a new one
            segments[-1]["bit_equal"] = digest(os.path.join(out, "adapter_model.safetensors")) == reference
            out = new_segment()
        fresh = not os.path.isdir(out)
        argv = train_argv(model, data, out, *([] if fresh else ["--resume_from_checkpoint", "true"]))
        if point["kind"] == "write":
            left = [s for s in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS) if s > latest_complete_step(out)]
            if not left:
                rows.append({**point, "killed": False, "skipped": "no checkpoint left to write"})
                continue
            point["step"] = rng.choice(left[:2])
        if point["kind"] == "rerun-time":
            run_train(argv)  # first to the end: this point kills a re-run of the finished command
            finished = snapshot(out)
        rerun = point["kind"] == "rerun-time"
        kind = "time" if rerun else point["kind"]
        code, _ = run_train(argv, kind, point.get("step"), point.get("file"), point.get("delay_s"), from_launch=rerun)
        row = {**point, "segment": len(segments) - 1, "killed": code == -signal.SIGKILL, "at_kill": state_at_kill(out)}
        if point["kind"] == "rerun-time":
            row["finished_adapter_unchanged"] = snapshot(out) == finished
        rows.append(row)
        print(f"kill {i}: {point} killed={row['killed']} at kill: {row['at_kill']}", flush=True)
    resume = train_argv(model, data, out, "--resume_from_checkpoint", "true")
    run_train(resume)
    final = snapshot(out)
    run_train(resume)
    again = snapshot(out)
    segments[-1]["bit_equal"] = final["files"].get("adapter_model.safetensors", ("missing",))[0] == reference
    bit_equal = all(segment["bit_equal"] for segment in segments)
    result = {
        "segments": segments,
        "kills": rows,
        "n_killed": sum(r["killed"] for r in rows),
        "bit_equal": bit_equal,
        "rerun_changed_nothing": again == final,
        "finished_adapter_unchanged_by_killed_rerun": rows[-1].get("finished_adapter_unchanged"),
        "checkpoints": final["checkpoints"],
    }
    result["ok"] = bool(bit_equal and result["rerun_changed_nothing"] and result[
        "finished_adapter_unchanged_by_killed_rerun"] is not False)  # fmt: skip
    return result


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--points", default=None, help="comma-separated kill points for the trials (e.g. mid-final)")
    parser.add_argument(
        "--chain", action="store_true", help="ten kill points along one run (13 processes) instead of `--trials`"
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from _train_helpers import make_jsonl, make_tiny_llama

    work = args.workdir or tempfile.mkdtemp(prefix="pi-peft-soak-")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    model = make_tiny_llama(os.path.join(work, "model"))
    data = make_jsonl(os.path.join(work, "data", "train.jsonl"), n_docs=6, words_per_doc=120)
    reference_dir = os.path.join(work, "reference")
    shutil.rmtree(reference_dir, ignore_errors=True)
    _, window_s = run_train(train_argv(model, data, reference_dir))
    reference = digest(os.path.join(reference_dir, "adapter_model.safetensors"))
    print(f"uninterrupted run: adapter sha256 {reference[:16]}, {window_s:.2f} s from its first checkpoint to exit")

    if args.chain:
        result = chain(model, data, work, reference, window_s, random.Random(args.seed))
        print(
            f"chain: {result['n_killed']} of {len(result['kills'])} kill points killed the process; final adapter "
            f"bit-equal to the uninterrupted run: {result['bit_equal']}; a re-run of the finished command changed "
            f"nothing: {result['rerun_changed_nothing']}; a re-run killed mid-way left the finished adapter as it "
            f"was: {result['finished_adapter_unchanged_by_killed_rerun']}; {time.time() - t0:.0f} s (seed {args.seed})"
        )
        if args.json_out:
            from pi_peft.utils import write_json

            write_json(args.json_out, {"reference_sha256": reference, "seed": args.seed, "chain": result})
        return 0 if result["ok"] else 1

    points = plan(args.trials, random.Random(args.seed), window_s)
    if args.points:
        points = [{"kind": kind, "file": None, "step": None} for kind in args.points.split(",")]
    results = []
    for i, point in enumerate(points):
        out = os.path.join(work, f"trial-{i}")
        shutil.rmtree(out, ignore_errors=True)
        first = train_argv(model, data, out)
        code, _ = run_train(first, point["kind"], point.get("step"), point.get("file"), point.get("delay_s"))
        at_kill = state_at_kill(out)
        resume = train_argv(model, data, out, "--resume_from_checkpoint", "true")
        run_train(resume)  # to the end
        final = snapshot(out)
        run_train(resume)  # once more: a finished run
        again = snapshot(out)
        got = final["files"].get("adapter_model.safetensors", ("missing",))[0]
        row = {
            **point,
            "killed": code == -signal.SIGKILL,
            "at_kill": at_kill,
            "bit_equal": got == reference,
            "rerun_changed_nothing": again == final,
            "checkpoints": final["checkpoints"],
        }
        killed_as_planned = row["killed"] or point["kind"] == "finished"
        row["ok"] = row["bit_equal"] and row["rerun_changed_nothing"] and killed_as_planned
        results.append(row)
        where = point.get("file") and f"{point['file']} of checkpoint-{point['step']}" or point.get("delay_s", "")
        print(
            f"trial {i}: {point['kind']:<12} {str(where):<42} killed={row['killed']!s:<5} "
            f"at kill: {at_kill['checkpoints']} final={at_kill['final_adapter']}; "
            f"bit-equal={row['bit_equal']} rerun changed nothing={row['rerun_changed_nothing']}"
        )
    passed = sum(r["ok"] for r in results)
    print(f"{passed}/{len(results)} trials passed in {time.time() - t0:.0f} s (seed {args.seed})")
    if args.json_out:
        from pi_peft.utils import write_json

        write_json(args.json_out, {"reference_sha256": reference, "seed": args.seed, "trials": results})
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
