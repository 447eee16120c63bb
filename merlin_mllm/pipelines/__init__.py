"""Pipelines: the jobs that run the ranker over a prepared dataset, on the Merlin stack.

- :mod:`merlin_mllm.pipelines.train_config`: ``TrainConfig``, the training settings (validated when made).
- :mod:`merlin_mllm.pipelines.training`: ``train_ranker``, LoRA SFT through Merlin's dataloader
  and Lightning (``load_rows``, ``tokenize_rows``, ``RankerDataModule``).
- :mod:`merlin_mllm.pipelines.evaluation`: ``evaluate_ranker``, ranking metrics of a trained or
  zero-shot ranker over a split (``plot_evaluation``).
- :mod:`merlin_mllm.pipelines.summaries`: the item and user summary stages as NVTabular
  workflows on a Dask cluster (``dask_client``, ``summarize_items_on_cluster``,
  ``summarize_users_on_cluster``; ``merlin-mllm summarize ... --workers N``).

They sit above the ranker core and the operators, and below serving, the CLI and the
quickstart. Names are imported lazily, on first use (``TrainConfig`` without torch).
"""
from __future__ import annotations

from merlin_mllm.lazy_exports import lazy_exports

_EXPORTS = {
    "TrainConfig": "train_config",
    **dict.fromkeys(["RankerDataModule", "load_rows", "tokenize_rows", "train_ranker"], "training"),
    **dict.fromkeys(["evaluate_ranker", "plot_evaluation"], "evaluation"),
    **dict.fromkeys(["dask_client", "summarize_items_on_cluster", "summarize_users_on_cluster"], "summaries"),
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
