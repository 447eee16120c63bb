"""The data layer: raw datasets -> Merlin parquet splits for the MLLM-MSR ranker.

* :func:`merlin_mllm.data.prepare.prepare_dataset` (ml-100k, amazon2023, microlens; paper or
  temporal protocol);
* :func:`merlin_mllm.data.images.fetch_images` (cached, retried image downloads);
* :func:`merlin_mllm.data.tables.read_table` / ``read_schema`` to read the outputs back.

Names are imported lazily, so ``import merlin_mllm.data.images`` does not load Merlin.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare_dataset": "merlin_mllm.data.prepare",
    "fetch_images": "merlin_mllm.data.images",
    "read_table": "merlin_mllm.data.tables",
    "read_schema": "merlin_mllm.data.tables",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
