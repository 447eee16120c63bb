"""``prepare_dataset``: raw dataset files -> Merlin parquet splits for the MLLM-MSR ranker.

Steps, in order: parse (malformed lines raise or are skipped and counted) -> drop duplicate
(user, item) interactions, keeping the earliest -> iterative k-core -> optional random choice
of ``max_users`` users (on the timeline optionally ``test_users`` of them among the users with an
event at or after ``T_test``) -> per user, sort by time (ties in a seeded random order) and keep the
latest ``max_history`` events -> split by protocol -> drop targets without history -> sample
negatives.

Protocols (all seeded and deterministic):

* ``paper``: users split at random 80/10/10; each user's last kept event is its target.
* ``leave-last-out`` (formerly ``temporal``, still accepted with a ``FutureWarning``): every
  user in every split; test = last event, valid = second to last, train = third to last. A
  row's history stops before its own time, but other users' events after it are counted for it
  (see :mod:`merlin_mllm.data.splits`).
* ``timeline``: a global time line cut twice, ``T_valid < T_test`` (by default the 70% and 80%
  quantiles of the k-core events' times; ``valid_cut``/``test_cut`` or ``*_cut_quantile`` set
  them; ``report.json`` records them under ``cuts``). Test: each user with an event at or after
  ``T_test``, one group whose target is the user's last event; valid: each user with an event
  in ``[T_valid, T_test)``, its last event there; train: each user with an event before
  ``T_valid``, its last event before it (see :func:`~merlin_mllm.data.processing.timeline_targets`
  for why one group per user). ``max_history`` defaults to 0 (all events: histories and counts
  need the whole past). Users rate in bursts, so the cuts split users more than histories: a
  small ``max_users`` sample can set ``test_users``, how many of its users are drawn among those
  with an event at or after ``T_test`` (the rest among the others), to hold enough test groups
  (:func:`~merlin_mllm.data.processing.sample_users`).

Every protocol: a row's ``target_position`` is the number of its user's kept events with a
timestamp strictly less than the target's, and its history the events before that position, so
events in the same second as the target are not its history. A target without any strictly
earlier event is dropped and counted (``targets_without_history`` in ``report.json``).

Train and valid groups hold 1 positive + ``n_negatives_train`` negatives, test groups 1 +
``n_negatives_test``. Negatives are drawn uniformly, without replacement, from *all* items
that survive the k-core (not only those of the chosen users) that the user never interacted
with in its whole deduplicated history; on the timeline, only from the items with a k-core event
(any user) strictly before the row's time, since an item nobody had met yet was not a candidate
then. Drawing from the chosen users' items alone would bias
small subsets: a negative would always be something another kept user chose, while a positive
is often chosen by its user only, which turns popularity upside down. The ``items/`` table then
holds the items the output refers to (events and rows). Ids are contiguous int64 from 1 (0 is
left for padding), assigned in the natural order of the raw keys.

Training groups (``train/`` only; ``valid/`` and ``test/`` keep the protocol's groups, row for
row and byte for byte, whatever these are):

* ``train_negatives`` K: negatives per training group (default: ``n_negatives_train``);
* ``train_targets``: ``"last"`` (the protocol's target only, the paper), ``"blocks"`` (also a
  group at every summary-block boundary ``train_block_size, 2 * train_block_size, ...`` before
  it, as :func:`~merlin_mllm.data.prefix_targets.add_prefix_targets` adds) or ``"every"`` (also
  a group at every position from ``train_block_size`` on before it), all strictly before the
  train target's time. Paper protocol: training users only; leave-last-out and timeline: every
  user with a train target, before it;
* ``train_negative_sampling``: ``"uniform"``, or ``"popularity"``: each next negative drawn with
  probability proportional to its count among the training-time events (every kept event
  before its user's valid and test targets' time, or before ``T_valid`` on the timeline: the
  rule of ``data.splits.training_events`` for the valid split), among the unseen items not drawn
  yet (on the timeline, first seen before the row); an item without such an event is never
  drawn.

With the defaults (K = ``n_negatives_train``, ``last``, ``uniform``) the output is what it was
before these options existed. Otherwise the protocol's training groups are still drawn first
(and then set aside) so that item ids stay those of the default output: items that only the new
training groups refer to get the ids after them, in their own natural order, and the ``items/``
table may then list a few items that only the set-aside draw chose. The protocol's training
groups keep their group ids; the added ones are numbered after the test groups. Within
``train/``, the protocol's targets come first (one group per user), then the added ones, by user
then position.

Output folder::

    train/ valid/ test/   user_id, item_id, label, target_position, group_id, timestamp,
                          history_item_ids (list: the user's items before the target, in time order)
    events/               user_id, item_id, timestamp, position[, rating]
    items/                item_id, item_key, title, description, attributes, image_path[, year, genres | image_url]
                          (attributes: the catalogue facts beyond the title, "" for none;
                          merlin_mllm.data.attributes)
    users/                user_id, user_key, split (paper: the user's split; else "all": any
                          user may have rows in any split)
    report.json           counts and settings; ``image_root``: the images folder

Image paths: ``image_path`` is relative to the image root recorded as ``image_root`` in
``report.json`` (the ``images`` folder: absolute, or relative to ``out`` when it lies inside
``out``; ``null`` without images). Readers resolve the paths through
:func:`merlin_mllm.data.image_files.dataset_image_root`, which keeps every read inside that root.
Folders prepared before the root was recorded hold absolute paths and no ``image_root``: they
are still read, their absolute paths as they are.

A row's history is the user's events with ``position < target_position``: those strictly before
the target's time. Within a group the positive row comes first, then the negatives in the order
drawn.

Usage::

    from merlin_mllm.data.prepare import prepare_dataset
    report = prepare_dataset("ml-100k", "paper", "data/ml100k", max_users=200)
    report = prepare_dataset("ml-100k", "paper", "data/ml100k_groups", train_negatives=7, train_targets="blocks")
    report = prepare_dataset("ml-100k", "timeline", "data/ml100k_timeline")   # cuts at the 70%/80% quantiles
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from merlin_mllm.choices import NEGATIVE_SAMPLING, PROTOCOLS, TRAIN_TARGETS
from merlin_mllm.data import processing
from merlin_mllm.data.attributes import ATTRIBUTES_COLUMN
from merlin_mllm.data.image_files import IMAGE_ROOT_KEY, image_index, record_image_root
from merlin_mllm.data.registry import dataset_entry
from merlin_mllm.data.sources import BadLines, read_source
from merlin_mllm.data.tables import Tags, write_table

logger = logging.getLogger(__name__)

#: Old protocol names still accepted, with a FutureWarning, as the name they stand for.
PROTOCOL_ALIASES = {"temporal": "leave-last-out"}
#: ``max_history`` when not given: 12 (four summary blocks of 3) for the per-user protocols; all
#: events on the timeline, whose histories and counts need the whole past.
DEFAULT_MAX_HISTORY = {"paper": 12, "leave-last-out": 12, "timeline": 0}
_TEXT_COLUMNS = ("title", "description", ATTRIBUTES_COLUMN, "genres")
#: The Merlin tags of the row tables' columns (train/ valid/ test/).
ROW_TAGS = {
    "user_id": [Tags.USER_ID, Tags.CATEGORICAL],
    "item_id": [Tags.ITEM_ID, Tags.CATEGORICAL],
    "label": [Tags.TARGET, Tags.BINARY_CLASSIFICATION],
    "timestamp": [Tags.TIME],
    "history_item_ids": [Tags.ITEM, Tags.LIST, Tags.SEQUENCE],
}


def protocol_name(protocol: str) -> str:
    """The protocol's current name: itself, or for an old alias (``"temporal"``) the name it stands
    for, with a ``FutureWarning``; a ``ValueError`` listing the names for anything else."""
    if protocol in PROTOCOL_ALIASES:
        warnings.warn(f"protocol {protocol!r} is now called {PROTOCOL_ALIASES[protocol]!r}; the old name will go",
                      FutureWarning, stacklevel=3)
        return PROTOCOL_ALIASES[protocol]
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    return protocol


def _iso_time(timestamp: int, unit: str) -> str:
    seconds = timestamp / 1000 if unit == "ms" else timestamp
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat()


def _check_settings(protocol, max_history, max_users, n_negatives_test, n_negatives_train, k_user, k_item,
                    train_negatives, train_targets, train_negative_sampling, train_block_size):
    if train_targets not in TRAIN_TARGETS:
        raise ValueError(f"unknown train_targets {train_targets!r}; choose one of {list(TRAIN_TARGETS)}")
    if train_negative_sampling not in NEGATIVE_SAMPLING:
        raise ValueError(f"unknown train_negative_sampling {train_negative_sampling!r}; "
                         f"choose one of {list(NEGATIVE_SAMPLING)}")
    # train_negatives defaults to n_negatives_train (which may be 0); asked for, it must be >= 1.
    for name, value in {"train_negatives": train_negatives, "train_block_size": train_block_size}.items():
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in {
        "max_history": max_history,
        "max_users": max_users,
        "n_negatives_test": n_negatives_test,
        "n_negatives_train": n_negatives_train,
        "min_user_interactions": k_user,
        "min_item_interactions": k_item,
    }.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    needed = processing.MIN_EVENTS[protocol]
    if 0 < max_history < needed:
        raise ValueError(f"protocol {protocol!r} needs max_history >= {needed} (or 0 for all), got {max_history}")


def _spawn_rngs(seed: int) -> dict[str, np.random.Generator]:
    """Independent random streams, so that changing one setting (say the number of test
    negatives) does not change what the other steps draw."""
    # Children are numbered (spawn key i): adding a name at the end leaves the others' streams alone.
    names = ("users", "split", "train", "valid", "test", "train_groups", "ties")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def _contiguous_ids(keys) -> dict:
    return {key: index for index, key in enumerate(processing.natural_order(keys), start=1)}


def user_histories(deduped: pd.DataFrame, user_ids: dict, item_ids: dict) -> dict[int, np.ndarray]:
    """Each kept user's full deduplicated history, as sorted ids of items in the output: the
    items a user's negatives must avoid."""
    frame = deduped[deduped["user_key"].isin(user_ids.keys()).to_numpy()]
    frame = frame[frame["item_key"].isin(item_ids.keys()).to_numpy()]
    users = frame["user_key"].map(user_ids).to_numpy(np.int64)
    items = frame["item_key"].map(item_ids).to_numpy(np.int64)
    histories = {int(user): np.empty(0, dtype=np.int64) for user in user_ids.values()}
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    boundaries = np.flatnonzero(np.diff(users)) + 1
    for start, stop in zip(np.r_[0, boundaries], np.r_[boundaries, len(users)]):
        if stop > start:
            histories[int(users[start])] = np.unique(items[start:stop])
    return histories


