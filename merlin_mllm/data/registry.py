"""The datasets that ``prepare_dataset`` and ``merlin-mllm data prepare`` know: one entry each.

An entry names the dataset, its reader (a function ``(input, bad_lines) -> Source``, see
:mod:`merlin_mllm.data.sources`), its default k-core thresholds and a line of help (what it is,
what ``--input`` must be). Adding a dataset is writing its reader and one :class:`DatasetEntry`
in :data:`DATASETS`; the CLI's ``--dataset`` help, the k-core defaults and the reader dispatch
all come from here.

This module imports nothing heavy: readers are named as ``"module:function"`` and imported on
first use, so the CLI can build its help without loading pandas.

Usage::

    from merlin_mllm.data.registry import DATASETS, dataset_entry

    list(DATASETS)                            # ['ml-100k', 'amazon2023', 'microlens']
    dataset_entry("amazon2023").k_core        # (6, 5)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

__all__ = ["DatasetEntry", "DATASETS", "dataset_entry", "datasets_help"]


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset.

    Parameters
    ----------
    name : str
        The ``--dataset`` value.
    reader : str
        ``"module:function"`` of the reader, called as ``reader(input, bad_lines)`` with
        ``input`` a ``Path`` or ``None``; it returns a :class:`~merlin_mllm.data.sources.Source`.
    k_core : (int, int)
        Default minimum interactions per (user, item).
    help : str
        What the dataset is and what ``input`` must be, one line.
    """

    name: str
    reader: str
    k_core: Tuple[int, int]
    help: str

    def read_function(self) -> Callable:
        """The reader function (its module is imported here, on first use)."""
        module, function = self.reader.split(":")
        return getattr(importlib.import_module(module), function)

    def read(self, input: Optional[Path | str], bad_lines):
        """Read the raw files: ``Source`` of this dataset."""
        return self.read_function()(Path(input) if input is not None else None, bad_lines)


#: Every known dataset, by name, in the order the CLI lists them. k-cores are the paper's
#: (MovieLens is not in the paper).
DATASETS: Dict[str, DatasetEntry] = {
    entry.name: entry
    for entry in (
        DatasetEntry(
            "ml-100k", "merlin_mllm.data.sources:read_ml100k", (5, 5),
            "MovieLens-100k; input: a folder with ml-100k.inter/ml-100k.item (default: the copy in the recbole wheel)",
        ),
        DatasetEntry(
            "amazon2023", "merlin_mllm.data.sources:read_amazon2023", (6, 5),
            "Amazon Reviews 2023, one category; input: the reviews file <Category>.jsonl[.gz] "
            "(meta_<Category>.jsonl[.gz] beside it) or a folder with one category's pair",
        ),
        DatasetEntry(
            "microlens", "merlin_mllm.data.sources:read_microlens", (7, 5),
            "MicroLens; input: the folder with MicroLens-100k_pairs.csv and MicroLens-100k_title_en.csv "
            "(images default to its MicroLens-*_covers folder)",
        ),
    )
}


def dataset_entry(name: str) -> DatasetEntry:
    """The entry of ``name``; a ``ValueError`` listing the known names for any other."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    return DATASETS[name]


def datasets_help() -> str:
    """The CLI's ``--dataset`` help: every name with its help line."""
    return " | ".join(f"{entry.name}: {entry.help}" for entry in DATASETS.values())
