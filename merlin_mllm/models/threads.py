"""Torch's CPU threads: the one function that sets them (DEVELOPERS.md, "Threads").

A torch process uses ``torch.get_num_threads()`` intra-op threads (OpenMP; default: every
core). Several torch processes on one machine (Dask workers summarising, Triton ranker
instances, a training run beside a benchmark) each taking every core oversubscribe it: a
thread that loses its core stalls its whole parallel region (measured in DEVELOPERS.md:
evaluation fell from 0.37 to 9 s per group beside another job). So each process takes its
share: the cores this process may run on (``os.sched_getaffinity``, which respects taskset and
container CPU sets, unlike ``os.cpu_count``) divided by the processes that share them.

Usage::

    from merlin_mllm.models.threads import set_torch_threads
    set_torch_threads(processes=2)      # e.g. 2 Dask workers or 2 Triton CPU instances
    set_torch_threads(1)                # exactly one thread
"""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["available_cpus", "threads_per_process", "set_torch_threads"]


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_process(processes: int = 1) -> int:
    """Intra-op threads per process when ``processes`` torch processes share this machine's CPUs."""
    if int(processes) < 1:
        raise ValueError(f"processes must be at least 1, not {processes}")
    return max(1, available_cpus() // int(processes))


def set_torch_threads(threads: Optional[int] = None, *, processes: int = 1) -> int:
    """Set torch's intra-op threads: ``threads`` when given (> 0), else this process's share of
    the CPUs among ``processes`` (:func:`threads_per_process`). Returns the number set.

    Inter-op threads are left alone: torch allows setting them only before its first parallel
    work, and the ranker runs no inter-op parallel graphs.
    """
    import torch  # lazy: Dask workers call this before anything else loads torch

    count = int(threads) if threads is not None and int(threads) > 0 else threads_per_process(processes)
    torch.set_num_threads(count)
    return count
