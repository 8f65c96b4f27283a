import glob
import json
import re

import pytest

from pi_peft.cli.estimate import cli_main
from pi_peft.estimate import GIB, estimate_memory, max_context, recipe_row
from pi_peft.measure import measure_cpu_peak

LLAMA2 = "meta-llama/Llama-2-7b-hf"
RECIPES = sorted(glob.glob("recipes/*.yaml"))
# a tiny Llama big enough that the activations dominate the peak RSS of a subprocess
MEASURED = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
    max_position_embeddings=256,
)


def test_breakdown_follows_the_documented_formula():
    short, long = estimate_memory(LLAMA2, 8192), estimate_memory(LLAMA2, 16384)
    assert short.weights == long.weights and short.trainable == long.trainable  # independent of T
    assert long.activations == 2 * short.activations  # O(T) with SDPA + checkpointing
    # NF4 (double quant) linears + bf16 embeddings / head / norms of Llama-2-7B: ~3.6 GiB
    assert 3.4 * GIB < short.weights < 3.8 * GIB
    assert estimate_memory(LLAMA2, 8192, quantization="none").weights > 12 * GIB  # bf16: 2 bytes x 6.7B
    eager = estimate_memory(LLAMA2, 8192, attention="eager")
    assert eager.activations - short.activations == 32 * 8192**2 * 6  # heads x T^2 x (bf16 + fp32)
    assert estimate_memory(LLAMA2, 8192, loss="full").logits == 8192 * 32000 * 10 > 2 * short.logits


def test_max_context_is_the_largest_that_fits():
    largest = max_context(LLAMA2, 24)
    assert largest % 256 == 0
    assert estimate_memory(LLAMA2, largest).total <= 24 * GIB < estimate_memory(LLAMA2, largest + 256).total


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="`quantization`.*'int3'"):
        estimate_memory(LLAMA2, 4096, quantization="int3")
    with pytest.raises(ValueError, match="`context_length`"):
        estimate_memory(LLAMA2, 0)
    with pytest.raises(ValueError, match="`model`"):
        estimate_memory("/no/such/config.json", 4096)


def test_cli_breakdown_from_a_local_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({**MEASURED, "max_position_embeddings": 4096}))
    assert cli_main([str(tmp_path / "config.json"), "--context-length", "16384", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == sum(out[k] for k in ("weights", "trainable", "activations", "logits", "overhead"))
    assert out["max_context"] > 16384
    assert cli_main([str(tmp_path), "--context-length", "16384"]) == 0
    assert "largest context that fits in 24 GiB" in capsys.readouterr().out


def test_every_recipe_states_the_estimators_peak(capsys):
    assert len(RECIPES) == 4
    assert cli_main(["--recipes", *RECIPES]) == 0
    table = capsys.readouterr().out
    for path in RECIPES:
        total = recipe_row(path)["estimate"].total / GIB
        stated = re.search(r"Estimated peak GPU memory.*: ([\d.]+) GiB", open(path).read())
        assert stated and float(stated.group(1)) == round(total, 1), path
        assert total < 24, path  # every shipped recipe fits one 24 GB GPU by the estimate
        assert path.split("/")[-1] in table


def test_estimate_matches_measured_cpu_peak_rss():
    """Peak RSS of fp32 LoRA steps in a subprocess vs the formula (quantization="none", 4-byte activations)."""
    kwargs = dict(quantization="none", r=8, dtype_bytes=4, device="cpu", loss="chunked", loss_chunk_tokens=1024)
    measured = {T: measure_cpu_peak(MEASURED, T, chunk_tokens=1024) for T in (2048, 8192)}
    estimated = {T: estimate_memory(MEASURED, T, **kwargs).total for T in measured}
    for T in measured:
        assert 0.75 < measured[T] / estimated[T] < 1.25, (T, measured[T], estimated[T])
    growth = (measured[8192] - measured[2048]) / (estimated[8192] - estimated[2048])
    assert 0.7 < growth < 1.3, growth


def test_estimator_chunk_default_matches_the_loss_default():
    import inspect

    from pi_peft.estimate import estimate_memory
    from pi_peft.losses import DEFAULT_CHUNK_TOKENS

    assert inspect.signature(estimate_memory).parameters["loss_chunk_tokens"].default == DEFAULT_CHUNK_TOKENS
