"""Which user summary each labelled row sees: the summaries layer's answer for training,
evaluation and serving.

A row (``user_id``, ``target_position``, and ``history_item_ids`` when present) sees the summary
of its own history, the items before its target, so nothing at or after the target leaks into
it. The summaries come from one of (:data:`SummarySource`):

* a summary store folder (written by ``merlin-mllm summarize users``): the stored summary of
  the row's history, found with :func:`merlin_mllm.summaries.user_store.history_summary_keys`;
* a parquet file/folder or DataFrame with ``user_id``, ``target_position``, ``user_summary``
  (for instance :func:`recent_titles_summaries`);
* a callable ``rows -> list of str``.

A row whose history ends inside a summary block (``len(history) % k != 0``) sees, from a store,
either the chain's step over that partial block (``partial_block="summary"``, the default:
``summarize users`` generates one step per such row) or, with ``partial_block="titles"``, the
chain's latest block-boundary summary before the target followed by the titles of the items
after that boundary (:data:`SINCE_BOUNDARY`). The second needs no step per row: it is how the
training rows of a folder prepared with ``train_targets="every"`` (a target at every position)
are read (:func:`partial_block_rule`), so ``summarize users`` only has to hold each user's
boundary chain, which it records anyway.

Usage::

    from merlin_mllm.summaries.rows import row_summaries
    rows["user_summary"] = row_summaries("data/summaries", "data/ml100k", rows)
    train["user_summary"] = row_summaries("data/summaries", "data/ml100k_every", train,
                                          partial_block=partial_block_rule("data/ml100k_every", "train"))
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import pandas as pd

from merlin_mllm.choices import USER_CONTEXTS
from merlin_mllm.data.attributes import item_attributes
from merlin_mllm.data.splits import prepared_tables
from merlin_mllm.data.tables import read_table
from merlin_mllm.summaries.store import MARKER_FILE, SEGMENT_DIR, open_store
from merlin_mllm.summaries.user_history import history_lists, history_rating_lists, rating_text
from merlin_mllm.summaries.user_store import history_summary_keys, recorded_config, stored_summary_texts
from merlin_mllm.text import item_slot, strip_item_slots

__all__ = ["SummarySource", "PARTIAL_BLOCKS", "SINCE_BOUNDARY", "RECENT_TITLES", "is_store",
           "row_histories", "row_history_ratings", "row_summaries", "user_context_texts", "recent_titles_text",
           "context_details", "item_attribute_texts", "partial_block_rule",
           "recent_titles_summaries"]

#: Where user summaries come from: a store folder, a summary table (path or DataFrame) or a callable.
SummarySource = Union[str, os.PathLike, pd.DataFrame, Callable[[pd.DataFrame], Sequence[str]]]
#: How a store summarises a history that ends inside a block: the chain's step over the partial
#: block, or the latest boundary summary plus the titles after it (see the module docstring).
PARTIAL_BLOCKS = ("summary", "titles")
#: Joins a boundary summary and the titles of the items after it (``partial_block="titles"``).
SINCE_BOUNDARY = "Since then, the user interacted with: "
#: Opens the recent-titles text ("Recently watched: A; B; C.").
RECENT_TITLES = "Recently watched: "


def is_store(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a summary store folder."""
    path = Path(path)
    return path.is_dir() and ((path / MARKER_FILE).exists() or (path / SEGMENT_DIR).is_dir())


def row_histories(data_dir: Union[str, os.PathLike], rows: pd.DataFrame) -> List[Tuple[int, ...]]:
    """Each row's history (item ids before its target): its ``history_item_ids``, else from ``events/``."""
    if "history_item_ids" in rows.columns:
        return [tuple(int(i) for i in h) if h is not None else () for h in rows["history_item_ids"]]
    events = prepared_tables(data_dir).events
    return [tuple(h) for h in history_lists(events, rows["user_id"], rows["target_position"])]


def row_history_ratings(data_dir: Union[str, os.PathLike], rows: pd.DataFrame,
                        histories: Optional[Sequence[Sequence[int]]] = None) -> List[Tuple[Optional[float], ...]]:
    """Each row's history ratings: the rating of each history item at its own event, read from
    ``events/`` rows with ``position < target_position`` (strictly before the row's time).

    ``histories`` (default :func:`row_histories`) are checked to be those same events' items.
    Raises ``ValueError`` when the dataset has no ratings or a history does not match its events.
    """
    if "target_position" not in rows.columns:
        raise ValueError("rows need target_position to read their history's ratings")
    histories = row_histories(data_dir, rows) if histories is None else histories
    events = prepared_tables(data_dir).events
    return [tuple(r) for r in history_rating_lists(events, rows["user_id"], rows["target_position"], histories)]


