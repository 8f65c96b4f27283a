import json
import math

import pytest
import torch

from pi_peft.cli.demo import cli_main
from pi_peft.demo import DEMO_MODELS, QUICK, DemoConfig


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-quick")
    threads = torch.get_num_threads()
    try:  # one thread: the quick model is too small to gain from two, and a shared CI core costs 2 threads dearly
        assert cli_main(["--quick", "--threads", "1", "--output-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "demo.json").read_text())


def test_quick_demo_json_is_complete(quick_run):
    out, summary = quick_run
    cfg = DemoConfig(**QUICK)
    L, T = cfg.context_length, cfg.target_length
    assert set(summary["results"]) == set(DEMO_MODELS)
    for name, result in summary["results"].items():
        ppl = {p["context_length"]: p["ppl"] for p in result["ppl"]}
        assert set(ppl) == {L, 2 * L, T}, name
        assert all(math.isfinite(v) and v > 1 for v in ppl.values()), name
        pk = result["passkey"]
        assert pk["lengths"] == cfg.passkey_lengths and pk["depths"] == list(cfg.passkey_depths)
        assert len(pk["accuracy"]) == len(cfg.passkey_lengths)
        assert all(len(row) == len(cfg.passkey_depths) for row in pk["accuracy"])
        assert all(0.0 <= a <= 1.0 for row in pk["accuracy"] for a in row)
        assert pk["k_max"] in [0, *cfg.passkey_lengths]
    assert len(summary["claims"]) == 4 and all(isinstance(v, bool) for v in summary["claims"].values())
    assert summary["timings_s"]["total"] > 0 and summary["model_parameters"] > 0
    assert set(summary["finetune_final_loss"]) == {"direct-ft", "pi-ft"}
    # pretraining learned something: the loss is well below that of a uniform guess over the vocabulary
    assert summary["pretrain_final_loss"] < math.log(cfg.vocab_size) - 0.5


def test_quick_demo_writes_tables_and_plots(quick_run):
    out, _ = quick_run
    for name in ("demo.md", "ppl.json", "ppl.md", "ppl.png", "passkey.json", "passkey.md", "passkey.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "demo.md").read_text()
    assert all(f"| {name} |" in table for name in DEMO_MODELS)
    assert "k_max" in table
    assert set(json.loads((out / "passkey.json").read_text())["models"]) == set(DEMO_MODELS)


def test_demo_rejects_unknown_setting(tmp_path):
    with pytest.raises(ValueError, match="`--set nope=1`"):
        cli_main(["--quick", "--set", "nope=1", "--output-dir", str(tmp_path)])
