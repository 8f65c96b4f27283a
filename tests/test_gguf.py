"""`pi-peft gguf-to-hf` on tiny GGUF files written with the `gguf` package: a complete file converts exactly; a file
that lacks a tensor, is truncated or corrupt fails with one line naming the file and what is wrong (issue 19, item 10).
"""

import os

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="writing test GGUF files needs the `gguf` package: pip install gguf")

from _gguf_helpers import write_tiny_gguf  # noqa: E402
from _train_helpers import documents  # noqa: E402

from pi_peft.cli import main as pi_peft_main  # noqa: E402
from pi_peft.testing import tiny_model, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = train_tokenizer(documents(20, 50), vocab_size=300)  # 300 > the 256-byte alphabet: it has merges
    model = tiny_model("llama", vocab_size=len(tokenizer))
    root = tmp_path_factory.mktemp("gguf")
    return model, tokenizer, root, write_tiny_gguf(root / "tiny.gguf", model, tokenizer)


def _convert(gguf_file, output, capsys) -> tuple[int, str]:
    code = pi_peft_main(["gguf-to-hf", str(gguf_file), str(output)])
    return code, capsys.readouterr().err.strip().splitlines()[-1] if code else ""


def _fails(gguf_file, tmp_path, capsys) -> str:
    code, line = _convert(gguf_file, tmp_path / "out", capsys)
    assert code == 2 and line.startswith("pi-peft gguf-to-hf: error: ") and "internal error" not in line, line
    assert f"`gguf_file`={str(gguf_file)!r}" in line  # names the file
    assert not (tmp_path / "out").exists()  # nothing written
    return line


def test_a_complete_gguf_converts_every_weight_exactly(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, _, path = tiny
    assert _convert(path, tmp_path / "out", capsys)[0] == 0
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    want, got = model.state_dict(), converted.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    text = "the river stone light"
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(text).input_ids == tokenizer(text).input_ids


@pytest.mark.parametrize(
    "drop, names",
    [
        (("blk.1.attn_k.weight",), "model.layers.1.self_attn.k_proj.weight"),
        (("blk.0.ffn_down.weight", "output_norm.weight"), "model.layers.0.mlp.down_proj.weight, model.norm.weight"),
    ],
)
def test_a_gguf_without_a_tensor_fails_naming_it(tiny, tmp_path, capsys, drop, names):
    model, tokenizer, _, _ = tiny
    path = write_tiny_gguf(tmp_path / "partial.gguf", model, tokenizer, drop=drop)
    line = _fails(path, tmp_path, capsys)
    assert f"does not hold every weight of its architecture (llama): missing {len(drop)}: {names}." in line


def test_a_gguf_without_its_tokenizer_merges_or_scores_is_named(tiny, tmp_path, capsys):
    model, tokenizer, _, _ = tiny
    path = write_tiny_gguf(tmp_path / "nomerges.gguf", model, tokenizer, tokenizer_keys=False)
    line = _fails(path, tmp_path, capsys)  # was: internal error: KeyError: scores
    assert "lacks the tokenizer metadata `tokenizer.ggml.scores` that its 'gpt2' tokenizer needs" in line


@pytest.mark.parametrize(
    "cut, message",
    [
        (10, r"is truncated \(or corrupt\): the file ends at byte 10, but the tensor count needs bytes 8\.\.16"),
        (100, r"the file ends at byte 100, but the length of metadata `general.name` needs"),
        (2000, r"the file ends at byte 2000, but the length of metadata `tokenizer.ggml.tokens`\[\d+\]"),
        (-100, r"is truncated: \d+ bytes, but its tensors \(up to `blk.1.ffn_down.weight`\) need \d+"),  # was: reshape
        (-1, r"is truncated: \d+ bytes, but its tensors"),
    ],
)
def test_a_truncated_gguf_is_one_line_naming_the_file(tiny, tmp_path, capsys, cut, message):
    import re

    data = open(tiny[3], "rb").read()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: cut if cut > 0 else len(data) + cut])
    line = _fails(path, tmp_path, capsys)
    assert re.search(message, line), line
    assert "Download the file again." in line


@pytest.mark.parametrize(
    "at, message",
    [
        (30, r"is corrupt: metadata key #0 at byte 32 claims \d+ bytes, more than the whole file"),  # was: unpack_from
        (200, r"is corrupt: metadata key #\d+ at byte \d+ is not UTF-8 text"),  # was: a utf-8 decode error
        (4, r"is GGUF version \d+; only versions 2 and 3 can be read"),
    ],
)
def test_a_corrupt_gguf_is_one_line_naming_the_file(tiny, tmp_path, capsys, at, message):
    import re

    data = bytearray(open(tiny[3], "rb").read())
    data[at : at + 4] = b"\xff\xfe\xfd\xfc"
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    assert re.search(message, _fails(path, tmp_path, capsys))


def test_inspect_reads_the_header_of_a_complete_file(tiny):
    from pi_peft.sharing.gguf import inspect_gguf

    header = inspect_gguf(tiny[3])
    assert header["version"] == 3 and header["size"] == os.path.getsize(tiny[3])
    assert header["tensors"]["blk.0.attn_q.weight"] == ("F32", (64, 64))
    assert len(header["tensors"]) == 2 + 9 * 2 + 1  # embeddings, final norm, 9 per layer, untied output
