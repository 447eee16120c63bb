"""The data layer: raw datasets -> Merlin parquet splits for the MLLM-MSR ranker.

* :func:`merlin_mllm.data.prepare.prepare_dataset` (the datasets of
  :data:`merlin_mllm.data.registry.DATASETS`; paper, leave-last-out or timeline protocol);
* :func:`merlin_mllm.data.image_files.fetch_images` (cached, retried image downloads) and
  :func:`~merlin_mllm.data.image_files.dataset_image_root` (where item image paths are confined);
* :func:`merlin_mllm.data.tables.read_table` / ``read_schema`` to read the outputs back.

Names are imported lazily, so ``import merlin_mllm.data.image_files`` does not load Merlin.
"""
from __future__ import annotations

from merlin_mllm.lazy_exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["DATASETS", "DatasetEntry", "dataset_entry"], "registry"),
    **dict.fromkeys(["dataset_image_root", "fetch_images"], "image_files"),
    "prepare_dataset": "prepare",
    **dict.fromkeys(["read_schema", "read_table"], "tables"),
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
