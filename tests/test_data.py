import pytest
from _train_helpers import documents, make_jsonl
from datasets import Dataset

from pi_peft.testing import train_tokenizer
from pi_peft.training.data import detect_mode, load_raw_dataset, pack_documents, prepare_train_dataset


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(documents(30, 100), vocab_size=256)


def _stream(tokenizer, texts):
    ids = []
    for text in texts:
        ids += [
            tokenizer.bos_token_id,
            *tokenizer(text, add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
    return ids


def test_pack_documents_makes_exact_windows_of_the_token_stream(tokenizer):
    texts = documents(7, 60, seed=3)
    packed = pack_documents(Dataset.from_dict({"text": texts}), tokenizer, 50)
    stream = _stream(tokenizer, texts)
    assert len(packed) == len(stream) // 50 > 1
    assert all(len(row) == 50 for row in packed["input_ids"])
    assert sum(packed["input_ids"], []) == stream[: len(packed) * 50]  # BOS doc EOS BOS doc EOS ..., tail dropped


def test_too_short_dataset_raises_instead_of_a_silent_short_run(tokenizer):
    with pytest.raises(ValueError, match=r"too short for one window.*`max_length`=4096"):
        pack_documents(Dataset.from_dict({"text": documents(3, 20)}), tokenizer, 4096)


def test_streaming_local_jsonl_is_packed_and_too_short_stream_raises(tmp_path, tokenizer):
    path = make_jsonl(str(tmp_path / "docs" / "train.jsonl"), n_docs=5, words_per_doc=80)
    stream = load_raw_dataset(data_files=[path], streaming=True)
    blocks = list(pack_documents(stream, tokenizer, 64))
    assert len(blocks) > 3 and all(len(b["input_ids"]) == 64 for b in blocks)
    with pytest.raises(ValueError, match="too short"):
        pack_documents(load_raw_dataset(data_files=[path], streaming=True), tokenizer, 100_000)


def test_load_raw_dataset_local_text_files_and_bad_input(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    assert load_raw_dataset(data_files=[str(tmp_path / "a.txt")])["text"] == ["first line", "second line"]
    with pytest.raises(ValueError, match="`data_files`.*extensions"):
        load_raw_dataset(data_files=[str(tmp_path / "a.docx")])
    with pytest.raises(ValueError, match="`dataset_name`"):
        load_raw_dataset()


def test_detect_mode_and_sft_pass_through(tokenizer):
    chat = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]}
    )
    assert detect_mode(chat) == "sft"
    assert detect_mode(Dataset.from_dict({"text": ["x"]})) == "pretrain"
    out, mode = prepare_train_dataset(chat, tokenizer, 1024)
    assert mode == "sft" and out is chat  # trl tokenises it with the chat template
    with pytest.raises(ValueError, match="`dataset_text_field`"):
        detect_mode(Dataset.from_dict({"body": ["x"]}))
    with pytest.raises(ValueError, match="`data_mode`.*'fancy'"):
        prepare_train_dataset(chat, tokenizer, 1024, mode="fancy")


def test_missing_data_file_is_named(tmp_path):
    from pi_peft.training.data import load_raw_dataset

    with pytest.raises(ValueError, match=r"`data_files`: no such file\(s\) \['.*missing.jsonl'\]"):
        load_raw_dataset(data_files=[str(tmp_path / "missing.jsonl")])
