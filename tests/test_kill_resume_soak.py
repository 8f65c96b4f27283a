"""benchmarks/kill_resume_soak.py: its plan covers every kill point, and (slow) a short soak passes."""

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import kill_resume_soak  # noqa: E402


def test_ten_trials_cover_every_kill_point():
    points = kill_resume_soak.plan(10, random.Random(0), window_s=5.0)
    kinds = {(p["kind"], p.get("file")) for p in points}
    assert kinds >= set(kill_resume_soak.SPECIFIC)  # each file mid-write, before / mid final save, finished
    assert sum(p["kind"] == "time" for p in points) == 10 - len(kill_resume_soak.SPECIFIC)
    assert all(0 <= p["delay_s"] <= 5.0 for p in points if p["kind"] == "time")
    writes = [p["step"] for p in points if p["kind"] == "write"]
    assert all(s % kill_resume_soak.SAVE_STEPS == 0 and 0 < s <= kill_resume_soak.MAX_STEPS for s in writes)


@pytest.mark.slow  # 3 trials x 3 training processes: ~5-15 min on a shared 2-core machine
def test_a_short_soak_resumes_bit_equal_and_never_overwrites(tmp_path):
    out = tmp_path / "soak.json"
    argv = ["--trials", "3", "--seed", "3", "--workdir", str(tmp_path), "--json-out", str(out)]
    assert kill_resume_soak.main(argv) == 0
