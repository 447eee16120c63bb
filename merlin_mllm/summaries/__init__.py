"""Item and user summaries (MLLM-MSR stages 1 and 2) and the store they share.

- :mod:`merlin_mllm.summaries.store`: ``SummaryStore``, the content-addressed, append-only store.
- :mod:`merlin_mllm.summaries.report`: ``SummaryReport``, the counts every run returns.
- :mod:`merlin_mllm.summaries.item`: item summaries (``summarize_items``, ``ItemSummarizer``); the
  backends that write them, with their prompts, in ``item_backends``.
- :mod:`merlin_mllm.summaries.user`: recurrent user-preference summaries, the jobs
  (``summarize_users``, ``update_users``); their parts: ``user_summarizer`` (the engine),
  ``user_prompts``, ``user_history`` (item table, row histories, history lines) and
  ``user_store`` (the recorded configuration and the lookups, e.g. ``latest_user_summary``).

Names are imported lazily, on first use.
"""
from __future__ import annotations

from merlin_mllm.lazy_exports import lazy_exports

_EXPORTS = {
    "SummaryReport": "report",
    **dict.fromkeys(["SummaryRecord", "SummaryStore", "UserState", "open_store"], "store"),
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
