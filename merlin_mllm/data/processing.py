"""The interaction-processing steps of ``prepare_dataset``, each a small pure function.

Order: :func:`drop_duplicates` -> :func:`k_core` -> :func:`sample_users` ->
:func:`order_and_trim` -> split (:func:`paper_targets` / :func:`temporal_targets`) -> optional
extra training targets (:func:`prefix_targets`) -> :func:`check_negatives` ->
:func:`build_rows` (which calls :func:`sample_negatives`, uniform or weighted by
:func:`popularity_weights`).

The input of the first step is an interactions table with ``user_key``, ``item_key``
(strings), ``timestamp`` (int64) and ``line`` (file order); later steps add integer ids.

Usage::

    deduped, n_duplicates = drop_duplicates(interactions)
    core, rounds = k_core(deduped, min_user=5, min_item=5)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

#: The paper's random user split: train, valid, test fractions.
PAPER_SPLIT = (0.8, 0.1, 0.1)
SPLITS = ("train", "valid", "test")
#: The fewest kept events a user needs: every target needs at least one history event.
MIN_EVENTS = {"paper": 2, "temporal": 4}
#: Which positions of a training user become training targets (:func:`prefix_targets`): the
#: protocol's own target only; also every summary-block boundary before it; also every position
#: after the first block before it.
TRAIN_TARGETS = ("last", "blocks", "every")
#: How training negatives are drawn: uniformly, or weighted by training-time popularity.
NEGATIVE_SAMPLING = ("uniform", "popularity")


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


def sample_negatives(
    rng: np.random.Generator, n_items: int, forbidden: np.ndarray, k: int, weights: Optional[np.ndarray] = None
) -> np.ndarray:
    """``k`` distinct item ids drawn from ``1..n_items`` minus ``forbidden``.

    Parameters
    ----------
    rng : numpy.random.Generator
    n_items : int
        Item ids are ``1..n_items``.
    forbidden : numpy.ndarray
        Sorted unique ids that must not be drawn (everything the user interacted with).
    k : int
        How many to draw.
    weights : numpy.ndarray, optional
        ``n_items + 1`` non-negative weights indexed by item id (entry 0 unused): draw each next
        item with probability proportional to its weight among the items not drawn yet and not
        forbidden (an item of weight 0 is never drawn). Default: uniform.
    """
    if weights is not None:
        return _weighted_negatives(rng, weights, forbidden, k)
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


def _weighted_negatives(rng: np.random.Generator, weights: np.ndarray, forbidden: np.ndarray, k: int,
                        cumulative: Optional[np.ndarray] = None) -> np.ndarray:
    """Successive weighted draws without replacement (what ``rng.choice(replace=False, p=...)``
    does), by rejection when most of the weight is allowed, else from the explicit allowed set."""
    weights = np.asarray(weights, dtype=np.float64)
    n_items = len(weights) - 1
    forbidden = np.asarray(forbidden, dtype=np.int64)
    available = int(np.count_nonzero(weights[1:] > 0)) - int(np.count_nonzero(weights[forbidden] > 0))
    if k > available:
        raise ValueError(f"cannot draw {k} negatives: only {available} of {n_items} items are unseen by the user "
                         f"and have a training-time interaction")
    if k == 0:
        return np.empty(0, dtype=np.int64)
    total = float(weights[1:].sum())
    if float(weights[forbidden].sum()) > total / 2 or available < 2 * k:
        allowed = np.setdiff1d(np.flatnonzero(weights > 0), forbidden, assume_unique=True)
        allowed = allowed[allowed >= 1]
        p = weights[allowed] / weights[allowed].sum()
        return rng.choice(allowed, size=k, replace=False, p=p).astype(np.int64)
    cumulative = np.cumsum(weights) if cumulative is None else cumulative
    chosen: list[int] = []
    seen: set[int] = set(forbidden.tolist())
    while len(chosen) < k:
        draws = np.searchsorted(cumulative, rng.random(2 * (k - len(chosen)) + 2) * cumulative[-1], side="right")
        for draw in np.minimum(draws, n_items).tolist():
            if draw not in seen and weights[draw] > 0:
                seen.add(draw)
                chosen.append(draw)
                if len(chosen) == k:
                    break
    return np.asarray(chosen, dtype=np.int64)


def unseen_count(n_items: int, forbidden: np.ndarray, weights: Optional[np.ndarray] = None) -> int:
    """How many items :func:`sample_negatives` can draw for a user who saw ``forbidden``."""
    if weights is None:
        return n_items - len(forbidden)
    return int(np.count_nonzero(weights[1:] > 0)) - int(np.count_nonzero(weights[np.asarray(forbidden, dtype=np.int64)] > 0))


def check_negatives(targets: "Targets", n_negatives: int, n_items: int, user_history: dict[int, np.ndarray],
                    what: str, weights: Optional[np.ndarray] = None, user_names: Optional[dict] = None) -> None:
    """Raise before anything is drawn when some user of ``targets`` has fewer than
    ``n_negatives`` items to draw from, naming that user (``user_names`` maps an id to the raw key)."""
    for user in dict.fromkeys(int(u) for u in targets.user_id):
        available = unseen_count(n_items, user_history[user], weights)
        if n_negatives > available:
            name = f"user {user}" if user_names is None else f"user {user_names[user]!r} (id {user})"
            pool = "items" if weights is None else "items with a training-time interaction"
            raise ValueError(
                f"{what}: cannot draw {n_negatives} negatives: only {available} of {n_items} {pool} of the "
                f"catalogue are unseen by {name}; ask for fewer negatives"
            )


def popularity_weights(events: pd.DataFrame, held_out: Sequence["Targets"], n_items: int) -> np.ndarray:
    """Each item's count among the training-time events, indexed by item id (``n_items + 1`` entries).

    Training-time events are the ``events`` (``user_id``, ``item_id``, ``position``) that come
    before every ``held_out`` target of their user (the valid and test targets): for each user the
    cut-off is the smallest held-out ``target_position``, and a user without one keeps all events.
    This is the rule of :func:`merlin_mllm.data.splits.training_events` for the valid split.
    """
    cutoff: dict[int, int] = {}
    for targets in held_out:
        for user, position in zip(targets.user_id.tolist(), targets.target_position.tolist()):
            cutoff[user] = min(position, cutoff.get(user, position))
    limit = events["user_id"].map(cutoff)
    keep = limit.isna().to_numpy() | (events["position"].to_numpy() < limit.fillna(0).to_numpy())
    counts = np.bincount(events.loc[keep, "item_id"].to_numpy(np.int64), minlength=n_items + 1)[: n_items + 1]
    counts[0] = 0
    return counts.astype(np.float64)


def prefix_targets(events: pd.DataFrame, last: "Targets", mode: str, block_size: int) -> "Targets":
    """The extra training targets before each user's own training target (``last``).

    ``mode`` (:data:`TRAIN_TARGETS`): ``"last"`` adds none; ``"blocks"`` adds the positions
    ``block_size, 2 * block_size, ...``; ``"every"`` adds every position from ``block_size`` on;
    all strictly before the user's target. Users in the order of ``last``, positions ascending.
    ``events`` holds ``user_id``, ``item_id``, ``position`` and ``timestamp``.
    """
    if mode not in TRAIN_TARGETS:
        raise ValueError(f"unknown train targets {mode!r}; choose one of {list(TRAIN_TARGETS)}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    step = int(block_size) if mode == "blocks" else 1
    chosen = [] if mode == "last" else [
        (int(user), p) for user, target in zip(last.user_id.tolist(), last.target_position.tolist())
        for p in range(int(block_size), int(target), step)
    ]
    if not chosen:
        empty = np.empty(0, dtype=np.int64)
        return Targets(empty, empty.copy(), empty.copy(), empty.copy())
    positions = events.set_index(["user_id", "position"])
    picked = positions.loc[pd.MultiIndex.from_tuples(chosen, names=["user_id", "position"])].reset_index()
    return Targets(
        user_id=picked["user_id"].to_numpy(np.int64),
        target_position=picked["position"].to_numpy(np.int64),
        item_id=picked["item_id"].to_numpy(np.int64),
        timestamp=picked["timestamp"].to_numpy(np.int64),
    )


def build_rows(
    targets: Targets,
    n_negatives: int,
    n_items: int,
    user_history: dict[int, np.ndarray],
    rng: np.random.Generator,
    first_group_id: int,
    desc: str = "negatives",
    weights: Optional[np.ndarray] = None,
) -> pd.DataFrame:
    """One group per target: the positive row, then ``n_negatives`` sampled negative rows.

    ``user_history[user_id]`` is the sorted array of every item id the user ever interacted with
    (its full deduplicated history), so that no negative is an item the user has seen.
    ``weights`` (see :func:`sample_negatives`): popularity-weighted draws instead of uniform.
    """
    per_group = 1 + n_negatives
    n_groups = len(targets.user_id)
    item_ids = np.empty(n_groups * per_group, dtype=np.int64)
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)) if weights is not None else None
    for group in tqdm(range(n_groups), desc=desc, unit=" groups", disable=None):
        user = int(targets.user_id[group])
        start = group * per_group
        item_ids[start] = targets.item_id[group]
        if weights is None:
            item_ids[start + 1 : start + per_group] = sample_negatives(rng, n_items, user_history[user], n_negatives)
        else:
            item_ids[start + 1 : start + per_group] = _weighted_negatives(rng, weights, user_history[user], n_negatives,
                                                                          cumulative)
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
