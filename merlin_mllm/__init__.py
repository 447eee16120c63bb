"""merlin-mllm: an MLLM ranking stage (MLLM-MSR) for NVIDIA Merlin pipelines."""

__version__ = "0.1.0"
