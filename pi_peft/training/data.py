"""Long-context training data: any `datasets` source, tokenised and packed into blocks of exactly the target length
(continued pretraining, as in the PI paper), or passed through to trl for SFT on chat / instruction data.

trl's `SFTConfig.max_length` defaults to 1024 and silently truncates; here the window is the target context, and a
dataset that cannot fill one window raises instead of training on nothing.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from typing import Any, Optional, Union

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset

from ..utils import check_positive_int

AnyDataset = Union[Dataset, IterableDataset]
DATA_MODES = ("auto", "pretrain", "sft")
SFT_COLUMNS = ("messages", "prompt", "completion", "conversations")
# builder names of local files, by extension
_BUILDERS = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


def load_raw_dataset(
    name: Optional[str] = None,
    *,
    data_files: Optional[Union[str, list[str]]] = None,
    config: Optional[str] = None,
    split: str = "train",
    streaming: bool = False,
) -> AnyDataset:
    """Load one split of any `datasets` source: a Hub id (`name`), a builder (`"text"`, `"json"`, `"parquet"`) with
    `data_files`, local files alone (the builder follows their extension), or a directory saved with
    `save_to_disk`. `streaming=True` returns an `IterableDataset`."""
    if name is None and not data_files:
        raise ValueError("Give a dataset: `dataset_name` (a Hub id or local path) or `data_files` (local files).")
    if name is not None and os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        from datasets import load_from_disk

        loaded = load_from_disk(name)
        ds = loaded[split] if isinstance(loaded, DatasetDict) else loaded
        return ds.to_iterable_dataset() if streaming else ds
    if name is None:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        exts = {os.path.splitext(f)[1].lower() for f in files}
        builders = {_BUILDERS.get(e) for e in exts}
        if len(builders) != 1 or None in builders:
            raise ValueError(
                f"`data_files`={files!r}: cannot tell the format from the extensions {sorted(exts)}; use one of "
                f"{sorted(_BUILDERS)} or pass `dataset_name` ('text', 'json', 'parquet', 'csv')."
            )
        name = builders.pop()
        missing = [f for f in files if not glob.glob(os.path.expanduser(f))]
        if missing:
            raise ValueError(f"`data_files`: no such file(s) {missing}; pass existing local files or glob patterns.")
    loaded = load_dataset(name, config, data_files=data_files, split=split, streaming=streaming)
    if isinstance(loaded, (DatasetDict, IterableDatasetDict)):  # pragma: no cover - split= returns one split
        loaded = loaded[split]
    return loaded


def column_names(dataset: AnyDataset) -> list[str]:
    names = dataset.column_names
    if names is None:  # an IterableDataset of unknown features
        names = list(next(iter(dataset)).keys())
    return list(names)


def detect_mode(dataset: AnyDataset, text_field: str = "text") -> str:
    """`"sft"` for trl's conversational / prompt-completion formats, `"pretrain"` for plain text."""
    names = column_names(dataset)
    if any(c in names for c in SFT_COLUMNS):
        return "sft"
    if text_field in names or "input_ids" in names:
        return "pretrain"
    raise ValueError(
        f"The dataset has columns {names}, none of which is text (`dataset_text_field`={text_field!r}) or an SFT "
        f"format ({list(SFT_COLUMNS)}). Set `dataset_text_field` to the column that holds the documents."
    )


def _pack_batch(batch: dict[str, list], *, tokenizer, block_size: int, text_field: str, add_eos: bool):
    # documents -> one token stream (BOS doc EOS BOS doc EOS ...) -> rows of exactly block_size tokens
    if "input_ids" in batch:
        docs = [list(ids) for ids in batch["input_ids"]]
    else:
        docs = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    for ids in docs:
        if bos is not None:
            stream.append(bos)
        stream.extend(ids)
        if add_eos and eos is not None:
            stream.append(eos)
    usable = len(stream) // block_size * block_size  # the tail shorter than a block is dropped
    return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}