def _items_table(source, item_ids: dict, images: Optional[Path]) -> tuple[pd.DataFrame, dict]:
    keys = list(item_ids.keys())
    items = source.load_items(keys).reset_index(drop=True)
    if list(items["item_key"]) != keys:
        raise AssertionError("item metadata rows are out of order")  # a reader bug, not user input
    items.insert(0, "item_id", np.arange(1, len(keys) + 1, dtype=np.int64))
    stats = {"items_without_metadata": int((~items["has_metadata"]).sum())}
    items = items.drop(columns=["has_metadata"])
    if ATTRIBUTES_COLUMN not in items.columns:  # a reader with no attributes: every table has the column
        items.insert(items.columns.get_loc("description") + 1, ATTRIBUTES_COLUMN, "")
    stats["items_without_attributes"] = int((items[ATTRIBUTES_COLUMN].fillna("") == "").sum())
    if images is not None:
        # Paths relative to the images folder, the image root that report.json records: readers
        # confine every read to it. image_index names files inside the folder (symlinks kept).
        index = image_index(images)
        paths = [index.get(key) for key in keys]
        root = os.path.abspath(images)
        items["image_path"] = [os.path.relpath(path, root) if path is not None else None for path in paths]
        missing = [key for key, path in zip(keys, paths) if path is None]
        stats["missing_image_files"] = len(missing)
        stats["missing_image_examples"] = missing[:10]
    else:
        items["image_path"] = None
        stats["missing_image_files"] = 0
        stats["missing_image_examples"] = []
    items["image_path"] = items["image_path"].astype(object)
    stats["items_with_image"] = int(items["image_path"].notna().sum())
    stats["items_without_image"] = int(items["image_path"].isna().sum())
    if "year" in items:
        items["year"] = items["year"].astype(np.int64)
    return items, stats


