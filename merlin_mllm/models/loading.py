"""Loading any Hugging Face LLM or MLLM, by hub id or local path: the one home for model loading.

``load()`` returns the model with its tokenizer and (for MLLMs) its processor, on CUDA in
bf16 when a GPU is present and on CPU in fp32 otherwise. ``load()`` with no argument gives the
embedded SmolLM2-135M-Instruct. ``trust_remote_code`` stays off unless asked for.

``shared_model()`` and ``shared_tokenizer()`` are the process-wide cache: a model is loaded once
per process (a Dask worker, an NVTabular transform), however many partitions or calls use it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from merlin_mllm.models import embedded

#: Names accepted for the embedded default LLM.
EMBEDDED_LLM_ALIASES = {None, "", "embedded", "smollm2", embedded.SMOLLM2_NAME}


@dataclass
class LoadedModel:
    """A model with what is needed to prompt it."""

    model: Any
    tokenizer: Any
    processor: Any  # the AutoProcessor for an MLLM; the tokenizer for a text LLM
    kind: str  # "llm" or "mllm"
    model_id: str
    device: torch.device
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    @property
    def is_multimodal(self) -> bool:
        return self.kind == "mllm"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """bf16 on CUDA (when supported), fp32 on CPU: CPU bf16 matmuls are slow and less exact."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.float32


def resolve_model_path(model_id_or_path: Optional[str]) -> str:
    """A hub id or local path; the embedded aliases map to the converted SmolLM2 folder."""
    if model_id_or_path in EMBEDDED_LLM_ALIASES:
        return str(embedded.smollm2_path())
    return str(model_id_or_path)


def model_kind(config) -> str:
    """'mllm' when transformers maps the config to an image-text-to-text model, else 'llm'."""
    from transformers import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return "mllm" if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING else "llm"


