"""``add_prefix_targets``: more training groups per user, one at each summary-block boundary.

The paper protocol gives each training user one group: its last item against sampled negatives.
Sequential models train on every prefix of the history instead. This adds, for every training
user, a group whose positive is the item right after each full block of the history (positions
``k, 2k, ...`` for block size ``k``, up to the user's own training target). The user summary of
such a row is the recurrent chain over whole blocks, which the summary store already holds for
every user whose history passes that boundary: the extra rows need no new LLM call.

Only ``train/`` changes. ``valid/``, ``test/``, ``items/``, ``events/`` and ``users/`` are copied
as they are, so the test groups (and every score already computed on them) stay comparable row
for row. Each new group holds the positive and ``n_negatives`` negatives (the prepared folder's
``n_negatives_train`` by default), drawn uniformly from the items of ``items/`` that the user
never interacted with in its whole deduplicated history (re-read from the raw files named in
``report.json``), as ``prepare_dataset`` draws them.

The positions are chosen by :func:`merlin_mllm.data.processing.prefix_targets`, the function
behind ``prepare_dataset(train_targets="blocks")``, which builds the same groups while preparing
(its negatives come from the whole k-core, not only from ``items/``). This post-step is for a
folder that is already prepared and summarised.

Usage::

    from merlin_mllm.data.prefix_targets import add_prefix_targets
    report = add_prefix_targets("data/ml100k", "data/ml100k_prefixes", block_size=3)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from merlin_mllm.data import processing
from merlin_mllm.data.prepare import ROW_TAGS, user_histories, with_history
from merlin_mllm.data.sources import BadLines, read_source
from merlin_mllm.data.tables import read_table, write_table

__all__ = ["add_prefix_targets"]

_COPIED = ("valid", "test", "items", "events", "users")


def _full_histories(report: dict, users: pd.DataFrame, items: pd.DataFrame) -> dict[int, np.ndarray]:
    """Each user's whole deduplicated history (ids of ``items/``), re-read from the raw files."""
    interactions_file = (report.get("files") or {}).get("interactions")
    if not interactions_file or not Path(interactions_file).exists():
        raise FileNotFoundError(
            f"report.json names no readable raw interactions file ({interactions_file!r}); the negatives must "
            f"exclude each user's whole history, which the prepared events (trimmed) do not hold"
        )
    raw = read_source(report["dataset"], Path(interactions_file).parent, BadLines("skip")).interactions
    deduped, _ = processing.drop_duplicates(raw)
    # Keys are compared as text: the raw reader and the written tables may type them differently.
    deduped = deduped.assign(user_key=deduped["user_key"].astype(str), item_key=deduped["item_key"].astype(str))
    return user_histories(deduped, dict(zip(users["user_key"].astype(str), users["user_id"].astype(np.int64))),
                           dict(zip(items["item_key"].astype(str), items["item_id"].astype(np.int64))))


def add_prefix_targets(
    data_dir: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    *,
    block_size: int = 3,
    n_negatives: Optional[int] = None,
    seed: int = 0,
) -> dict:
    """Write a copy of a prepared folder whose ``train/`` also has a group at every block boundary.

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset``.
    out : path
        The new prepared folder (replaced if it exists). Its ``report.json`` is the source's,
        with a ``prefix_targets`` record added.
    block_size : int
        The user summaries' block size: targets sit at positions ``block_size, 2 * block_size,
        ...`` strictly before each training user's own target.
    n_negatives : int, optional
        Negatives per new group; defaults to the folder's ``n_negatives_train``.
    seed : int
        Seeds the negatives.

    Returns
    -------
    dict
        Counts: training users, groups and rows before and after.
    """
    data_dir, out = Path(data_dir), Path(out)
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    report = json.loads((data_dir / "report.json").read_text())
    if report.get("cuts") is not None:
        # The timeline's negatives must have existed before each row, which this post-step does not know.
        raise ValueError(f"{data_dir} is a timeline folder: prepare it with train_targets='blocks' instead")
    if n_negatives is None:
        n_negatives = int(report["settings"]["n_negatives_train"])
    train = read_table(data_dir / "train")
    events = read_table(data_dir / "events")
    items = read_table(data_dir / "items")
    users = read_table(data_dir / "users")
    group_ids = [train["group_id"]] + [read_table(data_dir / split)["group_id"] for split in ("valid", "test")]
    next_group = int(max(g.max() for g in group_ids if len(g))) + 1

    last = train[train["label"] == 1]
    last_target = last.set_index("user_id")["target_position"]
    own = processing.Targets(
        user_id=last["user_id"].to_numpy(np.int64),
        target_position=last["target_position"].to_numpy(np.int64),
        item_id=last["item_id"].to_numpy(np.int64),
        timestamp=last["timestamp"].to_numpy(np.int64),
    )
    # The same choice of positions as `prepare_dataset(train_targets="blocks")`.
    targets = processing.prefix_targets(events, own, "blocks", int(block_size))
    # Item ids of a prepared folder are contiguous 1..len(items), so the sampler draws from items/.
    if sorted(items["item_id"].tolist()) != list(range(1, len(items) + 1)):
        raise ValueError(f"{data_dir / 'items'}: item ids are not contiguous from 1; was it written by prepare_dataset?")
    histories = _full_histories(report, users, items)
    missing = sorted(u for u in set(targets.user_id.tolist()) if not len(histories.get(u, ())))
    if missing:
        raise ValueError(f"user {missing[0]} (and {len(missing) - 1} more) not found in the raw interactions file")
    rows = processing.build_rows(targets, n_negatives, len(items), histories, np.random.default_rng(seed), next_group,
                                 desc="prefix negatives")
    sequences = {int(user): group.sort_values("position")["item_id"].to_numpy()
                 for user, group in events.groupby("user_id", sort=False)}
    rows = with_history(rows, sequences)
    combined = pd.concat([train, rows[train.columns]], ignore_index=True)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in _COPIED:
        shutil.copytree(data_dir / name, out / name)
    write_table(combined, out / "train", ROW_TAGS, {"user_id": len(users), "item_id": len(items)})
    summary = {
        "source": str(data_dir),
        "block_size": int(block_size),
        "n_negatives": int(n_negatives),
        "seed": int(seed),
        "train_users": int(last_target.size),
        "groups_before": int(train["group_id"].nunique()),
        "groups_added": int(len(targets.user_id)),
        "rows_before": int(len(train)),
        "rows_after": int(len(combined)),
    }
    (out / "report.json").write_text(json.dumps({**report, "prefix_targets": summary}, indent=2, sort_keys=True) + "\n")
    return summary