@dataclass(frozen=True)
class _Settings:
    """``prepare_dataset``'s settings, checked, with the dataset's and protocol's defaults filled in."""

    protocol: str
    max_history: int
    max_users: int
    k_user: int
    k_item: int
    on_bad_line: str
    n_negatives_test: int
    n_negatives_train: int
    train_negatives: int
    train_targets: str
    train_negative_sampling: str
    train_block_size: int
    test_users: int

    @property
    def default_training(self) -> bool:
        """Whether the training groups are the protocol's own (drawn once, as the paper does)."""
        return (self.train_negatives == self.n_negatives_train and self.train_targets == "last"
                and self.train_negative_sampling == "uniform")

    def negatives(self, split: str) -> int:
        """Negatives per group of ``split`` in the protocol's draw."""
        return self.n_negatives_test if split == "test" else self.n_negatives_train

    def recorded(self) -> dict:
        """The ``settings`` that ``report.json`` records."""
        return {
            "max_history": self.max_history,
            "max_users": self.max_users,
            "min_user_interactions": self.k_user,
            "min_item_interactions": self.k_item,
            "on_bad_line": self.on_bad_line,
            "n_negatives_test": self.n_negatives_test,
            "n_negatives_train": self.n_negatives_train,
            "train_negatives": int(self.train_negatives),
            "train_targets": self.train_targets,
            "train_negative_sampling": self.train_negative_sampling,
            "train_block_size": int(self.train_block_size),
            "test_users": int(self.test_users),
        }


