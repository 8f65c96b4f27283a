import re

import pytest
import torch
from _eval_helpers import eval_tokenizer  # noqa: F401  (fixture)
from torch import nn

from pi_peft.evaluation.passkey import (
    FILLER_SENTENCES,
    build_prompt,
    effective_context_window,
    evaluate_passkey,
    extract_answer,
    filler_text,
    fit_prompt,
    token_length,
)
from pi_peft.testing import tiny_model

EXPECTED = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n"
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass is green.\n"
    "The pass key is 12345. Remember it. 12345 is the pass key.\n"
    "The grass is green. The sky is blue.\n"
    "What is the pass key? The pass key is"
)


def test_prompt_exact_text():
    assert build_prompt("12345", 6, 2) == EXPECTED


def test_filler_cycles_through_the_five_sentences():
    assert len(FILLER_SENTENCES) == 5
    assert filler_text(7) == " ".join(FILLER_SENTENCES + FILLER_SENTENCES[:2])
    assert filler_text(0) == ""


@pytest.mark.parametrize("length", [120, 200, 333])
def test_fit_prompt_token_length(eval_tokenizer, length):  # noqa: F811
    prompt = fit_prompt(eval_tokenizer, "54321", length, 0.5)
    n = token_length(eval_tokenizer, prompt)
    assert n <= length
    # one more filler sentence would not fit: the prompt is as long as allowed
    before, after = prompt.split("\n")[1], prompt.split("\n")[3]
    k_before = before.count(".") if before else 0
    k_after = after.count(".") if after else 0
    longer = build_prompt("54321", k_before, k_after + 1)
    assert token_length(eval_tokenizer, longer) > length


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_fit_prompt_needle_depth(eval_tokenizer, depth):  # noqa: F811
    prompt = fit_prompt(eval_tokenizer, "11111", 400, depth)
    lines = prompt.split("\n")
    assert lines[2] == "The pass key is 11111. Remember it. 11111 is the pass key."
    before = len(re.findall(r"\.", lines[1]))
    after = len(re.findall(r"\.", lines[3]))
    assert before + after > 20
    assert abs(before / (before + after) - depth) <= 1 / (before + after)
    # in tokens: the share of filler tokens before the needle is the depth
    n_before = len(eval_tokenizer(lines[1], add_special_tokens=False)["input_ids"])
    n_after = len(eval_tokenizer(lines[3], add_special_tokens=False)["input_ids"])
    assert abs(n_before / (n_before + n_after) - depth) < 0.05


def test_fit_prompt_rejects_bad_input(eval_tokenizer):  # noqa: F811
    with pytest.raises(ValueError, match="`lengths`"):
        fit_prompt(eval_tokenizer, "12345", 10, 0.5)
    with pytest.raises(ValueError, match="`depths`"):
        fit_prompt(eval_tokenizer, "12345", 200, 1.5)


def test_extract_answer():
    assert extract_answer(" 12345. Remember") == "12345"
    assert extract_answer("12345678") == "12345678"
    assert extract_answer(" the key") == ""


@pytest.mark.parametrize(
    "grid, expected",
    [
        ({128: 1.0, 256: 0.5, 384: 0.25, 512: 0.2}, 512),  # 20% counts
        ({128: 1.0, 256: 0.5, 384: 0.1, 512: 0.9}, 256),  # a failure stops k_max even if longer lengths succeed
        ({512: 1.0, 128: 0.19, 256: 1.0}, 0),  # the shortest fails; order of keys does not matter
        ({1000: 0.3}, 1000),
    ],
)
def test_effective_context_window(grid, expected):
    assert effective_context_window(grid) == expected


class OracleModel(nn.Module):
    """Answers the pass key correctly while the prompt has at most ``reach`` tokens, else answers 00000."""

    def __init__(self, tokenizer, reach: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.reach = tokenizer, reach

    def generate(self, input_ids, max_new_tokens, **kwargs):
        rows = []
        for ids in input_ids:
            key = re.search(r"The pass key is (\d+)\.", self.tokenizer.decode(ids)).group(1)
            key = key if len(ids) <= self.reach else "00000"
            new = self.tokenizer(" " + key, add_special_tokens=False)["input_ids"]
            new = (new + [self.tokenizer.eos_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(new)]))
        return torch.stack(rows)


def test_accuracy_grid_and_k_max_follow_the_model(eval_tokenizer):  # noqa: F811
    model = OracleModel(eval_tokenizer, reach=250)
    result = evaluate_passkey(model, eval_tokenizer, [300, 120, 200], depths=[0.0, 1.0], trials=3, batch_size=2)
    assert result.lengths == [120, 200, 300]
    assert result.accuracy == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    assert result.accuracy_by_length == {120: 1.0, 200: 1.0, 300: 0.0}
    assert result.k_max == 200
    assert len(result.records) == 3 * 2 * 3
    assert len({r["key"] for r in result.records}) > 10  # random keys
    assert all(r["key"].isdigit() and len(r["key"]) == 5 for r in result.records)
    assert all(r["tokens"] <= r["length"] for r in result.records)


def test_real_model_batched_equals_unbatched(eval_tokenizer):  # noqa: F811
    model = tiny_model("llama", vocab_size=len(eval_tokenizer))
    kwargs = dict(lengths=[90, 150], depths=[0.0, 0.5], trials=3, seed=1)
    one = evaluate_passkey(model, eval_tokenizer, batch_size=1, **kwargs)
    many = evaluate_passkey(model, eval_tokenizer, batch_size=3, **kwargs)
    assert [r["output"] for r in one.records] == [r["output"] for r in many.records]
    assert [r["key"] for r in one.records] == [r["key"] for r in many.records]


def test_evaluate_passkey_rejects_bad_grid(eval_tokenizer):  # noqa: F811
    model = OracleModel(eval_tokenizer, reach=10_000)
    with pytest.raises(ValueError, match="`trials`"):
        evaluate_passkey(model, eval_tokenizer, [200], trials=0)
    with pytest.raises(ValueError, match="`lengths`"):
        evaluate_passkey(model, eval_tokenizer, [])
