"""The user stage's inputs: the item table, each row's history, and the line each history item shows.

- :func:`read_items` reads the item table (once per process and file version);
- :func:`history_lists` / :func:`add_history_item_ids` build each row's history from the
  ``events`` table: the user's items strictly before the row's target, in time order;
- :func:`history_rating_lists` gives each history item's rating at its own event (same rows,
  same order), and :func:`rated_line` / :func:`rating_text` how a rating is shown;
- :class:`ItemTexts` gives each history item's prompt line: its stored item summary after its
  title, else title + description, cut to the token budgets.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from merlin_mllm.models.loading import shared_tokenizer
from merlin_mllm.summaries.store import ITEM_REF_NAMESPACE, SummaryStore
from merlin_mllm.text import TokenBudgets, fits_by_bytes, truncate_tokens

_ITEM_TABLES: Dict[Tuple[str, float], pd.DataFrame] = {}
#: The rating scale's top: the datasets with ratings (ML-100k, the Amazon reviews) rate 1 to 5.
RATING_SCALE = 5
#: The events column that holds an explicit rating (optional in the data contract).
RATING_COLUMN = "rating"


def read_items(items: Union[str, os.PathLike, pd.DataFrame]) -> pd.DataFrame:
    """The item table (``item_id``, ``title``, ``description``), indexed by item id.

    A path is read once per process. Raises ``ValueError`` naming the file when columns are missing.
    """
    from merlin_mllm.data.tables import read_table

    if isinstance(items, pd.DataFrame):
        frame, where = items, "the items DataFrame"
    else:
        where = str(Path(items).resolve())
        if not Path(where).exists():
            raise FileNotFoundError(f"items table not found: {where}")
        # Re-read when the table changes on disk during a long-lived worker.
        files = sorted(Path(where).glob("*.parquet")) if Path(where).is_dir() else [Path(where)]
        cache_key = (where, max((f.stat().st_mtime for f in files), default=0.0))
        cached = _ITEM_TABLES.get(cache_key)
        if cached is not None:
            return cached
        frame = read_table(where)
    missing = [c for c in ("item_id", "title") if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: the items table lacks column(s) {missing}")
    cols = ["item_id", "title"] + (["description"] if "description" in frame.columns else [])
    table = frame[cols].copy()
    if "description" not in table.columns:
        table["description"] = ""
    table["item_id"] = table["item_id"].astype("int64")
    if table["item_id"].duplicated().any():
        dup = table.loc[table["item_id"].duplicated(), "item_id"].iloc[0]
        raise ValueError(f"{where}: item_id {dup} appears more than once")
    table = table.set_index("item_id")
    if not isinstance(items, pd.DataFrame):
        _ITEM_TABLES[cache_key] = table
    return table


# --------------------------------------------------------------------------- histories from events
def history_lists(events: pd.DataFrame, user_ids: Sequence[int], target_positions: Sequence[int]) -> List[List[int]]:
    """Each row's history: the user's item ids with ``position < target_position``, in order.

    Parameters
    ----------
    events : DataFrame
        ``user_id``, ``item_id``, ``position`` (the ``events/`` table of the data contract).
    user_ids, target_positions : sequences
        One entry per row.

    Example
    -------
    >>> rows["history_item_ids"] = history_lists(events, rows.user_id, rows.target_position)
    """
    ordered = events.sort_values(["user_id", "position"], kind="stable")
    users = ordered["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    by_user = {int(users[s]): (ordered["position"].to_numpy()[s:e], ordered["item_id"].to_numpy()[s:e])
               for s, e in zip(starts, ends)}
    empty = (np.empty(0, dtype="int64"), np.empty(0, dtype="int64"))
    out = []
    for user, target in zip(np.asarray(user_ids), np.asarray(target_positions)):
        positions, items = by_user.get(int(user), empty)
        out.append(items[: np.searchsorted(positions, target, side="left")].astype("int64").tolist())
    return out


def history_rating_lists(events: pd.DataFrame, user_ids: Sequence[int], target_positions: Sequence[int],
                         histories: Optional[Sequence[Sequence[int]]] = None) -> List[List[Optional[float]]]:
    """Each row's history ratings: the ``rating`` of each of the user's events with
    ``position < target_position``, in order (``None`` where an event has none).

    Each rating is read from the history item's own event (by position, so never from a later
    event of the same item), and only from events strictly before the row's time.

    Parameters
    ----------
    events : DataFrame
        ``user_id``, ``item_id``, ``position`` and ``rating`` (the ``events/`` table).
    user_ids, target_positions : sequences
        One entry per row.
    histories : sequences of item ids, optional
        The rows' ``history_item_ids``: checked to be the same events' items, so each rating
        belongs to the item shown beside it.

    Raises
    ------
    ValueError
        When ``events`` has no ``rating`` column, a rating lies outside 1..RATING_SCALE, or a
        row's history is not its events before the target (naming the row's user).
    """
    if RATING_COLUMN not in events.columns:
        raise ValueError(f"the events table has no {RATING_COLUMN!r} column: this dataset has no ratings to show")
    rated = events[RATING_COLUMN].dropna()
    bad = rated[(rated < 1) | (rated > RATING_SCALE)]
    if len(bad):
        row = events.loc[bad.index[0]]
        raise ValueError(f"events: user {int(row['user_id'])}, item {int(row['item_id'])} has rating {row[RATING_COLUMN]!r}, "
                         f"outside 1..{RATING_SCALE}")
    ordered = events.sort_values(["user_id", "position"], kind="stable")
    by_user = {int(u): (g["position"].to_numpy(), g["item_id"].to_numpy(), g[RATING_COLUMN].to_numpy(dtype="float64"))
               for u, g in ordered.groupby("user_id", sort=False)}
    empty = (np.empty(0, dtype="int64"), np.empty(0, dtype="int64"), np.empty(0, dtype="float64"))
    out = []
    for row, (user, target) in enumerate(zip(np.asarray(user_ids), np.asarray(target_positions))):
        positions, items, ratings = by_user.get(int(user), empty)
        end = int(np.searchsorted(positions, target, side="left"))
        if histories is not None and [int(i) for i in histories[row]] != items[:end].astype("int64").tolist():
            raise ValueError(f"row {row} (user {int(user)}, target_position {int(target)}): its history_item_ids are "
                             "not the user's events before the target, so their ratings cannot be matched")
        out.append([None if np.isnan(r) else float(r) for r in ratings[:end]])
    return out


def rating_text(rating: Optional[float]) -> str:
    """``"rated 4/5"`` (``""`` for no rating)."""
    return "" if rating is None else f"rated {float(rating):g}/{RATING_SCALE}"


def rated_line(line: str, rating: Optional[float]) -> str:
    """An item's line with its rating after it, ``"Toy Story (1995) (rated 5/5)"``; unchanged without one."""
    return f"{line} ({rating_text(rating)})" if rating is not None else line