def _settings(k_core_default: tuple[int, int], protocol: str, cut_settings: dict, *, max_history, max_users, min_user_interactions,
              min_item_interactions, on_bad_line, n_negatives_test, n_negatives_train, train_negatives, train_targets,
              train_negative_sampling, train_block_size, test_users) -> _Settings:
    """The checked settings of one ``prepare_dataset`` call (``protocol``: its current name;
    ``k_core_default``: the dataset's k-core thresholds)."""
    k_user_default, k_item_default = k_core_default
    if protocol != "timeline" and any(value is not None for value in cut_settings.values()):
        raise ValueError(f"cut times are for the timeline protocol only, not {protocol!r}")
    if isinstance(test_users, bool) or not isinstance(test_users, (int, np.integer)) or test_users < 0:
        raise ValueError(f"test_users must be an integer >= 0, got {test_users!r}")
    if test_users and protocol != "timeline":
        raise ValueError(f"test_users is for the timeline protocol only, not {protocol!r}")
    if test_users and not 0 < test_users <= max_users:
        raise ValueError(f"test_users ({test_users}) needs max_users >= test_users, got max_users={max_users}")
    if max_history is None:
        max_history = DEFAULT_MAX_HISTORY[protocol]
    k_user = k_user_default if min_user_interactions is None else min_user_interactions
    k_item = k_item_default if min_item_interactions is None else min_item_interactions
    _check_settings(protocol, max_history, max_users, n_negatives_test, n_negatives_train, k_user, k_item,
                    train_negatives, train_targets, train_negative_sampling, train_block_size)
    return _Settings(protocol, max_history, max_users, k_user, k_item, on_bad_line, n_negatives_test,
                     n_negatives_train, n_negatives_train if train_negatives is None else train_negatives,
                     train_targets, train_negative_sampling, train_block_size, test_users)


def _k_core_events(source, settings: _Settings) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The source's interactions deduplicated, then their k-core; and what ``report.json`` counts of them."""
    raw = source.interactions
    if raw.empty:
        raise ValueError(f"no interactions were read from {source.files.get('interactions')}")
    deduped, n_duplicates = processing.drop_duplicates(raw)
    core, k_core_rounds = processing.k_core(deduped, settings.k_user, settings.k_item)
    if core.empty:
        raise ValueError(f"no interactions survive the ({settings.k_user}, {settings.k_item}) k-core; "
                         "lower min_user_interactions/min_item_interactions")
    counts = {
        "raw_interactions": int(len(raw)),
        "duplicates_removed": int(n_duplicates),
        "after_dedup": {"users": int(deduped["user_key"].nunique()), "items": int(deduped["item_key"].nunique()),
                        "interactions": int(len(deduped))},
        "after_k_core": {"users": int(core["user_key"].nunique()), "items": int(core["item_key"].nunique()),
                         "interactions": int(len(core)), "rounds": int(k_core_rounds)},
    }
    return deduped, core, counts


