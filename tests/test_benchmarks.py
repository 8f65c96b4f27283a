"""CI smoke runs of the benchmark scripts (tiny sizes): they run end to end and their outputs are complete and sane.
No timing asserts: the numbers at these sizes measure nothing, only that the scripts still work."""

import json
import math
import os
import sys

import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)

import _common  # noqa: E402
import estimator_accuracy  # noqa: E402
import gpu_max_context  # noqa: E402
import memory_vs_context  # noqa: E402
import pi_overhead  # noqa: E402
import tiled_mlp  # noqa: E402

SMOKE_T = 128  # 2x the smoke model's original window


@pytest.fixture(scope="module")
def mvc(tmp_path_factory):
    """One smoke run of memory_vs_context.py: (a), (b) and (c), each in its own subprocess."""
    path = str(tmp_path_factory.mktemp("bench") / "mvc.json")
    assert memory_vs_context.main(["--smoke", "--contexts", str(SMOKE_T), "--json-out", path]) == 0
    with open(path) as f:
        return path, json.load(f)


def test_memory_vs_context_runs_both_configurations_in_subprocesses(mvc):
    _, payload = mvc
    runs = {r["label"]: r for r in payload["runs"]}
    assert set(runs) == {"plain", "pi_peft", "trl"}
    assert runs["trl"]["checkpointing"] is True  # trl's own default, not ours
    for run in runs.values():
        assert run["context_length"] == SMOKE_T
        assert 0 < run["idle_rss"] < run["peak_rss"]
        assert run["step_rss"] == run["peak_rss"] - run["idle_rss"] > 0
        assert run["torch_peak"] > 0
        assert run["tokens_per_s"] > 0 and run["step_time"] > 0
        assert run["attn_implementation"] == "sdpa"
        assert run["dims"] == _common.SMOKE_DIMS
    pids = {run["pid"] for run in runs.values()}
    assert len(pids) == 3 and os.getpid() not in pids  # each configuration in its own process
    # same base, same data, same PI factor, LoRA B = 0 at the first step: both configurations compute the same loss,
    # (b) without ever building the full logits
    loss_a, loss_b = runs["plain"]["losses"][0], runs["pi_peft"]["losses"][0]
    assert math.isfinite(loss_a) and abs(loss_a - math.log(_common.SMOKE_DIMS["vocab_size"])) < 1.0
    assert loss_b == pytest.approx(loss_a, abs=1e-4)
    # the same trainable parameters: LoRA on all linear layers + embeddings + norms in both
    assert runs["plain"]["trainable_params"] == runs["pi_peft"]["trainable_params"]


def test_memory_vs_context_summary_ratios_are_b_over_a(mvc):
    _, payload = mvc
    runs = {r["label"]: r for r in payload["runs"]}
    ratios = payload["summary"]["ratios"]["pi_peft"][str(SMOKE_T)]
    vs_trl = payload["summary"]["ratios"]["pi_peft_vs_trl"][str(SMOKE_T)]
    for m in ("peak_rss", "step_rss", "torch_peak", "tokens_per_s", "tokens_per_cpu_s"):
        assert ratios[m] == pytest.approx(runs["pi_peft"][m] / runs["plain"][m])
        assert vs_trl[m] == pytest.approx(runs["pi_peft"][m] / runs["trl"][m])
    assert payload["machine"]["cores"] == os.cpu_count() and payload["machine"]["torch"] == torch.__version__


def test_memory_vs_context_report_has_every_table(mvc, capsys):
    _, payload = mvc
    text = memory_vs_context.report(payload["runs"], payload["summary"], payload["machine"])
    needles = ["peak RSS of the process", "peak RSS minus the idle RSS", "peak of live torch CPU allocations",
               "tokens / wall-clock second", "tokens / CPU second", "(b) / (a)", "Growth of memory", "(a) plain",
               "(b) pi_peft", "(c) trl SFTTrainer", "(b) / (c)"]  # fmt: skip
    for needle in needles:
        assert needle in text
    assert f"- (c) trl SFTTrainer: {_common.CONFIG_HELP['trl']}" in text  # described as what it is, not as (b)


