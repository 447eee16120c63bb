"""The Hugging Face backend: any MLLM (or text LLM) that :func:`merlin_mllm.models.load` opens.

LLaVA-NeXT, Qwen2-VL, Idefics3, ...: pictures go through the model's own processor and enter
the forward pass as its pixel tensors (``pixel_values``, ``image_sizes``, ``image_grid_thw``,
...). A text LLM runs text-only (``use_images=False``).

Qwen-style models number positions in 3-D (mrope: time, height, width), image tokens by their
grid cell; all of that is handled here: prompts are positioned over prefix + candidate with the
model's ``get_rope_index`` and sliced, and such models score one user per forward pass. For the
same reason they cannot run packed candidate groups (``packing_limit``), nor can prompts whose
images travel as processor tensors: their groups take the shared-prefix KV path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from merlin_mllm.models.loading import load
from merlin_mllm.ranker.backend import RankerBackend
from merlin_mllm.ranker.batches import pad_right
from merlin_mllm.ranker.ranker_config import RankerConfig
from merlin_mllm.ranker.prompt import EncodedPrompt

__all__ = ["HFBackend", "PER_TOKEN_KEYS"]

#: Processor outputs that are per-token (aligned with input_ids) rather than image tensors.
PER_TOKEN_KEYS = ("mm_token_type_ids",)


class HFBackend(RankerBackend):
    """A Hugging Face MLLM or text LLM; images through its processor (see the module docstring)."""

    name = "hf"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: 3-D rotary positions (Qwen2-VL style).
        self.mrope = hasattr(self.inner, "get_rope_index")
        # Such models number positions by image grid, so they are scored one user at a time.
        self.scores_users_together = not self.mrope

    @classmethod
    def canonical_base_model(cls, base_model: str) -> str:
        # A local folder is saved by its absolute path, so the config loads from anywhere.
        if os.path.isdir(str(base_model)):
            return str(Path(base_model).resolve())
        return str(base_model)

    @classmethod
    def load(cls, config: RankerConfig, *, device: torch.device, dtype: torch.dtype) -> "HFBackend":
        loaded = load(config.base_model, device=device, dtype=dtype)
        if config.use_images and loaded.kind != "mllm":
            raise ValueError(f"{config.base_model} is a text-only LLM: build it with use_images=False")
        image_mode = "processor" if config.use_images else "none"
        return cls(config, loaded.model, loaded.tokenizer, loaded.processor, image_mode=image_mode,
                   prompt_processor=loaded.processor if loaded.kind == "mllm" else loaded.tokenizer)

    # ------------------------------------------------------------------ inputs
    def batch_inputs(self, image_inputs: Dict[str, Any]) -> Dict[str, Any]:
        batch = {}
        for key, value in image_inputs.items():
            if key in PER_TOKEN_KEYS:
                batch[key], _ = pad_right(value, 0)
            else:
                batch[key] = value
        return batch

    def model_inputs(self, input_ids: torch.Tensor, *, item_ids=None, image_features=None,
                     image_inputs=None) -> Dict[str, Any]:
        inputs: Dict[str, Any] = {"input_ids": input_ids}
        for key, value in (image_inputs or {}).items():
            if key in self.inner_params and value is not None:
                inputs[key] = value.to(self.device) if hasattr(value, "to") else value
        return inputs

    def generate_inputs(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        inputs: Dict[str, Any] = {"input_ids": batch["input_ids"].to(self.device)}
        for key, value in batch.items():
            if key not in ("input_ids", "attention_mask", "labels"):
                inputs[key] = value.to(self.device) if hasattr(value, "to") else value
        return inputs

    def packing_limit(self) -> Optional[str]:
        if self.mrope:
            return ("3-D rotary positions (mrope) number each prompt's tokens from its own start, so a "
                    "packed candidate cannot continue from the prefix")
        if self.prompt.image_mode == "processor":
            return "the processor's image tensors are laid out per prompt, not per packed candidate"
        return super().packing_limit()

    # ------------------------------------------------------------------ positions
    def prefix_position_ids(self, length: int) -> Optional[torch.Tensor]:
        if not self.mrope:
            return None
        # A text-only prefix: all three position axes count 0..length-1.
        return torch.arange(length, device=self.device).view(1, 1, -1).expand(3, 1, -1)

    def candidate_inputs(self, prompts: Sequence[EncodedPrompt], prefix_len: int,
                         image_inputs: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[torch.Tensor]]:
        per_token = {k: v for k, v in image_inputs.items() if k in PER_TOKEN_KEYS}
        pixel_inputs = {k: v for k, v in image_inputs.items() if k not in PER_TOKEN_KEYS}
        position_ids = None
        if self.mrope:
            position_ids = self.mrope_positions(prompts, per_token, pixel_inputs)[..., prefix_len:]
        for key, lists in per_token.items():
            pixel_inputs[key], _ = pad_right([row[prefix_len:] for row in lists], 0, self.device)
        return pixel_inputs, position_ids

    def mrope_positions(self, prompts: Sequence[EncodedPrompt], per_token: Dict[str, Any],
                        pixel_inputs: Dict[str, Any]) -> torch.Tensor:
        """3-D rotary positions (3, B, L) of the full prompts (Qwen2-VL style models).

        Such models number image tokens by their grid cell, so candidate positions cannot be
        inferred from the cache length; they are computed over prefix + candidate and sliced.
        """
        ids, mask = pad_right([p.input_ids for p in prompts], int(self.tokenizer.pad_token_id), self.device)
        if "mm_token_type_ids" in per_token:
            types, _ = pad_right(per_token["mm_token_type_ids"], 0, self.device)
        else:
            types = torch.zeros_like(ids)
        rope_kwargs = dict(input_ids=ids, mm_token_type_ids=types, attention_mask=mask)
        if pixel_inputs.get("image_grid_thw") is not None:
            rope_kwargs["image_grid_thw"] = pixel_inputs["image_grid_thw"].to(self.device)
        positions, _ = self.inner.get_rope_index(**rope_kwargs)
        return positions
