import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from pi_peft import PIConfig
from pi_peft.evaluation.perplexity import evaluate_perplexity, perplexity_by_length, window_spans
from pi_peft.testing import tiny_model


def test_window_spans_non_overlapping_and_sliding():
    assert window_spans(10, 4) == [(0, 4, 3), (4, 8, 3)]  # full windows only; each scores all tokens but its first
    assert window_spans(10, 4, stride=2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert window_spans(3, 4) == []
    with pytest.raises(ValueError, match="`stride`"):
        window_spans(10, 4, stride=5)
    with pytest.raises(ValueError, match="`context_length`"):
        window_spans(10, 1)


def direct_ppl(model, doc: torch.Tensor, context_length: int, stride: int | None) -> float:
    """Reference: full logits of every window, cross-entropy of the scored targets."""
    total, count = 0.0, 0
    for start, end, n in window_spans(len(doc), context_length, stride):
        ids = doc[start:end][None]  # (1, T)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0]  # (T, V)
        t = end - start
        total += F.cross_entropy(logits[t - 1 - n : t - 1].float(), ids[0, t - n :], reduction="sum").item()
        count += n
    return math.exp(total / count)


@pytest.fixture
def doc():
    return torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("stride", [None, 16])
def test_perplexity_equals_direct_computation(base, doc, stride):
    result = evaluate_perplexity(base, [doc.tolist()], 64, stride=stride)
    assert result.ppl == pytest.approx(direct_ppl(base, doc, 64, stride), rel=1e-5)
    spans = window_spans(300, 64, stride)
    assert result.windows == len(spans)
    assert result.tokens == sum(n for *_, n in spans)


def test_batching_and_loss_chunks_do_not_change_the_result(base, doc):
    ref = evaluate_perplexity(base, [doc.tolist()], 64, stride=32).ppl
    assert evaluate_perplexity(base, [doc.tolist()], 64, stride=32, batch_size=3).ppl == pytest.approx(ref, rel=1e-5)
    chunked = evaluate_perplexity(base, [doc.tolist()], 64, stride=32, loss_chunk_size=7).ppl
    assert chunked == pytest.approx(ref, rel=1e-5)


def test_pi_adapter_is_scored_with_lora_and_interpolated_rope(doc):
    model = get_peft_model(
        tiny_model(), PIConfig(scaling_factor=4.0, target_modules="all-linear", init_lora_weights=False)
    )
    model.eval()
    pi = evaluate_perplexity(model, [doc.tolist()], 256).ppl
    assert pi == pytest.approx(direct_ppl(model, doc, 256, None), rel=1e-5)
    with model.disable_adapter():  # original RoPE and no LoRA: a different model, a different number
        assert evaluate_perplexity(model, [doc.tolist()], 256).ppl != pytest.approx(pi, rel=1e-5)


def test_documents_are_scored_separately(base, doc):
    docs = [doc[:150].tolist(), doc[150:].tolist(), doc[:20].tolist()]  # the short one has no full window
    result = evaluate_perplexity(base, docs, 64)
    assert result.windows == 4
    with pytest.raises(ValueError, match="`context_length`=400"):
        evaluate_perplexity(base, docs, 400)


def test_perplexity_by_length_caps_stride(base, doc):
    results = perplexity_by_length(base, [doc.tolist()], [128, 32], stride=64)
    assert [r.context_length for r in results] == [32, 128]
    assert [r.stride for r in results] == [32, 64]
