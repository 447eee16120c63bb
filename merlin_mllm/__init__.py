"""merlin-mllm: an MLLM ranking stage (MLLM-MSR) for NVIDIA Merlin pipelines.

Import-time side effects: the package has exactly two, both listed here.

1. This file sets two MKL environment defaults (below), on ``import merlin_mllm``: MKL otherwise
   picks kernels and thread splits by load, so the same model could score ~1e-4 differently in a
   Triton instance and in the in-process evaluation. Values the user set are kept.
2. :func:`merlin_mllm.merlin_compat.apply` patches merlin.models.torch 23.12 to run on Python
   3.11 with Hugging Face models (see that module). It is not called here, because it imports
   torch and Merlin: the modules that build on merlin.models.torch call it when they are
   imported (``merlin_mllm.ranker.block``, ``merlin_mllm.pipelines.training``); it is idempotent.

Every package ``__init__`` below this one only lists its public names and imports them lazily
(:mod:`merlin_mllm.lazy_exports`), with no other effect.
"""
import os as _os

# Side effect 1 (see above): reproducible CPU float results.
_os.environ.setdefault("MKL_CBWR", "AUTO")
_os.environ.setdefault("MKL_DYNAMIC", "FALSE")

__version__ = "0.1.0"
