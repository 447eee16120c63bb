"""One safetensors file per item-keyed table (image features, collaborative embeddings): written
atomically, read back with its kind checked, so a crash never leaves half a file and a file of
another kind is refused by name.

Usage::

    write_tables_file(path, {"item_ids": ids, "vectors": vectors}, {"format": "my-table-v1"})
    tensors, metadata = read_tables_file(path, "my table", "my-table-v1", {"item_ids", "vectors"})
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["write_tables_file", "read_tables_file"]


def write_tables_file(path: Union[str, os.PathLike], tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> Path:
    """Write ``tensors`` and ``metadata`` to ``path`` through a temporary file (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_tables_file(path: Union[str, os.PathLike], what: str, file_format: str,
                     required: Iterable[str]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The tensors and metadata of a file written by :func:`write_tables_file`.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When it is not readable safetensors, its ``format`` is not ``file_format``, or it lacks a
        ``required`` tensor; each message names ``what`` and the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    if metadata.get("format") != file_format:
        raise ValueError(f"{path} is not {'an' if what[0] in 'aeiou' else 'a'} {what} file "
                         f"(format={metadata.get('format')!r})")
    missing = set(required) - set(tensors)
    if missing:
        raise ValueError(f"{path} lacks tensors {sorted(missing)}")
    return tensors, metadata