def add_history_item_ids(rows: pd.DataFrame, events: pd.DataFrame, column: str = "history_item_ids") -> pd.DataFrame:
    """A copy of ``rows`` with the list column ``history_item_ids`` built from ``events``."""
    missing = [c for c in ("user_id", "target_position") if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack column(s) {missing} needed to build {column}")
    out = rows.copy()
    out[column] = history_lists(events, out["user_id"], out["target_position"])
    return out


# --------------------------------------------------------------------------- item lines
def _clean(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return " ".join(str(value).split())


class ItemTexts:
    """The line each history item shows in a prompt: its stored summary, else title + description.

    Texts are raw (unescaped): they enter summary keys as content; prompts escape them. The
    title is cut to ``budgets.title`` tokens and the line to ``budgets.history_item`` tokens of
    ``model``'s tokenizer, which is loaded only when a line is long enough to need it.
    """

    def __init__(self, items: pd.DataFrame, store: SummaryStore, *, model=None,
                 budgets: TokenBudgets = TokenBudgets(), on_unknown_item: str = "error"):
        if on_unknown_item not in ("error", "skip"):
            raise ValueError(f"on_unknown_item must be 'error' or 'skip', not {on_unknown_item!r}")
        self.items, self.store, self.model, self.budgets = items, store, model, budgets
        self.on_unknown_item = on_unknown_item
        self._lines: Dict[int, str] = {}
        self.without_summary: set = set()
        #: Texts cut to their budget since the last reset (titles and lines, once per item).
        self.truncated = 0

    def _fit(self, text: str, budget: int) -> str:
        if fits_by_bytes(text, budget):
            return text
        cut = truncate_tokens(text, budget, shared_tokenizer(self.model))
        self.truncated += int(cut.truncated)
        return cut.text.strip() if cut.truncated else text

    def prepare(self, item_ids: Iterable[int]) -> None:
        """Look up every item needed (one pass over the store's refs)."""
        needed = sorted({int(i) for i in item_ids} - set(self._lines))
        if not needed:
            return
        refs = self.store.get_refs(ITEM_REF_NAMESPACE, [str(i) for i in needed])
        summaries = self.store.get_many(refs.values())
        known = self.items.index
        budgets = self.budgets
        for item_id in needed:
            in_table = item_id in known
            title = self._fit(_clean(self.items.at[item_id, "title"]), budgets.title) if in_table else ""
            summary = summaries.get(refs.get(str(item_id), ""), None)
            if summary is not None:
                line = f"{title}: {_clean(summary)}" if title else _clean(summary)
                self._lines[item_id] = self._fit(line, budgets.history_item)
            elif in_table:
                self.without_summary.add(item_id)
                line = ". ".join(p for p in (title, _clean(self.items.at[item_id, "description"])) if p)
                self._lines[item_id] = self._fit(line, budgets.history_item) or "an item with no title or description"

    def has(self, item_id: int) -> bool:
        if int(item_id) not in self._lines:
            self.prepare([item_id])
        return int(item_id) in self._lines

    def __getitem__(self, item_id: int) -> str:
        if not self.has(item_id):
            raise KeyError(f"item id {int(item_id)} is neither in the items table nor in the store")
        return self._lines[int(item_id)]
