"""Smoke runs of the MLA benchmark and the miniature experiment (tiny sizes): they run end to end and report what
they claim to measure. No timing asserts."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "experiments", "mla"))

import mla_kv_cache  # noqa: E402


@pytest.mark.slow
def test_mla_kv_cache_benchmark_smoke(tmp_path):
    path = tmp_path / "mla.json"
    assert mla_kv_cache.main(["--smoke", "--contexts", "96", "--json-out", str(path)]) == 0
    rows = {r["config"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == set(mla_kv_cache.CONFIGS)
    dims = mla_kv_cache.SMOKE_DIMS
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    assert rows["original"]["values_per_token_layer"] == 2 * dims["num_key_value_heads"] * head_dim
    for config in ("mla-moderate", "mla-paper"):
        s = mla_kv_cache.mla_settings(config, dims)
        assert rows[config]["values_per_token_layer"] == s["kv_rank"] + dims["num_key_value_heads"] * s["rope_dims"]
        assert rows[config]["cache_bytes"] < rows["original"]["cache_bytes"]
    for row in rows.values():
        assert row["cached_tokens"] == 96 and row["prefill_peak_rss"] >= row["model_rss"] > 0
        assert row["decode_peak_rss"] > 0


@pytest.mark.slow
def test_mla_experiment_quick_run(tmp_path):
    import experiment

    assert experiment.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert list(results) == [
        "original",
        "mla-25%-init",
        "mla-25%-ft",
        "mla-12%-init",
        "mla-12%-ft",
        "pi-ft",
        "mla-25%-pi-ft",
    ]
    assert (
        results["mla-12%-ft"]["cache_values"]
        < results["mla-25%-ft"]["cache_values"]
        < results["original"]["cache_values"]
    )
    assert "| mla-25%-pi-ft |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_mla_experiment_long_quick_run(tmp_path):
    """``--long``: PI alone and MLA + PI through the demo's own fine-tuning and evaluation, side by side."""
    import experiment

    assert experiment.main(["--long", "--quick", "--output-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "long.json").read_text())
    results = payload["results"]
    assert list(results) == ["pi-ft", "mla-25%-pi-ft"]
    level = payload["level"]
    assert results["mla-25%-pi-ft"]["cache_values"] == level[0] + payload["config"]["num_attention_heads"] * level[1]
    assert results["mla-25%-pi-ft"]["cache_values"] < results["pi-ft"]["cache_values"]
    for r in results.values():  # the demo's evaluation: perplexity at L, 2L, 4L and passkey at its lengths
        assert [p["context_length"] for p in r["ppl"]] == [128, 256, 512]
        assert all(p["ppl"] > 1 for p in r["ppl"])
        assert 0 <= r["passkey"]["k_max"] <= 512
    assert "| mla-25%-pi-ft | " in (tmp_path / "long.md").read_text()
