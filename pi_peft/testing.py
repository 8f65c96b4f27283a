"""Tiny offline models and tokenizers for tests, the CPU demo and benchmarks (nothing is downloaded)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

TINY_DIMS = dict(
    hidden_size=64,  # 4 heads x head_dim 16
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,  # the "original window" L of every tiny model
)

FAMILIES = ("llama", "mistral", "qwen2")


def tiny_config(family: str = "llama", **overrides):
    """A tiny transformers config of a RoPE family (``llama``, ``mistral``, ``qwen2``)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if family not in classes:
        raise ValueError(f"`family` must be one of {sorted(classes)}, got {family!r}.")
    kwargs = {**TINY_DIMS, **overrides}
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
    return classes[family](**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM in fp32 eval mode, identical for the same ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, path: str | os.PathLike | None = None, split_digits: bool = True
):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    ``split_digits=True`` gives one token per digit (a 5-digit passkey is always 5 tokens); ``False`` lets BPE merge
    runs of digits like GPT-2's byte-level BPE does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if path is not None:
        fast.save_pretrained(path)
    return fast


def save_tiny_checkpoint(path: str | os.PathLike, family: str = "llama", seed: int = 0, tokenizer=None, **overrides):
    """Save a tiny model (and optional tokenizer) to ``path`` as a local ``from_pretrained`` checkpoint."""
    model = tiny_model(family, seed=seed, **overrides)
    if tokenizer is not None:
        model.config.vocab_size = max(model.config.vocab_size, len(tokenizer))
        model = tiny_model(family, seed=seed, **{**overrides, "vocab_size": model.config.vocab_size})
        model.config.bos_token_id = tokenizer.bos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return model