def _store_summaries(path: Path, data_dir: Path, rows: pd.DataFrame, partial_block: str = "summary") -> List[str]:
    """Each row's user summary from the store: the chain over its own history (items before the
    target); with ``partial_block="titles"`` the chain up to its last block boundary plus titles."""
    store = open_store(path)
    config = recorded_config(store)
    if config is None:
        raise ValueError(
            f"{path}: the store holds no user summaries; run "
            f"`merlin-mllm summarize users --data {data_dir} --summaries {path}` first"
        )
    # A history is (item ids, their ratings): ratings-aware summaries are keyed by both, each
    # rating read from the item's own event before the row (row_history_ratings).
    items_of = row_histories(data_dir, rows)
    rated = row_history_ratings(data_dir, rows, items_of) if config.ratings else [()] * len(items_of)
    histories = [(h, tuple(r)) for h, r in zip(items_of, rated)]
    tails: dict = {}
    if partial_block == "titles":
        if config.mode != "recurrent":
            raise ValueError(f"{path}: partial_block='titles' reads the recurrent chain's block boundaries, but the "
                             f"store's user summaries are {config.mode!r} (one prompt per history)")
        k = int(config.block_size)
        tails = {h: h[0][len(h[0]) - len(h[0]) % k:] for h in set(histories)}
        lookup = {h: (h[0][: len(h[0]) - len(tails[h])], h[1][: len(h[0]) - len(tails[h])] if h[1] else ())
                  for h in tails}
    else:
        lookup = {h: h for h in set(histories)}
    unique = list(set(lookup.values()))
    keys = dict(zip(unique, history_summary_keys(store, data_dir / "items", [h for h, _ in unique], config,
                                                 ratings=[r for _, r in unique] if config.ratings else None)))
    missing = [h for h, k in keys.items() if k is not None and k not in store]
    if missing:
        example = rows.loc[[lookup[h] == missing[0] for h in histories], "user_id"].iloc[0]
        what = "block-boundary summary" if partial_block == "titles" else "stored summary"
        raise ValueError(
            f"{path}: {len(missing)} row histories have no {what} (e.g. user {int(example)}, "
            f"{len(missing[0][0])} history items); run `merlin-mllm summarize users --data {data_dir} --summaries {path}`"
        )
    texts = dict(zip(keys, stored_summary_texts(store, list(keys.values()))))
    if not tails or not any(tails.values()):
        return [texts[lookup[h]] for h in histories]
    titles = prepared_tables(data_dir).items.set_index("item_id")["title"]
    out = []
    for h in histories:
        if not tails[h]:
            out.append(texts[lookup[h]])
            continue
        since = SINCE_BOUNDARY + "; ".join(str(titles[int(i)]) for i in tails[h]) + "."
        # A history shorter than one block has no boundary summary: the titles alone.
        out.append(f"{texts[lookup[h]]} {since}" if lookup[h][0] else since)
    return out


def partial_block_rule(data_dir: Union[str, os.PathLike], split: str) -> str:
    """The ``partial_block`` that rows of ``split`` in a prepared folder are read with.

    ``"titles"`` for the ``train`` rows of a folder prepared with ``train_targets="every"`` (its
    ``report.json``), whose per-position targets have no summary step of their own; else
    ``"summary"``.
    """
    report = Path(data_dir) / "report.json"
    if split != "train" or not report.exists():
        return "summary"
    settings = json.loads(report.read_text()).get("settings", {})
    return "titles" if settings.get("train_targets") == "every" else "summary"


def _table_summaries(table: pd.DataFrame, rows: pd.DataFrame, where: str) -> List[str]:
    needed = ["user_id", "target_position", "user_summary"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"{where}: the summaries table lacks column(s) {missing}")
    table = table[needed].drop_duplicates(["user_id", "target_position"])
    merged = rows[["user_id", "target_position"]].merge(table, on=["user_id", "target_position"], how="left")
    absent = merged["user_summary"].isna()
    if absent.any():
        first = merged[absent].iloc[0]
        raise ValueError(
            f"{where}: {int(absent.sum())} rows have no user summary (e.g. user {int(first.user_id)}, "
            f"target_position {int(first.target_position)})"
        )
    return merged["user_summary"].astype(str).tolist()


