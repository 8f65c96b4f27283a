"""Builders shared by test_hub.py, test_export.py and test_loading.py (tiny offline checkpoints and PI adapters)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model

import pi_peft
from pi_peft.testing import save_tiny_checkpoint, train_tokenizer

L = 64  # original window of the tiny models
TEXTS = ["The pass key is 12345. Remember it. The grass is green. The sky is blue."] * 20
BASE_LICENSE = "apache-2.0"


def make_base(path: Path, **overrides) -> str:
    """A tiny Llama checkpoint folder with a tokenizer and a README whose card declares a license."""
    path = Path(path)
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    save_tiny_checkpoint(path, "llama", tokenizer=tokenizer, **overrides)
    (path / "README.md").write_text(f"---\nlicense: {BASE_LICENSE}\n---\n\n# tiny base\n")
    return str(path)


def load_base(base_dir: str, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, **kwargs).eval()


def make_adapter(base_dir: str, out: Path, *, seed: int = 0, base_model=None, **pi_kwargs):
    """Save a PI adapter with non-zero LoRA weights (and perturbed trained embeddings/norms) to ``out``."""
    torch.manual_seed(seed)
    base = base_model if base_model is not None else load_base(base_dir)
    config = pi_peft.PIConfig(
        **{"context_length": 4 * L, "target_modules": "all-linear", "init_lora_weights": False, **pi_kwargs}
    )
    model = get_peft_model(base, config)
    with torch.no_grad():  # a trained adapter: full modules differ from the base
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(out))
    return model.eval()
