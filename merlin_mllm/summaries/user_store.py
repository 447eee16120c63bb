"""What the user stage records in the summary store, and the lookups that read it back.

A :func:`~merlin_mllm.summaries.user.summarize_users` run records its configuration
(:func:`record_config`, ref namespace :data:`CONFIG_REF_NAMESPACE`); readers of the store
(``train_ranker``, ``evaluate_ranker``, the Triton export) rebuild each row's summary key from it
(:func:`history_summary_keys`) and read the texts (:func:`stored_summary_texts`), or a user's
latest summary (:func:`latest_user_summary`). Nothing here generates.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import pandas as pd

from merlin_mllm.generation import GenerationSettings
from merlin_mllm.models.loading import model_id_of
from merlin_mllm.summaries.store import SummaryStore, canonical_json, open_store
from merlin_mllm.summaries.user_history import read_items
from merlin_mllm.summaries.user_prompts import EMPTY_HISTORY_SUMMARY
from merlin_mllm.summaries.user_summarizer import DEFAULT_BLOCK_SIZE, UserSummarizer, UserSummaryConfig
from merlin_mllm.text import TokenBudgets

#: Ref namespace holding the configuration of the latest ``summarize_users`` run (key "latest").
CONFIG_REF_NAMESPACE = "user_config"


def record_config(store: SummaryStore, config: UserSummaryConfig, items_path: Optional[Path]) -> None:
    """Record ``config`` (and the items table it read) as the store's latest user-stage run."""
    record = dict(config.to_dict(), items_path=str(Path(items_path).resolve()) if items_path else None)
    key = SummaryStore.key("user_config", config.model_id, config.prompt_version, config.settings.key(), record)
    store.put(key, canonical_json(record), {"kind": "user_config"})
    store.put_refs(CONFIG_REF_NAMESPACE, {"latest": key})


def resolve_config(store: SummaryStore, model, block_size, settings, items, need_items: bool = True,
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
    return UserSummaryConfig(model_id, int(block_size), recorded.get("mode", "recurrent"), settings, budgets,
                             bool(recorded.get("ratings", False)), int(recorded.get("max_history", 0))), items


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
    config, _ = resolve_config(store, model, block_size, settings, items=None, need_items=False)
    state = store.get_user_state(config.scope, int(user_id))
    if state is None:
        return None
    if state.latest_key is None:
        return EMPTY_HISTORY_SUMMARY
    return store.get(state.latest_key)


def recorded_config(summaries: Union[SummaryStore, str, os.PathLike]) -> Optional[UserSummaryConfig]:
    """The configuration of the last :func:`~merlin_mllm.summaries.user.summarize_users` run into the store (``None``: no run)."""
    store = open_store(summaries)
    key = store.get_ref(CONFIG_REF_NAMESPACE, "latest")
    text = store.get(key) if key is not None else None
    return UserSummaryConfig.from_dict(json.loads(text)) if text is not None else None


def history_summary_keys(summaries: Union[SummaryStore, str, os.PathLike],
                         items: Union[str, os.PathLike, pd.DataFrame],
                         histories: Sequence[Sequence[int]],
                         config: Optional[UserSummaryConfig] = None,
                         ratings: Optional[Sequence[Sequence[Optional[float]]]] = None) -> List[Optional[str]]:
    """The key of the summary ``summarize_users`` stores for each history (item ids in time order).

    ``None`` for an empty history (its summary is :data:`EMPTY_HISTORY_SUMMARY`). Nothing is
    generated, so a key may be missing from the store (test ``key in store``). The keys are
    those of ``config``, by default the store's :func:`recorded_config`. A ratings-aware
    configuration needs ``ratings``, one per history item (``history_rating_lists``).

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
    if config.ratings and ratings is None:
        raise ValueError(f"{store.path}: the store's user summaries are ratings-aware: give each history's ratings")
    for row, history in enumerate(histories):
        plan = summarizer.plan(history, ratings=None if ratings is None else ratings[row])
        keys.append(plan[-1].key if plan else None)
    return keys


def stored_summary_texts(summaries: Union[SummaryStore, str, os.PathLike],
                         keys: Sequence[Optional[str]]) -> List[str]:
    """The stored text of each summary key; ``None`` (an empty history) gives :data:`EMPTY_HISTORY_SUMMARY`."""
    store = summaries if isinstance(summaries, SummaryStore) else open_store(summaries)
    found = store.get_many(k for k in keys if k is not None)
    return [EMPTY_HISTORY_SUMMARY if k is None else found[k] for k in keys]
