"""Recurrent user-preference summaries (MLLM-MSR stage 2), cached in a :class:`SummaryStore`.

A user's history, in time order, is cut into blocks of ``k`` items (default 3). Step 1 asks the
LLM for the user's preferences from block 1; step ``j`` shows the summary of step ``j-1`` as
"what we already know of this user" plus block ``j`` and asks for an updated summary. Every
answer starts with the fixed lead-in :data:`ANSWER_LEAD_IN`. ``mode="direct"`` instead puts the
whole history into one prompt (the paper's MLLM-MSR_R ablation).

Caching and no leakage
----------------------
Each step is content-addressed: its key covers the previous step's key, the texts of its block's
items, the model id, :data:`PROMPT_VERSION` and the output-relevant generation settings. So the
summary at every block boundary is kept, rows and users sharing a history prefix share steps, and
a re-run generates nothing. A row whose history (the items strictly before its target) has
length ``t`` gets the chain over its ``t // k`` full blocks plus, when ``t % k != 0``, one more
step over the partial tail block (cached the same way). Its key therefore depends only on items
before the target: nothing at or after the target can reach its summary.

A row with an empty history gets :data:`EMPTY_HISTORY_SUMMARY` without any LLM call.

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
user's known events (:class:`UserState`). :func:`update_users` appends new events: only new full
blocks are summarised, each from the previous boundary summary, so a user with 9 summarised
items and 3 new ones costs exactly one LLM call. Items of an incomplete block wait, recorded as
pending, until the block is full. An event whose item the user already has is skipped (the
data layer keeps deduplicated histories too), so applying one events file twice costs nothing.

Usage::

    from merlin_mllm.summaries.user import summarize_users, update_users, latest_user_summary

    report = summarize_users("data/ml100k", "data/summaries")            # all splits
    print(report)           # generated 812, reused 0, failed 0, ..., LLM calls 812, tokens ...
    report = update_users("new_events.parquet", "data/summaries")       # only new full blocks
    text = latest_user_summary("data/summaries", user_id=7)
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from merlin_mllm.generation import GenerationSettings, generate_chat
from merlin_mllm.models import embedded, load
from merlin_mllm.models.loading import EMBEDDED_LLM_ALIASES, LoadedModel, resolve_model_path
from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.summaries.store import (
    ITEM_REF_NAMESPACE,
    SummaryStore,
    UserState,
    canonical_json,
    open_store,
)
from merlin_mllm.text import TokenBudgets, escape_untrusted, fits_by_bytes, truncate_tokens

log = logging.getLogger(__name__)

#: Part of every user-summary key: bump it whenever a prompt below changes.
PROMPT_VERSION = "user-v1"
#: The answer starts with this (given to the model as the start of its reply).
ANSWER_LEAD_IN = "The user appears to have a preference for"
#: The summary of a row with no history before its target. No LLM call: there is nothing to
#: summarise, and a fixed text keeps such rows identical and free.
EMPTY_HISTORY_SUMMARY = "The user has no earlier interactions, so no preference is known yet."
MODES = ("recurrent", "direct")
DEFAULT_BLOCK_SIZE = 3
#: The budgets a user step's key records (the others belong to the item stage).
USER_BUDGETS = ("title", "history_item", "previous_summary", "history")
#: Ref namespace holding the configuration of the latest ``summarize_users`` run (key "latest").
CONFIG_REF_NAMESPACE = "user_config"
_STEP_KIND = {"recurrent": "user_step", "direct": "user_direct"}


# --------------------------------------------------------------------------- configuration
def model_id_of(model) -> str:
    """The id a summary key records, without loading the model."""
    if isinstance(model, LoadedModel):
        return model.model_id
    if model in EMBEDDED_LLM_ALIASES:
        return embedded.SMOLLM2_NAME
    return str(model)


@dataclass(frozen=True)
class UserSummaryConfig:
    """Everything that decides a user summary's text, apart from the history itself.

    Parameters
    ----------
    model_id : str
        The LLM's id or local path (``"smollm2-135m-instruct"`` is the embedded default).
    block_size : int
        Items per recurrent step (the paper's k = 3).
    mode : {"recurrent", "direct"}
    settings : GenerationSettings
        Greedy by default, so summaries are deterministic.
    budgets : TokenBudgets
        Token budgets of the prompt's texts (see the module docstring); part of every key.
    """

    model_id: str
    block_size: int = DEFAULT_BLOCK_SIZE
    mode: str = "recurrent"
    settings: GenerationSettings = GenerationSettings()
    budgets: TokenBudgets = TokenBudgets()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if int(self.block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not isinstance(self.budgets, TokenBudgets):
            raise TypeError(f"budgets must be a TokenBudgets, not {type(self.budgets).__name__}")

    @property
    def budget_key(self) -> dict:
        """The budgets a step key records."""
        return {name: getattr(self.budgets, name) for name in USER_BUDGETS}

    @property
    def scope(self) -> str:
        """Id of the user states kept under this configuration."""
        return SummaryStore.key("user_scope", self.model_id, PROMPT_VERSION, self.settings.key(),
                                {"block_size": int(self.block_size), "mode": self.mode, "budgets": self.budget_key})

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "block_size": int(self.block_size), "mode": self.mode,
                "settings": asdict(self.settings), "budgets": self.budgets.to_dict(),
                "prompt_version": PROMPT_VERSION}

    @classmethod
    def from_dict(cls, data: Mapping) -> "UserSummaryConfig":
        return cls(data["model_id"], int(data["block_size"]), data["mode"], GenerationSettings(**data["settings"]),
                   TokenBudgets.from_dict(data.get("budgets")))


# --------------------------------------------------------------------------- per-process caches
_MODELS: Dict[str, object] = {}
_MODELS_LOCK = threading.Lock()
_TOKENIZERS: Dict[str, object] = {}
#: How many times this process loaded each model (the Dask test checks "once per worker").
MODEL_LOADS: Dict[str, int] = {}


def get_model(model=None):
    """The process-wide loaded model for ``model`` (an id/path, or a LoadedModel to register).

    Loading happens once per process and model id, however many partitions or calls use it.
    """
    if isinstance(model, LoadedModel):
        with _MODELS_LOCK:
            _MODELS.setdefault(model.model_id, model)
        return model
    model_id = model_id_of(model)
    with _MODELS_LOCK:
        lm = _MODELS.get(model_id)
        if lm is None:
            lm = _MODELS[model_id] = load(model_id)
            MODEL_LOADS[model_id] = MODEL_LOADS.get(model_id, 0) + 1
        return lm


def get_tokenizer(model=None):
    """The tokenizer of ``model`` (an id/path, or a LoadedModel), without loading its weights.

    Cut lines enter the summary keys, so readers that only rebuild keys need the tokenizer but
    not the model. Loaded once per process and model id (or taken from a loaded model).
    """
    if isinstance(model, LoadedModel):
        return model.tokenizer
    model_id = model_id_of(model)
    with _MODELS_LOCK:
        if model_id in _MODELS:
            return _MODELS[model_id].tokenizer
        tokenizer = _TOKENIZERS.get(model_id)
        if tokenizer is None:
            from transformers import AutoTokenizer  # lazy: transformers is a heavy import

            tokenizer = _TOKENIZERS[model_id] = AutoTokenizer.from_pretrained(resolve_model_path(model_id))
        return tokenizer


def read_parquet(path: Union[str, os.PathLike], columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """A parquet file, or every ``*.parquet`` file of a folder in name order, as one DataFrame.

    Folders written by Merlin also hold ``schema.pbtxt`` and ``_metadata`` files, which
    ``pd.read_parquet(folder)`` would try to read as data.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"parquet data not found: {path}")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.parquet file in {path}")
    return pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)


