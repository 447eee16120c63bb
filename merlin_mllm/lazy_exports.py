"""The package ``__init__`` convention: public names listed in ``__all__``, imported lazily.

Each package ``__init__`` maps its public names to the submodules that define them and resolves
a name on first access through a module-level ``__getattr__`` (PEP 562)::

    _EXPORTS = {"load": "loading", "LoadedModel": "loading"}   # name -> submodule
    __all__ = sorted(_EXPORTS)
    __getattr__ = lazy_exports(__name__, _EXPORTS)

so importing a package, or one light submodule of it, never imports its heavy siblings
(``merlin_mllm.data.registry`` without pandas, ``merlin_mllm.models.embedded`` without torch).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """The module-level ``__getattr__`` of ``package``: ``exports[name]`` is the submodule
    (relative to ``package``) that defines ``name``; any other name raises ``AttributeError``."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
