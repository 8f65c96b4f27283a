"""Safe loading of adapter folders, local or on the Hub, with clear errors for the ways they go wrong.

One code path for both: a Hub id is first turned into a local snapshot folder by huggingface_hub's
``snapshot_download`` (cache, token, ``revision`` and ``HF_HUB_OFFLINE`` handled as everywhere else in the HF
stack), then the folder is checked exactly like a local one:

- ``adapter_config.json`` present and valid JSON with a ``peft_type``;
- weights present as ``adapter_model.safetensors``, whose header and size are consistent (a truncated or corrupt file
  is named as such instead of failing deep inside safetensors/peft);
- a pickle ``adapter_model.bin`` is refused unless ``allow_pickle=True`` (unpickling can run arbitrary code);
- every adapter tensor fits the base model it is applied to (same module names and sizes), so an adapter meant for
  another architecture or model size fails with the module, both shapes and the fix, not a ``size mismatch`` trace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

ADAPTER_CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
SAVED_PREFIX = "base_model.model."
"""peft saves adapter tensors under the PeftModel's names; stripping this gives the base model's module names."""

# files a snapshot of an adapter repo needs (weights, config, card, tokenizer saved next to the adapter)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "chat_template.jinja",
)
"""A tokenizer's files: a folder with any of them has a tokenizer; uploads and exports copy those present."""

ADAPTER_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.md", "*.model", "*.txt", "*.jinja"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a user can name (``--dtype``); ``"auto"`` keeps the checkpoint's own."""


