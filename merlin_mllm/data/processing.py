"""The interaction-processing steps of ``prepare_dataset``, each a small pure function.

Order: :func:`drop_duplicates` -> :func:`k_core` -> :func:`sample_users` ->
:func:`order_and_trim` -> split (:func:`paper_targets` / :func:`temporal_targets`) ->
:func:`build_rows` (which calls :func:`sample_negatives`).

The input of the first step is an interactions table with ``user_key``, ``item_key``
(strings), ``timestamp`` (int64) and ``line`` (file order); later steps add integer ids.

Usage::

    deduped, n_duplicates = drop_duplicates(interactions)
    core, rounds = k_core(deduped, min_user=5, min_item=5)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

#: The paper's random user split: train, valid, test fractions.
PAPER_SPLIT = (0.8, 0.1, 0.1)
SPLITS = ("train", "valid", "test")
#: The fewest kept events a user needs: every target needs at least one history event.
MIN_EVENTS = {"paper": 2, "temporal": 4}


def natural_order(keys) -> np.ndarray:
    """The keys sorted numerically when all are integers (``"2" < "10"``), else as strings."""
    keys = np.asarray(sorted(set(keys)), dtype=object)
    if len(keys) and all(isinstance(key, str) and key.isdigit() for key in keys):
        return keys[np.argsort(np.array([int(key) for key in keys]), kind="stable")]
    return keys


def drop_duplicates(interactions: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep each (user, item) pair's earliest interaction (file order breaks timestamp ties).

    Returns
    -------
    (pandas.DataFrame, int)
        The deduplicated table (in its original row order) and how many rows were dropped.
    """
    ordered = interactions.sort_values(["timestamp", "line"], kind="stable")
    kept = ordered.drop_duplicates(["user_key", "item_key"], keep="first").sort_index()
    return kept, len(interactions) - len(kept)


def k_core(interactions: pd.DataFrame, min_user: int, min_item: int) -> tuple[pd.DataFrame, int]:
    """Iterative k-core: drop users with < ``min_user`` and items with < ``min_item`` interactions
    until neither exists (dropping one side can push the other below its threshold).

    Returns
    -------
    (pandas.DataFrame, int)
        The filtered table and the number of passes it took.
    """
    if min_user < 0 or min_item < 0:
        raise ValueError(f"k-core thresholds must be >= 0, got users {min_user}, items {min_item}")
    frame = interactions
    rounds = 0
    while True:
        rounds += 1
        user_counts = frame["user_key"].map(frame["user_key"].value_counts())
        item_counts = frame["item_key"].map(frame["item_key"].value_counts())
        keep = (user_counts >= min_user) & (item_counts >= min_item)
        if keep.all():
            return frame, rounds
        frame = frame[keep.to_numpy()]


def sample_users(interactions: pd.DataFrame, max_users: int, rng: np.random.Generator) -> pd.DataFrame:
    """Keep ``max_users`` users chosen uniformly at random (0 or more than there are: all)."""
    if max_users < 0:
        raise ValueError(f"max_users must be >= 0, got {max_users}")
    users = natural_order(interactions["user_key"].unique())
    if max_users == 0 or max_users >= len(users):
        return interactions
    chosen = set(rng.choice(users, size=max_users, replace=False).tolist())
    return interactions[interactions["user_key"].isin(chosen).to_numpy()]


def order_and_trim(interactions: pd.DataFrame, max_history: int) -> pd.DataFrame:
    """Sort each user's interactions by time (ties by item key) and keep the latest ``max_history``.

    Returns the kept rows sorted by user then time, with ``position`` (0-based within the user's
    kept sequence). ``max_history=0`` keeps everything.
    """
    if max_history < 0:
        raise ValueError(f"max_history must be >= 0, got {max_history}")
    frame = interactions.copy()
    user_rank = {key: rank for rank, key in enumerate(natural_order(frame["user_key"].unique()))}
    item_rank = {key: rank for rank, key in enumerate(natural_order(frame["item_key"].unique()))}
    frame["_user_rank"] = frame["user_key"].map(user_rank).astype(np.int64)
    frame["_item_rank"] = frame["item_key"].map(item_rank).astype(np.int64)
    frame = frame.sort_values(["_user_rank", "timestamp", "_item_rank"], kind="stable")
    if max_history:
        from_end = frame.groupby("_user_rank", sort=False).cumcount(ascending=False)
        frame = frame[(from_end < max_history).to_numpy()]
    frame["position"] = frame.groupby("_user_rank", sort=False).cumcount().astype(np.int64)
    return frame.drop(columns=["_user_rank", "_item_rank"]).reset_index(drop=True)


@dataclass
class Targets:
    """The target events of one split: one row-group per (user, target)."""

    user_id: np.ndarray  # int64
    target_position: np.ndarray  # int64
    item_id: np.ndarray  # int64, the positive
    timestamp: np.ndarray  # int64