def _chosen_events(core: pd.DataFrame, settings: _Settings, rngs: dict, cuts: Optional[dict]) -> tuple[pd.DataFrame, dict]:
    """The chosen users' events, each user's latest ``max_history`` in time order, without the users
    too short for the protocol; and what ``report.json`` counts of them."""
    chosen = processing.sample_users(core, settings.max_users, rngs["users"], test_users=int(settings.test_users),
                                     test_cut=cuts["test"]["timestamp"] if cuts else None)
    events = processing.order_and_trim(chosen, settings.max_history, rngs["ties"])
    # Users whose kept sequence cannot give every target a non-empty history are dropped.
    lengths = events.groupby("user_key")["position"].transform("size")
    needed = processing.MIN_EVENTS[settings.protocol]
    too_short = events.loc[(lengths < needed).to_numpy(), "user_key"].nunique()
    events = events[(lengths >= needed).to_numpy()]
    if events.empty:
        raise ValueError("no user has enough interactions left for the protocol")
    return events, {"users_selected": int(chosen["user_key"].nunique()), "users_dropped_too_short": int(too_short)}


def _protocol_targets(events: pd.DataFrame, settings: _Settings, rngs: dict, cuts: Optional[dict]) -> tuple[dict, dict]:
    """Each split's targets by the protocol, less those without history; and how many those were."""
    if settings.protocol == "paper":
        targets = processing.paper_targets(events, rngs["split"])
    elif settings.protocol == "leave-last-out":
        targets = processing.leave_last_out_targets(events)
    else:
        targets = processing.timeline_targets(events, cuts["valid"]["timestamp"], cuts["test"]["timestamp"])
    without_history = {}
    for split in processing.SPLITS:
        targets[split], without_history[split] = processing.with_history_only(targets[split])
    if not len(targets["test"].user_id):
        raise ValueError("no test target is left with a history; check the cuts or max_users")
    return targets, without_history


@dataclass(frozen=True)
class _NegativePool:
    """What every negative draw reads: the candidate items (ids 1..``n_items``), each user's
    items to avoid, on the timeline each item's first k-core time, the popularity weights."""

    n_items: int
    histories: dict
    first_seen: Optional[np.ndarray]
    weights: Optional[np.ndarray]
    user_names: dict

    def check(self, targets, n_negatives: int, what: str, weights: Optional[np.ndarray] = None) -> None:
        processing.check_negatives(targets, n_negatives, self.n_items, self.histories, what, weights=weights,
                                   user_names=self.user_names, first_seen=self.first_seen)

    def rows(self, targets, n_negatives: int, rng, first_group: int, desc: str,
             weights: Optional[np.ndarray] = None) -> pd.DataFrame:
        return processing.build_rows(targets, n_negatives, self.n_items, self.histories, rng, first_group,
                                     desc=desc, weights=weights, first_seen=self.first_seen)


def _check_draws(pool: _NegativePool, targets: dict, extra_targets, settings: _Settings) -> None:
    """Every draw of :func:`_draw_rows`, checked before any is made (and long before anything is written)."""
    for split in ("valid", "test"):
        pool.check(targets[split], settings.negatives(split), f"{split} groups")
    pool.check(targets["train"], settings.n_negatives_train, "train groups")
    if not settings.default_training:
        for what, wanted in (("train groups", targets["train"]),
                             (f"{settings.train_targets} train targets", extra_targets)):
            pool.check(wanted, int(settings.train_negatives), what, weights=pool.weights)


def _draw_rows(pool: _NegativePool, targets: dict, extra_targets, settings: _Settings, rngs: dict,
               events: pd.DataFrame) -> tuple[dict, np.ndarray]:
    """Each split's rows (positive, then its negatives), in candidate ids; and the ids the
    protocol's draw refers to (with ``events``), which keep the first output ids."""
    rows: dict[str, pd.DataFrame] = {}
    next_group = 0
    for split in processing.SPLITS:
        rows[split] = pool.rows(targets[split], settings.negatives(split), rngs[split], next_group,
                                f"{split} negatives")
        next_group += len(targets[split].user_id)
    # The protocol's training groups fix the item ids (see the module docstring); other training
    # options replace them afterwards, from their own random stream.
    used = np.unique(np.concatenate([events["item_id"].to_numpy()] + [f["item_id"].to_numpy() for f in rows.values()]))
    if not settings.default_training:
        rng, k = rngs["train_groups"], int(settings.train_negatives)
        rows["train"] = pd.concat([
            pool.rows(targets["train"], k, rng, 0, "train negatives", weights=pool.weights),
            pool.rows(extra_targets, k, rng, next_group, f"{settings.train_targets} train negatives",
                      weights=pool.weights),
        ], ignore_index=True)
    return rows, used


