"""The collaborative tokens' item table: SASRec item embeddings trained before the training split's cut.

LLaRA feeds an item's embedding from a trained sequential recommender into the LLM as one soft
token (:mod:`merlin_mllm.ranker.collab_tokens`). The recommender here is the compact SASRec of
:mod:`merlin_mllm.baselines` (the hybrid's retrieval column and the SASRec row are the same
model), trained by :func:`~merlin_mllm.baselines.train_sequential_baseline` on
:func:`~merlin_mllm.data.splits.training_events` of the **train** split: on timeline folders the
events before ``T_valid``, less each training user's events at or after its first training
target; so no training target, and nothing any valid or test row happens after, is in the table.
The one table serves training, evaluation and serving (it is saved with the ranker): an item
that first appears after the cut has no embedding, and is cold.

Its item embeddings are SASRec's (tied) input embeddings, one row per catalogue item. An item
with no training-time event keeps its random initial row (moved only as a softmax negative), so
it is marked cold (``known`` False) and takes the projector's learned cold vector instead.

Usage::

    from merlin_mllm.pipelines.collab import train_collab_embeddings
    table = train_collab_embeddings("data/ml100k_timeline", seed=42)
    table.summary(), table.metadata["trained_before"]
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Optional, Union

import numpy as np

from merlin_mllm.baselines import SequentialSettings, train_sequential_baseline
from merlin_mllm.data.splits import prepared_tables, split_cuts, training_events
from merlin_mllm.ranker.collab_tokens import CollabEmbeddings

__all__ = ["COLLAB_SPLIT", "train_collab_embeddings"]

#: The split whose training-time events the table is trained on: the ranker trains on its rows,
#: and every later split's rows happen after its cut.
COLLAB_SPLIT = "train"


def train_collab_embeddings(data_dir: Union[str, os.PathLike], *, seed: int = 0,
                            settings: Optional[SequentialSettings] = None) -> CollabEmbeddings:
    """Train the compact SASRec on the train split's training-time events; its item embeddings.

    Parameters
    ----------
    data_dir : path or PreparedTables
        Output of ``prepare_dataset``.
    seed : int
        SASRec's training seed.
    settings : SequentialSettings, optional
        SASRec's settings (default: the baselines'); ``hidden`` is the table's dimension.

    Returns
    -------
    CollabEmbeddings
        One row per item of ``items/``; ``known`` where the item has a training-time event.
        ``metadata``: ``model``, ``seed``, ``settings``, ``trained_before`` (split, the folder's
        timeline cuts or None, events used, their last timestamp), ``items``, ``cold``.
    """
    data = prepared_tables(data_dir)
    settings = settings or SequentialSettings()
    events = training_events(data, COLLAB_SPLIT)
    baseline = train_sequential_baseline("sasrec", data, seed, split=COLLAB_SPLIT, settings=settings)
    item_ids = np.sort(data.items["item_id"].to_numpy(np.int64))
    weights = baseline.model.items.weight.detach().float().cpu().numpy()
    beyond = item_ids[(item_ids < 1) | (item_ids > baseline.n_items)]
    if beyond.size:
        raise ValueError(f"{data.folder / 'items'}: item id {int(beyond[0])} is outside SASRec's 1..{baseline.n_items}")
    known = np.isin(item_ids, events["item_id"].to_numpy(np.int64))
    cuts = split_cuts(data.folder) if (data.folder / "report.json").exists() else None
    last = int(events["timestamp"].max()) if "timestamp" in events.columns and len(events) else None
    metadata = {
        "model": "sasrec (merlin_mllm.baselines, compact)",
        "seed": int(seed),
        "settings": asdict(settings),
        "trained_before": {"split": COLLAB_SPLIT, "cuts": None if cuts is None else cuts._asdict(),
                           "events": int(len(events)), "last_event_timestamp": last},
        "items": int(len(item_ids)),
        "cold": int((~known).sum()),
        "final_loss": round(float(baseline.losses[-1]), 6) if baseline.losses else None,
    }
    return CollabEmbeddings(item_ids, weights[item_ids], known, metadata)
