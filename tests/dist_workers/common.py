"""The 2-process (gloo, CPU) test harness: launch a worker script under torchrun, collect what each rank wrote, and
compare losses and gradients with a one-process run of the same worker.

In a test (the parent)::

    from dist_workers.common import launch, compare_grads     # tests/ is on sys.path under pytest
    # (or: from tests.dist_workers.common import ...)

    two = launch(WORKER, 2, ["--mode", "ddp"], tmp_path / "two")  # python -m torch.distributed.run --nproc_per_node 2
    one = launch(WORKER, 1, ["--mode", "ddp"], tmp_path / "one")  # plain `python WORKER ...`: no WORLD_SIZE
    assert two[0]["world_size"] == 2
    compare_grads(two[0]["grads"], one[0]["grads"], rtol=1e-5)

In the worker (the child, any script run by :func:`launch`)::

    from dist_workers.common import write_result
    write_result({"loss": loss, "world_size": world_size}, tensors={"grads": {name: grad}})

Each rank's `write_result` writes `rank{RANK}.json` (and `rank{RANK}.<key>.safetensors` per tensor group) into
`$PI_PEFT_DIST_OUT`; :func:`launch` returns them as a list indexed by rank, each a dict with the JSON keys plus one
`{name: tensor}` dict per tensor group. The child environment: `ACCELERATE_USE_CPU=true` (accelerate's gloo CPU
engine; pass `env={"ACCELERATE_USE_CPU": None}` to drop it), `OMP_NUM_THREADS=1`, `OMP_WAIT_POLICY=PASSIVE`,
`HF_HUB_OFFLINE=1`, a free `MASTER_PORT`, and `PYTHONPATH` with the repository root and `tests/` (so a worker imports
`pi_peft`, `dist_workers.common` and `tests.dist_workers.common`). A failing launch raises `AssertionError` with the
command and the end of its output; :func:`launch_process` returns the `CompletedProcess` instead (for tests that
expect a refusal).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import torch

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
OUT_ENV = "PI_PEFT_DIST_OUT"


def free_port() -> int:
    """A TCP port free on localhost right now (for `MASTER_PORT`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(out_dir: Union[str, os.PathLike], env: Optional[Mapping[str, Optional[str]]] = None) -> dict:
    """The environment of a launched worker (see the module docstring); `env` overrides it, `None` values remove."""
    merged = dict(os.environ)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        merged.pop(name, None)  # never inherit a launcher's variables
    merged.update(
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), merged.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    merged[OUT_ENV] = str(out_dir)
    for name, value in (env or {}).items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = str(value)
    return merged


def command(worker: Union[str, os.PathLike], nproc: int, args: Sequence[str] = (), port: Optional[int] = None):
    """`python -m torch.distributed.run --nproc_per_node nproc ... worker args` (`nproc` > 1), else `python worker
    args` (one plain process: no torchrun, so no `WORLD_SIZE` / `LOCAL_RANK`)."""
    if nproc > 1:
        port = port or free_port()
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
        return [sys.executable, *launcher, str(worker), *map(str, args)]
    return [sys.executable, str(worker), *map(str, args)]


def launch_process(
    worker: Union[str, os.PathLike],
    nproc: int,
    args: Sequence[str],
    out_dir: Union[str, os.PathLike],
    env: Optional[Mapping[str, Optional[str]]] = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run `worker` in `nproc` processes (see :func:`command`) with `OUT_ENV` = `out_dir`; returns the finished
    process (stdout and stderr merged into `.stdout`, and its wall time in `.wall_s`) whatever its exit status."""
    os.makedirs(out_dir, exist_ok=True)
    cmd = command(worker, nproc, args)
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=child_env(out_dir, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    proc.wall_s = time.perf_counter() - start
    proc.cmd = cmd
    return proc


def launch(
    worker: Union[str, os.PathLike],
    nproc: int,
    args: Sequence[str],
    out_dir: Union[str, os.PathLike],
    env: Optional[Mapping[str, Optional[str]]] = None,
    timeout: float = 600,
) -> list[dict]:
    """Run `worker` in `nproc` processes and return what every rank wrote with :func:`write_result`, by rank.

    Raises `AssertionError` (the command, the exit status and the last 6000 characters of the output) when the
    launch fails or a rank wrote nothing. `results[0]["wall_s"]` is the launch's wall time (all ranks, start-up
    included)."""
    proc = launch_process(worker, nproc, args, out_dir, env, timeout)
    tail = proc.stdout[-6000:]
    assert proc.returncode == 0, f"{' '.join(proc.cmd)} exited with {proc.returncode}:\n{tail}"
    results = [read_result(out_dir, rank) for rank in range(nproc)]
    results[0]["wall_s"] = proc.wall_s
    results[0]["output"] = proc.stdout
    return results


def write_result(payload: Mapping, tensors: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> None:
    """In a worker: write this rank's `payload` (JSON-able) and tensor groups (`{group: {name: tensor}}`, saved as
    float64 safetensors) into `$PI_PEFT_DIST_OUT`. The JSON file is written last and atomically."""
    from safetensors.torch import save_file

    out = Path(os.environ[OUT_ENV])
    rank = int(os.environ.get("RANK", 0))
    groups = []
    for group, named in (tensors or {}).items():
        weights = {name: t.detach().to("cpu", torch.float64).contiguous() for name, t in named.items()}
        save_file(weights, str(out / f"rank{rank}.{group}.safetensors"))
        groups.append(group)
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps({**payload, "_tensor_groups": groups}))
    os.replace(tmp, out / f"rank{rank}.json")


def read_result(out_dir: Union[str, os.PathLike], rank: int) -> dict:
    """What rank `rank` wrote with :func:`write_result` (JSON keys + one `{name: tensor}` dict per tensor group)."""
    from safetensors.torch import load_file

    path = Path(out_dir) / f"rank{rank}.json"
    assert path.is_file(), f"rank {rank} wrote no result ({path} is missing)"
    result = json.loads(path.read_text())
    for group in result.pop("_tensor_groups"):
        result[group] = load_file(str(Path(out_dir) / f"rank{rank}.{group}.safetensors"))
    return result


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """`||got - want|| / ||want||` in float64 (the absolute error when `want` is all zeros)."""
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    diff = (got - want).norm().item()
    scale = want.norm().item()
    return diff / scale if scale > 0 else diff


def compare_grads(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], rtol: float = 1e-5, min_nonzero: int = 1
) -> dict[str, float]:
    """Assert `got` and `want` hold the same parameter names and shapes, every gradient within `rtol` relative error
    (:func:`rel_error`) and at least `min_nonzero` of `want`'s gradients non-zero (a comparison of zeros proves
    nothing); returns `{name: relative error}`."""
    assert set(got) == set(want), f"different gradients: only in got {set(got) - set(want)}, only in want " + str(
        set(want) - set(got)
    )
    assert want, "no gradients to compare"
    errors = {}
    for name in sorted(want):
        assert got[name].shape == want[name].shape, f"{name}: shape {tuple(got[name].shape)} != {want[name].shape}"
        errors[name] = rel_error(got[name], want[name])
    nonzero = sum(bool(w.abs().sum() > 0) for w in want.values())
    assert nonzero >= min_nonzero, f"only {nonzero} of {len(want)} reference gradients are non-zero"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.3g} > {rtol:g}"
    return errors