_ITEM_TABLES: Dict[Tuple[str, float], pd.DataFrame] = {}
#: One generation at a time per model in a process: generate_chat switches the tokenizer's
#: padding side, which threads of one Dask worker would otherwise race on.
_GENERATE_LOCKS: Dict[int, threading.Lock] = {}


def read_items(items: Union[str, os.PathLike, pd.DataFrame]) -> pd.DataFrame:
    """The item table (``item_id``, ``title``, ``description``), indexed by item id.

    A path is read once per process. Raises ``ValueError`` naming the file when columns are missing.
    """
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
        frame = read_parquet(where)
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
        self.items = items
        self.store = store
        self.model = model
        self.budgets = budgets
        self.on_unknown_item = on_unknown_item
        self._lines: Dict[int, str] = {}
        self.without_summary: set = set()
        #: Texts cut to their budget since the last reset (titles and lines, once per item).
        self.truncated = 0

    def _fit(self, text: str, budget: int) -> str:
        if fits_by_bytes(text, budget):
            return text
        cut = truncate_tokens(text, budget, get_tokenizer(self.model))
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


# --------------------------------------------------------------------------- prompts
def _numbered(lines: Sequence[str], tokenizer) -> str:
    return "\n".join(f"{i}. {escape_untrusted(line, tokenizer)}" for i, line in enumerate(lines, 1))