def _output_item_ids(candidate_ids: dict, used: np.ndarray, added: np.ndarray) -> dict:
    """Item key -> output id: ``used`` first, then ``added`` (both candidate ids), each in natural order."""
    key_of = {index: key for key, index in candidate_ids.items()}
    item_ids = _contiguous_ids([key_of[int(index)] for index in used])
    for key in processing.natural_order([key_of[int(index)] for index in added]):
        item_ids[key] = len(item_ids) + 1
    return item_ids


def _renumbered(events: pd.DataFrame, rows: dict, renumber: dict) -> tuple[pd.DataFrame, dict]:
    """``events`` and ``rows`` with candidate item ids turned into output ids, the rows with their histories."""
    events = events.assign(item_id=events["item_id"].map(renumber).astype(np.int64))
    rows = {split: frame.assign(item_id=frame["item_id"].map(renumber).astype(np.int64)) for split, frame in rows.items()}
    sequences = {int(user): group["item_id"].to_numpy() for user, group in events.groupby("user_id", sort=False)}
    return events, {split: with_history(frame, sequences) for split, frame in rows.items()}


def _users_table(user_ids: dict, targets: dict, protocol: str) -> pd.DataFrame:
    users = pd.DataFrame(
        {
            "user_id": np.fromiter(user_ids.values(), dtype=np.int64, count=len(user_ids)),
            "user_key": pd.Series(list(user_ids.keys()), dtype=object),
        }
    )
    if protocol == "paper":
        split_of = {int(user): split for split in processing.SPLITS for user in targets[split].user_id}
        users["split"] = users["user_id"].map(split_of)
    else:
        # leave-last-out: every user has a target in every split; timeline: any user may have one
        # in any split (which ones: read the rows).
        users["split"] = "all"
    return users


def _source_report(source, bad: BadLines, images_folder: Optional[Path], out: Path) -> dict:
    """What ``report.json`` records of the raw files: where they were, their time unit, the lines skipped."""
    return {
        "files": {**source.files, "images": str(images_folder) if images_folder is not None else None},
        IMAGE_ROOT_KEY: record_image_root(images_folder, out) if images_folder is not None else None,
        "timestamp_unit": source.timestamp_unit,
        "malformed_lines_skipped": bad.total,
        "malformed_lines_by_file": dict(sorted(bad.by_file.items())),
        "malformed_line_examples": bad.examples,
    }