def test_fit_growth_tells_linear_from_quadratic():
    T = [1024, 2048, 4096, 8192, 16384]
    linear = _common.fit_growth(T, [500e6 + 3e4 * t for t in T])
    quadratic = _common.fit_growth(T, [500e6 + 10 * t + 5.0 * t * t for t in T])
    assert linear["verdict"] == "linear" and linear["exponent"] == pytest.approx(1.0, abs=0.01)
    assert linear["bytes_per_token_linear"] == pytest.approx(3e4)
    assert quadratic["verdict"] == "quadratic" and quadratic["exponent"] == pytest.approx(2.0, abs=0.05)
    assert _common.fit_growth(T[:2], [1.0, 2.0])["verdict"].startswith("untested")


def test_estimator_accuracy_compares_the_measured_runs(mvc, tmp_path, capsys):
    path, payload = mvc
    out = tmp_path / "est.json"
    assert estimator_accuracy.main(["--from-json", path, "--json-out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "device='cpu', dtype_bytes=4" in text and "within 25%" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == ["plain", "pi_peft", "trl"]
    runs = {r["label"]: r for r in payload["runs"]}
    for row in rows:
        est = estimator_accuracy.estimate_for(runs[row["label"]])
        assert row["estimate"]["total"] == est.total > 0
        for m in ("torch_peak", "step_rss"):
            assert row[f"ratio_{m}"] == pytest.approx(est.total / runs[row["label"]][m])
    # (a) is estimated without checkpointing and with full fp32 logits (value, copy, gradient); (b) with both savers
    assert rows[0]["estimate"]["activations"] > rows[1]["estimate"]["activations"]
    plain = runs["plain"]
    tokens, vocab = plain["context_length"] * plain["batch_size"], plain["dims"]["vocab_size"]
    assert rows[0]["estimate"]["logits"] == tokens * vocab * (4 + 4 + 4)


def test_pi_overhead_smoke(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert (
        pi_overhead.main(["--smoke", "--context-length", str(SMOKE_T), "--rounds", "2", "--json-out", str(out)]) == 0
    )
    payload = json.loads(out.read_text())
    result, summary = payload["result"], payload["summary"]
    assert len(result["ratios"]) == 2 and all(r > 0 for r in result["ratios"])
    assert len(result["step_times"]["lora"]) == len(result["step_times"]["pi"]) == 4  # A B B A, twice
    assert result["rope_parameters"]["lora"]["rope_type"] == "default"
    assert result["rope_parameters"]["pi"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert summary["min_ratio"] <= summary["median_ratio"] <= summary["max_ratio"]
    lo, hi = summary["median_ratio_ci95"]
    assert summary["min_ratio"] <= lo <= summary["median_ratio"] <= hi <= summary["max_ratio"]
    # PI only rescales the rotary frequencies: a step does exactly the same arithmetic
    assert result["flops"]["pi"] == result["flops"]["lora"] > 0
    assert summary["verdict"] in ("met", "MISSED") or summary["verdict"].startswith("inconclusive")
    assert "target PI overhead <= 2%" in capsys.readouterr().out


def test_pi_overhead_rejects_zero_rounds():
    with pytest.raises(ValueError, match="`--rounds`"):
        pi_overhead.main(["--smoke", "--rounds", "0"])


def test_build_rejects_unknown_configuration():
    with pytest.raises(ValueError, match="`config` must be one of"):
        _common.build("qlora", _common.SMOKE_DIMS, SMOKE_T)


def test_gpu_max_context_without_cuda_exits_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_max_context.main(["--model", "bench"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "torch.cuda.is_available() is False" in err


@pytest.mark.parametrize("threshold", [0, 1000, 1024, 4096, 5000, 9999, 10**6])
def test_gpu_search_finds_the_largest_fitting_context(threshold):
    largest, trials = gpu_max_context.search_max_context(lambda T: T <= threshold, 4096, 1024, 100_000)
    expected = min(threshold, 100_000) // 1024 * 1024
    assert largest == expected
    assert all(ok == (T <= threshold) for T, ok in trials)
    assert len(trials) <= 12  # doubling + bisection, not a scan


def test_gpu_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`start`=1000 must be a multiple"):
        gpu_max_context.search_max_context(lambda T: True, 1000, 1024, 4096)
    with pytest.raises(ValueError, match="`multiple_of` must be a positive int"):
        gpu_max_context.search_max_context(lambda T: True, 1024, 0, 4096)


def test_tiled_mlp_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "tiled.json"
    argv = ["--smoke", "--contexts", "128", "--steps", "1", "--tile-tokens", "32", "--json-out", str(out)]
    assert tiled_mlp.main(argv) == 0
    payload = json.loads(out.read_text())
    runs = {r["config"]: r for r in payload["runs"]}
    assert set(runs) == {"pi_peft", "pi_peft_tiled"} and runs["pi_peft_tiled"]["tile_tokens"] == 32
    # the same model, data and seed: tiling is exact, so the first step's loss is the same
    assert runs["pi_peft_tiled"]["losses"][0] == pytest.approx(runs["pi_peft"]["losses"][0], abs=1e-5)
    row = payload["summary"]["rows"][str(SMOKE_T)]
    assert row["ratio_step_rss"] == pytest.approx(runs["pi_peft_tiled"]["step_rss"] / runs["pi_peft"]["step_rss"])
    est_b, est_t = tiled_mlp.estimate_for(runs["pi_peft"]), tiled_mlp.estimate_for(runs["pi_peft_tiled"])
    assert (row["estimate_b"], row["estimate_t"]) == (est_b.total, est_t.total)
    assert est_t.tile_tokens == 32 and est_t.layer < est_b.layer  # the estimator counts one 32-token MLP tile
    text = capsys.readouterr().out
    assert "(t)/(b)" in text and "target (t) step time <= 1.3" in text


def test_tiled_mlp_interleaved_timing_smoke(tmp_path, capsys):
    """`--interleaved`: both configurations in one process, B T T B rounds, ratio of medians."""
    out = tmp_path / "interleaved.json"
    argv = ["--interleaved", "--smoke", "--time-context", "128", "--rounds", "2", "--tile-tokens", "32"]
    assert tiled_mlp.main([*argv, "--json-out", str(out)]) == 0
    payload = json.loads(out.read_text())
    result, summary = payload["result"], payload["summary"]
    assert result["tiled_mlps"] == {"pi_peft": 0, "pi_peft_tiled": _common.SMOKE_DIMS["num_hidden_layers"]}
    assert result["first_loss"]["pi_peft_tiled"] == pytest.approx(result["first_loss"]["pi_peft"], abs=1e-5)
    for config in tiled_mlp.CONFIGS:
        assert len(result["step_times"][config]) == len(result["cpu_times"][config]) == 4  # 2 rounds x 2 steps
    assert len(result["ratios"]) == len(result["cpu_ratios"]) == 2
    med = {c: sorted(ts)[1:3] for c, ts in result["step_times"].items()}  # median of 4 = mean of the middle two
    expected = sum(med["pi_peft_tiled"]) / sum(med["pi_peft"])
    assert summary["wall"]["ratio_of_medians"] == pytest.approx(expected)
    assert summary["met"] == (expected <= tiled_mlp.TARGET_TIME)
    text = capsys.readouterr().out
    assert "ratio of medians" in text and "target (t) step time <= 1.3" in text
    assert tiled_mlp.main(["--report-from", str(out)]) == 0
    assert capsys.readouterr().out.strip() == text.strip()
