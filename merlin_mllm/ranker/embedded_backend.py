"""The embedded backend: SmolLM2-135M-Instruct with EfficientNet-Lite0 image tokens, LLaVA style.

An item's picture is a 7x7 grid of image tokens (49 x 1290: EfficientNet features plus each
cell's colour statistics), precomputed per item in an
:class:`~merlin_mllm.ranker.image_features.ItemImageFeatures` table. A trainable 2-layer GELU MLP
(:class:`ImageProjector`, 1290 -> 576 -> 576) maps them into SmolLM2's embedding space, where
they replace the embeddings of the prompt's 49 ``<image>`` placeholder tokens. In a packed
candidate group (:mod:`merlin_mllm.ranker.packing`) a row holds one such block per candidate
with an image; the grids fill them in reading order.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from merlin_mllm.image_loading import is_missing
from merlin_mllm.models.loading import load
from merlin_mllm.models.vision import VisionEncoder
from merlin_mllm.ranker.backend import RankerBackend
from merlin_mllm.ranker.collab_tokens import CollabProjector, embed_tokens
from merlin_mllm.ranker.ranker_config import EMBEDDED, RankerConfig
from merlin_mllm.ranker.prompt import Candidate, add_image_token

__all__ = ["EmbeddedBackend", "ImageProjector"]


class ImageProjector(nn.Module):
    """LLaVA-1.5's projector: Linear(vision_dim, hidden) -> GELU -> Linear(hidden, hidden).

    Maps image feature tokens (..., vision_dim) into the language model's embedding space.
    The weights are initialised from ``seed`` alone, so runs are repeatable.

    Parameters
    ----------
    vision_dim : int
        Feature size of the image tokens (1290 for EfficientNet-Lite0 plus cell colours).
    hidden_size : int
        The language model's embedding size (576 for SmolLM2-135M).
    seed : int
    """

    def __init__(self, vision_dim: int, hidden_size: int, seed: int = 0):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)
        generator = torch.Generator().manual_seed(int(seed))
        for linear in (self.linear_1, self.linear_2):
            # PyTorch's default Linear init (uniform +-1/sqrt(fan_in)), drawn from our generator.
            bound = 1.0 / math.sqrt(linear.in_features)
            with torch.no_grad():
                linear.weight.copy_(torch.empty_like(linear.weight).uniform_(-bound, bound, generator=generator))
                linear.bias.copy_(torch.empty_like(linear.bias).uniform_(-bound, bound, generator=generator))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_tokens)))


class EmbeddedBackend(RankerBackend):
    """SmolLM2 + projected EfficientNet grids (see the module docstring).

    ``projector`` is the trainable :class:`ImageProjector` (None without images);
    ``item_features`` the item image table that ``item_ids`` are looked up in.
    """

    name = EMBEDDED
    # Small model: the merged LoRA copy is cheap and scoring about 20% faster on CPU.
    merges_lora_for_scoring = True
    # Before training the projector is a random map: zero-shot images would enter as noise.
    images_without_training = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Loaded on first use: a shared, frozen, per-process instance (not a submodule).
        self._vision_encoder: Optional[VisionEncoder] = None

    @classmethod
    def canonical_base_model(cls, base_model: str) -> str:
        return EMBEDDED

    @classmethod
    def load(cls, config: RankerConfig, *, device: torch.device, dtype: torch.dtype) -> "EmbeddedBackend":
        loaded = load(None, device=device, dtype=dtype, kind="llm")
        hf_model, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.processor
        old_vocab = hf_model.get_input_embeddings().weight.shape[0]
        add_image_token(tokenizer)
        if len(tokenizer) > old_vocab:
            hf_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            # The placeholder row is never used (projected features replace it); zero it
            # so the model is the same on every load.
            with torch.no_grad():
                hf_model.get_input_embeddings().weight[old_vocab:].zero_()
                if hf_model.get_output_embeddings() is not None:
                    hf_model.get_output_embeddings().weight[old_vocab:].zero_()
        image_mode = "placeholder" if config.use_images else "none"
        hidden = hf_model.get_input_embeddings().weight.shape[1]
        projector = None
        if config.use_images:
            # Kept in fp32 whatever the base dtype: it trains from scratch, and bf16 would
            # round away AdamW's small updates.
            projector = ImageProjector(config.vision_feature_dim, hidden, seed=config.seed).to(device)
        backend = cls(config, hf_model, tokenizer, processor, image_mode=image_mode,
                      prompt_processor=processor if loaded.kind == "mllm" else tokenizer, projector=projector)
        if config.collab_tokens:
            # fp32 and seeded apart from the image projector, like it (see above).
            mlp = ImageProjector(config.collab_dim, hidden, seed=config.seed + 1)
            backend.collab_projector = CollabProjector(mlp, config.collab_dim).to(device)
        return backend

    def token_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``input_ids``, collaborative tokens projected from the item table."""
        return embed_tokens(self.hf_model.get_input_embeddings(), input_ids, self.collab_projector,
                            self.collab_embeddings, self.tokenizer.pad_token_id)

    @classmethod
    def uses_item_images(cls, config: RankerConfig) -> bool:
        return config.use_images

    def vision_encoder(self) -> VisionEncoder:
        """EfficientNet-Lite0, for candidates that bring a picture instead of an item id."""
        if self._vision_encoder is None:
            self._vision_encoder = VisionEncoder.load(self.device)
        return self._vision_encoder

    # ------------------------------------------------------------------ inputs
    def image_rows(self, candidates: Sequence[Candidate]) -> Tuple[List[bool], Optional[torch.Tensor]]:
        """Grids from the item table by item id, or encoded from a candidate's own picture."""
        shows, grids, to_encode = [], [], []
        for index, candidate in enumerate(candidates):
            if candidate.item_id is not None and self.item_features is not None and candidate.item_id in self.item_features:
                features, has = self.item_features.lookup([candidate.item_id])
                shows.append(bool(has[0]))
                if bool(has[0]):
                    grids.append(features[0])
            elif not is_missing(candidate.image):
                shows.append(True)
                to_encode.append(len(grids))
                grids.append(candidate.image)
            elif candidate.item_id is not None and self.item_features is not None:
                raise KeyError(f"candidate {index}: item id {candidate.item_id} is not in the item image table")
            else:
                shows.append(False)
        if to_encode:
            encoded = self.vision_encoder().grid([grids[i] for i in to_encode]).cpu()
            for slot, grid in zip(to_encode, encoded):
                grids[slot] = grid
        stacked = torch.stack([g.float() for g in grids]) if grids else None
        return shows, stacked

    def embed_images(self, input_ids: torch.Tensor, item_ids, image_features) -> torch.Tensor:
        """Token embeddings with projected image features at the placeholder positions."""
        embeds = self.token_embeds(input_ids)
        if self.projector is None:
            return embeds
        placeholder = input_ids == self.prompt.image_token_id
        per_row = placeholder.sum(dim=1)
        image_rows = per_row > 0
        if not bool(image_rows.any()):
            return self._join_projector_graph(embeds)
        expected = self.config.num_image_tokens
        wrong = image_rows & (per_row != expected)
        if bool(wrong.any()):
            row = int(torch.nonzero(wrong)[0])
            raise ValueError(f"row {row}: {int(per_row[row])} image placeholder tokens, expected 0 or {expected}")
        if image_features is None:
            if item_ids is None:
                raise ValueError("the prompts have image placeholders but neither item_ids nor image_features were given")
            if self.item_features is None:
                raise ValueError("no item image table attached (RankerModel.set_item_features)")
            item_ids = torch.as_tensor(item_ids).reshape(-1)
            if item_ids.numel() != input_ids.shape[0]:
                raise ValueError(f"{item_ids.numel()} item ids for a batch of {input_ids.shape[0]}")
            rows = torch.nonzero(image_rows).reshape(-1).cpu()
            image_features, has = self.item_features.lookup(item_ids.cpu()[rows])
            if not bool(has.all()):
                bad = int(rows[~has][0])
                raise ValueError(
                    f"row {bad}: the prompt shows an image but item {int(item_ids[bad])} has none in the "
                    "item image table; tokenize that row without image tokens"
                )
        elif image_features.shape[0] != int(image_rows.sum()):
            raise ValueError(f"{image_features.shape[0]} image grids for {int(image_rows.sum())} rows with images")
        return self._scatter_projected(embeds, placeholder, image_features)

    def _join_projector_graph(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.projector.training and torch.is_grad_enabled() and self.projector.linear_1.weight.requires_grad:
            # A batch without pictures would leave the projector out of the autograd graph,
            # and DistributedDataParallel then fails ("parameters that did not receive
            # gradients"). An empty projection joins the graph with zero gradients.
            empty = self.projector(embeds.new_zeros((0, self.config.vision_feature_dim), dtype=torch.float32))
            embeds = embeds + empty.sum().to(embeds.dtype)
        return embeds

    def _scatter_projected(self, embeds: torch.Tensor, placeholder: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """``embeds`` with the projected ``grids`` at the placeholder positions, in reading order."""
        projected = self.projector(grids.to(self.device, self.projector.linear_1.weight.dtype))
        return embeds.masked_scatter(placeholder.unsqueeze(-1), projected.to(embeds.dtype))

    def item_grids(self, item_ids: Sequence[Optional[int]]) -> torch.Tensor:
        """The image grids (M, 49, D) of ``item_ids`` from the item image table; every item must have one."""
        if self.item_features is None:
            raise ValueError("no item image table attached (RankerModel.set_item_features)")
        if any(item is None for item in item_ids):
            raise ValueError("a candidate shows an image but has no item id (pass its grid instead)")
        grids, has = self.item_features.lookup(torch.as_tensor([int(i) for i in item_ids], dtype=torch.long))
        if not bool(has.all()):
            missing = [int(i) for i, shown in zip(item_ids, has.tolist()) if not shown]
            raise ValueError(f"item {missing[0]} shows an image but has none in the item image table")
        return grids

    def packed_model_inputs(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor] = None
                            ) -> Dict[str, Any]:
        embeds = self.token_embeds(input_ids)
        if self.projector is None:
            if image_features is not None and len(image_features):
                raise ValueError("image grids given, but this ranker is text-only (use_images=False)")
            return {"inputs_embeds": embeds}
        placeholder = input_ids == self.prompt.image_token_id
        blocks = 0 if image_features is None else int(image_features.shape[0])
        if int(placeholder.sum()) != blocks * self.config.num_image_tokens:
            raise ValueError(f"{int(placeholder.sum())} image placeholder tokens in the packed rows for {blocks} "
                             f"image grids of {self.config.num_image_tokens}")
        if not blocks:
            return {"inputs_embeds": self._join_projector_graph(embeds)}
        return {"inputs_embeds": self._scatter_projected(embeds, placeholder, image_features)}

    def model_inputs(self, input_ids: torch.Tensor, *, item_ids=None, image_features=None,
                     image_inputs=None) -> Dict[str, Any]:
        return {"inputs_embeds": self.embed_images(input_ids, item_ids, image_features)}

    def generate_inputs(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return {"inputs_embeds": self.embed_images(batch["input_ids"].to(self.device), None,
                                                   batch.get("image_features"))}