def prepare_dataset(
    dataset: str,
    protocol: str,
    out: str | Path,
    *,
    input: str | Path | None = None,
    images: str | Path | None = None,
    max_history: Optional[int] = None,
    max_users: int = 0,
    seed: int = 42,
    min_user_interactions: int | None = None,
    min_item_interactions: int | None = None,
    on_bad_line: str = "error",
    n_negatives_test: int = 20,
    n_negatives_train: int = 1,
    train_negatives: Optional[int] = None,
    train_targets: str = "last",
    train_negative_sampling: str = "uniform",
    train_block_size: int = 3,
    valid_cut: Optional[int] = None,
    test_cut: Optional[int] = None,
    valid_cut_quantile: Optional[float] = None,
    test_cut_quantile: Optional[float] = None,
    test_users: int = 0,
) -> dict:
    """Prepare one dataset for the ranker and write it under ``out`` (see the module docstring).

    Parameters
    ----------
    dataset : str
        A name in :data:`merlin_mllm.data.registry.DATASETS`: ``"ml-100k"``, ``"amazon2023"`` or
        ``"microlens"``.
    protocol : str
        ``"paper"`` (random 80/10/10 user split, last event is the target), ``"leave-last-out"``
        (last event for test, second to last for valid, third to last for train; the old name
        ``"temporal"`` warns) or ``"timeline"`` (two global cut times; see the module docstring).
    out : str or Path
        Output folder; its ``train``, ``valid``, ``test``, ``events``, ``items``, ``users``
        folders and ``report.json`` are replaced.
    input : str or Path, optional
        The raw files; what each dataset takes is its registry entry's ``help`` (ml-100k
        defaults to the copy in the recbole wheel).
    images : str or Path, optional
        A folder of ``<item_key>.<jpg|png|...>`` files. For microlens it defaults to the
        ``MicroLens-*_covers`` folder inside ``input`` when there is one. It becomes the
        dataset's image root: ``report.json`` records it as ``image_root`` and ``image_path``
        values are relative to it.
    max_history : int, optional
        The most recent events kept per user (0 = all). Default: 12 (four blocks of 3) for
        ``paper`` and ``leave-last-out``, 0 for ``timeline``.
    max_users : int
        Keep this many users, chosen at random with ``seed`` after k-core (0 = all; on the
        timeline see ``test_users``).
    seed : int
        Seeds user choice, split and negatives. The same seed gives byte-identical parquet files.
    min_user_interactions, min_item_interactions : int, optional
        k-core thresholds; default: the registry entry's ``k_core`` (ml-100k 5/5, amazon2023
        6/5, microlens 7/5).
    on_bad_line : str
        ``"error"`` (raise, naming file:line) or ``"skip"`` (skip and count).
    n_negatives_test, n_negatives_train : int
        Negatives per test group, and per valid group (and train group, unless ``train_negatives``).
    train_negatives : int, optional
        K >= 1: negatives per training group (default: ``n_negatives_train``, which may be 0).
    train_targets : str
        ``"last"`` (default: the protocol's target only), ``"blocks"`` or ``"every"`` (see the
        module docstring).
    train_negative_sampling : str
        ``"uniform"`` (default) or ``"popularity"`` (training-time counts; training groups only).
    train_block_size : int
        The user summaries' block size that ``"blocks"`` and ``"every"`` count in (default 3).
    valid_cut, test_cut : int, optional
        Timeline only: ``T_valid`` and ``T_test`` as timestamps (the data's unit:
        ``report["timestamp_unit"]``).
    valid_cut_quantile, test_cut_quantile : float, optional
        Timeline only: the cuts as quantiles of the k-core events' times (defaults 0.7 and 0.8
        when neither a cut nor its quantile is given).
    test_users : int
        Timeline only, with ``max_users``: draw this many of the ``max_users`` users among those
        with a k-core event at or after ``T_test`` (each gives one test group, unless its target
        has no history) and the others among the users without one (train and valid groups);
        0 (default): all ``max_users`` uniformly. A small sample then holds test groups and the
        users whose past trains the model (see
        :func:`~merlin_mllm.data.processing.sample_users` for why).

    Raises
    ------
    ValueError
        Before anything is written: an unknown name, a count out of range, or a user with fewer
        unseen items than the negatives asked for (naming the user and the split).

    Returns
    -------
    dict
        The report, also written to ``out/report.json``.
    """
    k_core_default = dataset_entry(dataset).k_core  # raises for an unknown name
    protocol = protocol_name(protocol)
    cut_settings = {"valid_cut": valid_cut, "test_cut": test_cut, "valid_quantile": valid_cut_quantile,
                    "test_quantile": test_cut_quantile}
    settings = _settings(
        k_core_default, protocol, cut_settings, max_history=max_history, max_users=max_users,
        min_user_interactions=min_user_interactions, min_item_interactions=min_item_interactions,
        on_bad_line=on_bad_line, n_negatives_test=n_negatives_test, n_negatives_train=n_negatives_train,
        train_negatives=train_negatives, train_targets=train_targets, train_negative_sampling=train_negative_sampling,
        train_block_size=train_block_size, test_users=test_users,
    )
    bad = BadLines(on_bad_line)
    out = Path(out)
    images_folder = Path(images) if images is not None else None
    if images_folder is not None and not images_folder.is_dir():
        raise FileNotFoundError(f"images folder {images_folder} does not exist")
    rngs = _spawn_rngs(seed)

    source = read_source(dataset, input, bad)
    deduped, core, core_counts = _k_core_events(source, settings)
    # Checked before the users are chosen or anything drawn: the cuts depend on the k-core only.
    cuts = processing.timeline_cuts(core["timestamp"].to_numpy(), **cut_settings) if protocol == "timeline" else None
    events, choice_counts = _chosen_events(core, settings, rngs, cuts)

    user_ids = _contiguous_ids(events["user_key"].unique())
    # Negatives come from every k-core item (see the module docstring); ids are renumbered
    # below to the items the output refers to.
    candidate_ids = _contiguous_ids(core["item_key"].unique())
    events = events.assign(
        user_id=events["user_key"].map(user_ids).astype(np.int64),
        item_id=events["item_key"].map(candidate_ids).astype(np.int64),
    ).sort_values(["user_id", "position"], kind="stable")
    events = events.assign(earlier=processing.earlier_events(events))
    targets, without_history = _protocol_targets(events, settings, rngs, cuts)
    extra_targets = processing.prefix_targets(events, targets["train"], train_targets, int(train_block_size))

    weights = None
    if train_negative_sampling == "popularity":
        weights = processing.popularity_weights(events, [targets["valid"], targets["test"]], len(candidate_ids),
                                                before=cuts["valid"]["timestamp"] if cuts else None)
    pool = _NegativePool(
        n_items=len(candidate_ids),
        histories=user_histories(deduped, user_ids, candidate_ids),
        # On the timeline a row's negatives are the items seen (k-core, any user) before its time.
        first_seen=processing.first_seen_times(core, candidate_ids, len(candidate_ids)) if protocol == "timeline" else None,
        weights=weights,
        user_names={index: key for key, index in user_ids.items()},
    )
    _check_draws(pool, targets, extra_targets, settings)
    rows, used = _draw_rows(pool, targets, extra_targets, settings, rngs, events)
    added = np.setdiff1d(rows["train"]["item_id"].to_numpy(), used)
    item_ids = _output_item_ids(candidate_ids, used, added)
    events, rows = _renumbered(events, rows, {candidate_ids[key]: index for key, index in item_ids.items()})

    images_folder = images_folder or source.default_images
    items, image_stats = _items_table(source, item_ids, images_folder)
    users = _users_table(user_ids, targets, protocol)
    event_columns = ["user_id", "item_id", "timestamp", "position"] + (["rating"] if "rating" in events else [])
    _write_outputs(out, rows, events[event_columns], items, users, len(user_ids), len(item_ids))

    report = {
        "dataset": dataset,
        "protocol": protocol,
        "seed": seed,
        "settings": settings.recorded(),
        **_source_report(source, bad, images_folder, out),
        **core_counts,
        **choice_counts,
        "targets_without_history": without_history,
        "kept": {"users": len(user_ids), "items": len(item_ids), "events": int(len(events))},
        "negatives_drawn_from_items": len(candidate_ids),
        "users_per_split": {split: int(len(targets[split].user_id)) for split in processing.SPLITS},
        "rows_per_split": {split: int(len(rows[split])) for split in processing.SPLITS},
        "train_groups": {"protocol_targets": int(len(targets["train"].user_id)),
                         "added_targets": int(len(extra_targets.user_id)),
                         "items_only_in_added_train_rows": int(len(added))},
        **image_stats,
    }
    if cuts is not None:
        report["cuts"] = {name: {**cut, "date": _iso_time(cut["timestamp"], source.timestamp_unit)}
                          for name, cut in cuts.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def with_history(rows: pd.DataFrame, sequences: dict) -> pd.DataFrame:
    """Add ``history_item_ids``: the user's item ids in time order strictly before the target.

    Carrying the history on the row makes leakage impossible by construction: anything that
    reads a row's history (the user-summary operator) cannot see the target or later items.
    """
    history = [
        sequences[int(user)][: int(position)].astype(np.int64).tolist()
        for user, position in zip(rows["user_id"], rows["target_position"])
    ]
    return rows.assign(history_item_ids=history)


def _write_outputs(out: Path, rows, events, items, users, n_users: int, n_items: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    domains = {"user_id": n_users, "item_id": n_items}
    for split, frame in rows.items():
        write_table(frame, out / split, ROW_TAGS, domains)
    event_tags = {
        "user_id": ROW_TAGS["user_id"],
        "item_id": ROW_TAGS["item_id"],
        "timestamp": [Tags.TIME],
        "rating": [Tags.CONTINUOUS],
    }
    write_table(events.reset_index(drop=True), out / "events", event_tags, domains)
    item_tags = {"item_id": ROW_TAGS["item_id"], **{name: [Tags.TEXT] for name in _TEXT_COLUMNS}}
    write_table(items, out / "items", item_tags, {"item_id": n_items})
    write_table(users, out / "users", {"user_id": ROW_TAGS["user_id"]}, {"user_id": n_users})