def recent_titles_text(history: Sequence[int], titles, last: int = 5, *, item_slots: bool = False,
                       ratings: Optional[Sequence[Optional[float]]] = None, attributes=None) -> str:
    """``"Recently watched: A; B; C."``: the titles of the last ``last`` items of ``history``
    (most recent last; ``titles`` maps item id -> title). An empty history gives ``""``.
    ``item_slots``: each title is followed by its item's collaborative-token slot
    (:func:`merlin_mllm.text.item_slot`; ``RankerConfig.collab_tokens``).

    ``ratings`` (one per history item, ``None`` where it has none) and ``attributes`` (item id ->
    catalogue attributes text) add, in brackets after each title, its attributes and its rating:
    ``"Toy Story (1995) (Genres: Animation, Comedy. Released 1995; rated 5/5)"``. Without them
    the text is the titles alone, as it always was.
    """
    history = list(history)
    if ratings is not None and len(ratings) != len(history):
        raise ValueError(f"{len(ratings)} ratings for a history of {len(history)} items")
    start = max(0, len(history) - int(last)) if last > 0 else len(history)
    chosen = []
    for position in range(start, len(history)):
        item = int(history[position])
        title = strip_item_slots(str(titles[item])) + item_slot(item) if item_slots else str(titles[item])
        details = []
        if attributes is not None and str(attributes[item]).strip():
            details.append(str(attributes[item]).strip().rstrip("."))
        if ratings is not None and ratings[position] is not None:
            details.append(rating_text(ratings[position]))
        chosen.append(f"{title} ({'; '.join(details)})" if details else title)
    return RECENT_TITLES + "; ".join(chosen) + "." if chosen else ""


def context_details(data_dir: Union[str, os.PathLike], rows: pd.DataFrame, histories: Sequence[Sequence[int]], *,
                    ratings: bool = False, attributes: bool = False) -> Tuple[Optional[list], Optional[pd.Series]]:
    """What the titles context shows beside each title: each row's history ratings
    (:func:`row_history_ratings`, from the row's own events before its time) and the items'
    catalogue attributes (:func:`merlin_mllm.data.attributes.item_attributes`); ``None`` for
    what is not asked."""
    rated = row_history_ratings(data_dir, rows, histories) if ratings else None
    return rated, (item_attribute_texts(data_dir) if attributes else None)


def item_attribute_texts(data_dir: Union[str, os.PathLike]) -> pd.Series:
    """Each item's catalogue attributes text, indexed by item id."""
    items = prepared_tables(data_dir).items
    return pd.Series(item_attributes(items, where=f"{Path(data_dir) / 'items'}").to_numpy(),
                     index=items["item_id"].astype("int64").to_numpy())


def user_context_texts(summaries: Optional[SummarySource], data_dir: Union[str, os.PathLike], rows: pd.DataFrame, *,
                       context: str = "summary", titles: int = 5, partial_block: str = "summary",
                       item_slots: bool = False, ratings: bool = False, attributes: bool = False) -> List[str]:
    """The text of each row's user part of the prompt, for the ranker's ``user_context``.

    Parameters
    ----------
    summaries : path, DataFrame, callable or None
        See :func:`row_summaries`; not read (may be None) with ``context="titles"``.
    data_dir : path
        The prepared dataset (``items/`` titles, ``events/`` when rows lack ``history_item_ids``).
    rows : DataFrame
        Rows with ``user_id`` and ``target_position`` (and ``history_item_ids`` when present).
    context : {"summary", "titles", "both"}
        ``summary``: :func:`row_summaries` (the paper's). ``titles``: :func:`recent_titles_text`
        of the row's own history (items before its target: no leakage, no LLM). ``both``: the
        summary, a blank line, then the titles.
    titles : int
        Titles per row for ``titles`` and ``both``.
    partial_block : {"summary", "titles"}
        Passed to :func:`row_summaries`.
    item_slots : bool
        A collaborative-token slot after each title (:func:`recent_titles_text`), for a ranker
        with ``collab_tokens``; a summary's own text never holds one (slot characters are removed).
    ratings, attributes : bool
        With ``titles`` and ``both``: show each title's rating (from the row's own events before
        its time; the dataset needs ratings) and its catalogue attributes
        (:func:`recent_titles_text`). Off by default: the titles alone.
    """
    if context not in USER_CONTEXTS:
        raise ValueError(f"user context must be one of {USER_CONTEXTS}, not {context!r}")
    if context != "titles" and summaries is None:
        raise ValueError(f"user context {context!r} reads user summaries: give a summary store or table")
    summary = row_summaries(summaries, data_dir, rows, partial_block=partial_block) if context != "titles" else None
    if item_slots and summary is not None:
        summary = [strip_item_slots(s) for s in summary]
    if context == "summary":
        return summary
    items = prepared_tables(data_dir).items.set_index("item_id")["title"]
    histories = row_histories(data_dir, rows)
    rated, facts = context_details(data_dir, rows, histories, ratings=ratings, attributes=attributes)
    recent = [recent_titles_text(history, items, titles, item_slots=item_slots,
                                 ratings=None if rated is None else rated[row], attributes=facts)
              for row, history in enumerate(histories)]
    if context == "titles":
        return recent
    return [f"{s}\n\n{t}" if t else s for s, t in zip(summary, recent)]


