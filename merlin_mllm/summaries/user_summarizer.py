"""The user stage's engine: :class:`UserSummaryConfig` and :class:`UserSummarizer`.

The summarizer turns histories (item ids in time order) into summary keys, planning each
history's chain of content-addressed steps and generating, wave by wave, only the steps the
store lacks (see :mod:`merlin_mllm.summaries.user` for the keys and why nothing leaks).
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd
from tqdm.auto import tqdm

from merlin_mllm.generation import GenerationSettings, generate_chat
from merlin_mllm.models.loading import shared_model
from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.summaries.store import SummaryStore, UserState
from merlin_mllm.summaries.user_history import ItemTexts, rated_line
from merlin_mllm.summaries.user_prompts import ANSWER_LEAD_IN, PROMPT_VERSION, RATINGS_PROMPT_VERSION, build_prompt
from merlin_mllm.text import TokenBudgets

MODES = ("recurrent", "direct")
DEFAULT_BLOCK_SIZE = 3
#: Block size and history depth for summarising every user's long history on a timeline folder
#: (ratings-aware, SmolLM2-135M, greedy, 96 new tokens), measured by
#: ``python -m benchmarks.bench_user_summary_pass`` (``benchmarks/speed/user_summary_pass.json``):
#: on ML-100k's all-user timeline folder k=24 with depth 24 (each row's summary covers its last
#: 24 to 47 items) needs 2,045 steps, at 7.2 to 8.4 CPU-seconds a step on one thread of this CPU:
#: 4.75 h on one thread, about 2.4 h on both cores. Whole histories need 33,545 steps at k=3 (the
#: default, the paper's, kept for the short-history protocols) and 4,757 at k=24; k=48 with depth
#: 48 needs 1,747, but each of its prompts shows up to 48 items (not timed). Nearly every distinct
#: row history (2,026) ends in a step of its own, which bounds any per-row pass from below.
TIMELINE_BLOCK_SIZE = 24
TIMELINE_MAX_HISTORY = 24
#: The budgets a user step's key records (the others belong to the item stage).
USER_BUDGETS = ("title", "history_item", "previous_summary", "history")
_STEP_KIND = {"recurrent": "user_step", "direct": "user_direct"}
#: One generation at a time per model in a process: generate_chat switches the tokenizer's
#: padding side, which threads of one Dask worker would otherwise race on.
_GENERATE_LOCKS: Dict[int, threading.Lock] = {}


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
    ratings : bool
        Ratings-aware summaries: each history line shows the user's rating of the item, read
        from that item's own event before the row (``"Toy Story (1995) (rated 5/5)"``), and the
        prompt asks what the user disliked too. Its own prompt version
        (:data:`~merlin_mllm.summaries.user_prompts.RATINGS_PROMPT_VERSION`), so its keys, its
        user states and the recorded configuration never mix with summaries written without.
    max_history : int
        History depth: 0 (default) summarises the whole history before the row. ``D > 0`` (a
        multiple of ``block_size``) summarises the items from the last multiple of ``D`` that
        leaves at least ``D`` items before the row (:func:`depth_start`): between ``D`` and
        ``2D - 1`` of the most recent items. The window starts on a fixed grid, so the rows of
        one user (and the user's own chain) whose histories end in the same stretch share
        every step, and a user costs at most about ``2D / block_size`` steps however long the
        history.
    """

    model_id: str
    block_size: int = DEFAULT_BLOCK_SIZE
    mode: str = "recurrent"
    settings: GenerationSettings = GenerationSettings()
    budgets: TokenBudgets = TokenBudgets()
    ratings: bool = False
    max_history: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if int(self.block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not isinstance(self.budgets, TokenBudgets):
            raise TypeError(f"budgets must be a TokenBudgets, not {type(self.budgets).__name__}")
        if not isinstance(self.ratings, bool):
            raise TypeError(f"ratings must be True or False, not {self.ratings!r}")
        if int(self.max_history) < 0 or int(self.max_history) % int(self.block_size):
            raise ValueError(f"max_history must be 0 (the whole history) or a positive multiple of block_size "
                             f"({self.block_size}), not {self.max_history}")

    @property
    def prompt_version(self) -> str:
        """The version of the prompt this configuration renders (part of every key)."""
        return RATINGS_PROMPT_VERSION if self.ratings else PROMPT_VERSION

    @property
    def budget_key(self) -> dict:
        """The budgets a step key records."""
        return {name: getattr(self.budgets, name) for name in USER_BUDGETS}

    @property
    def scope(self) -> str:
        """Id of the user states kept under this configuration."""
        depth = {"max_history": int(self.max_history)} if self.max_history else {}
        return SummaryStore.key("user_scope", self.model_id, self.prompt_version, self.settings.key(),
                                {"block_size": int(self.block_size), "mode": self.mode, "budgets": self.budget_key,
                                 **depth})

    def to_dict(self) -> dict:
        # "ratings" only when set: a configuration without ratings records what it always did.
        return {"model_id": self.model_id, "block_size": int(self.block_size), "mode": self.mode,
                "settings": asdict(self.settings), "budgets": self.budgets.to_dict(),
                "prompt_version": self.prompt_version, **({"ratings": True} if self.ratings else {}),
                **({"max_history": int(self.max_history)} if self.max_history else {})}

    @classmethod
    def from_dict(cls, data: Mapping) -> "UserSummaryConfig":
        config = cls(data["model_id"], int(data["block_size"]), data["mode"], GenerationSettings(**data["settings"]),
                     TokenBudgets.from_dict(data.get("budgets")), bool(data.get("ratings", False)),
                     int(data.get("max_history", 0)))
        recorded = data.get("prompt_version", PROMPT_VERSION)
        if recorded != config.prompt_version:
            raise ValueError(f"the recorded user-summary configuration was written with prompt {recorded!r}, which "
                             f"this code does not render (it renders {config.prompt_version!r} for ratings="
                             f"{config.ratings}); re-run `merlin-mllm summarize users` into the store")
        return config



def depth_start(length: int, max_history: int) -> int:
    """Where a history of ``length`` items starts being summarised under history depth
    ``max_history`` (0: the whole history): the last multiple of ``max_history`` that leaves at
    least ``max_history`` items, so the window holds ``max_history`` to ``2 * max_history - 1``."""
    if not max_history or length < 2 * max_history:
        return 0
    return (length - max_history) // max_history * max_history


# --------------------------------------------------------------------------- the engine
@dataclass(frozen=True)
class _Step:
    key: str
    level: int  # position of the step in its planned chain (1-based)
    previous: Optional[str]  # key of the summary this step continues
    items: Tuple[str, ...]  # the block's item lines
    # What the block read, recorded with the stored step (an audit trail; not part of the key):
    item_ids: Tuple[int, ...] = ()
    ratings: Optional[Tuple[Optional[float], ...]] = None


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
        return shared_model(self._model if self._model is not None else self.config.model_id)

    # -- keys
    def step_key(self, previous: Optional[str], item_lines: Sequence[str]) -> str:
        c = self.config
        return SummaryStore.key(_STEP_KIND[c.mode], c.model_id, c.prompt_version, c.settings.key(),
                                {"previous": previous, "items": list(item_lines), "budgets": c.budget_key})

    def lines(self, history: Sequence[int], ratings: Optional[Sequence[Optional[float]]] = None) -> List[str]:
        """The prompt line of each history item; with a ratings-aware configuration, its rating after it.

        ``ratings`` (one per item, ``None`` where the event has none) is required exactly when
        the configuration is ratings-aware.
        """
        if self.config.ratings != (ratings is not None):
            raise ValueError("a ratings-aware configuration needs each history's ratings, and only it takes them"
                             if self.config.ratings else "this configuration is not ratings-aware: pass no ratings")
        if ratings is None:
            return [self.texts[i] for i in history]
        if len(ratings) != len(history):
            raise ValueError(f"{len(ratings)} ratings for a history of {len(history)} items")
        return [rated_line(self.texts[i], r) for i, r in zip(history, ratings)]

    def plan(self, history: Sequence[int], previous: Optional[str] = None,
             ratings: Optional[Sequence[Optional[float]]] = None) -> List[_Step]:
        """The steps whose last one summarises ``history`` (``[]`` for an empty history).

        Recurrent: one step per full block, plus one over a partial tail block; ``previous``
        (a stored summary key) continues an existing chain. Direct: one step. ``ratings``: see
        :meth:`lines`. With a history depth (``config.max_history``) and no ``previous``, only
        the items from :func:`depth_start` on.
        """
        lines = self.lines(history, ratings)
        first = depth_start(len(lines), int(self.config.max_history)) if previous is None else 0
        lines, history = lines[first:], [int(i) for i in history][first:]
        ratings = list(ratings)[first:] if ratings is not None else None
        if not lines:
            return []
        k = len(lines) if self.config.mode == "direct" else int(self.config.block_size)
        steps = []
        for level, start in enumerate(range(0, len(lines), k), 1):
            block = tuple(lines[start : start + k])
            key = self.step_key(previous, block)
            steps.append(_Step(key, level, previous, block, tuple(history[start : start + k]),
                               tuple(ratings[start : start + k]) if ratings is not None else None))
            previous = key
        return steps

    def _clean_histories(self, histories: Sequence[Sequence[int]], report: SummaryReport,
                         labels: Optional[Sequence[str]],
                         ratings: Optional[Sequence[Sequence[Optional[float]]]] = None) -> List[Tuple[int, ...]]:
        """The histories without unknown items (an error, or dropped and counted); with
        ``ratings``, ``(histories, ratings)`` with the same items dropped from both."""
        self.texts.prepare(i for h in histories for i in h)
        out, rated = [], []
        for row, history in enumerate(histories):
            unknown = [int(i) for i in history if not self.texts.has(i)]
            if unknown:
                where = labels[row] if labels is not None else f"history {row}"
                if self.texts.on_unknown_item == "error":
                    raise ValueError(f"{where}: item id(s) {unknown[:5]} are neither in the items table nor in the store")
                report.skipped += len(unknown)
            out.append(tuple(int(i) for i in history if self.texts.has(i)))
            if ratings is not None:
                rated.append(tuple(r for i, r in zip(history, ratings[row]) if self.texts.has(i)))
        return (out, rated) if ratings is not None else out

    def summarize(self, histories: Sequence[Sequence[int]], report: SummaryReport,
                  labels: Optional[Sequence[str]] = None,
                  previous: Optional[Sequence[Optional[str]]] = None,
                  ratings: Optional[Sequence[Sequence[Optional[float]]]] = None) -> List[Optional[str]]:
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
        ratings : sequence of rating sequences, optional
            Per history, each item's rating (``None`` where it has none); required exactly when
            the configuration is ratings-aware.
        """
        if ratings is not None:
            histories, ratings = self._clean_histories(histories, report, labels, ratings)
        else:
            histories = self._clean_histories(histories, report, labels)
        previous = list(previous) if previous is not None else [None] * len(histories)
        rated = ratings if ratings is not None else [None] * len(histories)
        tasks = list(zip(previous, histories, rated))
        plans = {t: self.plan(t[1], t[0], t[2]) for t in set(tasks)}
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
                                                budgets=self.config.budgets, report=report, ratings=self.config.ratings))
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
                                             "model_id": self.config.model_id, "prompt_version": self.config.prompt_version,
                                             "item_ids": list(todo[i].item_ids),
                                             **({"ratings": list(todo[i].ratings)} if todo[i].ratings is not None else {})})
                        for i, text in zip(idx, texts)
                    )
                    report.generated += written
                    # Another worker stored the same step meanwhile: its text wins (store rule).
                    report.reused_from_store += len(idx) - written
                    bar.update(len(idx))
        finally:
            bar.close()

    def boundary_state(self, user_id: int, history: Sequence[int], base: Optional[UserState] = None,
                       ratings: Optional[Sequence[Optional[float]]] = None) -> UserState:
        """The state after ``history``: boundary keys over its full blocks (steps must be stored).
        ``ratings``: see :meth:`lines`."""
        k = int(self.config.block_size)
        boundaries = list(base.boundaries) if base is not None else []
        # Without a base, the chain starts where plan() starts that of the full blocks (depth).
        start = base.summarised if base is not None else depth_start(len(history) - len(history) % k,
                                                                      int(self.config.max_history))
        previous = base.latest_key if base is not None else None
        lines = self.lines(history, ratings)
        for end in range(start + k, len(history) + 1, k):
            previous = self.step_key(previous, lines[end - k : end])
            boundaries.append((end, previous))
        return UserState(self.config.scope, int(user_id), tuple(int(i) for i in history), tuple(boundaries))
