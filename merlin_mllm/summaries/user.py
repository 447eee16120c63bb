"""Recurrent user-preference summaries (MLLM-MSR stage 2), cached in a :class:`SummaryStore`.

A user's history, in time order, is cut into blocks of ``k`` items (default 3). Step 1 asks the
LLM for the user's preferences from block 1; step ``j`` shows the summary of step ``j-1`` as
"what we already know of this user" plus block ``j`` and asks for an updated summary. Every
answer starts with the fixed lead-in :data:`~merlin_mllm.summaries.user_prompts.ANSWER_LEAD_IN`.
``mode="direct"`` instead puts the whole history into one prompt (the paper's MLLM-MSR_R ablation).

Caching and no leakage
----------------------
Each step is content-addressed: its key covers the previous step's key, the texts of its block's
items, the model id, :data:`~merlin_mllm.summaries.user_prompts.PROMPT_VERSION` and the
output-relevant generation settings. So the summary at every block boundary is kept, rows and
users sharing a history prefix share steps, and a re-run generates nothing. A row whose history
(the items strictly before its target) has length ``t`` gets the chain over its ``t // k`` full
blocks plus, when ``t % k != 0``, one more step over the partial tail block (cached the same
way). Its key therefore depends only on items before the target: nothing at or after the target
can reach its summary.

A row with an empty history gets :data:`~merlin_mllm.summaries.user_prompts.EMPTY_HISTORY_SUMMARY`
without any LLM call.

History lines show each item's summary from the store (published by the item stage under the
ref namespace ``"item"``: ``{str(item_id): summary_key}``) after its title; an item without one
is shown by title + description, and counted in ``SummaryReport.items_without_summary``.

Token budgets (:class:`merlin_mllm.text.TokenBudgets`, in every step key): a history line's title
is cut to ``title`` tokens and the whole line to ``history_item``; at prompt time the previous
summary is cut to ``previous_summary`` and the numbered block of lines to ``history`` (keeping
its most recent lines). Cuts are counted in ``SummaryReport.truncated``. The steps of one wave
are batched by prompt length (``GenerationSettings.sort_by_length``). Run the
item stage before the user stage: a user summary is keyed by the item texts it saw, so adding
item summaries later gives new user summaries (the old ones stay valid for their inputs).

Incremental updates
-------------------
:func:`summarize_users` also records, per user, the chain of boundary summaries over all the
user's known events (:class:`~merlin_mllm.summaries.store.UserState`). :func:`update_users`
appends new events: only new full blocks are summarised, each from the previous boundary
summary, so a user with 9 summarised items and 3 new ones costs exactly one LLM call. Items of
an incomplete block wait, recorded as pending, until the block is full. An event whose item the
user already has is skipped (the data layer keeps deduplicated histories too), so applying one
events file twice costs nothing.

The stage's modules
-------------------
- this module: the jobs, :func:`summarize_users` (with :class:`UserSummaryRun`, its parts) and
  :func:`update_users`;
- :mod:`~merlin_mllm.summaries.user_summarizer`: ``UserSummaryConfig`` and ``UserSummarizer``,
  which plans and generates the steps;
- :mod:`~merlin_mllm.summaries.user_prompts`: the prompts and their fixed texts;
- :mod:`~merlin_mllm.summaries.user_history`: the item table, row histories, history lines;
- :mod:`~merlin_mllm.summaries.user_store`: the recorded configuration and the lookups
  (``latest_user_summary``, ``history_summary_keys``, ``stored_summary_texts``).

Usage::

    from merlin_mllm.summaries.user import summarize_users, update_users
    from merlin_mllm.summaries.user_store import latest_user_summary

    report = summarize_users("data/ml100k", "data/summaries")            # all splits
    print(report)           # generated 812, reused 0, failed 0, ..., LLM calls 812, tokens ...
    report = update_users("new_events.parquet", "data/summaries")       # only new full blocks
    text = latest_user_summary("data/summaries", user_id=7)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import pandas as pd

from merlin_mllm.generation import GenerationSettings
from merlin_mllm.models.loading import model_id_of
from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.summaries.store import SummaryStore
from merlin_mllm.summaries.user_history import RATING_COLUMN, history_lists, history_rating_lists, read_items
from merlin_mllm.summaries.user_store import record_config, resolve_config
from merlin_mllm.summaries.user_summarizer import DEFAULT_BLOCK_SIZE, UserSummarizer, UserSummaryConfig
from merlin_mllm.text import TokenBudgets

log = logging.getLogger(__name__)


def summarize_users(
    data_dir: Union[str, os.PathLike],
    summaries: Union[str, os.PathLike],
    *,
    splits: Sequence[str] = ("train", "valid", "test"),
    model=None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    mode: str = "recurrent",
    settings: GenerationSettings = GenerationSettings(),
    progress: bool = True,
    on_unknown_item: str = "error",
    budgets: TokenBudgets = TokenBudgets(),
    ratings: bool = False,
    max_history: int = 0,
) -> SummaryReport:
    """Summarise every row history of ``splits`` and every user's full history into the store.

    Reads the data contract's ``events/``, ``items/`` and split folders under ``data_dir``. A
    row's history is its ``history_item_ids`` column when present, else the user's events with
    ``position < target_position``. In recurrent mode each user's chain of boundary summaries
    over all their events is recorded too (for :func:`update_users` and
    :func:`~merlin_mllm.summaries.user_store.latest_user_summary`).

    Parameters
    ----------
    data_dir : path
        The output folder of ``merlin-mllm data prepare``.
    summaries : path
        The summary store folder (created when missing; shared with the item stage).
    splits : sequence of str
        Split folders whose rows need summaries; missing folders are an error.
    model : str or LoadedModel, optional
        Default: the embedded SmolLM2-135M-Instruct.
    block_size : int
        Items per recurrent step (k; the paper's default is 3).
    mode : {"recurrent", "direct"}
        ``direct``: one prompt with the whole history per row (MLLM-MSR_R).
    settings : GenerationSettings
        Greedy by default.
    budgets : TokenBudgets
        Token budgets of the prompt's texts (recorded in every key).
    ratings : bool
        Ratings-aware summaries (``UserSummaryConfig.ratings``): each history line shows the
        user's rating from its own event before the row; needs a ``rating`` column in ``events/``.
    max_history : int
        History depth (``UserSummaryConfig.max_history``): 0 summarises whole histories.

    Returns
    -------
    SummaryReport
        Counts are of summary steps (unique keys), not rows; ``rows`` counts the rows served.

    Example
    -------
    >>> report = summarize_users("data/ml100k", "data/summaries", block_size=3)
    >>> print(report)
    """
    run = UserSummaryRun(data_dir, summaries, splits=splits, model=model, block_size=block_size, mode=mode,
                         settings=settings, progress=progress, on_unknown_item=on_unknown_item, budgets=budgets,
                         ratings=ratings, max_history=max_history)
    run.summarizer.summarize(run.histories, run.report, run.labels, ratings=run.ratings)
    return run.finish()


class UserSummaryRun:
    """:func:`summarize_users` in parts, so the generation can run elsewhere (a Dask cluster).

    Making one reads the data and lists the distinct histories to summarise (``histories``,
    with ``users`` and ``labels``): every row history of ``splits`` and, in recurrent mode,
    each user's full history up to its last block boundary. Generate their summaries (with
    ``summarizer.summarize`` or the ``UserPreferenceSummary`` operator under ``config``), then
    :meth:`finish` records the users' states and the run's configuration, which the readers
    of the store need; it generates nothing when every step is stored.

    Example
    -------
    >>> run = UserSummaryRun("data/ml100k", "data/summaries")
    >>> run.summarizer.summarize(run.histories, run.report, run.labels, ratings=run.ratings)
    >>> report = run.finish()
    """

    def __init__(self, data_dir, summaries, *, splits: Sequence[str] = ("train", "valid", "test"), model=None,
                 block_size: int = DEFAULT_BLOCK_SIZE, mode: str = "recurrent",
                 settings: GenerationSettings = GenerationSettings(), progress: bool = True,
                 on_unknown_item: str = "error", budgets: TokenBudgets = TokenBudgets(), ratings: bool = False,
                 max_history: int = 0):
        self.data_dir = data_dir = Path(data_dir)
        self.store = store = SummaryStore(summaries)
        self.config = UserSummaryConfig(model_id_of(model), int(block_size), mode, settings, budgets, ratings,
                                        int(max_history))
        # Lazy: merlin.io (under data.tables) is a heavy import, and only the readers need it.
        from merlin_mllm.data.tables import read_named_table

        items = read_items(data_dir / "items")
        events = read_named_table(data_dir / "events", "events table",
                                  ["user_id", "item_id", "position"] + ([RATING_COLUMN] if ratings else []))
        self.summarizer = UserSummarizer(store, items, self.config, model=model, progress=progress,
                                         on_unknown_item=on_unknown_item)
        self.report = report = SummaryReport()
        self.histories: List[Tuple[int, ...]] = []
        self.users: List[int] = []
        self.labels: List[str] = []
        #: Per history, each item's rating at its own event (ratings-aware runs only, else None).
        self.ratings: Optional[List[Tuple[Optional[float], ...]]] = [] if ratings else None
        for split in splits:
            path = data_dir / split
            rows = read_named_table(path, f"{split} rows", ["user_id"])
            if "history_item_ids" in rows.columns:
                lists = [list(h) if h is not None else [] for h in rows["history_item_ids"]]
            elif "target_position" in rows.columns:
                lists = history_lists(events, rows["user_id"], rows["target_position"])
            else:
                raise ValueError(f"{path}: rows need history_item_ids or target_position")
            report.rows += len(rows)
            report.empty_histories += sum(1 for h in lists if len(h) == 0)
            if ratings:
                # Each item's rating at its own event, of the events strictly before the row's target.
                if "target_position" not in rows.columns:
                    raise ValueError(f"{path}: ratings-aware summaries need the rows' target_position")
                rated = history_rating_lists(events, rows["user_id"], rows["target_position"], lists)
            else:
                rated = [()] * len(lists)
            # Rows of one group share a history: summarise each distinct (user, history) once.
            distinct = {(int(u), tuple(int(i) for i in h), tuple(r)) for u, h, r in zip(rows["user_id"], lists, rated)}
            for user, history, history_ratings in sorted(distinct, key=lambda t: t[:2]):
                self._add(user, history, f"{path} (user {user})", history_ratings if ratings else None)

        self.full: Dict[int, Tuple[int, ...]] = {}
        if mode == "recurrent":
            ordered = events.sort_values(["user_id", "position"], kind="stable")
            groups = list(ordered.groupby("user_id", sort=True))
            raw = {int(u): tuple(int(i) for i in g["item_id"]) for u, g in groups}
            labels = [f"{data_dir / 'events'} (user {u})" for u in raw]
            self.full_ratings: Dict[int, Optional[Tuple[Optional[float], ...]]] = dict.fromkeys(raw)
            if ratings:
                raw_ratings = [tuple(None if pd.isna(r) else float(r) for r in g[RATING_COLUMN]) for _, g in groups]
                cleaned, cleaned_ratings = self.summarizer._clean_histories(list(raw.values()), report, labels, raw_ratings)
                self.full_ratings = dict(zip(raw, cleaned_ratings))
            else:
                cleaned = self.summarizer._clean_histories(list(raw.values()), report, labels)
            self.full = dict(zip(raw, cleaned))
            for user, history in self.full.items():
                # Only full blocks: a user's recorded chain ends at the last block boundary.
                end = len(history) - len(history) % block_size
                user_ratings = self.full_ratings[user]
                self._add(user, history[:end], f"{data_dir / 'events'} (user {user})",
                          user_ratings[:end] if user_ratings is not None else None)

    def _add(self, user: int, history: Tuple[int, ...], label: str,
             ratings: Optional[Tuple[Optional[float], ...]] = None) -> None:
        self.users.append(user)
        self.histories.append(history)
        self.labels.append(label)
        if self.ratings is not None:
            self.ratings.append(ratings)

    def finish(self) -> SummaryReport:
        """Record the users' states and this run's configuration; close the store; the report."""
        if self.full:
            self.store.refresh()
            self.store.put_user_states(self.summarizer.boundary_state(u, h, ratings=self.full_ratings[u])
                                       for u, h in self.full.items())
        # Both modes: readers of the store (train_ranker, evaluate_ranker, the Triton export) rebuild
        # each row's summary key from this config. update_users refuses a direct one.
        record_config(self.store, self.config, items_path=self.data_dir / "items")
        self.store.close()
        return self.report


def update_users(
    events_path: Union[str, os.PathLike],
    summaries: Union[str, os.PathLike],
    *,
    items: Union[str, os.PathLike, pd.DataFrame, None] = None,
    model=None,
    block_size: Optional[int] = None,
    settings: Optional[GenerationSettings] = None,
    progress: bool = True,
    on_unknown_item: str = "error",
    budgets: Optional[TokenBudgets] = None,
) -> SummaryReport:
    """Extend users' recurrent summaries with new events: only new full blocks are summarised.

    Each user's new events (sorted by time) are appended after the items already recorded for
    them; pending items plus new ones are cut into blocks of ``block_size`` and each full block
    costs one LLM step, continuing from the last boundary summary. The history is never re-read.
    Events for items the user already has are skipped (counted in ``report.skipped``). Users the
    store does not know start from scratch.

    Parameters
    ----------
    events_path : path
        Parquet file or folder with ``user_id``, ``item_id``, ``timestamp``.
    summaries : path
        The summary store folder written by :func:`summarize_users`.
    items : path or DataFrame, optional
        The item table; default: the one recorded by the last ``summarize_users`` run.
    model, block_size, settings, budgets : optional
        Default: those of the last ``summarize_users`` run (the state is kept per configuration).

    Example
    -------
    >>> report = update_users("new_events.parquet", "data/summaries")
    >>> report.llm_calls          # one per user with a newly completed block
    """
    store = SummaryStore(summaries)
    config, items = resolve_config(store, model, block_size, settings, items, budgets=budgets)
    if config.mode != "recurrent":
        raise ValueError(
            f"the store {store.path} was last filled in {config.mode!r} mode (one prompt over the "
            "whole history, MLLM-MSR_R), which keeps no chain to extend; update_users continues "
            "recurrent summaries only: re-run summarize_users(mode='direct') on the longer histories"
        )
    if config.ratings or config.max_history:
        # A user state keeps item ids only, not the ratings its pending items need; and a depth
        # moves the chain's start as the history grows, which an append cannot follow.
        raise ValueError(f"the store {store.path} holds user summaries with ratings={config.ratings}, max_history="
                         f"{config.max_history}, which update_users does not extend yet: re-run summarize_users "
                         "with the same settings on the longer events")
    events_path = Path(events_path)
    from merlin_mllm.data.tables import read_named_table  # lazy: see UserSummaryRun

    events = read_named_table(events_path, "new events", ["user_id", "item_id", "timestamp"])
    events = events.sort_values(["user_id", "timestamp"], kind="stable")
    summarizer = UserSummarizer(store, read_items(items), config, model=model, progress=progress, on_unknown_item=on_unknown_item)
    report = SummaryReport()
    states = {int(u): store.get_user_state(config.scope, int(u)) for u in events["user_id"].unique()}
    # Texts are needed for the new items and the pending ones only: the summarised history is
    # represented by its last boundary key.
    summarizer.texts.prepare(list(events["item_id"]) + [i for st in states.values() if st for i in st.pending])

    new_states, histories, previous, labels = {}, [], [], []
    for user, group in events.groupby("user_id", sort=True):
        user = int(user)
        base = states[user]
        seen = set(base.item_ids) if base is not None else set()
        fresh = []
        for item in group["item_id"]:
            item = int(item)
            if item in seen:
                report.skipped += 1  # already in this user's history (e.g. the file applied twice)
                continue
            if not summarizer.texts.has(item):
                if on_unknown_item == "error":
                    raise ValueError(f"{events_path}: user {user}, item id {item} is neither in the items table nor in the store")
                report.skipped += 1
                continue
            seen.add(item)
            fresh.append(item)
        if not fresh:
            continue
        history = (base.item_ids if base is not None else ()) + tuple(fresh)
        new_states[user] = (base, history)
        done = base.summarised if base is not None else 0
        full = len(history) - len(history) % config.block_size
        if full > done:
            histories.append(history[done:full])
            previous.append(base.latest_key if base is not None else None)
            labels.append(f"{events_path} (user {user})")
    if store.user_states() and not any(states.values()):
        log.warning("no user of %s has a state under this configuration in %s: all start from scratch",
                    events_path, store.path)
    summarizer.summarize(histories, report, labels, previous=previous)
    store.put_user_states(summarizer.boundary_state(u, h, base) for u, (base, h) in new_states.items())
    report.rows += len(new_states)
    store.close()
    return report