def causal_lm_class(config):
    """The auto class that loads ``config``'s model to be prompted with text only.

    ``AutoModelForCausalLM``, except for an image-text-to-text architecture that has no causal-LM
    class (LLaVA-NeXT, for one, in transformers 4.x and 5.x): it loads through
    ``AutoModelForImageTextToText`` and is prompted with text alone (e.g. a text-only item summarizer).
    """
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
    )

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def load(
    model_id_or_path: Optional[str] = None,
    *,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    kind: str = "auto",
    trust_remote_code: bool = False,
    eval_mode: bool = True,
    **model_kwargs,
) -> LoadedModel:
    """Load an LLM (AutoModelForCausalLM) or MLLM (AutoModelForImageTextToText).

    Parameters
    ----------
    model_id_or_path : str, optional
        A Hugging Face hub id or a local folder. ``None`` or ``"smollm2"`` loads the embedded
        SmolLM2-135M-Instruct. With no network, only local folders and the embedded model load.
    device, dtype :
        Default: CUDA + bf16 when a GPU is present, CPU + fp32 otherwise.
    kind : {"auto", "llm", "mllm"}
        ``auto`` reads the config: image-text-to-text architectures load as MLLMs.
    trust_remote_code : bool
        Off by default: loading a model must not run code from its folder unless the user asks.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    path = resolve_model_path(model_id_or_path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if kind == "auto":
        kind = model_kind(config)
    if kind not in ("llm", "mllm"):
        raise ValueError(f"kind must be 'auto', 'llm' or 'mllm', not {kind!r}")

    if kind == "mllm":
        processor = load_processor(path, trust_remote_code=trust_remote_code)
        tokenizer = processor.tokenizer
        auto_cls = AutoModelForImageTextToText
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        processor = tokenizer
        auto_cls = causal_lm_class(config)
    model = auto_cls.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, **model_kwargs
    ).to(device)
    if eval_mode:
        model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, processor, kind, model_id_of(model_id_or_path), device, dtype)


def model_id_of(model) -> str:
    """The id a model is known by (in summary keys and the cache), without loading it.

    ``model`` is a hub id, a local path, an embedded alias (``None``, ``"smollm2"``, ...: the
    embedded SmolLM2's name) or a :class:`LoadedModel` (its ``model_id``).
    """
    if isinstance(model, LoadedModel):
        return model.model_id
    if model in EMBEDDED_LLM_ALIASES:
        return embedded.SMOLLM2_NAME
    return str(model)


# ------------------------------------------------------------------ the process-wide cache
#: Loaded models by (model id, device as asked, kind as asked): ``None`` and ``"auto"`` are
#: keys of their own, so a model registered by :func:`shared_model` is found by id alone.
_SHARED_MODELS: Dict[Tuple[str, Optional[str], str], LoadedModel] = {}
_SHARED_TOKENIZERS: Dict[str, Any] = {}
_SHARED_LOCK = threading.Lock()
#: How many times this process loaded each model id through :func:`shared_model` (the Dask
#: test checks "once per worker").
MODEL_LOADS: Dict[str, int] = {}


def shared_model(
    model=None, *, device: Union[str, torch.device, None] = None, kind: str = "auto"
) -> LoadedModel:
    """The process-wide loaded model for ``model``, loaded by :func:`load` on first use.

    Parameters
    ----------
    model : str, path or LoadedModel, optional
        A hub id, local folder or embedded alias (default: the embedded SmolLM2). A
        ``LoadedModel`` is returned as is, and registered under its ``model_id`` (with no
        device or kind) unless a model is registered there already, so later calls by id in
        this process use it.
    device, kind :
        Passed to :func:`load`; part of the cache key as given (``None`` / ``"auto"``: the
        defaults).
    """
    if isinstance(model, LoadedModel):
        with _SHARED_LOCK:
            _SHARED_MODELS.setdefault((model.model_id, None, "auto"), model)
        return model
    model_id = model_id_of(model)
    key = (model_id, str(torch.device(device)) if device is not None else None, kind)
    with _SHARED_LOCK:
        loaded = _SHARED_MODELS.get(key)
        if loaded is None:
            loaded = _SHARED_MODELS[key] = load(model_id, device=device, kind=kind)
            MODEL_LOADS[model_id] = MODEL_LOADS.get(model_id, 0) + 1
        return loaded


def shared_tokenizer(model=None):
    """The tokenizer of ``model`` (an id/path/alias, or a LoadedModel), without loading weights.

    Readers that only rebuild summary keys need the tokenizer (cut texts enter the keys) but
    not the model. It is taken from the model :func:`shared_model` holds for this id (with no
    device or kind), else loaded once per process and model id.
    """
    if isinstance(model, LoadedModel):
        return model.tokenizer
    model_id = model_id_of(model)
    with _SHARED_LOCK:
        loaded = _SHARED_MODELS.get((model_id, None, "auto"))
        if loaded is not None:
            return loaded.tokenizer
        tokenizer = _SHARED_TOKENIZERS.get(model_id)
        if tokenizer is None:
            from transformers import AutoTokenizer  # lazy: transformers is a heavy import

            tokenizer = _SHARED_TOKENIZERS[model_id] = AutoTokenizer.from_pretrained(resolve_model_path(model_id))
        return tokenizer


def load_processor(path: Union[str, Path], *, trust_remote_code: bool = False):
    """AutoProcessor for an MLLM folder or hub id.

    Without torchvision, processors that also handle video (Qwen2-VL, Qwen2.5-VL, SmolVLM, ...)
    fail to load, because transformers' video processors all need torchvision. Images do not,
    so without torchvision such a processor is loaded without its video part
    (see ``processor_without_video``).
    """
    import importlib.util

    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    if importlib.util.find_spec("torchvision") is None:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        processor_cls = PROCESSOR_MAPPING.get(type(config), None)
        if processor_cls is not None and "video_processor" in processor_attributes(processor_cls):
            return processor_without_video(processor_cls).from_pretrained(
                str(path), trust_remote_code=trust_remote_code
            )
    return AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def processor_attributes(processor_cls) -> list:
    """The names of a processor class's parts (``get_attributes()`` in transformers 5, ``attributes`` in 4.x)."""
    if hasattr(processor_cls, "get_attributes"):
        return list(processor_cls.get_attributes())
    return list(processor_cls.attributes)


def processor_without_video(processor_cls):
    """A subclass of ``processor_cls`` with no ``video_processor``, for images and text only.

    transformers builds, checks and loads a processor's parts from the names returned by
    ``get_attributes()``; dropping ``video_processor`` from them means it is never loaded
    (which needs torchvision) nor type-checked (``video_processor=None`` fails that check). The
    subclass keeps its parent's name, so a saved processor still names the real class.
    """

    class ProcessorWithoutVideo(processor_cls):
        # transformers 4.x reads the class attribute, 5.x the classmethod.
        attributes = [name for name in processor_attributes(processor_cls) if name != "video_processor"]

        @classmethod
        def get_attributes(cls):
            return [name for name in super().get_attributes() if name != "video_processor"]

    ProcessorWithoutVideo.__name__ = processor_cls.__name__
    ProcessorWithoutVideo.__qualname__ = processor_cls.__qualname__
    return ProcessorWithoutVideo


def single_token_id(tokenizer, text: str) -> int:
    """The id of ``text`` when it is exactly one token (e.g. the answers "Yes" / "No")."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens in this tokenizer ({ids}); it must be one")
    return ids[0]
