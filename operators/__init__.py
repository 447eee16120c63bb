"""NVTabular operators of merlin-mllm, imported as ``merlin_mllm.operators``.

This folder is installed as the subpackage ``merlin_mllm.operators`` (see pyproject.toml's
``package-dir``), so users write ``from merlin_mllm.operators import ItemSummary``.
The operators are imported lazily: each pulls in NVTabular, torch and transformers.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ItemSummary": "item_summary",
    "UserPreferenceSummary": "user_summary",
    "TokenizePrompt": "tokenize_prompt",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