def pack_documents(
    dataset: AnyDataset,
    tokenizer,
    block_size: int,
    *,
    text_field: str = "text",
    add_eos: bool = True,
    batch_size: int = 1000,
    num_proc: Optional[int] = None,
) -> AnyDataset:
    """Tokenise documents and pack them into rows of exactly `block_size` tokens.

    Each document becomes `BOS tokens EOS`; the documents of a map batch (`batch_size` documents) are concatenated and
    cut into `block_size` blocks, dropping the last partial block of each batch (at most `block_size - 1` tokens per
    `batch_size` documents). Works on `Dataset` and streaming `IterableDataset`. Raises `ValueError` when not one block
    can be made.
    """
    check_positive_int("block_size", block_size, "the target context")
    names = column_names(dataset)
    if text_field not in names and "input_ids" not in names:
        raise ValueError(
            f"`dataset_text_field`={text_field!r} is not a column of the dataset (columns: {names}); set it to the "
            "column holding the documents."
        )
    kwargs: dict[str, Any] = dict(batched=True, batch_size=batch_size, remove_columns=names)
    if isinstance(dataset, Dataset):
        kwargs.update(num_proc=num_proc, desc=f"Packing into {block_size}-token blocks")
    packed = dataset.map(
        _pack_batch,
        fn_kwargs=dict(tokenizer=tokenizer, block_size=block_size, text_field=text_field, add_eos=add_eos),
        **kwargs,
    )
    _require_one_block(packed, dataset, tokenizer, block_size, text_field)
    return packed


def _count_tokens(dataset: AnyDataset, tokenizer, text_field: str, limit: int = 10_000) -> int:
    total = 0
    for i, row in enumerate(dataset):
        if i >= limit:
            break
        ids = (
            row["input_ids"]
            if "input_ids" in row
            else tokenizer(row[text_field], add_special_tokens=False)["input_ids"]
        )
        total += len(ids) + 2
    return total


def _require_one_block(packed: AnyDataset, source: AnyDataset, tokenizer, block_size: int, text_field: str) -> None:
    empty = len(packed) == 0 if isinstance(packed, Dataset) else next(iter(packed), None) is None
    if empty:
        tokens = _count_tokens(source, tokenizer, text_field)
        raise ValueError(
            f"The training dataset is too short for one window: it has about {tokens} tokens, fewer than one block "
            f"of `max_length`={block_size} tokens (the target context). Use longer or more documents, or a "
            "shorter `max_length` (then it no longer trains the full target window)."
        )


def prepare_train_dataset(
    dataset: AnyDataset,
    tokenizer,
    context_length: int,
    *,
    mode: str = "auto",
    text_field: str = "text",
    num_proc: Optional[int] = None,
) -> tuple[AnyDataset, str]:
    """The dataset SFTTrainer trains on, and the mode used.

    - `"pretrain"` (plain text, or `"auto"` on a text column): packed into `context_length`-token blocks
      ([`pack_documents`]); trl then uses them as they are.
    - `"sft"` (`messages`, `prompt`/`completion`, ... or `"auto"` on those columns): passed through to trl, which
      tokenises with the chat template; pair it with `max_length=context_length` (and `packing=True` to fill windows).
    """
    if mode not in DATA_MODES:
        raise ValueError(f"`data_mode` must be one of {DATA_MODES}, got {mode!r}.")
    if mode == "auto":
        mode = detect_mode(dataset, text_field)
    if mode == "pretrain":
        return pack_documents(dataset, tokenizer, context_length, text_field=text_field, num_proc=num_proc), mode
    names = column_names(dataset)
    if not any(c in names for c in (*SFT_COLUMNS, text_field)):
        raise ValueError(
            f"`data_mode`='sft' needs one of the columns {list(SFT_COLUMNS)} or {text_field!r}; the dataset has "
            f"{names}."
        )
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError("The training dataset is empty.")
    return dataset, mode


def write_jsonl(rows: Iterable[dict], path: Union[str, os.PathLike]) -> str:
    """Write rows as JSON lines (for small local datasets in examples and tests); complete or absent."""
    import json

    from ..utils import atomic_write_text

    path = os.fspath(path)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path
