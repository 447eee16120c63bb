"""Model layer: loading HF LLMs/MLLMs and the embedded offline defaults.

* :func:`merlin_mllm.models.loading.load` (any HF LLM/MLLM id or folder, or the embedded
  SmolLM2), :class:`~merlin_mllm.models.loading.LoadedModel` and the device/dtype defaults;
* :mod:`merlin_mllm.models.precision` (the precision names and what ``"auto"`` detects),
  :mod:`merlin_mllm.models.threads` (torch's CPU threads per process);
* :mod:`merlin_mllm.models.embedded` (the embedded assets), :mod:`merlin_mllm.models.vision`
  (the EfficientNet-Lite0 encoder), :mod:`merlin_mllm.models.tiny` (tiny random MLLMs for tests).

Names are imported lazily, so ``from merlin_mllm.models import embedded`` does not load torch.
"""
from __future__ import annotations

from merlin_mllm.lazy_exports import lazy_exports

_EXPORTS = dict.fromkeys(["LoadedModel", "default_device", "default_dtype", "load", "single_token_id"], "loading")
_EXPORTS.update(dict.fromkeys(["PRECISIONS", "resolve_precision", "auto_precision"], "precision"))
_EXPORTS.update(dict.fromkeys(["set_torch_threads"], "threads"))
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