def build_prompt(item_lines: Sequence[str], previous_summary: Optional[str], tokenizer, *, whole_history: bool = False,
                 budgets: Optional[TokenBudgets] = None, report: Optional[SummaryReport] = None) -> List[dict]:
    """The chat messages of one summarisation step (every inserted text cut to its budget, then escaped).

    With ``budgets``, the previous summary is cut to ``budgets.previous_summary`` tokens and the
    numbered history block to ``budgets.history`` (keeping its end: the most recent items);
    each cut adds one to ``report.truncated``. Lines are expected cut already (``ItemTexts``).
    """
    items = _numbered(item_lines, tokenizer)
    if budgets is not None:
        block = truncate_tokens("\n".join(f"{i}. {line}" for i, line in enumerate(item_lines, 1)),
                                budgets.history, tokenizer, keep="end")
        if block.truncated:
            items = escape_untrusted(block.text.strip(), tokenizer)
        if previous_summary is not None:
            cut = truncate_tokens(previous_summary, budgets.previous_summary, tokenizer)
            previous_summary = cut.text.strip() if cut.truncated else previous_summary
            block_cuts = int(block.truncated) + int(cut.truncated)
        else:
            block_cuts = int(block.truncated)
        if report is not None:
            report.truncated += block_cuts
    ask = ("Write one short paragraph about the user's tastes: the kinds of items, genres, styles "
           "or qualities they seem to like. Describe preferences only; do not list or retell the items.")
    if previous_summary is None:
        scope = "all the items" if whole_history else "the items"
        content = (f"Below are {scope} a user interacted with, oldest first.\n\n{items}\n\n{ask}")
    else:
        content = (
            "What we already know of this user:\n"
            f"{escape_untrusted(previous_summary, tokenizer)}\n\n"
            f"Afterwards the user interacted with these items, oldest first:\n\n{items}\n\n"
            "Update what we know: merge the earlier preferences with what these new items show. "
            + ask
        )
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------- the engine
@dataclass(frozen=True)
class _Step:
    key: str
    level: int  # position of the step in its planned chain (1-based)
    previous: Optional[str]  # key of the summary this step continues
    items: Tuple[str, ...]  # the block's item lines


