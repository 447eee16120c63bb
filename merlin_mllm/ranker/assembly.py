"""Putting a :class:`~merlin_mllm.ranker.model.RankerModel` together from a :class:`RankerConfig`.

``RankerModel.build`` (a new ranker) and ``RankerModel.from_pretrained`` (a saved folder) both end
here: the precision is resolved on the loading machine, the backend loads the base model, the
answer token ids are checked against a saved config, LoRA is attached (or loaded), the
projector's weights are loaded and the item image table is checked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
from safetensors.torch import load_file

from merlin_mllm.models.loading import default_device
from merlin_mllm.models.precision import PRECISIONS, precision_of_dtype, resolve_precision
from merlin_mllm.ranker.backend_registry import backend_class
from merlin_mllm.ranker.ranker_config import ADAPTER_DIR, CONFIG_FILE, PROJECTOR_FILE, RankerConfig
from merlin_mllm.ranker.lora import attach_lora
from merlin_mllm.ranker.prompt import check_prompt_version

__all__ = ["assemble", "saved_parts"]


def assemble(model_class, config: RankerConfig, *, device, dtype, item_features=None,
             adapter_dir: Optional[Path] = None, projector_file: Optional[Path] = None, is_trainable: bool = True,
             collab_projector_file: Optional[Path] = None, collab_embeddings=None):
    """A ``model_class`` (``RankerModel``) in eval mode for ``config``, which gets its answer ids
    (and, when ``dtype`` is given, the precision that dtype is). With ``config.collab_tokens``
    the collaborative tokens' projector weights and item table are loaded/attached when given."""
    family = backend_class(config.backend)
    config.validate()
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        # Resolved on the machine that loads the ranker ("auto" detects; the config keeps "auto").
        dtype = resolve_precision(config.precision, device).dtype
    elif precision_of_dtype(dtype) in PRECISIONS:
        config.precision = precision_of_dtype(dtype)  # the config says what the weights are
    backend = family.load(config, device=device, dtype=dtype)
    no_id, yes_id = backend.prompt.answer_token_ids()
    if config.no_token_id is not None and (config.no_token_id, config.yes_token_id) != (no_id, yes_id):
        raise ValueError(
            f"the saved answer ids (No={config.no_token_id}, Yes={config.yes_token_id}) differ "
            f"from this tokenizer's ({no_id}, {yes_id}): wrong base model?"
        )
    config.no_token_id, config.yes_token_id = no_id, yes_id

    backbone = attach_lora(backend.hf_model, config, device=device, adapter_dir=adapter_dir,
                           is_trainable=is_trainable)
    projector = backend.projector
    if projector is not None:
        if projector_file is not None:
            projector.load_state_dict(load_file(str(projector_file), device=str(device)))
        projector.requires_grad_(not config.zero_shot and is_trainable)
    collab = backend.collab_projector
    if collab is not None:
        if collab_projector_file is not None:
            collab.load_state_dict(load_file(str(collab_projector_file), device=str(device)))
        collab.requires_grad_(not config.zero_shot and is_trainable)

    if item_features is not None and backend.uses_item_images(config):
        config.check_item_features(item_features)
    model = model_class(backend, backbone, item_features)
    if collab_embeddings is not None:
        model.set_collab_embeddings(collab_embeddings)
    model.eval()
    return model


def saved_parts(path: Path, precision: Optional[str] = None) -> Tuple[RankerConfig, Optional[Path], Optional[Path]]:
    """The config of the ranker saved in ``path`` (``precision``, when given, replacing the saved
    one), and its adapter folder and projector file (None where the config needs none).

    Raises
    ------
    ValueError
        The ranker was trained with a prompt version this code cannot render.
    FileNotFoundError
        The adapter or the projector weights the config needs are missing.
    """
    config = RankerConfig.read(path)
    if precision is not None:
        config.precision = precision
    try:
        check_prompt_version(config.prompt_version)
    except ValueError as exc:
        raise ValueError(f"{path / CONFIG_FILE}: trained with a prompt this merlin-mllm cannot render ({exc}); "
                         "scores would not be comparable") from exc
    adapter_dir = projector_file = None
    if not config.zero_shot:
        adapter_dir = path / ADAPTER_DIR
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter_dir}/adapter_config.json not found (LoRA adapter missing)")
    if backend_class(config.backend).uses_item_images(config):
        projector_file = path / PROJECTOR_FILE
        if not projector_file.is_file():
            raise FileNotFoundError(f"{projector_file} not found (image projector weights missing)")
    return config, adapter_dir, projector_file
