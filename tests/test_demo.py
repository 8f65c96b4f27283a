import contextlib
import io
import json
import math
import os
import random
import shutil
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pi_peft import demo
from pi_peft.cli.demo import cli_main
from pi_peft.demo import DEMO_MODELS, QUICK, DemoConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-quick")
    cache_home = tmp_path_factory.mktemp("xdg-cache")
    threads, old_cache = torch.get_num_threads(), os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache_home)
    assert demo.default_cache_dir() == str(cache_home / "pi_peft" / "demo")  # where a full run would cache
    stdout = io.StringIO()
    try:  # one thread: the quick model is too small to gain from two, and a shared CI core costs 2 threads dearly
        with contextlib.redirect_stdout(stdout):
            assert cli_main(["--quick", "--threads", "1", "--output-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
        if old_cache is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = old_cache
    return out, json.loads((out / "demo.json").read_text()), stdout.getvalue(), cache_home


def test_quick_demo_json_is_complete(quick_run):
    out, summary, _, _ = quick_run
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
    assert summary["timings_s"]["total"] > 0 and summary["model_parameters"] > 0
    tuned = {"direct-ft", "pi-ft", "pi-full-ft"}
    assert set(summary["finetune_final_loss"]) == tuned == set(summary["learning_curves"])
    for curve in summary["learning_curves"].values():  # one probe per curve step, at L, 2L and 4L
        assert [p["step"] for p in curve["probes"]] == list(cfg.curve_steps)
        assert all(set(p["accuracy_by_length"]) == {str(L), str(2 * L), str(T)} for p in curve["probes"])
    # pretraining learned something: the loss is well below that of a uniform guess over the vocabulary
    assert summary["pretrain_final_loss"] < math.log(cfg.vocab_size) - 0.5
    assert summary["pretrain_cached"] is False


def test_quick_demo_claims_nothing(quick_run):
    """Regression (issue 13, item 10): a smoke run ticked paper claims on a model that retrieves nothing."""
    out, summary, stdout, cache_home = quick_run
    assert summary["smoke_run"] is True and summary["claims"] is None
    for text in ((out / "demo.md").read_text(), stdout):
        assert "- [x]" not in text and "- [ ]" not in text
        assert "no claim is checked" in text
    assert not (cache_home / "pi_peft").exists(), "a smoke run must not write into the user's cache"


def test_quick_demo_writes_tables_and_plots(quick_run):
    out, _, _, _ = quick_run
    for name in ("demo.md", "ppl.json", "ppl.md", "ppl.png", "passkey.json", "passkey.md", "passkey.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "demo.md").read_text()
    assert all(f"| {name} |" in table for name in DEMO_MODELS)
    assert "k_max" in table and "during fine-tuning" in table
    assert set(json.loads((out / "passkey.json").read_text())["models"]) == set(DEMO_MODELS)


def _results(cfg, ppl_by_arm, k_max_by_arm):
    L, T = cfg.context_length, cfg.target_length
    return {
        name: {
            "ppl": [{"context_length": n, "ppl": v} for n, v in zip((L, 2 * L, T), ppl_by_arm[name])],
            "passkey": {"k_max": k_max_by_arm[name]},
        }
        for name in ppl_by_arm
    }


def test_claims_are_checked_on_full_runs_only():
    cfg = DemoConfig()
    L, T = cfg.context_length, cfg.target_length
    ppl = {"extrapolation": (10, 15, 30), "direct-ft": (10, 10, 10), "pi-ft": (11, 11, 10), "pi-full-ft": (9, 9, 10)}
    k_max = {"extrapolation": L, "direct-ft": 2 * L, "pi-ft": T, "pi-full-ft": 2 * L}
    checks = demo.claims(_results(cfg, ppl, k_max), cfg)
    assert checks == {
        "the base retrieves at L (k_max >= L), so the passkey claims can be tested": True,
        "extrapolation blows up past L (ppl@4L > 2 x ppl@L)": True,
        "PI + full FT (the paper's) ppl@4L <= ppl@L": False,
        "PI + full FT (the paper's) passkey holds to 4L (k_max = 4L)": False,
        "PI + LoRA FT (pi_peft's) ppl@4L <= ppl@L": True,
        "PI + LoRA FT (pi_peft's) passkey holds to 4L (k_max = 4L)": True,
        "direct FT k_max well below 4L (<= 3L)": True,
    }
    assert demo.claims(_results(cfg, ppl, k_max), replace(cfg, smoke=True)) == {}
    blind_base = demo.claims(_results(cfg, ppl, {**k_max, "extrapolation": 0}), cfg)  # seed 1 of round 5
    assert blind_base[demo.BASE_RETRIEVES] is False


def test_pretrained_base_cache_round_trip(tmp_path):
    """The second call loads the first call's base (atomically written, keyed by settings and tokenizer)."""
    cfg = replace(DemoConfig(**QUICK), pretrain_steps=3, corpus_chars=100_000, threads=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        data = demo.prepare_data(cfg, random.Random(0))
        first, info = demo.pretrained_base(cfg, data, random.Random(1), str(tmp_path))
        second, info2 = demo.pretrained_base(cfg, data, random.Random(1), str(tmp_path))
        other_key = demo.base_cache_key(replace(cfg, rope_theta=500.0), data["tokenizer"], data["corpus"]["sha256"])
    finally:
        torch.set_num_threads(threads)
    assert (info["cached"], info2["cached"]) == (False, True) and info["path"] == info2["path"]
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(info["path"])]  # no temporary left behind
    assert other_key != os.path.basename(info["path"])
    assert info2["final_loss"] == pytest.approx(info["final_loss"])
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_demo_rejects_unknown_setting(tmp_path):
    with pytest.raises(ValueError, match="`--set nope=1`"):
        cli_main(["--quick", "--set", "nope=1", "--output-dir", str(tmp_path)])


def test_demo_rejects_unknown_arm(tmp_path):
    with pytest.raises(ValueError, match="`arms` contains \\['nope'\\]"):
        demo.run_demo(replace(DemoConfig(**QUICK), arms=("pi", "nope")), str(tmp_path))


def test_full_finetuning_arms_are_plain_models_with_the_arm_rope():
    """pi-full-ft = the PI adapter merged (the same outputs, RoPE linear x4, every weight trainable); direct-full-ft
    keeps the base's RoPE."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = DemoConfig(**QUICK)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=100
    )
    base = AutoModelForCausalLM.from_config(replace(config, max_position_embeddings=cfg.context_length)).eval()
    ids = torch.randint(0, 100, (1, cfg.target_length))
    full, adapter = demo.arm_model(base, cfg, "pi-full-ft"), demo.arm_model(base, cfg, "pi")
    assert type(full) is type(base) and all(p.requires_grad for p in full.parameters())
    assert full.config.rope_parameters["rope_type"] == "linear" and full.config.rope_parameters["factor"] == cfg.factor
    assert torch.allclose(full.model.rotary_emb.inv_freq * cfg.factor, base.model.rotary_emb.inv_freq)
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, adapter(ids).logits, atol=1e-5)
    direct = demo.arm_model(base, cfg, "direct-full-ft")
    assert torch.equal(direct.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq)
    with pytest.raises(ValueError, match="`arms` contains 'nope'"):
        demo.arm_model(base, cfg, "nope")


def test_split_digits_off_merges_digits_and_changes_the_cache_key():
    """``split_digits=False`` (round 4) lets BPE merge digit runs; the base cache key tells the two apart."""
    from pi_peft.testing import train_tokenizer

    rng = random.Random(0)
    texts = [f"The pass key is {rng.randint(10000, 99999)}. Remember it." for _ in range(400)]
    split = train_tokenizer(texts, vocab_size=400)
    merged = train_tokenizer(texts, vocab_size=400, split_digits=False)
    assert len(split(" 12345")["input_ids"]) == 6  # " " + one token per digit
    assert len(merged(" 12345")["input_ids"]) < 6
    assert merged.decode(merged(" 12345")["input_ids"]) == " 12345"
    cfg = DemoConfig(split_digits=True)
    assert demo.base_cache_key(cfg, split, "c") != demo.base_cache_key(replace(cfg, split_digits=False), split, "c")
    assert demo.base_cache_key(cfg, split, "c") != demo.base_cache_key(cfg, split, "another corpus")


def test_finetune_passkey_documents_span_the_extended_window_by_default():
    """Round 4: the default fine-tuning data has passkey documents up to 4L; L is the stricter variant."""
    cfg = DemoConfig()
    assert (cfg.split_digits, cfg.vocab_size) == (False, 2048)
    assert demo.finetune_passkey_max(cfg) == cfg.target_length == 4 * cfg.context_length
    assert demo.finetune_passkey_max(replace(cfg, finetune_passkey_max_tokens=cfg.context_length)) == 128


def test_passkey_answers_are_not_cut_when_keys_tokenize_unequally():
    """With merged digits, keys differ in token count; every answer gets room for its longest key."""
    from pi_peft.evaluation.passkey import evaluate_passkey, random_key
    from pi_peft.testing import train_tokenizer

    first_key = random_key(random.Random(0))  # the first key evaluate_passkey(seed=0) draws becomes one token
    rng = random.Random(1)
    texts = [f"The pass key is {rng.randint(10000, 99999)}. Remember it." for _ in range(400)]
    tok = train_tokenizer(texts + [f"The pass key is {first_key}."] * 400, vocab_size=300, split_digits=False)

    class Oracle(torch.nn.Module):  # answers the key it reads in the prompt
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, max_new_tokens, **kwargs):
            import re

            rows = []
            for ids in input_ids.tolist():
                key = re.search(r"The pass key is (\d+)\.", tok.decode(ids)).group(1)
                new = (tok(" " + key)["input_ids"] + [tok.eos_token_id] * max_new_tokens)[:max_new_tokens]
                rows.append(ids + new)
            return torch.tensor(rows)

    result = evaluate_passkey(Oracle(), tok, [200], depths=[0.5], trials=12, batch_size=4, seed=0)
    lengths = {len(tok(" " + r["key"])["input_ids"]) for r in result.records}
    assert max(lengths) > len(tok(" " + first_key)["input_ids"]) + 1  # the case this guards
    assert all(r["correct"] for r in result.records)


# ---- the corpus: the same on every machine with the same Python (issue 23) ----------------------------------------
def test_corpus_is_standard_library_only():
    paths = demo.stdlib_paths()
    assert len(paths) > 300
    assert not [p for p in paths if "site-packages" in p or "dist-packages" in p]
    root = sysconfig.get_paths()["stdlib"]
    tops = {os.path.relpath(p, root).split(os.sep)[0].removesuffix(".py") for p in paths}
    assert tops <= set(sys.stdlib_module_names) and not [t for t in tops if "test" in t]


def test_corpus_hash_ignores_what_is_installed(tmp_path):
    """A stdlib folder with a few real modules: installing a top-level module into its site-packages (or dropping a
    stray module or folder beside the stdlib) changes neither the file list nor the corpus hash."""
    root = sysconfig.get_paths()["stdlib"]
    fake = tmp_path / "python3.x"
    (fake / "json").mkdir(parents=True)
    for name in ("argparse.py", "difflib.py", "inspect.py", "typing.py"):
        shutil.copy(os.path.join(root, name), fake / name)
    for name in ("__init__.py", "decoder.py", "encoder.py"):
        shutil.copy(os.path.join(root, "json", name), fake / "json" / name)
    before = demo.stdlib_corpus(10**9, seed=0, root=str(fake))
    paths = demo.stdlib_paths(str(fake))
    (fake / "site-packages").mkdir()
    big = "x = 1\n" * 1000
    (fake / "site-packages" / "six.py").write_text(big)  # `pip install six`
    (fake / "site-packages" / "typing_extensions.py").write_text(big)
    (fake / "stray_module.py").write_text(big)  # not a standard-library module name
    (fake / "vendored").mkdir()
    (fake / "vendored" / "thing.py").write_text(big)
    after = demo.stdlib_corpus(10**9, seed=0, root=str(fake))
    assert demo.stdlib_paths(str(fake)) == paths and len(paths) == 7
    assert after == before and before[1]["files"] == 7 and len(before[1]["sha256"]) == 64
    (fake / "json" / "encoder.py").write_text((fake / "json" / "encoder.py").read_text() + "\n# edited\n")
    assert demo.stdlib_corpus(10**9, seed=0, root=str(fake))[1]["sha256"] != before[1]["sha256"]  # contents count


def test_committed_corpus_constant_is_the_committed_runs():
    committed = json.loads((ROOT / demo.COMMITTED_RUN).read_text())
    settings = committed["settings"]
    assert committed["corpus"]["sha256"] == demo.COMMITTED_CORPUS["sha256"]
    assert committed["corpus"]["python"] == demo.COMMITTED_CORPUS["python"]
    assert (settings["seed"], settings["corpus_chars"]) == (
        demo.COMMITTED_CORPUS["seed"],
        demo.COMMITTED_CORPUS["corpus_chars"],
    )
    assert (settings["seed"], settings["corpus_chars"]) == (DemoConfig().seed, DemoConfig().corpus_chars)


def test_corpus_note_says_whether_numbers_are_comparable():
    cfg = DemoConfig()
    same = {**demo.COMMITTED_CORPUS, "files": 10, "chars": 1000}
    assert "comparable" in demo.corpus_note(same, cfg) and "NOT" not in demo.corpus_note(same, cfg)
    other = {**same, "python": "3.12.1", "sha256": "0" * 64}
    assert "NOT the committed run's corpus" in demo.corpus_note(other, cfg)
    assert "not comparable" in demo.corpus_note(same, replace(cfg, seed=3))


def test_compare_runs_holds_within_tolerance_and_fails_on_a_perplexity_or_k_max_change():
    import copy
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "experiments" / "demo" / "compare_runs.py")
    compare_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_runs)
    committed = json.loads((ROOT / "experiments" / "demo" / "run" / "demo.json").read_text())

    near = copy.deepcopy(committed)
    near["results"]["pi"]["ppl"][0]["ppl"] *= 1.02  # inside 3%
    rows, ok = compare_runs.compare(committed, near, 0.03)
    assert ok and "| pi ppl@128 |" in "\n".join(rows)

    far = copy.deepcopy(committed)
    far["results"]["pi"]["ppl"][0]["ppl"] *= 1.05
    rows, ok = compare_runs.compare(committed, far, 0.03)
    assert not ok and any(r.startswith("| pi ppl@128 |") and r.endswith("| False |") for r in rows)

    other_k = copy.deepcopy(committed)
    other_k["results"]["extrapolation"]["passkey"]["k_max"] += 64
    assert not compare_runs.compare(committed, other_k, 0.03)[1]

    other_corpus = copy.deepcopy(committed)
    other_corpus["corpus"]["sha256"] = "0" * 64
    assert not compare_runs.compare(committed, other_corpus, 0.03)[1]