def resolve_adapter_dir(
    adapter: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
) -> Path:
    """A local folder for ``adapter`` (a folder, or a Hub repo id downloaded with ``snapshot_download``)."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(
            f"`adapter`={str(adapter)!r} is a file; pass the adapter *folder* (the one holding {ADAPTER_CONFIG_NAME})."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        local = snapshot_download(
            str(adapter), revision=revision, token=token, allow_patterns=ADAPTER_ALLOW_PATTERNS, repo_type="model"
        )
    except HFValidationError as exc:
        raise ValueError(
            f"`adapter`={str(adapter)!r} is neither an existing folder nor a valid Hub repo id ('user/name'): {exc}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ValueError(
            f"`adapter`={str(adapter)!r}: no such local folder and no such Hub repo (or it is private: log in with "
            "`hf auth login` or set `HF_TOKEN`)."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ValueError(
            f"`adapter`={str(adapter)!r} is not a local folder and is not in the local Hub cache, and downloading is "
            "off (HF_HUB_OFFLINE=1 or no connection). Pass a local folder, or unset HF_HUB_OFFLINE."
        ) from exc
    return Path(local)


def read_safetensors_header(file: Union[str, os.PathLike]) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape"}}`` of a ``.safetensors`` file, read with ``safetensors.safe_open`` (no tensor data).

    safetensors checks the header and that it covers the file exactly; a truncated or corrupt file becomes a
    ``ValueError`` naming the file and the fix.
    """
    from safetensors import SafetensorError, safe_open

    file = Path(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            return {
                k: {"dtype": f.get_slice(k).get_dtype(), "shape": list(f.get_slice(k).get_shape())} for k in f.keys()
            }
    except SafetensorError as exc:
        raise ValueError(
            f"`{file.name}` at {str(file)!r} is truncated or corrupt ({exc}). Re-save the adapter or download it "
            "again (e.g. `hf download <repo> --force-download`)."
        ) from exc


def check_adapter_dir(path: Union[str, os.PathLike], *, allow_pickle: bool = False) -> dict[str, Any]:
    """Check an adapter folder and return its ``adapter_config.json`` as a dict (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"`adapter`={str(path)!r} is not a folder.")
    present = sorted(p.name for p in path.iterdir())
    config_file = path / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(
            f"Adapter folder {str(path)!r} has no `{ADAPTER_CONFIG_NAME}` (it has: {present}). Point to the folder "
            "written by `model.save_pretrained(...)`, which holds `adapter_config.json` and the weights."
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"`{ADAPTER_CONFIG_NAME}` in {str(path)!r} is not valid JSON: {exc}.") from exc
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"`{ADAPTER_CONFIG_NAME}` in {str(path)!r} has no `peft_type`; it is not a peft adapter.")
    if (path / SAFETENSORS_NAME).is_file():
        read_safetensors_header(path / SAFETENSORS_NAME)
    elif (path / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise ValueError(
                f"Adapter folder {str(path)!r} holds its weights as a pickle (`{PICKLE_NAME}`), and unpickling a file "
                "can run arbitrary code. pi_peft only loads `adapter_model.safetensors` by default. If you trust "
                "the file, pass `allow_pickle=True` (CLI: `--allow-pickle`), then re-save it as safetensors."
            )
    else:
        raise ValueError(
            f"Adapter folder {str(path)!r} has no weights: expected `{SAFETENSORS_NAME}` (it has: {present}). "
            "The save was probably interrupted; save the adapter again."
        )
    return config


def adapter_tensor_shapes(path: Union[str, os.PathLike], *, allow_pickle: bool = False) -> dict[str, tuple]:
    """``{saved name: shape}`` of the adapter's tensors, read without loading the data (safetensors)."""
    path = Path(path)
    if (path / SAFETENSORS_NAME).is_file():
        return {k: tuple(v["shape"]) for k, v in read_safetensors_header(path / SAFETENSORS_NAME).items()}
    if not allow_pickle:
        raise ValueError(f"`{PICKLE_NAME}` is a pickle; pass `allow_pickle=True` to read it.")
    state = torch.load(path / PICKLE_NAME, map_location="meta", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def _module_in_out(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in, out) sizes a LoRA on ``module`` must have: ``lora_A`` is (r, in), ``lora_B`` is (out, r)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):  # nn.Linear, bnb Linear4bit/8bit
        return int(module.in_features), int(module.out_features)
    return None


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    size = getattr(config, "hidden_size", "?")
    layers = getattr(config, "num_hidden_layers", "?")
    return f"{arch} (hidden_size={size}, num_hidden_layers={layers})"


def check_base_compatible(shapes: Mapping[str, tuple], base: nn.Module, adapter_config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if an adapter with tensors ``shapes`` cannot apply to ``base`` (architecture/size)."""
    trained_on = adapter_config.get("base_model_name_or_path") or "an unrecorded base model"
    modules = dict(base.named_modules())
    params = dict(base.named_parameters())
    params.update(dict(base.named_buffers()))

    def mismatch(what: str) -> ValueError:
        return ValueError(
            f"This adapter does not fit the base model {_describe(base)}: {what}. The adapter was trained on "
            f"{trained_on!r}; load it onto that model (same architecture and size), e.g. with `base=` / `--base`."
        )

    for key, shape in shapes.items():
        name = _strip(key)
        for marker, dim, which in ((".lora_A.", 1, 0), (".lora_B.", 0, 1)):
            if marker in name:
                module_name = name.split(marker)[0]
                if module_name not in modules:
                    raise mismatch(f"it adapts module `{module_name}`, which this base does not have")
                in_out = _module_in_out(modules[module_name])
                if in_out is not None and int(shape[dim]) != in_out[which]:
                    side = "in_features" if which == 0 else "out_features"
                    raise mismatch(
                        f"`{module_name}` has {side}={in_out[which]} here but {int(shape[dim])} in the adapter"
                    )
                break
        else:
            if ".lora_" in name or "lora_magnitude" in name:
                continue  # other LoRA extras (biases, DoRA magnitudes): shapes follow the checked A/B
            # a fully trained module (modules_to_save: embeddings, norms) saved under the base's parameter name
            if name not in params:
                raise mismatch(f"it holds a full copy of `{name}`, which this base does not have")
            if tuple(params[name].shape) != tuple(shape):
                here = tuple(params[name].shape)
                raise mismatch(f"`{name}` has shape {here} here but {tuple(shape)} in the adapter")

    # the other way round: every base module of a kind the adapter covers (same name up to layer numbers) must have
    # its weights in the adapter, or peft fails with a raw KeyError (or leaves those layers silently unadapted)
    covered = {_strip(k).split(".lora_")[0] for k in shapes if ".lora_A." in k} | {_strip(k) for k in shapes}
    kinds = {_layer_pattern(name) for name in covered}
    for name in list(modules) + list(params):
        if name not in covered and _layer_pattern(name) in kinds:
            raise mismatch(f"this base has `{name}`, which the adapter has no weights for (more layers?)")


def _strip(key: str) -> str:
    return key[len(SAVED_PREFIX) :] if key.startswith(SAVED_PREFIX) else key


def _layer_pattern(name: str) -> str:
    """``model.layers.12.mlp.up_proj`` -> ``model.layers.#.mlp.up_proj``."""
    return ".".join("#" if part.isdigit() else part for part in name.split("."))


def load_adapter(
    adapter: Union[str, os.PathLike],
    base: Union[str, os.PathLike, nn.Module, None] = None,
    *,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    allow_pickle: bool = False,
    is_trainable: bool = False,
    **base_kwargs: Any,
):
    """Load a PI (or any peft) adapter safely: ``PeftModel`` on ``base`` after the checks of this module.

    Args:
        adapter: a local adapter folder or a Hub repo id (same code path).
        base: the base model (a loaded model, a folder or a Hub id); defaults to the adapter's
            ``base_model_name_or_path``.
        revision: Hub revision of the adapter (branch, tag or commit).
        token: Hub token; defaults to the usual places (``HF_TOKEN``, ``hf auth login``).
        dtype: dtype to load the base in (e.g. ``torch.bfloat16``).
        allow_pickle: allow a pickle ``adapter_model.bin`` (unpickling can run arbitrary code).
        is_trainable: load the adapter for further training.
        **base_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` for the base (e.g. ``device_map``).
    """
    from peft import PeftModel

    path = resolve_adapter_dir(adapter, revision=revision, token=token)
    config = check_adapter_dir(path, allow_pickle=allow_pickle)
    if not isinstance(base, nn.Module):
        base = load_base_model(base or config.get("base_model_name_or_path"), dtype=dtype, **base_kwargs)
    check_base_compatible(adapter_tensor_shapes(path, allow_pickle=allow_pickle), base, config)
    return PeftModel.from_pretrained(base, str(path), is_trainable=is_trainable)


def resolve_dtype(name: Union[str, torch.dtype, None], *, field: str = "dtype") -> Union[torch.dtype, str, None]:
    """``"float32"``/``"bfloat16"``/``"float16"`` -> the torch dtype; ``"auto"``, ``None`` and dtypes pass through."""
    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"`{field}` must be one of {['auto', *DTYPES]}, got {name!r}.")
    return DTYPES[name]


def is_adapter_dir(path: Union[str, os.PathLike]) -> bool:
    return Path(path, ADAPTER_CONFIG_NAME).is_file()


def check_model_path(path: str, what: str) -> None:
    """A path that looks local must exist; a Hub id must be reachable (clear errors instead of hub tracebacks)."""
    if Path(path).expanduser().exists():
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1:  # a path, not a Hub id 'org/name'
        raise ValueError(f"`{what}`={path!r}: no such folder. Pass an existing local folder or a Hub id 'org/name'.")
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        raise ValueError(
            f"`{what}`={path!r} is not a local folder and downloading is off (HF_HUB_OFFLINE=1). Pass a local folder, "
            "or unset HF_HUB_OFFLINE to download it from the Hub."
        )


def load_base_model(base: Union[str, os.PathLike, None], *, dtype=None, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(base)`` in eval mode; the one place pi_peft loads a base model."""
    from transformers import AutoModelForCausalLM

    if not base:
        raise ValueError(
            "The adapter does not record its base model (`base_model_name_or_path` is empty in adapter_config.json); "
            "pass it explicitly with `base=` (CLI: `--base`)."
        )
    check_model_path(str(base), "base")
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    return AutoModelForCausalLM.from_pretrained(str(base), **kwargs).eval()


def load_model(path: Union[str, os.PathLike], *, dtype: Union[str, torch.dtype, None] = "auto", device: str = "auto"):
    """A base, merged or PI-adapter model (adapters through :func:`load_adapter`, with its checks), in eval mode on
    ``device`` (``"auto"``: CUDA when available)."""
    path = str(path)
    check_model_path(path, "model")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if is_adapter_dir(path):
        import pi_peft  # noqa: F401  (registers PI with peft)

        model = load_adapter(path, dtype=resolve_dtype(dtype))
    else:
        model = load_base_model(path, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(path: Union[str, os.PathLike], tokenizer: Optional[str] = None, *, required: bool = True):
    """The tokenizer for a model or adapter folder: ``tokenizer`` if given, else the folder's own, else (adapters)
    the one of ``base_model_name_or_path``. ``required=False`` returns ``None`` instead of raising."""
    from transformers import AutoTokenizer

    if tokenizer:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    sources = [str(path)]
    if is_adapter_dir(path):
        base = json.loads(Path(path, ADAPTER_CONFIG_NAME).read_text()).get("base_model_name_or_path")
        sources += [base] if base else []
    errors = []
    for source in sources:
        folder = Path(source).expanduser()
        if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
            errors.append(f"{source!r} has no tokenizer files")
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError) as exc:
            errors.append(f"{source!r}: {' '.join(str(exc).split())[:200]}")
    if not required:
        return None
    raise ValueError(f"No tokenizer could be loaded for {str(path)!r} ({'; '.join(errors)}); pass `--tokenizer`.")
