"""Small helpers shared across pi_peft: atomic writes (complete or absent), the one JSON writer, the one positive-int
check, Markdown tables."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: PathLike, directory: bool) -> None:
    """`mkstemp`/`mkdtemp` create 0600/0700 entries; give the result the mode a plain `open`/`mkdir` would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; it replaces ``path`` only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    _usual_mode(tmp, directory=False)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``: complete or absent, never half written."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def refuse_to_overwrite_inputs(
    output: PathLike, inputs: dict[str, Any], *, field: str = "output", replaces_folder: bool = True
) -> None:
    """Raise if writing ``output`` would overwrite or delete one of ``inputs`` (``{name: path}``; Hub ids and ``None``
    skipped): ``output`` may not be an input, nor (when the whole folder is replaced) a folder holding one."""
    out = Path(output).expanduser().resolve()
    for name, value in inputs.items():
        if value is None or not Path(str(value)).expanduser().exists():
            continue  # a Hub id or nothing: no local file to destroy
        source = Path(str(value)).expanduser().resolve()
        if source == out or (replaces_folder and out in source.parents):
            raise ValueError(
                f"`{field}`={str(output)!r} would overwrite the {name} {str(value)!r} it is made from; choose a "
                "new folder."
            )


@contextlib.contextmanager
def atomic_output_dir(output: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``output`` only if the block succeeds (complete or absent).

    An existing ``output`` is refused unless ``overwrite``; it is then swapped out only after the new one is complete.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"`output`={str(output)!r} already exists; choose a new folder or pass `--overwrite`.")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    _usual_mode(tmp, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def is_kbit_model(model: Any) -> bool:
    """Whether ``model`` (or the base model under a peft wrapper) was loaded in 4 or 8 bit."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def is_positive_int(value: Any) -> bool:
    """``value`` is an ``int`` (not a ``bool``) greater than 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive_int(name: str, value: Any, what: str = "", fix: str = "") -> int:
    """``value`` if it is a positive int, else ``ValueError("`name` must be a positive int (what), got value. fix")``:
    the one check behind every count, length and size pi_peft accepts."""
    if not is_positive_int(value):
        detail = f" ({what})" if what else ""
        raise ValueError(f"`{name}` must be a positive int{detail}, got {value!r}.{' ' + fix if fix else ''}")
    return value


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def read_json_object(path: PathLike, field: str, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in the file ``path`` (the value of the argument ``field``), or a ``ValueError`` that names
    ``field``, the path, what is wrong and ``fix``; ``what`` says what the object should be ("a model config"). The one
    reader of pi_peft's JSON inputs."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"`{field}`={str(path)!r} is not a readable JSON file ({exc}); {fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"`{field}`={str(path)!r} holds a JSON {type(obj).__name__}, not {what} (an object); {fix}")
    return obj


def write_json(path: PathLike, payload: Any) -> None:
    """``payload`` as indented JSON, atomically (complete or absent); NaN -> null and +-inf -> "inf"/"-inf", so the
    file is strict JSON. The one JSON writer of pi_peft's results."""
    atomic_write_text(path, json.dumps(_json_safe(payload), indent=2) + "\n")
