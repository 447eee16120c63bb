"""NVTabular operators of merlin-mllm, imported as ``merlin_mllm.operators``.

This folder is installed as the subpackage ``merlin_mllm.operators`` (see pyproject.toml's
``package-dir``), so users write ``from merlin_mllm.operators import ItemSummary``.
The operators are imported lazily: each pulls in NVTabular, torch and transformers.
"""
from __future__ import annotations

from merlin_mllm.lazy_exports import lazy_exports

_EXPORTS = {
    "ItemSummary": "item_summary",
    "TokenizePrompt": "tokenize_prompt",
    "UserPreferenceSummary": "user_summary",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