class UserSummarizer:
    """Turns histories (lists of item ids) into summary keys, generating only what the store lacks.

    Parameters
    ----------
    store : SummaryStore
    items : DataFrame
        ``read_items`` output (indexed by item id).
    config : UserSummaryConfig
    model : LoadedModel or str, optional
        Loaded on first need only: a run whose steps are all stored loads no model.
    on_unknown_item : {"error", "skip"}
        A history item missing from both the item table and the store: raise (default), or drop
        it from the history and count it in ``report.skipped``.

    Example
    -------
    >>> summarizer = UserSummarizer(store, read_items("data/items"), UserSummaryConfig("smollm2-135m-instruct"))
    >>> report = SummaryReport()
    >>> keys = summarizer.summarize([[3, 8, 1, 5]], report)   # 2 steps: block [3, 8, 1] + tail [5]
    >>> store.get(keys[0])
    """

    def __init__(self, store: SummaryStore, items: pd.DataFrame, config: UserSummaryConfig, *,
                 model=None, progress: bool = True, on_unknown_item: str = "error"):
        self.store = store
        self.config = config
        self.texts = ItemTexts(items, store, model=model if model is not None else config.model_id,
                               budgets=config.budgets, on_unknown_item=on_unknown_item)
        self._model = model
        self.progress = progress

    @property
    def lm(self):
        return get_model(self._model if self._model is not None else self.config.model_id)

    # -- keys
    def step_key(self, previous: Optional[str], item_lines: Sequence[str]) -> str:
        c = self.config
        return SummaryStore.key(_STEP_KIND[c.mode], c.model_id, PROMPT_VERSION, c.settings.key(),
                                {"previous": previous, "items": list(item_lines), "budgets": c.budget_key})

    def plan(self, history: Sequence[int], previous: Optional[str] = None) -> List[_Step]:
        """The steps whose last one summarises ``history`` (``[]`` for an empty history).

        Recurrent: one step per full block, plus one over a partial tail block; ``previous``
        (a stored summary key) continues an existing chain. Direct: one step.
        """
        lines = [self.texts[i] for i in history]
        if not lines:
            return []
        k = len(lines) if self.config.mode == "direct" else int(self.config.block_size)
        steps = []
        for level, start in enumerate(range(0, len(lines), k), 1):
            block = tuple(lines[start : start + k])
            key = self.step_key(previous, block)
            steps.append(_Step(key, level, previous, block))
            previous = key
        return steps

    def _clean_histories(self, histories: Sequence[Sequence[int]], report: SummaryReport,
                         labels: Optional[Sequence[str]]) -> List[Tuple[int, ...]]:
        self.texts.prepare(i for h in histories for i in h)
        out = []
        for row, history in enumerate(histories):
            unknown = [int(i) for i in history if not self.texts.has(i)]
            if unknown:
                where = labels[row] if labels is not None else f"history {row}"
                if self.texts.on_unknown_item == "error":
                    raise ValueError(f"{where}: item id(s) {unknown[:5]} are neither in the items table nor in the store")
                report.skipped += len(unknown)
            out.append(tuple(int(i) for i in history if self.texts.has(i)))
        return out

    def summarize(self, histories: Sequence[Sequence[int]], report: SummaryReport,
                  labels: Optional[Sequence[str]] = None,
                  previous: Optional[Sequence[Optional[str]]] = None) -> List[Optional[str]]:
        """Summary key of each history (``None`` for an empty one), generating missing steps.

        Parameters
        ----------
        histories : sequence of item-id sequences, in time order
        report : SummaryReport
            Updated in place.
        labels : sequence of str, optional
            Name each history in error messages (e.g. ``"data/test (user 7)"``).
        previous : sequence of str or None, optional
            Per history, the stored summary key its chain continues from (incremental updates).
        """
        histories = self._clean_histories(histories, report, labels)
        previous = list(previous) if previous is not None else [None] * len(histories)
        tasks = list(zip(previous, histories))
        plans = {t: self.plan(t[1], t[0]) for t in set(tasks)}
        steps = {s.key: s for plan in plans.values() for s in plan}
        self.run_steps(steps, report)
        report.items_without_summary += len(self.texts.without_summary)
        self.texts.without_summary.clear()
        report.truncated += self.texts.truncated
        self.texts.truncated = 0
        return [plans[t][-1].key if plans[t] else t[0] for t in tasks]

    def run_steps(self, steps: Mapping[str, _Step], report: SummaryReport) -> None:
        """Generate the steps the store lacks, level by level, batching each level across users."""
        self.store.refresh()
        missing = [s for s in steps.values() if s.key not in self.store]
        report.reused_from_store += len(steps) - len(missing)
        if not missing:
            return
        # A step can run once the summary it continues exists: its wave is one more than the
        # wave of a missing predecessor. Steps of one wave are batched together across users.
        missing_keys = {s.key: s for s in missing}
        wave: Dict[str, int] = {}
        for s in sorted(missing, key=lambda s: s.level):
            chain, node = [], s
            while node is not None and node.key not in wave:
                chain.append(node)
                node = missing_keys.get(node.previous) if node.previous is not None else None
            base = wave[node.key] if node is not None else 0
            for depth, step in enumerate(reversed(chain), 1):
                wave[step.key] = base + depth
        lm = self.lm
        bar = tqdm(total=len(missing), desc="user summaries", unit="step", disable=not self.progress)
        try:
            for level in sorted(set(wave.values())):
                todo = [s for s in missing if wave[s.key] == level]
                prompts = []
                for s in todo:
                    previous = None
                    if s.previous is not None:
                        previous = self.store.get(s.previous)
                        if previous is None:  # the level before was generated or stored
                            raise RuntimeError(f"summary {s.previous} vanished from the store {self.store.path}")
                    prompts.append(build_prompt(s.items, previous, lm.tokenizer, whole_history=self.config.mode == "direct",
                                                budgets=self.config.budgets, report=report))
                # Chunks by prompt length (generate_chat batches each chunk by length again);
                # each is stored as soon as it is done, so a crash loses one chunk at most.
                order = list(range(len(todo)))
                if self.config.settings.sort_by_length:
                    lengths = [len(lm.tokenizer.encode(p[0]["content"], add_special_tokens=False)) for p in prompts]
                    order.sort(key=lengths.__getitem__)
                chunk = max(1, int(self.config.settings.batch_size))
                for start in range(0, len(order), chunk):
                    idx = order[start : start + chunk]
                    with _GENERATE_LOCKS.setdefault(id(lm), threading.Lock()):
                        texts, stats = generate_chat(lm, [prompts[i] for i in idx], self.config.settings,
                                                     assistant_prefix=[ANSWER_LEAD_IN] * len(idx))
                    report.add_generation(stats)
                    written = self.store.put_many(
                        (todo[i].key, text, {"kind": _STEP_KIND[self.config.mode], "block_items": len(todo[i].items), "previous": todo[i].previous,
                                             "model_id": self.config.model_id, "prompt_version": PROMPT_VERSION})
                        for i, text in zip(idx, texts)
                    )
                    report.generated += written
                    # Another worker stored the same step meanwhile: its text wins (store rule).
                    report.reused_from_store += len(idx) - written
                    bar.update(len(idx))
        finally:
            bar.close()

    def summary_texts(self, keys: Sequence[Optional[str]]) -> List[str]:
        """Texts for ``summarize`` keys; ``None`` (empty history) gives the generic summary."""
        return stored_summary_texts(self.store, keys)

    def boundary_state(self, user_id: int, history: Sequence[int], base: Optional[UserState] = None) -> UserState:
        """The state after ``history``: boundary keys over its full blocks (steps must be stored)."""
        k = int(self.config.block_size)
        boundaries = list(base.boundaries) if base is not None else []
        start = base.summarised if base is not None else 0
        previous = base.latest_key if base is not None else None
        for end in range(start + k, len(history) + 1, k):
            previous = self.step_key(previous, [self.texts[i] for i in history[end - k : end]])
            boundaries.append((end, previous))
        return UserState(self.config.scope, int(user_id), tuple(int(i) for i in history), tuple(boundaries))


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


