"""The interaction-processing steps of ``prepare_dataset``, each a small pure function.

Order: :func:`drop_duplicates` -> :func:`k_core` -> :func:`sample_users` ->
:func:`order_and_trim` -> split (:func:`paper_targets` / :func:`leave_last_out_targets` /
:func:`timeline_targets`, after :func:`timeline_cuts`) -> :func:`with_history_only` -> optional
extra training targets (:func:`prefix_targets`) -> :func:`check_negatives` ->
:func:`build_rows` (which calls :func:`sample_negatives`, uniform or weighted by
:func:`popularity_weights`, from every item or, on the timeline, from the items that existed
before the row: :func:`first_seen_times`).

Time, not position, decides what a row may see. Each user's events are ordered by time, ties in
a seeded random order (:func:`order_and_trim`), and a target's ``target_position`` is the number
of the user's kept events with a timestamp strictly less than the target's (:func:`earlier_events`),
so ``position < target_position`` means "strictly before the target's time": events in the
same second as a target are neither its history nor counted before it.

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

from merlin_mllm.choices import TRAIN_TARGETS

#: The paper's random user split: train, valid, test fractions.
PAPER_SPLIT = (0.8, 0.1, 0.1)
SPLITS = ("train", "valid", "test")
#: The fewest kept events a user needs for the protocol to give it its targets (the paper: one
#: target and one history event; leave-last-out: three targets and one history event). Ties can
#: still leave a target without a strictly earlier event: :func:`with_history_only` drops those.
MIN_EVENTS = {"paper": 2, "leave-last-out": 4, "timeline": 2}


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


def sample_users(interactions: pd.DataFrame, max_users: int, rng: np.random.Generator, *,
                 test_cut: Optional[int] = None, test_users: int = 0) -> pd.DataFrame:
    """Keep ``max_users`` users chosen uniformly at random (0 or more than there are: all).

    With ``test_users`` > 0 (the timeline protocol; ``test_cut`` is ``T_test``) the draw is
    stratified by the test cut: ``test_users`` of the ``max_users`` users are drawn uniformly
    among the users with an event at or after ``test_cut`` (those waiting for recommendations
    at the test moment, as in Elliot's ``fixed_timestamp`` split: each gives one test group), and
    the other ``max_users - test_users`` uniformly among the users without one (who give train
    and valid groups only). Why: users rate in bursts, so a global cut splits users rather than
    their histories. On ML-100k 303 of 943 users have an event after the default ``T_test``, and
    193 of them none before it, so a uniform sample of 40 users holds about 13 test groups; a
    stratified one holds as many as asked, and still the users whose past trains the model.
    Both strata are uniform, so the test groups are a uniform sample of the full test split's.

    Raises
    ------
    ValueError
        A stratum holds fewer users than asked for (naming both counts), or ``test_users``
        without a ``test_cut`` or above ``max_users``.
    """
    if max_users < 0:
        raise ValueError(f"max_users must be >= 0, got {max_users}")
    users = natural_order(interactions["user_key"].unique())
    if test_users:
        if test_cut is None:
            raise ValueError("test_users needs the test cut (the timeline protocol)")
        if not 0 < test_users <= max_users:
            raise ValueError(f"test_users must be between 1 and max_users ({max_users}), got {test_users}")
        last = interactions.groupby("user_key")["timestamp"].max()
        waiting = last.reindex(users).to_numpy() >= test_cut
        strata = (("with an event at or after the test cut", users[waiting], test_users),
                  ("without an event at or after the test cut", users[~waiting], max_users - test_users))
        chosen = set()
        for what, stratum, wanted in strata:
            if wanted > len(stratum):
                raise ValueError(f"{wanted} users asked for {what}, but there are only {len(stratum)}")
            chosen.update(rng.choice(stratum, size=wanted, replace=False).tolist())
        return interactions[interactions["user_key"].isin(chosen).to_numpy()]
    if max_users == 0 or max_users >= len(users):
        return interactions
    chosen = set(rng.choice(users, size=max_users, replace=False).tolist())
    return interactions[interactions["user_key"].isin(chosen).to_numpy()]


def order_and_trim(interactions: pd.DataFrame, max_history: int, rng: np.random.Generator) -> pd.DataFrame:
    """Sort each user's interactions by time, ties in a random order drawn from ``rng``, and keep
    the latest ``max_history``.

    Ties are common (in ML-100k three events in four share their second with another of the same
    user) and the order within a second is unknown. Breaking them by item key made "the last
    event" the highest key of a burst, which biased leave-last-out targets towards high-key items;
    a seeded random order does not. Give ``rng`` its own stream, so that the tie order does not
    move the other draws.

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
    # A deterministic order first (user, time, item key), then one random key per event in it.
    frame = frame.sort_values(["_user_rank", "timestamp", "_item_rank"], kind="stable")
    frame["_tie"] = rng.permutation(len(frame))
    frame = frame.sort_values(["_user_rank", "timestamp", "_tie"], kind="stable")
    if max_history:
        from_end = frame.groupby("_user_rank", sort=False).cumcount(ascending=False)
        frame = frame[(from_end < max_history).to_numpy()]
    frame["position"] = frame.groupby("_user_rank", sort=False).cumcount().astype(np.int64)
    return frame.drop(columns=["_user_rank", "_item_rank", "_tie"]).reset_index(drop=True)


def earlier_events(events: pd.DataFrame, user_column: str = "user_id") -> np.ndarray:
    """For each event, how many of its user's events have a strictly earlier timestamp.

    ``events`` holds ``user_column``, ``timestamp`` and ``position`` (each user's events numbered
    in time order, as :func:`order_and_trim` numbers them). This is the ``target_position`` of a
    row whose target is that event: its history is the events with ``position`` below it.
    """
    firsts = events.groupby([user_column, "timestamp"], sort=False)["position"].transform("min")
    return firsts.to_numpy(np.int64)


@dataclass
class Targets:
    """The target events of one split: one row-group per (user, target)."""

    user_id: np.ndarray  # int64
    target_position: np.ndarray  # int64
    item_id: np.ndarray  # int64, the positive
    timestamp: np.ndarray  # int64


def _targets_of(picked: pd.DataFrame) -> Targets:
    """The chosen events (rows of the events table, with ``earlier``) as targets, by user."""
    picked = picked.sort_values(["user_id", "position"], kind="stable")
    return Targets(
        picked["user_id"].to_numpy(np.int64),
        picked["earlier"].to_numpy(np.int64),
        picked["item_id"].to_numpy(np.int64),
        picked["timestamp"].to_numpy(np.int64),
    )


def _with_earlier(events: pd.DataFrame) -> pd.DataFrame:
    return events if "earlier" in events else events.assign(earlier=earlier_events(events))


def _targets_at(events: pd.DataFrame, users: np.ndarray, offset_from_end: int) -> Targets:
    """For each user, the event ``offset_from_end`` places before the last one (0 = the last)."""
    events = _with_earlier(events)
    lengths = events.groupby("user_id")["position"].size()
    chosen = events[events["user_id"].isin(users).to_numpy()]
    wanted = chosen["user_id"].map(lengths) - 1 - offset_from_end
    return _targets_of(chosen[(chosen["position"] == wanted).to_numpy()])


def with_history_only(targets: Targets) -> tuple[Targets, int]:
    """The targets with at least one history event (``target_position >= 1``: an event of the
    user strictly before the target's time), and how many were dropped."""
    keep = targets.target_position >= 1
    kept = Targets(*(np.asarray(values)[keep] for values in
                     (targets.user_id, targets.target_position, targets.item_id, targets.timestamp)))
    return kept, int(np.count_nonzero(~keep))


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


def leave_last_out_targets(events: pd.DataFrame) -> dict[str, Targets]:
    """Leave-last-out over all users: test = last event, valid = second to last, train = third to last.

    Each row's history stops strictly before its own target's time, but the targets of different
    users lie anywhere in time: what is counted for one user's row can come after it in the
    world's time (see :mod:`merlin_mllm.data.splits`). :func:`timeline_targets` does not.
    """
    users = np.sort(events["user_id"].unique())
    return {split: _targets_at(events, users, offset) for split, offset in zip(("test", "valid", "train"), (0, 1, 2))}


#: The timeline protocol's default cuts: quantiles of the k-core events' times.
TIMELINE_QUANTILES = {"valid": 0.7, "test": 0.8}


def timeline_cuts(timestamps: np.ndarray, valid_cut: Optional[int] = None, test_cut: Optional[int] = None,
                  valid_quantile: Optional[float] = None, test_quantile: Optional[float] = None) -> dict[str, dict]:
    """The two cut times of the timeline protocol, ``T_valid < T_test``.

    Each cut is either an absolute timestamp (``valid_cut``/``test_cut``, in the data's unit) or a
    quantile of ``timestamps`` (the k-core events' times; the event time at that quantile, the
    lower one between two events). Neither: :data:`TIMELINE_QUANTILES`.

    Returns
    -------
    dict
        ``{"valid": {...}, "test": {...}}``, each with ``timestamp`` (int), ``quantile`` (as asked,
        or ``None`` for an absolute cut) and ``fraction_of_k_core_events_before`` (the share of
        ``timestamps`` strictly before the cut).
    """
    timestamps = np.sort(np.asarray(timestamps, dtype=np.int64))
    if not len(timestamps):
        raise ValueError("no events to place the timeline cuts in")
    cuts = {}
    for name, cut, quantile in (("valid", valid_cut, valid_quantile), ("test", test_cut, test_quantile)):
        if cut is not None and quantile is not None:
            raise ValueError(f"give the {name} cut as a timestamp or as a quantile, not both")
        if cut is None:
            quantile = TIMELINE_QUANTILES[name] if quantile is None else quantile
            if isinstance(quantile, bool) or not isinstance(quantile, (int, float, np.number)) or not 0 < quantile < 1:
                raise ValueError(f"the {name} cut quantile must be a number in (0, 1), got {quantile!r}")
            cut = int(np.quantile(timestamps, float(quantile), method="lower"))
            quantile = float(quantile)
        elif isinstance(cut, bool) or not isinstance(cut, (int, np.integer)):
            raise ValueError(f"the {name} cut must be an integer timestamp, got {cut!r}")
        before = int(np.searchsorted(timestamps, int(cut), side="left"))
        cuts[name] = {"timestamp": int(cut), "quantile": quantile,
                      "fraction_of_k_core_events_before": before / len(timestamps)}
    if not cuts["valid"]["timestamp"] < cuts["test"]["timestamp"]:
        raise ValueError(f"the valid cut ({cuts['valid']['timestamp']}) must come before the test cut "
                         f"({cuts['test']['timestamp']})")
    return cuts


def timeline_targets(events: pd.DataFrame, valid_cut: int, test_cut: int) -> dict[str, Targets]:
    """The global-timeline protocol: one target per user and split, chosen by time windows.

    * test: each user with an event at or after ``test_cut``: the user's last event;
    * valid: each user with an event in ``[valid_cut, test_cut)``: the user's last event there;
    * train: each user with an event before ``valid_cut``: the user's last event before it.

    One group per user and split keeps the test split at several hundred groups on ML-100k
    (about 300 users have an event after the 80% quantile of time), all of them scored at a time
    when every training event had happened, and keeps the paired bootstrap over users simple
    (one group per user). A row's history is every event of its user strictly before the
    target's time, those after the cut included: a deployed model reads the user's history at
    request time.
    """
    if not valid_cut < test_cut:
        raise ValueError(f"the valid cut ({valid_cut}) must come before the test cut ({test_cut})")
    events = _with_earlier(events)
    stamps = events["timestamp"].to_numpy()
    windows = {"train": stamps < valid_cut, "valid": (stamps >= valid_cut) & (stamps < test_cut),
               "test": stamps >= test_cut}
    targets = {}
    for split, inside in windows.items():
        window = events[inside]
        # Events are in time order within a user, so the last position in the window is the latest.
        last = window.groupby("user_id")["position"].transform("max").to_numpy()
        targets[split] = _targets_of(window[window["position"].to_numpy() == last])
    return targets


#: ``first_seen`` of an item without any event: later than every row.
NEVER_SEEN = np.iinfo(np.int64).max


def first_seen_times(interactions: pd.DataFrame, item_ids: dict, n_items: int) -> np.ndarray:
    """Each item's earliest timestamp in ``interactions`` (``item_key``, ``timestamp``), indexed by
    the ids of ``item_ids`` (``n_items + 1`` entries; entry 0 and items without an event:
    :data:`NEVER_SEEN`). The timeline's negatives of a row at time t are the items seen before t."""
    first = interactions.groupby("item_key")["timestamp"].min()
    times = np.full(n_items + 1, NEVER_SEEN, dtype=np.int64)
    known = first[first.index.isin(item_ids.keys())]
    times[known.index.map(item_ids).to_numpy(np.int64)] = known.to_numpy(np.int64)
    return times


class _ExistingItems:
    """The items whose first event is strictly before a time: a prefix of the items by first time."""

    def __init__(self, first_seen: np.ndarray):
        self.order = np.argsort(first_seen, kind="stable").astype(np.int64)
        self.times = first_seen[self.order]

    def before(self, timestamp: int) -> np.ndarray:
        return self.order[: int(np.searchsorted(self.times, timestamp, side="left"))]


def sample_negatives(
    rng: np.random.Generator, n_items: int, forbidden: np.ndarray, k: int, weights: Optional[np.ndarray] = None,
    pool: Optional[np.ndarray] = None,
) -> np.ndarray:
    """``k`` distinct item ids drawn from ``1..n_items`` (or ``pool``) minus ``forbidden``.

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
    pool : numpy.ndarray, optional
        Distinct item ids: draw only among these (the timeline protocol's items that existed
        before the row). Default: ``1..n_items``.
    """
    if pool is not None and weights is not None:
        masked = np.zeros_like(np.asarray(weights, dtype=np.float64))
        masked[pool] = np.asarray(weights, dtype=np.float64)[pool]
        return _weighted_negatives(rng, masked, forbidden, k)
    if weights is not None:
        return _weighted_negatives(rng, weights, forbidden, k)
    if pool is not None:
        return _pool_negatives(rng, np.asarray(pool, dtype=np.int64), forbidden, k)
    available = n_items - len(forbidden)
    if k > available:
        raise ValueError(f"cannot draw {k} negatives: only {available} of {n_items} items are unseen by the user")
    return _pool_negatives(rng, np.arange(1, n_items + 1, dtype=np.int64), forbidden, k)


def _pool_negatives(rng: np.random.Generator, pool: np.ndarray, forbidden: np.ndarray, k: int) -> np.ndarray:
    """Uniform draws without replacement from ``pool`` minus ``forbidden``: rejection when most of
    the pool is allowed, else a choice from the explicit set (rejecting most draws would be slow)."""
    available = len(pool) - int(np.count_nonzero(np.isin(forbidden, pool)))
    if k > available:
        raise ValueError(f"cannot draw {k} negatives: only {available} of the {len(pool)} items seen before the "
                         f"row are unseen by the user")
    if k == 0:
        return np.empty(0, dtype=np.int64)
    if available < 2 * k or available < len(pool) // 2:
        allowed = np.setdiff1d(pool, forbidden)
        return rng.choice(allowed, size=k, replace=False).astype(np.int64)
    chosen: list[int] = []
    seen: set[int] = set(forbidden.tolist())
    while len(chosen) < k:
        for draw in pool[rng.integers(0, len(pool), size=2 * (k - len(chosen)) + 2)].tolist():
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


def unseen_count(n_items: int, forbidden: np.ndarray, weights: Optional[np.ndarray] = None,
                 pool: Optional[np.ndarray] = None) -> int:
    """How many items :func:`sample_negatives` can draw for a user who saw ``forbidden``."""
    forbidden = np.asarray(forbidden, dtype=np.int64)
    if pool is not None:
        forbidden = forbidden[np.isin(forbidden, pool)]
        if weights is None:
            return len(pool) - len(forbidden)
        return int(np.count_nonzero(weights[pool] > 0)) - int(np.count_nonzero(weights[forbidden] > 0))
    if weights is None:
        return n_items - len(forbidden)
    return int(np.count_nonzero(weights[1:] > 0)) - int(np.count_nonzero(weights[forbidden] > 0))


def check_negatives(targets: "Targets", n_negatives: int, n_items: int, user_history: dict[int, np.ndarray],
                    what: str, weights: Optional[np.ndarray] = None, user_names: Optional[dict] = None,
                    first_seen: Optional[np.ndarray] = None) -> None:
    """Raise before anything is drawn when some user of ``targets`` has fewer than
    ``n_negatives`` items to draw from, naming that user (``user_names`` maps an id to the raw key).

    With ``first_seen`` (:func:`first_seen_times`) each target is checked against the items seen
    strictly before its own time, as :func:`build_rows` draws them.
    """
    if first_seen is None:
        checks = ((user, None) for user in dict.fromkeys(int(u) for u in targets.user_id))
    else:
        checks = dict.fromkeys(zip(targets.user_id.tolist(), targets.timestamp.tolist()))
        existing = _ExistingItems(first_seen)
    for user, timestamp in checks:
        pool = None if timestamp is None else existing.before(timestamp)
        available = unseen_count(n_items, user_history[user], weights, pool)
        if n_negatives > available:
            name = f"user {user}" if user_names is None else f"user {user_names[user]!r} (id {user})"
            kind = "items" if weights is None else "items with a training-time interaction"
            where = "of the catalogue" if pool is None else f"seen before the row's time {timestamp}"
            raise ValueError(
                f"{what}: cannot draw {n_negatives} negatives: only {available} of {n_items} {kind} {where} "
                f"are unseen by {name}; ask for fewer negatives"
            )


def popularity_weights(events: pd.DataFrame, held_out: Sequence["Targets"], n_items: int,
                       before: Optional[int] = None) -> np.ndarray:
    """Each item's count among the training-time events, indexed by item id (``n_items + 1`` entries).

    Training-time events are the ``events`` (``user_id``, ``item_id``, ``position``) strictly
    before the time of every ``held_out`` target of their user (the valid and test targets): for
    each user the cut-off is the smallest held-out ``target_position`` (the count of the user's
    events strictly before that target's time), and a user without one keeps all events. With
    ``before`` (the timeline's valid cut) they are the events with a timestamp below it instead.
    Either way this is the rule of :func:`merlin_mllm.data.splits.training_events` for the valid
    split.
    """
    if before is not None:
        kept = events.loc[(events["timestamp"] < before).to_numpy(), "item_id"].to_numpy(np.int64)
        counts = np.bincount(kept, minlength=n_items + 1)[: n_items + 1]
        counts[0] = 0
        return counts.astype(np.float64)
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

    ``mode`` (:data:`merlin_mllm.choices.TRAIN_TARGETS`): ``"last"`` adds none; ``"blocks"`` adds the events at
    positions ``block_size, 2 * block_size, ...``; ``"every"`` adds every position from
    ``block_size`` on; all below the target's ``target_position``, i.e. strictly before the
    target's time. Each added target's own ``target_position`` is the count of the user's events
    strictly before its time. ``"blocks"`` skips a boundary that splits one second's events (no
    row can then see exactly the first whole blocks), so that every added row's history is whole
    blocks, whose summaries the recurrent chain already holds. ``"every"`` keeps such events, with
    the shorter history (two of them can share one); one without any earlier event is not added.
    Users in the order of ``last``, positions ascending. ``events`` holds ``user_id``,
    ``item_id``, ``position`` and ``timestamp``.
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
    positions = _with_earlier(events).set_index(["user_id", "position"])
    picked = positions.loc[pd.MultiIndex.from_tuples(chosen, names=["user_id", "position"])].reset_index()
    if mode == "blocks":
        picked = picked[(picked["earlier"] == picked["position"]).to_numpy()]
    targets = Targets(
        user_id=picked["user_id"].to_numpy(np.int64),
        target_position=picked["earlier"].to_numpy(np.int64),
        item_id=picked["item_id"].to_numpy(np.int64),
        timestamp=picked["timestamp"].to_numpy(np.int64),
    )
    return with_history_only(targets)[0]


