"""`SFTTrainer(peft_config=PIConfig(...))` trains at the PI window (pi_peft.training.window)."""

import subprocess
import sys
import textwrap

import pytest
from datasets import Dataset

from pi_peft import PIConfig
from pi_peft.testing import tiny_model

L = 64


@pytest.fixture(scope="module")
def sft_parts():
    from pi_peft.testing import train_tokenizer

    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 40], vocab_size=300)
    tokenizer.pad_token, tokenizer.eos_token = "<pad>", "</s>"
    return tokenizer, Dataset.from_dict({"text": ["the quick brown fox jumps " * 120] * 4})


@pytest.mark.parametrize(
    "max_length, expected",
    [(None, 4 * L), (1024, 4 * L), (100, 100), (4 * L + 1, "longer than the PI adapter's window")],
)
def test_sft_trainer_trains_at_the_pi_window(sft_parts, tmp_path, max_length, expected):
    from trl import SFTConfig, SFTTrainer

    tokenizer, data = sft_parts
    kwargs = {} if max_length is None else {"max_length": max_length}
    args = SFTConfig(str(tmp_path), report_to="none", use_cpu=True, **kwargs)
    make = lambda: SFTTrainer(  # noqa: E731
        model=tiny_model(vocab_size=len(tokenizer)),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=PIConfig(scaling_factor=4.0, target_modules=["q_proj"]),
    )
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=rf"`max_length`={max_length} is {expected}.*`context_length`={4 * L}"):
            make()
        return
    trainer = make()
    assert trainer.args.max_length == expected
    assert max(len(row["input_ids"]) for row in trainer.train_dataset) == expected


def test_sft_trainer_without_pi_is_left_alone(sft_parts, tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer, data = sft_parts
    args = SFTConfig(str(tmp_path), report_to="none", use_cpu=True)
    trainer = SFTTrainer(
        model=tiny_model(vocab_size=len(tokenizer)),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(target_modules=["q_proj"]),
    )
    assert trainer.args.max_length == 1024


def test_get_peft_model_and_sft_trainer_raise_no_future_warning(tmp_path):
    code = textwrap.dedent(
        f"""
        import pi_peft
        from datasets import Dataset
        from peft import get_peft_model
        from trl import SFTConfig, SFTTrainer
        from pi_peft import PIConfig
        from pi_peft.testing import tiny_model, train_tokenizer

        get_peft_model(tiny_model(), PIConfig(scaling_factor=4.0, target_modules=["q_proj"]))
        tok = train_tokenizer(["the quick brown fox " * 40], vocab_size=300)
        tok.pad_token, tok.eos_token = "<pad>", "</s>"
        SFTTrainer(
            model=tiny_model(vocab_size=len(tok)),
            args=SFTConfig({str(tmp_path)!r}, report_to="none", use_cpu=True, activation_checkpointing=True),
            train_dataset=Dataset.from_dict({{"text": ["the quick brown fox " * 30] * 2}}),
            processing_class=tok,
            peft_config=PIConfig(scaling_factor=4.0, target_modules=["q_proj"]),
        )
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.parametrize("words, fits", [(20, True), (120, False)])
def test_padding_free_without_packing_keeps_max_length_none_and_checks_the_rows(sft_parts, tmp_path, words, fits):
    # issue 19 item 7: trl requires `max_length=None` here (it does not truncate); pi_peft used to set the window
    from trl import SFTConfig, SFTTrainer

    tokenizer, _ = sft_parts
    data = Dataset.from_dict({"text": ["the quick brown fox jumps " * words] * 4})
    args = SFTConfig(str(tmp_path), report_to="none", use_cpu=True, padding_free=True, packing=False, max_length=None)
    make = lambda: SFTTrainer(  # noqa: E731
        model=tiny_model(vocab_size=len(tokenizer)),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=PIConfig(scaling_factor=4.0, target_modules=["q_proj"]),
    )
    if not fits:
        with pytest.raises(ValueError, match=rf"4 of 4 training rows are longer than .* `context_length`={4 * L}"):
            make()
        return
    trainer = make()
    assert trainer.args.max_length is None and trainer.padding_free
    assert max(len(row["input_ids"]) for row in trainer.train_dataset) <= 4 * L
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch  # really padding-free
