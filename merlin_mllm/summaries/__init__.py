"""Item and user summaries (MLLM-MSR stages 1 and 2) and the store they share.

- :mod:`merlin_mllm.summaries.store`: ``SummaryStore``, the content-addressed, append-only store.
- :mod:`merlin_mllm.summaries.report`: ``SummaryReport``, the counts every run returns.
- :mod:`merlin_mllm.summaries.user`: recurrent user-preference summaries
  (``summarize_users``, ``update_users``, ``latest_user_summary``).
"""
from merlin_mllm.summaries.report import SummaryReport  # noqa: F401
from merlin_mllm.summaries.store import SummaryRecord, SummaryStore, UserState, open_store  # noqa: F401
