"""The SFT recommender of MLLM-MSR: an MLLM with LoRA that answers Yes/No, scored by P(yes).

Backends
--------
``"embedded"`` (the offline default)
    SmolLM2-135M-Instruct plus EfficientNet-Lite0, joined the LLaVA way: an item's 7x7 grid of
    image tokens (49 x 1290: EfficientNet features plus each cell's colour statistics,
    precomputed per item in an :class:`ItemImageFeatures` table) goes through a trainable
    2-layer GELU MLP (1290 -> 576 -> 576) and replaces the embeddings of
    the 49 ``<image>`` placeholder tokens of the prompt. LoRA sits on SmolLM2's Linear layers;
    the projector trains; embeddings, lm_head and the CNN stay frozen.
``"hf"``
    Any Hugging Face MLLM that ``merlin_mllm.models.load`` opens (LLaVA-NeXT, Qwen2-VL,
    Idefics3, ...; or a text LLM in text-only mode). Images go through the model's processor.
    LoRA targets every Linear of the language model only: the vision tower, the multimodal
    projector and lm_head stay frozen.

Modes: ``use_images=False`` is the text-only ablation (MLLM-MSR_I); ``zero_shot=True`` applies
no LoRA and trains nothing (the paper's "without SFT" row).

Public API (stable; the Merlin block, training and evaluation build on it)
-------------------------------------------------------------------------
``RankerModel.build(base_model="embedded", *, use_images=True, zero_shot=False, lora_r=8,
lora_alpha=16, lora_dropout=0.05, loss="lm", seed=0, max_summary_tokens=384,
max_title_tokens=64, prompt_version="1", precision="float32", item_features=None, device=None,
dtype=None) -> RankerModel``
    A fresh model (seeded projector and LoRA init).
``RankerModel.from_pretrained(path, *, item_features=None, device=None, precision=None, dtype=None,
is_trainable=False) -> RankerModel`` / ``ranker.save_pretrained(path)``
    One artefact: ``ranker_config.json``, ``adapter/`` (peft), ``projector.safetensors``.
    Base weights are not copied; the config names the base model.
``ranker.prompt`` -> :class:`~merlin_mllm.ranker.prompt.RankerPrompt`
    Tokenizes (summary, title, has_image) into ids; see also ``RankerPrompt.for_model``.
``ranker.forward(input_ids, attention_mask, item_ids=None, labels=None, image_features=None,
**image_inputs) -> RankerOutput``
    Training/batch forward. ``input_ids``/``attention_mask``: (B, L) prompts *without* the
    answer, padded on the right. ``item_ids`` (B,): keys into the item image table for rows
    whose prompt has image placeholders (embedded backend). ``labels`` (B,) in {0, 1}: 1 =
    "Yes" (positive). Returns ``RankerOutput(logits=(B, 2) [No, Yes], loss, probs)``.
``ranker.compute_loss(output_or_vocab_logits, labels)``; module-level ``answer_only_labels``
    The loss is on the answer token only: every prompt position is masked.
``ranker.make_batch(summaries, candidates, labels=None) -> dict``
    Text-level batch building for any backend (tests, small jobs, HF MLLMs with pixels).
``ranker.score(user_summary, candidates, batch_size=32) -> np.ndarray``
    P(yes) per candidate from one forward pass: the user prefix is run once and its KV cache is
    shared by the candidates, batched.
``ranker.score_token_ids(prompt_ids, item_ids=None, batch_size=32) -> np.ndarray``
    The same from token ids (one user's candidates), as a Merlin pipeline delivers them.
``ranker.make_group(summary, candidates, labels=None) -> CandidateGroup``
    One user's candidates as a group: the shared prompt prefix and each candidate's own part
    (:mod:`~merlin_mllm.ranker.packing`); ``CandidateGroup.from_prompts`` makes one from token ids.
``ranker.forward_groups(groups, *, loss=None, path=None) -> GroupOutput``
    Groupwise training/batch forward: each group's prefix and all its candidates in one packed
    row with a block attention mask (or, for families that cannot pack, the prefix's KV cache
    expanded over the candidates). ``GroupOutput(logits=(N, 2), group_index=(N,), labels, loss,
    probs)``; losses ``"lm"``, ``"binary"``, ``"listwise"`` (:mod:`~merlin_mllm.ranker.losses`).
``ranker.score_packed(user_summary, candidates, batch_size=32) -> np.ndarray``
    P(yes) from packed rows instead of the shared KV cache (same scores up to rounding).
``ranker.score_independent(...)`` / ``ranker.score_generate(...)``
    Reference scorers: one full forward per candidate; ``generate()`` per candidate (the
    authors' way). For tests and benchmarks.
``ranker.autocast()``
    The context training forwards run in: bf16 autocast when the ranker's weights are bf16
    (``precision`` "bfloat16", or "auto" where it picks bf16), else nothing. ``forward`` and
    ``forward_groups`` enter it themselves; LoRA, the projector and a hybrid's head keep fp32
    weights, and the answer logits come back in fp32.
``ranker.merge_lora_for_scoring`` (bool; default True for the embedded backend)
    No-grad eval-mode forwards and scoring fold LoRA into a cached copy of the adapted weights
    (about 20% faster on CPU; costs one copy of the language model's Linear weights in memory).
    Training always runs the unmerged adapters; ``train()`` frees the copy.
``ranker.trainable_state_dict()`` / ``load_trainable_state_dict(sd)`` / ``parameter_groups(lr, projector_lr)``
    For optimizers and compact checkpoints.
Module-level helpers: ``pad_right(sequences, pad_id)``, ``batch_from_ragged(values, offsets,
pad_id)``, ``answer_only_labels(input_ids, attention_mask, answer_ids)``, ``IGNORE_INDEX``
(from :mod:`~merlin_mllm.ranker.batches`), ``RankerConfig`` (:mod:`~merlin_mllm.ranker.ranker_config`),
``ImageProjector`` (:mod:`~merlin_mllm.ranker.embedded_backend`), ``ItemImageFeatures``
(:mod:`~merlin_mllm.ranker.image_features`), re-exported here.

Composition
-----------
``RankerModel`` is thin; its parts live next to it:

* :mod:`~merlin_mllm.ranker.ranker_config`: ``RankerConfig`` and the saved folder's file names;
* :mod:`~merlin_mllm.ranker.assembly`: what ``build`` and ``from_pretrained`` share (precision,
  backend, answer ids, LoRA, projector) and the saved folder's checks;
* :mod:`~merlin_mllm.ranker.backend` (interface), :mod:`~merlin_mllm.ranker.embedded_backend`,
  :mod:`~merlin_mllm.ranker.hf_backend`, chosen in :mod:`~merlin_mllm.ranker.backend_registry`:
  the model family (loading, image inputs, positions);
* :mod:`~merlin_mllm.ranker.lora`: attaching LoRA and the merged-weights cache for scoring;
* :mod:`~merlin_mllm.ranker.scoring`: the scorers behind ``score*``;
* :mod:`~merlin_mllm.ranker.packing`, :mod:`~merlin_mllm.ranker.groups`,
  :mod:`~merlin_mllm.ranker.losses`: candidate groups, their forward passes and losses;
* :mod:`~merlin_mllm.ranker.batches`: padding and the answer-only labels.

Usage::

    from merlin_mllm.ranker import RankerModel, ItemImageFeatures

    table = ItemImageFeatures.load("item_images.safetensors")
    ranker = RankerModel.build("embedded", item_features=table)
    batch = ranker.make_batch(["Likes sci-fi."] * 2,
                              [{"title": "Alien", "item_id": 3}, {"title": "Heat", "item_id": 9}],
                              labels=[1, 0])
    out = ranker(**batch)             # out.loss, out.logits (2, 2), out.probs
    ranker.score("Likes sci-fi.", [{"title": "Alien", "item_id": 3}, "Heat"])
    ranker.save_pretrained("ranker/")
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from merlin_mllm.models.precision import DEFAULT_PRECISION
from merlin_mllm.ranker import groups, scoring
from merlin_mllm.ranker.assembly import assemble, saved_parts
from merlin_mllm.ranker.backend import RankerBackend
from merlin_mllm.ranker.backend_registry import backend_class_for_model
from merlin_mllm.ranker.batches import IGNORE_INDEX, answer_only_labels, answer_positions, batch_from_ragged, pad_right
from merlin_mllm.ranker.ranker_config import (ADAPTER_DIR, COLLAB_EMBEDDINGS_FILE, COLLAB_PROJECTOR_FILE, EMBEDDED,
                                              PROJECTOR_FILE, RankerConfig)
from merlin_mllm.ranker.collab_tokens import CollabEmbeddings
from merlin_mllm.ranker.embedded_backend import ImageProjector
from merlin_mllm.ranker.image_features import ItemImageFeatures
from merlin_mllm.ranker.groups import GroupOutput
from merlin_mllm.ranker.lora import LoraMergeCache
from merlin_mllm.ranker.packing import CandidateGroup
from merlin_mllm.ranker.losses import binary_loss, check_labels, lm_loss
from merlin_mllm.ranker.prompt import PROMPT_VERSION, Candidate, RankerPrompt
from merlin_mllm.summaries.candidates import candidate_token_budget

__all__ = [
    "RankerConfig",
    "RankerModel",
    "RankerOutput",
    "ImageProjector",
    "ItemImageFeatures",
    "answer_only_labels",
    "pad_right",
    "batch_from_ragged",
    "IGNORE_INDEX",
]


@dataclass
class RankerOutput:
    """What :meth:`RankerModel.forward` returns.

    Attributes
    ----------
    logits : tensor (B, 2)
        The answer-position logits of ["No", "Yes"] (float32).
    loss : tensor (), optional
        Present when labels were given.
    vocab_logits : tensor (B, V), optional
        The full answer-position logits (what the "lm" loss uses).
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    vocab_logits: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def probs(self) -> torch.Tensor:
        """P(yes) = softmax([logit_No, logit_Yes])[1], shape (B,)."""
        return torch.softmax(self.logits.float(), dim=-1)[:, 1]