def _targets_at(events: pd.DataFrame, users: np.ndarray, offset_from_end: int) -> Targets:
    """For each user, the event ``offset_from_end`` places before the last one (0 = the last)."""
    lengths = events.groupby("user_id")["position"].size()
    chosen = events[events["user_id"].isin(users).to_numpy()]
    wanted = chosen["user_id"].map(lengths) - 1 - offset_from_end
    picked = chosen[(chosen["position"] == wanted).to_numpy()].sort_values("user_id", kind="stable")
    return Targets(
        picked["user_id"].to_numpy(np.int64),
        picked["position"].to_numpy(np.int64),
        picked["item_id"].to_numpy(np.int64),
        picked["timestamp"].to_numpy(np.int64),
    )


def paper_targets(events: pd.DataFrame, rng: np.random.Generator) -> dict[str, Targets]:
    """The paper's protocol: users split at random 80/10/10; each user's last kept event is its target."""
    users = np.sort(events["user_id"].unique())
    shuffled = rng.permutation(users)
    n_valid = int(round(len(users) * PAPER_SPLIT[1]))
    n_test = int(round(len(users) * PAPER_SPLIT[2]))
    n_train = len(users) - n_valid - n_test
    parts = {
        "train": shuffled[:n_train],
        "valid": shuffled[n_train : n_train + n_valid],
        "test": shuffled[n_train + n_valid :],
    }
    return {split: _targets_at(events, np.sort(part), 0) for split, part in parts.items()}


def temporal_targets(events: pd.DataFrame) -> dict[str, Targets]:
    """Leave-last-out over all users: test = last event, valid = second to last, train = third to last."""
    users = np.sort(events["user_id"].unique())
    return {split: _targets_at(events, users, offset) for split, offset in zip(("test", "valid", "train"), (0, 1, 2))}


def sample_negatives(rng: np.random.Generator, n_items: int, forbidden: np.ndarray, k: int) -> np.ndarray:
    """``k`` distinct item ids drawn uniformly from ``1..n_items`` minus ``forbidden``.

    Parameters
    ----------
    rng : numpy.random.Generator
    n_items : int
        Item ids are ``1..n_items``.
    forbidden : numpy.ndarray
        Sorted unique ids that must not be drawn (everything the user interacted with).
    k : int
        How many to draw.
    """
    available = n_items - len(forbidden)
    if k > available:
        raise ValueError(f"cannot draw {k} negatives: only {available} of {n_items} items are unseen by the user")
    if k == 0:
        return np.empty(0, dtype=np.int64)
    if available < 2 * k or available < n_items // 2:
        # Few items left: draw from the explicit set rather than rejecting most draws.
        allowed = np.setdiff1d(np.arange(1, n_items + 1, dtype=np.int64), forbidden, assume_unique=True)
        return rng.choice(allowed, size=k, replace=False).astype(np.int64)
    chosen: list[int] = []
    seen: set[int] = set(forbidden.tolist())
    while len(chosen) < k:
        for draw in rng.integers(1, n_items + 1, size=2 * (k - len(chosen)) + 2).tolist():
            if draw not in seen:
                seen.add(draw)
                chosen.append(draw)
                if len(chosen) == k:
                    break
    return np.asarray(chosen, dtype=np.int64)


def build_rows(
    targets: Targets,
    n_negatives: int,
    n_items: int,
    user_history: dict[int, np.ndarray],
    rng: np.random.Generator,
    first_group_id: int,
    desc: str = "negatives",
) -> pd.DataFrame:
    """One group per target: the positive row, then ``n_negatives`` sampled negative rows.

    ``user_history[user_id]`` is the sorted array of every item id the user ever interacted with
    (its full deduplicated history), so that no negative is an item the user has seen.
    """
    per_group = 1 + n_negatives
    n_groups = len(targets.user_id)
    item_ids = np.empty(n_groups * per_group, dtype=np.int64)
    for group in tqdm(range(n_groups), desc=desc, unit=" groups", disable=None):
        user = int(targets.user_id[group])
        start = group * per_group
        item_ids[start] = targets.item_id[group]
        item_ids[start + 1 : start + per_group] = sample_negatives(rng, n_items, user_history[user], n_negatives)
    labels = np.zeros(n_groups * per_group, dtype=np.int64)
    labels[::per_group] = 1
    return pd.DataFrame(
        {
            "user_id": np.repeat(targets.user_id, per_group),
            "item_id": item_ids,
            "label": labels,
            "target_position": np.repeat(targets.target_position, per_group),
            "group_id": np.repeat(np.arange(first_group_id, first_group_id + n_groups, dtype=np.int64), per_group),
            "timestamp": np.repeat(targets.timestamp, per_group),
        }
    )