def build_rows(
    targets: Targets,
    n_negatives: int,
    n_items: int,
    user_history: dict[int, np.ndarray],
    rng: np.random.Generator,
    first_group_id: int,
    desc: str = "negatives",
    weights: Optional[np.ndarray] = None,
    first_seen: Optional[np.ndarray] = None,
) -> pd.DataFrame:
    """One group per target: the positive row, then ``n_negatives`` sampled negative rows.

    ``user_history[user_id]`` is the sorted array of every item id the user ever interacted with
    (its full deduplicated history), so that no negative is an item the user has seen.
    ``weights`` (see :func:`sample_negatives`): popularity-weighted draws instead of uniform.
    ``first_seen`` (:func:`first_seen_times`): draw only among the items first seen strictly
    before the row's timestamp (the timeline protocol).
    """
    per_group = 1 + n_negatives
    n_groups = len(targets.user_id)
    item_ids = np.empty(n_groups * per_group, dtype=np.int64)
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)) if weights is not None else None
    existing = _ExistingItems(first_seen) if first_seen is not None else None
    for group in tqdm(range(n_groups), desc=desc, unit=" groups", disable=None):
        user = int(targets.user_id[group])
        start = group * per_group
        item_ids[start] = targets.item_id[group]
        if existing is not None:
            item_ids[start + 1 : start + per_group] = sample_negatives(
                rng, n_items, user_history[user], n_negatives, weights,
                pool=existing.before(int(targets.timestamp[group])))
        elif weights is None:
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