# ---------------------------------------------------------------------------- the model
class RankerModel(nn.Module):
    """An MLLM (optionally with LoRA) that answers "will the user interact with this item next?".

    Build it with :meth:`build` or :meth:`from_pretrained`, not the constructor. See the module
    docstring for the full API and data contract.

    Attributes
    ----------
    config : RankerConfig
    prompt : RankerPrompt
        The prompt builder (tokenizer, chat template, image mode) of this model.
    tokenizer, processor :
        The base model's tokenizer and processor (the tokenizer for text LLMs).
    backbone : nn.Module
        The peft model (LoRA) or, in zero-shot mode, the Hugging Face model.
    backend : RankerBackend
        The model family: loading, image inputs and positions (see
        :mod:`merlin_mllm.ranker.backend`).
    projector : ImageProjector or None
        The embedded backend's trainable image projector.
    item_features : ItemImageFeatures or None
        The embedded backend's item image table (not a parameter; set with
        :meth:`set_item_features`).
    lora_merge : LoraMergeCache
        The merged LoRA weights used by no-grad scoring (see ``merge_lora_for_scoring``).
    """

    def __init__(self, backend: RankerBackend, backbone: nn.Module,
                 item_features: Optional[ItemImageFeatures] = None):
        super().__init__()
        self.config = backend.config
        self.backbone = backbone
        self.projector = backend.projector
        #: The collaborative tokens' projector (``config.collab_tokens``), trained like ``projector``.
        self.collab_projector = backend.collab_projector
        self.tokenizer = backend.tokenizer
        self.processor = backend.processor
        # A plain object: its HF model is registered through backbone, its projector above.
        self.backend = backend
        self.item_features = item_features
        self.lora_merge = LoraMergeCache(backbone)
        #: Fold LoRA into the weights for no-grad scoring (see ``merged_lora``). It keeps a
        #: merged copy of the adapted weights in memory, so it is on for the small embedded
        #: model and off for HF MLLMs by default.
        self.merge_lora_for_scoring = backend.merges_lora_for_scoring
        # On the language model's device: `device` (and so every input) follows this buffer.
        self.register_buffer(
            "_answer_ids", torch.tensor([self.config.no_token_id, self.config.yes_token_id], dtype=torch.long,
                                        device=backend.hf_model.get_input_embeddings().weight.device),
            persistent=False,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        base_model: str = EMBEDDED,
        *,
        use_images: bool = True,
        zero_shot: bool = False,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_init: Union[str, bool] = True,
        loss: str = "lm",
        seed: int = 0,
        max_summary_tokens: int = 384,
        max_title_tokens: Optional[int] = None,
        prompt_version: str = PROMPT_VERSION,
        user_context: str = "summary",
        context_titles: int = 5,
        candidate_text: str = "title",
        precision: str = DEFAULT_PRECISION,
        context_ratings: bool = False,
        context_attributes: bool = False,
        item_features: Optional[ItemImageFeatures] = None,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        collab_tokens: bool = False,
        collab_embeddings: Optional[CollabEmbeddings] = None,
    ) -> "RankerModel":
        """A new ranker around ``base_model``.

        Parameters
        ----------
        base_model : str
            ``"embedded"`` (default: SmolLM2-135M + EfficientNet-Lite0), or an HF hub id /
            local folder of an MLLM (LLaVA-NeXT, Qwen2-VL, Idefics3, ...) or text LLM.
        use_images : bool
            False for text-only prompts (MLLM-MSR_I). Text LLMs require False.
        zero_shot : bool
            No LoRA and nothing trainable: the base model as is. (For the embedded backend, the
            projector is then an untrained random map: use ``use_images=False`` for a fair
            zero-shot baseline.)
        lora_r, lora_alpha, lora_dropout, lora_init, loss, seed, max_summary_tokens, max_title_tokens, prompt_version,
        user_context, context_titles, candidate_text, precision, context_ratings, context_attributes :
            See :class:`RankerConfig`. ``max_title_tokens`` defaults to the budget of
            ``candidate_text`` (:func:`merlin_mllm.summaries.candidates.candidate_token_budget`:
            64 for the title alone).
        item_features : ItemImageFeatures, optional
            The embedded backend's item image table (can be set later).
        device : optional
            Default: CUDA when available, else CPU.
        dtype : torch.dtype, optional
            The weights' dtype, overriding ``precision`` (benchmarks, tests).
        collab_tokens : bool
            LLaRA-style collaborative tokens (:mod:`merlin_mllm.ranker.collab_tokens`; embedded
            backend). Needs ``collab_embeddings`` (here or later, :meth:`set_collab_embeddings`),
            whose size sets ``config.collab_dim``.
        collab_embeddings : CollabEmbeddings, optional
            The item embedding table of the collaborative tokens.

        Examples
        --------
        >>> ranker = RankerModel.build("embedded", use_images=False)      # doctest: +SKIP
        """
        family = backend_class_for_model(base_model)
        config = RankerConfig(
            base_model=family.canonical_base_model(base_model), backend=family.name,
            use_images=use_images, zero_shot=zero_shot, lora_r=lora_r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, lora_init=lora_init, loss=loss, seed=seed,
            max_summary_tokens=max_summary_tokens,
            max_title_tokens=candidate_token_budget(candidate_text) if max_title_tokens is None else max_title_tokens,
            prompt_version=prompt_version, user_context=user_context, context_titles=context_titles,
            candidate_text=candidate_text, context_ratings=context_ratings, context_attributes=context_attributes,
            precision=precision, collab_tokens=bool(collab_tokens),
        )
        if collab_embeddings is not None and not collab_tokens:
            raise ValueError("collab_embeddings were given but collab_tokens is False")
        if collab_embeddings is not None:
            config.collab_dim = collab_embeddings.dim
        return assemble(cls, config, device=device, dtype=dtype, item_features=item_features,
                        collab_embeddings=collab_embeddings)

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike],
        *,
        item_features: Optional[ItemImageFeatures] = None,
        device: Union[str, torch.device, None] = None,
        precision: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        is_trainable: bool = False,
    ) -> "RankerModel":
        """Load a ranker saved by :meth:`save_pretrained` (the base model is loaded by name).

        Parameters
        ----------
        path : folder
        item_features : ItemImageFeatures, optional
        device : optional
            Default: CUDA when available, else CPU.
        precision : {"float32", "bfloat16", "auto"}, optional
            Run in this precision instead of the saved one (``config.precision`` then says so).
        dtype : torch.dtype, optional
            The weights' dtype, overriding any precision (benchmarks, tests).
        is_trainable : bool
            True to continue training (LoRA and projector get gradients).

        A ranker with collaborative tokens reads its projector (``collab_projector.safetensors``)
        and its item table (``collab_embeddings.safetensors``) from ``path``.
        """
        path = Path(path)
        config, adapter_dir, projector_file = saved_parts(path, precision)
        collab_file = table = None
        if config.collab_tokens:
            collab_file, table_file = path / COLLAB_PROJECTOR_FILE, path / COLLAB_EMBEDDINGS_FILE
            for needed in (collab_file, table_file):
                if not needed.is_file():
                    raise FileNotFoundError(f"{needed} not found (the ranker was saved with collab_tokens)")
            table = CollabEmbeddings.load(table_file)
        return assemble(cls, config, device=device, dtype=dtype, item_features=item_features,
                        adapter_dir=adapter_dir, projector_file=projector_file, is_trainable=is_trainable,
                        collab_projector_file=collab_file, collab_embeddings=table)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> Path:
        """Write the adapter, the projector and the config into ``path`` (base weights are not copied).

        Layout: ``ranker_config.json``, ``adapter/`` (peft ``save_pretrained``: adapter_config.json,
        adapter_model.safetensors), ``projector.safetensors`` (embedded backend with images).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not self.config.zero_shot:
            # The resized embedding table is frozen and rebuilt on load: never save it.
            self.backbone.save_pretrained(str(path / ADAPTER_DIR), save_embedding_layers=False)
        if self.projector is not None:
            state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.projector.state_dict().items()}
            save_file(state, str(path / PROJECTOR_FILE))
        if self.collab_projector is not None:
            state = {k: v.detach().to("cpu", torch.float32).contiguous()
                     for k, v in self.collab_projector.state_dict().items()}
            save_file(state, str(path / COLLAB_PROJECTOR_FILE))
            if self.collab_embeddings is None:
                raise ValueError("a ranker with collab_tokens is saved with its item table: set_collab_embeddings first")
            self.collab_embeddings.save(path / COLLAB_EMBEDDINGS_FILE)
        self.config.write(path)
        return path

    # ------------------------------------------------------------------ facts
    @property
    def hf_model(self) -> nn.Module:
        """The Hugging Face model (with LoRA layers injected in place, when not zero-shot)."""
        return self.backend.hf_model

    @property
    def prompt(self) -> RankerPrompt:
        """The prompt builder (tokenizer, chat template, image mode) of this model."""
        return self.backend.prompt

    @property
    def item_features(self) -> Optional[ItemImageFeatures]:
        """The item image table (embedded backend); :meth:`set_item_features` checks it."""
        return self.backend.item_features

    @item_features.setter
    def item_features(self, item_features: Optional[ItemImageFeatures]) -> None:
        self.backend.item_features = item_features

    @property
    def answer_token_ids(self) -> torch.Tensor:
        """The token ids [No, Yes], (2,) long, on the model's device."""
        return self._answer_ids

    @property
    def device(self) -> torch.device:
        return self._answer_ids.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.get_input_embeddings().weight.dtype

    @property
    def yes_token_id(self) -> int:
        return int(self.config.yes_token_id)

    @property
    def no_token_id(self) -> int:
        return int(self.config.no_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def image_token_id(self) -> Optional[int]:
        return self.prompt.image_token_id

    @property
    def collab_embeddings(self) -> Optional[CollabEmbeddings]:
        """The collaborative tokens' item embedding table (``config.collab_tokens``)."""
        return self.backend.collab_embeddings

    def set_collab_embeddings(self, table: CollabEmbeddings) -> None:
        """Attach the collaborative tokens' item table; its size must be the projector's input."""
        if not self.config.collab_tokens:
            raise ValueError("this ranker was built without collab_tokens")
        if table.dim != self.config.collab_dim:
            raise ValueError(f"the item embedding table has {table.dim} dimensions; this ranker's collaborative "
                             f"projector takes {self.config.collab_dim}")
        self.backend.collab_embeddings = table

    def set_item_features(self, item_features: Optional[ItemImageFeatures]) -> None:
        """Attach the item image table (embedded backend)."""
        if item_features is not None:
            self.config.check_item_features(item_features)
        self.item_features = item_features

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float = 2e-5, projector_lr: Optional[float] = None,
                         weight_decay: float = 0.0) -> List[Dict[str, Any]]:
        """Optimizer parameter groups: LoRA at ``lr``; the projector at ``projector_lr``.

        The projector trains from scratch, so it usually wants a larger rate than LoRA
        (LLaVA trains its projector at 1e-3); default: ``lr``.
        """
        projectors = [m for m in (self.projector, self.collab_projector) if m is not None]
        projector_ids = {id(p) for m in projectors for p in m.parameters()}
        lora = [p for p in self.trainable_parameters() if id(p) not in projector_ids]
        groups = []
        if lora:
            groups.append({"params": lora, "lr": lr, "weight_decay": weight_decay, "name": "lora"})
        projector = [p for p in self.trainable_parameters() if id(p) in projector_ids]
        if projector:
            groups.append({"params": projector, "lr": projector_lr or lr, "weight_decay": weight_decay,
                           "name": "projector"})
        return groups

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Only the trained tensors (LoRA + projector): a compact checkpoint."""
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` returned (names must match exactly)."""
        own = dict(self.named_parameters())
        expected = {name for name, p in own.items() if p.requires_grad}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"trainable state mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)

    def train(self, mode: bool = True) -> "RankerModel":
        if mode:
            self.lora_merge.drop()  # training uses the unmerged adapters; free the copy
        return super().train(mode)

    # ------------------------------------------------------------------ merged LoRA for scoring
    def merged_lora(self):
        """Context: LoRA computed from merged weights (:class:`~merlin_mllm.ranker.lora.LoraMergeCache`)
        when ``merge_lora_for_scoring`` is on, in eval mode and without gradients; else a no-op."""
        return self.lora_merge.applied(self.merge_lora_for_scoring and not self.config.zero_shot and not self.training)

    def autocast(self):
        """Context of a training forward: bf16 autocast on the ranker's device when its weights are
        bf16, else a no-op. fp32 parameters (LoRA, the projector) are cast per matmul inside it, so
        they keep fp32 weights and fp32 gradients; the answer logits are returned in fp32."""
        if self.dtype != torch.bfloat16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # Kept for the tests that inspect the merged copy and the embedded image embeddings.
    @property
    def _merged_weights(self) -> List[torch.Tensor]:
        return self.lora_merge.weights

    @property
    def _merged_key(self):
        return self.lora_merge.key

    def _embed_images(self, input_ids: torch.Tensor, item_ids, image_features) -> torch.Tensor:
        return self.backend.embed_images(input_ids, item_ids, image_features)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        item_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        **image_inputs,
    ) -> RankerOutput:
        """Answer logits [No, Yes] at the answer position (and the loss when ``labels`` are given).

        Parameters
        ----------
        input_ids, attention_mask : tensors (B, L)
            Prompts without the answer, right-padded (:func:`pad_right`, :func:`batch_from_ragged`).
        item_ids : tensor (B,), optional
            Embedded backend: the candidate item per row, looked up in the item image table for
            rows whose prompt has image placeholders.
        labels : tensor (B,), optional
            1 for positives ("Yes"), 0 for negatives ("No").
        image_features : tensor (K, 49, 1290), optional
            Embedded backend: grids for the K rows with images, instead of ``item_ids``.
        **image_inputs :
            HF backend: the processor's image tensors (``pixel_values``, ``image_sizes``,
            ``image_grid_thw``, ``mm_token_type_ids``, ...).
        """
        positions = answer_positions(attention_mask)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with self.merged_lora(), self.autocast():
            hidden, _ = self.backend.hidden_states(input_ids, attention_mask, item_ids=item_ids,
                                                   image_features=image_features, image_inputs=image_inputs)
            rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]
            vocab_logits = self.backend.answer_logits(rows)
        output = RankerOutput(logits=vocab_logits[:, self._answer_ids], vocab_logits=vocab_logits)
        if labels is not None:
            output.loss = self.compute_loss(output, labels)
        return output

    def compute_loss(self, output: RankerOutput, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the answer token only (mean over the batch).

        ``loss="lm"``: NLL of the answer token over the whole vocabulary (equal to the HF
        causal-LM loss with :func:`answer_only_labels`). ``loss="binary"``: CE over [No, Yes].
        """
        labels = check_labels(labels, output.logits.shape[0], output.logits.device)
        if self.config.loss == "listwise":
            raise ValueError("the 'listwise' loss needs groups of one user's candidates: use forward_groups")
        if self.config.loss == "binary" or output.vocab_logits is None:
            return binary_loss(output.logits, labels)
        return lm_loss(output.vocab_logits, labels, self._answer_ids)

    def answer_ids_for(self, labels: torch.Tensor) -> torch.Tensor:
        """The answer token id per label (1 -> "Yes", 0 -> "No")."""
        return self._answer_ids.to(torch.as_tensor(labels).device)[torch.as_tensor(labels).long()]

    # ------------------------------------------------------------------ text-level batches
    def encode(self, summaries: Sequence[str], candidates: Sequence[Any]):
        """Encoded prompts plus image inputs for (summary, candidate) pairs.

        Returns
        -------
        (prompts, image_features, image_inputs)
            ``prompts``: list of :class:`EncodedPrompt`; ``image_features``: the embedded
            backend's grids for the prompts with images (or None); ``image_inputs``: the HF
            processor's tensors (or {}).
        """
        candidates = [Candidate.coerce(c, i) for i, c in enumerate(candidates)]
        if self.config.use_images:
            shows, grids = self.backend.image_rows(candidates)
        else:
            shows, grids = [False] * len(candidates), None
        batch = self.prompt.encode_batch(summaries, candidates, has_image=shows)
        return batch.prompts, grids, batch.image_inputs

    def make_batch(self, summaries: Sequence[str], candidates: Sequence[Any],
                   labels: Optional[Sequence[int]] = None) -> Dict[str, Any]:
        """A forward-ready batch (dict of tensors) from text: ``ranker(**batch)``.

        Parameters
        ----------
        summaries : list of str
            The user summary of each example.
        candidates : list of Candidate, str or dict
            The candidate of each example (title, image and/or item_id).
        labels : list of int, optional
            1 = positive ("Yes"), 0 = negative ("No").
        """
        prompts, grids, image_inputs = self.encode(summaries, candidates)
        ids, mask = pad_right([p.input_ids for p in prompts], self.pad_token_id)
        batch: Dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if grids is not None:
            batch["image_features"] = grids
        batch.update(self.backend.batch_inputs(image_inputs))
        if labels is not None:
            batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
        return batch

    # ------------------------------------------------------------------ scoring (merlin_mllm.ranker.scoring)
    def score(self, user_summary: str, candidates: Sequence[Any], *, batch_size: int = 32) -> np.ndarray:
        """P(yes) for each candidate of one user, from a single forward pass per batch.

        The user part of the prompt (system message + summary) is run once; its KV cache is
        repeated over a batch of candidates, and only the candidates' tokens (title, image
        tokens, question) are computed. No ``generate()``.

        Parameters
        ----------
        user_summary : str
        candidates : list of Candidate, str or dict
        batch_size : int
            Candidates per forward pass.

        Returns
        -------
        np.ndarray of float, shape (len(candidates),)
        """
        return scoring.score(self, user_summary, candidates, batch_size=batch_size)

    def score_token_ids(self, prompt_ids: Sequence[Sequence[int]], item_ids: Optional[Sequence[int]] = None,
                        *, batch_size: int = 32) -> np.ndarray:
        """P(yes) for one user's candidates given as token ids (e.g. from a Merlin dataloader).

        Parameters
        ----------
        prompt_ids : list of list of int
            Full prompts (without answers) of one user's candidates, as made by
            :meth:`RankerPrompt.encode`. The shared prefix is found from the ids.
        item_ids : list of int, optional
            Embedded backend: the candidates' item ids (for rows with image placeholders).
        """
        return scoring.score_token_ids(self, prompt_ids, item_ids, batch_size=batch_size)

    def score_users_token_ids(self, users: Sequence[Tuple[Sequence[Sequence[int]], Optional[Sequence[int]]]],
                              *, batch_size: int = 32) -> List[np.ndarray]:
        """P(yes) for several users' candidates at once (e.g. a dynamic batch of serving requests).

        Each user's prompt prefix is computed once, as in :meth:`score_token_ids`; then the
        candidates of *all* users go through the model together, ``batch_size`` rows per
        forward pass. A row attends only to its own user's cached prefix: prefixes are
        right-padded to the longest one in the pass with the padding masked out, and each row's
        positions continue from its own prefix length. The scores equal per-user scoring up to
        float rounding, but the matrix products are larger, which keeps a GPU busy. A ranker in
        bf16 scores user by user instead (see :func:`~merlin_mllm.ranker.scoring.score_users_token_ids`).

        Parameters
        ----------
        users : list of (prompt_ids, item_ids)
            Per user: the candidates' full prompt token ids and (embedded backend) item ids.
        batch_size : int
            Candidate rows per forward pass.

        Returns
        -------
        list of np.ndarray (float64), one per user, in input order.
        """
        return scoring.score_users_token_ids(self, users, batch_size=batch_size)

    def score_packed(self, user_summary: str, candidates: Sequence[Any], *, batch_size: int = 32) -> np.ndarray:
        """P(yes) for each candidate of one user from packed rows: the user prefix and up to
        ``batch_size`` candidates per row, with a block attention mask (no KV cache).

        Families that cannot pack (``backend.supports_packing``) run the shared-prefix path, with
        one log line. The scores equal :meth:`score`'s up to float rounding.
        """
        return scoring.score_packed(self, user_summary, candidates, batch_size=batch_size)

    # ------------------------------------------------------------------ candidate groups (merlin_mllm.ranker.groups)
    def make_group(self, summary: str, candidates: Sequence[Any],
                   labels: Optional[Sequence[int]] = None) -> CandidateGroup:
        """One user's :class:`~merlin_mllm.ranker.packing.CandidateGroup` from text, split where
        this ranker's prompt shares its prefix (with prompt version 2, after the question).

        Parameters
        ----------
        summary : str
        candidates : list of Candidate, str or dict
            E.g. the positive, then its negatives.
        labels : list of int, optional
            1 = positive, 0 = negative.
        """
        return groups.make_group(self, summary, candidates, labels)

    def forward_groups(self, candidate_groups: Sequence[CandidateGroup], *, loss: Optional[str] = None,
                       path: Optional[str] = None) -> GroupOutput:
        """Answer logits of every candidate of every group, and the loss when all groups have labels.

        Groups run packed (one row per group, a block attention mask, every candidate's
        positions continuing from its prefix) when the backend can, else the prefix's KV cache
        is expanded over the group's candidates (see :mod:`merlin_mllm.ranker.groups`). With
        gradients on, this is a training step's forward.

        Parameters
        ----------
        candidate_groups : list of CandidateGroup
            From :meth:`make_group` or ``CandidateGroup.from_prompts`` (token ids).
        loss : {"lm", "binary", "listwise"}, optional
            Default ``config.loss`` (see :mod:`merlin_mllm.ranker.losses`).
        path : {"packed", "expanded"}, optional
            Force a path (benchmarks, tests); default packed where supported.

        Returns
        -------
        GroupOutput
            ``logits`` (N, 2), ``group_index`` (N,), ``labels``, ``loss``, ``probs``.
        """
        return groups.forward_groups(self, candidate_groups, loss=loss, path=path)

    def score_independent(self, user_summary: str, candidates: Sequence[Any]) -> np.ndarray:
        """Reference scores: one full forward per candidate (no cache, no padding, batch of 1),
        with LoRA computed unmerged, as in training."""
        return scoring.score_independent(self, user_summary, candidates)

    def score_generate(self, user_summary: str, candidates: Sequence[Any], *, max_new_tokens: int = 30
                       ) -> Tuple[np.ndarray, int]:
        """The authors' way: ``generate()`` per candidate, P(yes) from the first step's logits.

        Returns
        -------
        (scores, new_tokens) : (np.ndarray, int)
            P(yes) per candidate and the total number of generated tokens.
        """
        return scoring.score_generate(self, user_summary, candidates, max_new_tokens=max_new_tokens)