def recent_titles_summaries(data_dir: Union[str, os.PathLike], last: int = 5) -> pd.DataFrame:
    """Placeholder user summaries without an LLM: "Recently watched: A; B; C." per row.

    For ranker-only experiments and tests. Each row of every split gets the titles of the last
    ``last`` items of its own ``history_item_ids`` (items before its target: no leakage). The
    result is a summary table for :func:`row_summaries` / ``train_ranker`` / ``evaluate_ranker``.

    Usage::

        table = recent_titles_summaries("data/ml100k", last=5)
        train_ranker("data/ml100k", table, "runs/ranker")

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset``.
    last : int
        Titles per summary (most recent last).
    """
    data_dir = Path(data_dir)
    titles = read_table(data_dir / "items").set_index("item_id")["title"]
    frames = []
    for split in ("train", "valid", "test"):
        rows = read_table(data_dir / split).drop_duplicates(["user_id", "target_position"])
        texts = [recent_titles_text(history, titles, last) or RECENT_TITLES + "."
                 for history in rows["history_item_ids"]]
        frames.append(pd.DataFrame({"user_id": rows["user_id"].to_numpy(),
                                    "target_position": rows["target_position"].to_numpy(), "user_summary": texts}))
    return pd.concat(frames, ignore_index=True)


def row_summaries(summaries: SummarySource, data_dir: Union[str, os.PathLike], rows: pd.DataFrame, *,
                  partial_block: str = "summary") -> List[str]:
    """The user summary of each row (one string per row, in order).

    Parameters
    ----------
    summaries : path, DataFrame or callable
        A summary store folder; a parquet file/folder or DataFrame with ``user_id``,
        ``target_position``, ``user_summary``; or ``callable(rows) -> list of str``.
    data_dir : path
        The prepared dataset (for ``items/`` and ``events/``).
    rows : DataFrame
        Rows with ``user_id`` and ``target_position`` (and ``history_item_ids`` when present).
    partial_block : {"summary", "titles"}
        From a store, how a history that ends inside a block is summarised (see the module
        docstring; :func:`partial_block_rule` gives a prepared split's). Tables and callables give
        their own texts.

    Raises
    ------
    ValueError
        When a row has no summary (naming the user), or the source is not recognised.
    """
    data_dir = Path(data_dir)
    if partial_block not in PARTIAL_BLOCKS:
        raise ValueError(f"partial_block must be one of {PARTIAL_BLOCKS}, not {partial_block!r}")
    if callable(summaries):
        texts = list(summaries(rows))
        if len(texts) != len(rows):
            raise ValueError(f"the summaries callable returned {len(texts)} texts for {len(rows)} rows")
        return [str(t) for t in texts]
    if isinstance(summaries, pd.DataFrame):
        return _table_summaries(summaries, rows, "the summaries DataFrame")
    path = Path(summaries)
    if is_store(path):
        return _store_summaries(path, data_dir, rows, partial_block)
    if path.exists():
        return _table_summaries(pd.read_parquet(path), rows, str(path))
    raise FileNotFoundError(f"user summaries not found: {path} is neither a summary store nor a parquet table")
