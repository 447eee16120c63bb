"""Where a ranker's backend is chosen: by base model name at build, by config name at load.

This is the only place that tells model families apart by name; everything else asks the
backend object (:class:`~merlin_mllm.ranker.backend.RankerBackend`).
"""
from __future__ import annotations

from typing import Dict, Type

from merlin_mllm.models.loading import EMBEDDED_LLM_ALIASES
from merlin_mllm.ranker.backend import RankerBackend
from merlin_mllm.ranker.embedded_backend import EmbeddedBackend
from merlin_mllm.ranker.hf_backend import HFBackend

__all__ = ["BACKENDS", "backend_class", "backend_class_for_model"]

#: Backend classes by ``RankerConfig.backend``: a new model family is one more class here.
BACKENDS: Dict[str, Type[RankerBackend]] = {backend.name: backend for backend in (EmbeddedBackend, HFBackend)}


def backend_class(name: str) -> Type[RankerBackend]:
    """The backend class of a config's ``backend`` name (an unknown name is refused)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be {' or '.join(map(repr, BACKENDS))}, not {name!r}")
    return BACKENDS[name]


def backend_class_for_model(base_model) -> Type[RankerBackend]:
    """The backend class for a base model: the embedded one for its aliases, else Hugging Face."""
    return EmbeddedBackend if base_model in EMBEDDED_LLM_ALIASES else HFBackend
