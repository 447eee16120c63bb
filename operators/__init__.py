"""NVTabular operators of merlin-mllm, imported as ``merlin_mllm.operators``."""
