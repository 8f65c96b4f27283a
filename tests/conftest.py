import os

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