def add_history_item_ids(rows: pd.DataFrame, events: pd.DataFrame, column: str = "history_item_ids") -> pd.DataFrame:
    """A copy of ``rows`` with the list column ``history_item_ids`` built from ``events``."""
    missing = [c for c in ("user_id", "target_position") if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack column(s) {missing} needed to build {column}")
    out = rows.copy()
    out[column] = history_lists(events, out["user_id"], out["target_position"])
    return out


def _read_table(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    frame = read_parquet(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: {what} lacks column(s) {missing}")
    return frame


# --------------------------------------------------------------------------- public API
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
) -> SummaryReport:
    """Summarise every row history of ``splits`` and every user's full history into the store.

    Reads the data contract's ``events/``, ``items/`` and split folders under ``data_dir``. A
    row's history is its ``history_item_ids`` column when present, else the user's events with
    ``position < target_position``. In recurrent mode each user's chain of boundary summaries
    over all their events is recorded too (for :func:`update_users` and
    :func:`latest_user_summary`).

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
                         settings=settings, progress=progress, on_unknown_item=on_unknown_item, budgets=budgets)
    run.summarizer.summarize(run.histories, run.report, run.labels)
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
    >>> run.summarizer.summarize(run.histories, run.report, run.labels)
    >>> report = run.finish()
    """

    def __init__(self, data_dir, summaries, *, splits: Sequence[str] = ("train", "valid", "test"), model=None,
                 block_size: int = DEFAULT_BLOCK_SIZE, mode: str = "recurrent",
                 settings: GenerationSettings = GenerationSettings(), progress: bool = True,
                 on_unknown_item: str = "error", budgets: TokenBudgets = TokenBudgets()):
        self.data_dir = data_dir = Path(data_dir)
        self.store = store = SummaryStore(summaries)
        self.config = UserSummaryConfig(model_id_of(model), int(block_size), mode, settings, budgets)
        items = read_items(data_dir / "items")
        events = _read_table(data_dir / "events", ["user_id", "item_id", "position"], "events table")
        self.summarizer = UserSummarizer(store, items, self.config, model=model, progress=progress,
                                         on_unknown_item=on_unknown_item)
        self.report = report = SummaryReport()
        self.histories: List[Tuple[int, ...]] = []
        self.users: List[int] = []
        self.labels: List[str] = []
        for split in splits:
            path = data_dir / split
            rows = _read_table(path, ["user_id"], f"{split} rows")
            if "history_item_ids" in rows.columns:
                lists = [list(h) if h is not None else [] for h in rows["history_item_ids"]]
            elif "target_position" in rows.columns:
                lists = history_lists(events, rows["user_id"], rows["target_position"])
            else:
                raise ValueError(f"{path}: rows need history_item_ids or target_position")
            report.rows += len(rows)
            report.empty_histories += sum(1 for h in lists if len(h) == 0)
            # Rows of one group share a history: summarise each distinct (user, history) once.
            for user, history in sorted({(int(u), tuple(int(i) for i in h)) for u, h in zip(rows["user_id"], lists)}):
                self._add(user, history, f"{path} (user {user})")

        self.full: Dict[int, Tuple[int, ...]] = {}
        if mode == "recurrent":
            ordered = events.sort_values(["user_id", "position"], kind="stable")
            raw = {int(u): tuple(int(i) for i in g["item_id"]) for u, g in ordered.groupby("user_id", sort=True)}
            cleaned = self.summarizer._clean_histories(list(raw.values()), report,
                                                       [f"{data_dir / 'events'} (user {u})" for u in raw])
            self.full = dict(zip(raw, cleaned))
            for user, history in self.full.items():
                # Only full blocks: a user's recorded chain ends at the last block boundary.
                self._add(user, history[: len(history) - len(history) % block_size], f"{data_dir / 'events'} (user {user})")

    def _add(self, user: int, history: Tuple[int, ...], label: str) -> None:
        self.users.append(user)
        self.histories.append(history)
        self.labels.append(label)

    def finish(self) -> SummaryReport:
        """Record the users' states and this run's configuration; close the store; the report."""
        if self.full:
            self.store.refresh()
            self.store.put_user_states(self.summarizer.boundary_state(u, h) for u, h in self.full.items())
        # Both modes: readers of the store (train_ranker, evaluate_ranker, the Triton export) rebuild
        # each row's summary key from this config. update_users refuses a direct one.
        _record_config(self.store, self.config, items_path=self.data_dir / "items")
        self.store.close()
        return self.report


def _record_config(store: SummaryStore, config: UserSummaryConfig, items_path: Optional[Path]) -> None:
    record = dict(config.to_dict(), items_path=str(Path(items_path).resolve()) if items_path else None)
    key = SummaryStore.key("user_config", config.model_id, PROMPT_VERSION, config.settings.key(), record)
    store.put(key, canonical_json(record), {"kind": "user_config"})
    store.put_refs(CONFIG_REF_NAMESPACE, {"latest": key})


def _resolve_config(store: SummaryStore, model, block_size, settings, items, need_items: bool = True,
                    budgets: Optional[TokenBudgets] = None) -> Tuple[UserSummaryConfig, object]:
    """The configuration of the last ``summarize_users`` run, overridden by explicit arguments."""
    recorded = {}
    key = store.get_ref(CONFIG_REF_NAMESPACE, "latest")
    if key is not None and store.get(key) is not None:
        recorded = json.loads(store.get(key))
    model_id = model_id_of(model) if model is not None else recorded.get("model_id", model_id_of(None))
    block_size = block_size if block_size is not None else recorded.get("block_size", DEFAULT_BLOCK_SIZE)
    if settings is None:
        settings = GenerationSettings(**recorded["settings"]) if "settings" in recorded else GenerationSettings()
    if items is None:
        items = recorded.get("items_path")
        if items is None and need_items:
            raise ValueError(f"the store {store.path} records no items table: pass items=")
    if budgets is None:
        budgets = TokenBudgets.from_dict(recorded.get("budgets"))
    return UserSummaryConfig(model_id, int(block_size), recorded.get("mode", "recurrent"), settings, budgets), items


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
    config, items = _resolve_config(store, model, block_size, settings, items, budgets=budgets)
    if config.mode != "recurrent":
        raise ValueError(
            f"the store {store.path} was last filled in {config.mode!r} mode (one prompt over the "
            "whole history, MLLM-MSR_R), which keeps no chain to extend; update_users continues "
            "recurrent summaries only: re-run summarize_users(mode='direct') on the longer histories"
        )
    events_path = Path(events_path)
    events = _read_table(events_path, ["user_id", "item_id", "timestamp"], "new events")
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


def latest_user_summary(summaries: Union[SummaryStore, str, os.PathLike], user_id: int, *,
                        model=None, block_size: Optional[int] = None,
                        settings: Optional[GenerationSettings] = None) -> Optional[str]:
    """The user's summary at their last full block boundary, or ``None`` for an unknown user.

    A user known to the store but with fewer than ``block_size`` items gets
    :data:`EMPTY_HISTORY_SUMMARY`. The configuration defaults to the last ``summarize_users`` run's.

    Example
    -------
    >>> latest_user_summary("data/summaries", 7)
    'The user appears to have a preference for ...'
    """
    store = open_store(summaries)
    config, _ = _resolve_config(store, model, block_size, settings, items=None, need_items=False)
    state = store.get_user_state(config.scope, int(user_id))
    if state is None:
        return None
    if state.latest_key is None:
        return EMPTY_HISTORY_SUMMARY
    return store.get(state.latest_key)


# --------------------------------------------------------------------------- reading stored summaries
def recorded_config(summaries: Union[SummaryStore, str, os.PathLike]) -> Optional[UserSummaryConfig]:
    """The configuration of the last :func:`summarize_users` run into the store (``None``: no run)."""
    store = open_store(summaries)
    key = store.get_ref(CONFIG_REF_NAMESPACE, "latest")
    text = store.get(key) if key is not None else None
    return UserSummaryConfig.from_dict(json.loads(text)) if text is not None else None


def history_summary_keys(summaries: Union[SummaryStore, str, os.PathLike],
                         items: Union[str, os.PathLike, pd.DataFrame],
                         histories: Sequence[Sequence[int]],
                         config: Optional[UserSummaryConfig] = None) -> List[Optional[str]]:
    """The key of the summary :func:`summarize_users` stores for each history (item ids in time order).

    ``None`` for an empty history (its summary is :data:`EMPTY_HISTORY_SUMMARY`). Nothing is
    generated, so a key may be missing from the store (test ``key in store``). The keys are
    those of ``config``, by default the store's :func:`recorded_config`.

    Example
    -------
    >>> keys = history_summary_keys("data/summaries", "data/ml100k/items", [(3, 8, 1, 5)])
    >>> stored_summary_texts("data/summaries", keys)
    """
    store = open_store(summaries)
    config = config if config is not None else recorded_config(store)
    if config is None:
        raise ValueError(f"{store.path}: the store holds no user summaries (no summarize_users run)")
    summarizer = UserSummarizer(store, read_items(items), config, progress=False)
    histories = [tuple(int(i) for i in history) for history in histories]
    summarizer.texts.prepare(i for history in histories for i in history)
    keys: List[Optional[str]] = []
    for history in histories:
        plan = summarizer.plan(history)
        keys.append(plan[-1].key if plan else None)
    return keys


def stored_summary_texts(summaries: Union[SummaryStore, str, os.PathLike],
                         keys: Sequence[Optional[str]]) -> List[str]:
    """The stored text of each summary key; ``None`` (an empty history) gives :data:`EMPTY_HISTORY_SUMMARY`."""
    store = summaries if isinstance(summaries, SummaryStore) else open_store(summaries)
    found = store.get_many(k for k in keys if k is not None)
    return [EMPTY_HISTORY_SUMMARY if k is None else found[k] for k in keys]
