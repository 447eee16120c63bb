"""merlin-mllm: an MLLM ranking stage (MLLM-MSR) for NVIDIA Merlin pipelines."""
import os as _os

# Reproducible CPU float results: MKL otherwise picks kernels (and thread splits) by load, so
# the same model could give scores that differ by ~1e-4 between a Triton instance and the
# in-process evaluation. Users who set these themselves keep their values.
_os.environ.setdefault("MKL_CBWR", "AUTO")
_os.environ.setdefault("MKL_DYNAMIC", "FALSE")

__version__ = "0.1.0"
