"""Shared fixtures: real models, loaded once per test session.

``make test`` runs the suite on pytest-xdist workers (one per core, a test file per worker). Each
worker takes its share of the cores for torch, and so do the processes it starts (the CLI, Dask
workers, Triton's python backend) through ``OMP_NUM_THREADS``: two workers each taking every core
would stall each other's parallel regions (DEVELOPERS.md, "Threads").
"""
from __future__ import annotations

import os

import pytest

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    from merlin_mllm.models.threads import set_torch_threads, threads_per_process

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(_WORKERS)))
    set_torch_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted from the wheel's GGUF on first use)."""
    from merlin_mllm.models import load

    return load()
