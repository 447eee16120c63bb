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
max_title_tokens=64, item_features=None, device=None, dtype=None) -> RankerModel``
    A fresh model (seeded projector and LoRA init).
``RankerModel.from_pretrained(path, *, item_features=None, device=None, dtype=None,
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
``ranker.score_independent(...)`` / ``ranker.score_generate(...)``
    Reference scorers: one full forward per candidate; ``generate()`` per candidate (the
    authors' way). For tests and benchmarks.
``ranker.merge_lora_for_scoring`` (bool; default True for the embedded backend)
    No-grad eval-mode forwards and scoring fold LoRA into a cached copy of the adapted weights
    (about 20% faster on CPU; costs one copy of the language model's Linear weights in memory).
    Training always runs the unmerged adapters; ``train()`` frees the copy.
``ranker.trainable_state_dict()`` / ``load_trainable_state_dict(sd)`` / ``parameter_groups(lr, projector_lr)``
    For optimizers and compact checkpoints.
Module-level helpers: ``pad_right(sequences, pad_id)``, ``batch_from_ragged(values, offsets,
pad_id)``, ``answer_only_labels(input_ids, attention_mask, answer_ids)``, ``RankerConfig``,
``ItemImageFeatures`` (re-exported from :mod:`merlin_mllm.ranker.features`).

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
import inspect
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from merlin_mllm.models.loading import EMBEDDED_LLM_ALIASES, default_device, default_dtype, load
from merlin_mllm.models.vision import TOKEN_DIM
from merlin_mllm.ranker.features import ItemImageFeatures
from merlin_mllm.ranker.prompt import (
    IMAGE_TOKEN,
    PROMPT_VERSION,
    Candidate,
    EncodedPrompt,
    RankerPrompt,
    add_image_token,
    common_prefix_length,
)

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

FORMAT_VERSION = 1
CONFIG_FILE = "ranker_config.json"
ADAPTER_DIR = "adapter"
PROJECTOR_FILE = "projector.safetensors"
EMBEDDED = "embedded"
#: Label value that the loss ignores (Hugging Face convention).
IGNORE_INDEX = -100
# Processor outputs that are per-token (aligned with input_ids) rather than image tensors.
_PER_TOKEN_KEYS = ("mm_token_type_ids",)


@dataclass
class RankerConfig:
    """Everything needed to rebuild a ranker around its base model (saved as JSON).

    Parameters
    ----------
    base_model : str
        ``"embedded"`` (SmolLM2 + EfficientNet-Lite0), a Hugging Face hub id or a local folder.
    backend : {"embedded", "hf"}
    use_images : bool
        False: text-only prompts (the MLLM-MSR_I ablation).
    zero_shot : bool
        True: no LoRA, nothing trainable (the "without SFT" baseline).
    lora_r, lora_alpha, lora_dropout :
        LoRA settings. The paper used r=8; the authors' code r=16, alpha=32, dropout 0.1.
    lora_init : str or bool
        peft ``init_lora_weights``: True (B=0, so step 0 equals the base model) or "gaussian"
        (the authors' code).
    loss : {"lm", "binary"}
        "lm": negative log-likelihood of the answer token over the whole vocabulary (the paper's
        objective, with the prompt masked). "binary": cross-entropy over [No, Yes] only.
    seed : int
        Seeds the projector and LoRA initialisation.
    max_summary_tokens, max_title_tokens : int
        Prompt token budgets for the user summary and the title.
    """

    base_model: str = EMBEDDED
    backend: str = EMBEDDED
    use_images: bool = True
    zero_shot: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_init: Union[str, bool] = True
    loss: str = "lm"
    seed: int = 0
    max_summary_tokens: int = 384
    max_title_tokens: int = 64
    # Filled in when the model is built:
    prompt_version: str = PROMPT_VERSION
    yes_token_id: Optional[int] = None
    no_token_id: Optional[int] = None
    image_token: str = IMAGE_TOKEN
    num_image_tokens: int = 49
    vision_feature_dim: int = TOKEN_DIM  # EfficientNet 1280 + cell colour 10
    lora_target_modules: Optional[str] = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "RankerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source}: unknown ranker settings {sorted(unknown)}")
        config = cls(**data)
        if config.format_version > FORMAT_VERSION:
            raise ValueError(
                f"{source}: ranker format {config.format_version} is newer than this merlin-mllm "
                f"understands ({FORMAT_VERSION}); upgrade merlin-mllm"
            )
        return config

    def validate(self) -> None:
        if self.backend not in (EMBEDDED, "hf"):
            raise ValueError(f"backend must be 'embedded' or 'hf', not {self.backend!r}")
        if self.loss not in ("lm", "binary"):
            raise ValueError(f"loss must be 'lm' or 'binary', not {self.loss!r}")
        if not self.zero_shot and self.lora_r < 1:
            raise ValueError(f"lora_r must be at least 1, not {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), not {self.lora_dropout}")


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


# ---------------------------------------------------------------------------- batch helpers
def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists into ``(input_ids, attention_mask)`` long tensors (B, L).

    The ranker needs right padding: Hugging Face forwards number positions 0..L-1 whatever the
    mask, so left padding would shift every position of the shorter prompts.
    """
    if not sequences:
        raise ValueError("no sequences to pad")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError(f"sequence {lengths.index(0)} is empty")
    ids = torch.full((len(sequences), max(lengths)), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), max(lengths)), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def batch_from_ragged(values: torch.Tensor, offsets: torch.Tensor, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` from a ragged list column (``name__values``, ``name__offsets``).

    This is how ``merlin.dataloader.torch.Loader`` delivers variable-length token-id lists.
    ``offsets`` has B+1 entries (starting at 0).
    """
    offsets = offsets.reshape(-1).long()
    values = values.reshape(-1).long()
    if offsets.numel() < 2 or int(offsets[0]) != 0 or int(offsets[-1]) != values.numel():
        raise ValueError(
            f"offsets must start at 0 and end at len(values)={values.numel()}; got "
            f"{offsets[:1].tolist()}..{offsets[-1:].tolist()} ({offsets.numel()} entries)"
        )
    lengths = offsets[1:] - offsets[:-1]
    if bool((lengths <= 0).any()):
        raise ValueError(f"row {int(torch.nonzero(lengths <= 0)[0])} has no tokens")
    batch, width = lengths.numel(), int(lengths.max())
    mask = (torch.arange(width, device=values.device)[None, :] < lengths[:, None].to(values.device)).long()
    ids = torch.full((batch, width), int(pad_id), dtype=torch.long, device=values.device)
    ids[mask.bool()] = values
    return ids, mask


def _answer_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token; the mask must be right-padded (1...1 0...0)."""
    mask = attention_mask.long()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"row {int(torch.nonzero(lengths == 0)[0])} of the batch is all padding")
    columns = torch.arange(mask.shape[1], device=mask.device)[None, :]
    if not bool((mask == (columns < lengths[:, None]).long()).all()):
        bad = int(torch.nonzero((mask != (columns < lengths[:, None]).long()).any(dim=1))[0])
        raise ValueError(
            f"row {bad} of the batch is not right-padded; pad prompts on the right "
            "(merlin_mllm.ranker.model.pad_right)"
        )
    return lengths - 1


def answer_only_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_ids: torch.Tensor, pad_id: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SFT sequence (prompt + answer token) and labels that mask every prompt position.

    The authors' code also put loss on the prompt tokens; here only the answer counts. The
    ranker's loss (one forward over the prompt, logits at its last position) equals the
    Hugging Face causal-LM loss on the returned ``(ids, mask, labels)``; the tests check that.

    Parameters
    ----------
    input_ids, attention_mask : tensors (B, L)
        Right-padded prompts without the answer.
    answer_ids : tensor (B,)
        The answer token per row (the "Yes" or "No" id).
    pad_id : int
        Fills the padding of the returned ids.

    Returns
    -------
    (ids, mask, labels) : tensors (B, L + 1)
        ``labels`` is ``IGNORE_INDEX`` everywhere except at each row's answer position.
    """
    positions = _answer_positions(attention_mask) + 1  # where the answer token is placed
    batch, length = input_ids.shape
    rows = torch.arange(batch, device=input_ids.device)
    ids = torch.full((batch, length + 1), int(pad_id), dtype=torch.long, device=input_ids.device)
    ids[:, :length] = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, int(pad_id)))
    ids[rows, positions] = answer_ids.to(ids.device).long()
    mask = torch.zeros_like(ids)
    mask[:, :length] = attention_mask.long()
    mask[rows, positions] = 1
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[rows, positions] = answer_ids.to(ids.device).long()
    return ids, mask, labels


def _lora_target_regex(hf_model) -> str:
    """A regex (peft ``target_modules``) matching every nn.Linear of the language model only.

    Vision towers have q/k/v projections too, so names are anchored at the language model's
    module path (``model.language_model``, ``model.text_model``, ``model``).
    """
    decoder = hf_model.get_decoder()
    prefix = next((name for name, module in hf_model.named_modules() if module is decoder), None)
    if prefix is None:
        raise ValueError(f"cannot locate the language model inside {type(hf_model).__name__}")
    leaves = sorted({
        name.rsplit(".", 1)[-1]
        for name, module in decoder.named_modules()
        if isinstance(module, nn.Linear) and name
    })
    if not leaves:
        raise ValueError(f"the language model of {type(hf_model).__name__} has no Linear layers")
    head = re.escape(prefix) + r"\." if prefix else ""
    return head + r"(?:.+\.)?(?:" + "|".join(re.escape(leaf) for leaf in leaves) + ")"


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


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
    projector : ImageProjector or None
        The embedded backend's trainable image projector.
    item_features : ItemImageFeatures or None
        The embedded backend's item image table (not a parameter; set with
        :meth:`set_item_features`).
    """

    def __init__(self, backbone: nn.Module, hf_model: nn.Module, tokenizer, processor,
                 config: RankerConfig, prompt: RankerPrompt, projector: Optional[ImageProjector] = None,
                 item_features: Optional[ItemImageFeatures] = None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.projector = projector
        self.tokenizer = tokenizer
        self.processor = processor
        self.prompt = prompt
        # Kept outside the module tree: the HF model is already registered through backbone.
        object.__setattr__(self, "_hf_model", hf_model)
        self.item_features = item_features
        # Plain attributes, not submodules: the inner model is already registered through
        # backbone, and the vision encoder is a shared, frozen, per-process instance.
        object.__setattr__(self, "_vision_encoder", None)
        object.__setattr__(self, "_inner", hf_model.base_model)  # the model without lm_head
        #: Fold LoRA into the weights for no-grad scoring (see ``_merged_lora``). It keeps a
        #: merged copy of the adapted weights in memory, so it is on for the small embedded
        #: model and off for HF MLLMs by default.
        self.merge_lora_for_scoring = config.backend == EMBEDDED
        self._merged_key = None
        self._merged_weights: List[torch.Tensor] = []
        self._merge_suspended = False
        self._inner_params = set(inspect.signature(self._inner.forward).parameters)
        self._mrope = hasattr(self._inner, "get_rope_index")
        # On the language model's device: `device` (and so every input) follows this buffer.
        self.register_buffer(
            "_answer_ids", torch.tensor([config.no_token_id, config.yes_token_id], dtype=torch.long,
                                        device=hf_model.get_input_embeddings().weight.device),
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
        max_title_tokens: int = 64,
        item_features: Optional[ItemImageFeatures] = None,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
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
        lora_r, lora_alpha, lora_dropout, lora_init, loss, seed, max_summary_tokens, max_title_tokens :
            See :class:`RankerConfig`.
        item_features : ItemImageFeatures, optional
            The embedded backend's item image table (can be set later).
        device, dtype :
            Default: CUDA + bf16 when available, else CPU + fp32.

        Examples
        --------
        >>> ranker = RankerModel.build("embedded", use_images=False)      # doctest: +SKIP
        """
        backend = EMBEDDED if base_model in EMBEDDED_LLM_ALIASES else "hf"
        if backend != EMBEDDED and os.path.isdir(str(base_model)):
            base_model = str(Path(base_model).resolve())
        config = RankerConfig(
            base_model=EMBEDDED if backend == EMBEDDED else str(base_model), backend=backend,
            use_images=use_images, zero_shot=zero_shot, lora_r=lora_r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, lora_init=lora_init, loss=loss, seed=seed,
            max_summary_tokens=max_summary_tokens, max_title_tokens=max_title_tokens,
        )
        return cls._assemble(config, device=device, dtype=dtype, item_features=item_features)

    @classmethod
    def _assemble(cls, config: RankerConfig, *, device, dtype, item_features=None,
                  adapter_dir: Optional[Path] = None, projector_file: Optional[Path] = None,
                  is_trainable: bool = True) -> "RankerModel":
        config.validate()
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        if config.backend == EMBEDDED:
            loaded = load(None, device=device, dtype=dtype, kind="llm")
        else:
            loaded = load(config.base_model, device=device, dtype=dtype)
        hf_model, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.processor

        projector = None
        if config.backend == EMBEDDED:
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
            if config.use_images:
                # Kept in fp32 whatever the base dtype: it trains from scratch, and bf16 would
                # round away AdamW's small updates.
                projector = ImageProjector(config.vision_feature_dim, hidden, seed=config.seed).to(device)
        else:
            if config.use_images and loaded.kind != "mllm":
                raise ValueError(f"{config.base_model} is a text-only LLM: build it with use_images=False")
            image_mode = "processor" if config.use_images else "none"

        prompt = _make_prompt(processor if loaded.kind == "mllm" else tokenizer, image_mode, config)
        no_id, yes_id = prompt.answer_token_ids()
        if config.no_token_id is not None and (config.no_token_id, config.yes_token_id) != (no_id, yes_id):
            raise ValueError(
                f"the saved answer ids (No={config.no_token_id}, Yes={config.yes_token_id}) differ "
                f"from this tokenizer's ({no_id}, {yes_id}): wrong base model?"
            )
        config.no_token_id, config.yes_token_id = no_id, yes_id

        for parameter in hf_model.parameters():
            parameter.requires_grad_(False)
        backbone = hf_model
        if not config.zero_shot:
            from peft import LoraConfig, PeftModel, get_peft_model

            fork_devices = ([device.index if device.index is not None else torch.cuda.current_device()]
                            if device.type == "cuda" else [])
            with torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(config.seed)
                if adapter_dir is not None:
                    backbone = PeftModel.from_pretrained(hf_model, str(adapter_dir), is_trainable=is_trainable)
                    config.lora_target_modules = backbone.peft_config["default"].target_modules
                else:
                    config.lora_target_modules = _lora_target_regex(hf_model)
                    lora_config = LoraConfig(
                        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                        target_modules=config.lora_target_modules, init_lora_weights=config.lora_init,
                        bias="none",
                    )
                    # autocast_adapter_dtype keeps LoRA weights in fp32 under a bf16/fp16 base.
                    backbone = get_peft_model(hf_model, lora_config, autocast_adapter_dtype=True)
        if projector is not None:
            if projector_file is not None:
                from safetensors.torch import load_file

                projector.load_state_dict(load_file(str(projector_file), device=str(device)))
            projector.requires_grad_(not config.zero_shot and is_trainable)

        if config.backend == EMBEDDED and config.use_images and item_features is not None:
            _check_features(item_features, config)
        model = cls(backbone, hf_model, tokenizer, processor, config, prompt, projector, item_features)
        model.eval()
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike],
        *,
        item_features: Optional[ItemImageFeatures] = None,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        is_trainable: bool = False,
    ) -> "RankerModel":
        """Load a ranker saved by :meth:`save_pretrained` (the base model is loaded by name).

        Parameters
        ----------
        path : folder
        item_features : ItemImageFeatures, optional
        device, dtype :
            Default: CUDA + bf16 when available, else CPU + fp32.
        is_trainable : bool
            True to continue training (LoRA and projector get gradients).
        """
        path = Path(path)
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: {path} is not a saved ranker")
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{config_file}: invalid JSON ({exc})") from exc
        config = RankerConfig.from_dict(data, source=str(config_file))
        if config.prompt_version != PROMPT_VERSION:
            raise ValueError(
                f"{config_file}: trained with prompt version {config.prompt_version}, but this "
                f"merlin-mllm writes prompt version {PROMPT_VERSION}; scores would not be comparable"
            )
        adapter_dir = projector_file = None
        if not config.zero_shot:
            adapter_dir = path / ADAPTER_DIR
            if not (adapter_dir / "adapter_config.json").is_file():
                raise FileNotFoundError(f"{adapter_dir}/adapter_config.json not found (LoRA adapter missing)")
        if config.backend == EMBEDDED and config.use_images:
            projector_file = path / PROJECTOR_FILE
            if not projector_file.is_file():
                raise FileNotFoundError(f"{projector_file} not found (image projector weights missing)")
        return cls._assemble(config, device=device, dtype=dtype, item_features=item_features,
                             adapter_dir=adapter_dir, projector_file=projector_file, is_trainable=is_trainable)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> Path:
        """Write the adapter, the projector and the config into ``path`` (base weights are not copied).

        Layout: ``ranker_config.json``, ``adapter/`` (peft ``save_pretrained``: adapter_config.json,
        adapter_model.safetensors), ``projector.safetensors`` (embedded backend with images).
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not self.config.zero_shot:
            # The resized embedding table is frozen and rebuilt on load: never save it.
            self.backbone.save_pretrained(str(path / ADAPTER_DIR), save_embedding_layers=False)
        if self.projector is not None:
            state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.projector.state_dict().items()}
            save_file(state, str(path / PROJECTOR_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    # ------------------------------------------------------------------ facts
    @property
    def hf_model(self) -> nn.Module:
        """The Hugging Face model (with LoRA layers injected in place, when not zero-shot)."""
        return self._hf_model

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

    def set_item_features(self, item_features: Optional[ItemImageFeatures]) -> None:
        """Attach the item image table (embedded backend)."""
        if item_features is not None:
            _check_features(item_features, self.config)
        self.item_features = item_features

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float = 2e-5, projector_lr: Optional[float] = None,
                         weight_decay: float = 0.0) -> List[Dict[str, Any]]:
        """Optimizer parameter groups: LoRA at ``lr``; the projector at ``projector_lr``.

        The projector trains from scratch, so it usually wants a larger rate than LoRA
        (LLaVA trains its projector at 1e-3); default: ``lr``.
        """
        projector_ids = {id(p) for p in self.projector.parameters()} if self.projector is not None else set()
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
            self._drop_merged_weights()  # training uses the unmerged adapters; free the copy
        return super().train(mode)

    # ------------------------------------------------------------------ merged LoRA for scoring
    def _lora_linears(self) -> List[nn.Module]:
        """peft LoRA Linear layers with one plain (non-DoRA) adapter, or [] if any is unusual."""
        layers = [m for m in self.backbone.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
        for layer in layers:
            if list(layer.lora_A.keys()) != ["default"] or getattr(layer, "lora_variant", {}) \
                    or layer.merged or not isinstance(layer.base_layer, nn.Linear):
                return []
        return layers

    def _drop_merged_weights(self) -> None:
        self._merged_key, self._merged_weights = None, []

    @contextlib.contextmanager
    def _merged_lora(self):
        """Run no-grad inference with each LoRA layer folded into its weight: W + s * B @ A.

        Unmerged LoRA adds two small matmuls and several full-size elementwise passes per
        Linear (about 15% of a SmolLM2 forward on CPU). The merged weights are new tensors,
        swapped in and out, so the base weights are restored bit for bit (peft's own
        merge/unmerge would add and subtract in place and drift). The merged copy is cached
        until a LoRA weight changes (tensor version counters tell) or training resumes.
        """
        layers = [] if (self._merge_suspended or not self.merge_lora_for_scoring or self.config.zero_shot
                        or self.training or torch.is_grad_enabled()) else self._lora_linears()
        if not layers:
            yield
            return
        key = tuple(
            (id(t), t._version) for layer in layers
            for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight)
        )
        if key != self._merged_key:
            self._drop_merged_weights()
            with torch.inference_mode(False), torch.no_grad():
                self._merged_weights = [
                    (layer.base_layer.weight.float() + layer.get_delta_weight("default").float())
                    .to(layer.base_layer.weight.dtype)
                    for layer in layers
                ]
            self._merged_key = key
        originals = []
        try:
            for layer, merged in zip(layers, self._merged_weights):
                originals.append(layer.base_layer.weight.data)
                layer.base_layer.weight.data = merged
                layer.merged_adapters.append("default")  # peft then calls base_layer only
            yield
        finally:
            for layer, original in zip(layers, originals):
                layer.base_layer.weight.data = original
                layer.merged_adapters.remove("default")

    # ------------------------------------------------------------------ forward
    def _embed_images(self, input_ids: torch.Tensor, item_ids, image_features) -> torch.Tensor:
        """Token embeddings with projected image features at the placeholder positions."""
        embeds = self.hf_model.get_input_embeddings()(input_ids)
        if self.projector is None:
            return embeds
        placeholder = input_ids == self.image_token_id
        per_row = placeholder.sum(dim=1)
        image_rows = per_row > 0
        if not bool(image_rows.any()):
            if self.training and torch.is_grad_enabled() and self.projector.linear_1.weight.requires_grad:
                # A batch without pictures would leave the projector out of the autograd graph,
                # and DistributedDataParallel then fails ("parameters that did not receive
                # gradients"). An empty projection joins the graph with zero gradients.
                empty = self.projector(embeds.new_zeros((0, self.config.vision_feature_dim), dtype=torch.float32))
                embeds = embeds + empty.sum().to(embeds.dtype)
            return embeds
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
        projected = self.projector(image_features.to(self.device, self.projector.linear_1.weight.dtype))
        return embeds.masked_scatter(placeholder.unsqueeze(-1), projected.to(embeds.dtype))

    def _hidden_states(self, input_ids, attention_mask, *, item_ids=None, image_features=None,
                       image_inputs=None, past_key_values=None, position_ids=None, use_cache=False):
        """Last hidden states (B, L, H) of the language model (and the cache)."""
        kwargs = dict(attention_mask=attention_mask, past_key_values=past_key_values, use_cache=use_cache)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self.config.backend == EMBEDDED:
            kwargs["inputs_embeds"] = self._embed_images(input_ids, item_ids, image_features)
        else:
            kwargs["input_ids"] = input_ids
            for key, value in (image_inputs or {}).items():
                if key in self._inner_params and value is not None:
                    kwargs[key] = value.to(self.device) if hasattr(value, "to") else value
        outputs = self._inner(**kwargs)
        return outputs.last_hidden_state, outputs.past_key_values

    def _answer_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (B, V) for the gathered answer-position rows only."""
        return self.hf_model.get_output_embeddings()(hidden_rows).float()

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
        positions = _answer_positions(attention_mask)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with self._merged_lora():
            hidden, _ = self._hidden_states(input_ids, attention_mask, item_ids=item_ids,
                                            image_features=image_features, image_inputs=image_inputs)
            rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]
            vocab_logits = self._answer_logits(rows)
        output = RankerOutput(logits=vocab_logits[:, self._answer_ids], vocab_logits=vocab_logits)
        if labels is not None:
            output.loss = self.compute_loss(output, labels)
        return output

    def compute_loss(self, output: RankerOutput, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the answer token only (mean over the batch).

        ``loss="lm"``: NLL of the answer token over the whole vocabulary (equal to the HF
        causal-LM loss with :func:`answer_only_labels`). ``loss="binary"``: CE over [No, Yes].
        """
        labels = torch.as_tensor(labels, device=output.logits.device).reshape(-1)
        if labels.numel() != output.logits.shape[0]:
            raise ValueError(f"{labels.numel()} labels for a batch of {output.logits.shape[0]}")
        if bool(((labels != 0) & (labels != 1)).any()):
            raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()))}")
        targets = labels.long()
        if self.config.loss == "binary" or output.vocab_logits is None:
            return F.cross_entropy(output.logits.float(), targets)
        return F.cross_entropy(output.vocab_logits.float(), self._answer_ids[targets])

    def answer_ids_for(self, labels: torch.Tensor) -> torch.Tensor:
        """The answer token id per label (1 -> "Yes", 0 -> "No")."""
        return self._answer_ids.to(torch.as_tensor(labels).device)[torch.as_tensor(labels).long()]

    # ------------------------------------------------------------------ text-level batches
    def _resolve_candidates(self, candidates: Sequence[Any]) -> Tuple[List[Candidate], List[bool], Optional[torch.Tensor]]:
        """Candidates, whether each prompt shows an image, and (embedded) their grids in order."""
        candidates = [Candidate.coerce(c, i) for i, c in enumerate(candidates)]
        if not self.config.use_images:
            return candidates, [False] * len(candidates), None
        if self.config.backend != EMBEDDED:
            from merlin_mllm.images import is_missing

            return candidates, [not is_missing(c.image) for c in candidates], None
        from merlin_mllm.images import is_missing

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
            encoded = self._encoder().grid([grids[i] for i in to_encode]).cpu()
            for slot, grid in zip(to_encode, encoded):
                grids[slot] = grid
        stacked = torch.stack([g.float() for g in grids]) if grids else None
        return candidates, shows, stacked

    def _encoder(self):
        if self._vision_encoder is None:
            from merlin_mllm.models.vision import VisionEncoder

            object.__setattr__(self, "_vision_encoder", VisionEncoder.load(self.device))
        return self._vision_encoder

    def encode(self, summaries: Sequence[str], candidates: Sequence[Any]):
        """Encoded prompts plus image inputs for (summary, candidate) pairs.

        Returns
        -------
        (prompts, image_features, image_inputs)
            ``prompts``: list of :class:`EncodedPrompt`; ``image_features``: the embedded
            backend's grids for the prompts with images (or None); ``image_inputs``: the HF
            processor's tensors (or {}).
        """
        candidates, shows, grids = self._resolve_candidates(candidates)
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
        for key, value in image_inputs.items():
            if key in _PER_TOKEN_KEYS:
                batch[key], _ = pad_right(value, 0)
            else:
                batch[key] = value
        if labels is not None:
            batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
        return batch

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        candidates = list(candidates)
        scores = np.zeros(len(candidates), dtype=np.float64)
        prefix_caches: Dict[Tuple[int, ...], Any] = {}
        for start, chunk in _chunks(candidates, batch_size):
            prompts, grids, image_inputs = self.encode([user_summary] * len(chunk), chunk)
            # The user part (system + summary) is the same for every batch of this user, so its
            # cache is computed once; the tokenizer-level split was made by RankerPrompt.
            prefix_len = min(self._prefix_length(prompts), min(p.prefix_len for p in prompts))
            scores[start:start + len(chunk)] = self._score_shared_prefix(
                prompts, prefix_len, grids, image_inputs, prefix_caches)
        return scores

    @torch.inference_mode()
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
        prompts = [EncodedPrompt(list(map(int, ids)), 0, False) for ids in prompt_ids]
        if item_ids is not None and len(item_ids) != len(prompts):
            raise ValueError(f"{len(item_ids)} item ids for {len(prompts)} prompts")
        scores = np.zeros(len(prompts), dtype=np.float64)
        if not prompts:
            return scores
        # Found once over all candidates, so every batch reuses the same prefix cache.
        prefix_len = self._prefix_length(prompts)
        caches: Dict[Tuple[int, ...], Any] = {}
        for start, chunk in _chunks(prompts, batch_size):
            chunk_items = None if item_ids is None else list(item_ids[start:start + len(chunk)])
            scores[start:start + len(chunk)] = self._score_shared_prefix(
                chunk, prefix_len, None, {}, caches, item_ids=chunk_items)
        return scores

    @torch.inference_mode()
    def score_users_token_ids(self, users: Sequence[Tuple[Sequence[Sequence[int]], Optional[Sequence[int]]]],
                              *, batch_size: int = 32) -> List[np.ndarray]:
        """P(yes) for several users' candidates at once (e.g. a dynamic batch of serving requests).

        Each user's prompt prefix is computed once, as in :meth:`score_token_ids`; then the
        candidates of *all* users go through the model together, ``batch_size`` rows per
        forward pass. A row attends only to its own user's cached prefix: prefixes are
        right-padded to the longest one in the pass with the padding masked out, and each row's
        positions continue from its own prefix length. The scores equal per-user scoring up to
        float rounding, but the matrix products are larger, which keeps a GPU busy.

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
        if len(users) <= 1 or self._mrope:
            # 3-D rotary models (Qwen2-VL) number positions by image grid, so they are scored
            # one user at a time.
            return [self.score_token_ids(p, None if i is None else list(i), batch_size=batch_size) for p, i in users]
        caches: Dict[Tuple[int, ...], Any] = {}
        prefixes = []  # per user: (prefix length, per-layer (keys, values) or None)
        rows = []  # (user index, prompt ids, item id or None)
        for user, (prompt_ids, item_ids) in enumerate(users):
            encoded = [EncodedPrompt([int(t) for t in p], 0, False) for p in prompt_ids]
            if item_ids is not None and len(item_ids) != len(encoded):
                raise ValueError(f"user {user}: {len(item_ids)} item ids for {len(encoded)} prompts")
            length = self._prefix_length(encoded) if encoded else 0
            with self._merged_lora():
                layers = self._prefix_cache(encoded[0].input_ids[:length], caches) if length > 0 else None
            prefixes.append((length, layers))
            items = [None] * len(encoded) if item_ids is None else [int(i) for i in item_ids]
            rows.extend((user, p.input_ids, item) for p, item in zip(encoded, items))
        scores = np.zeros(len(rows), dtype=np.float64)
        for start, chunk in _chunks(rows, batch_size):
            with self._merged_lora():
                scores[start:start + len(chunk)] = self._score_rows_of_users(chunk, prefixes)
        out, offset = [], 0
        for prompt_ids, _ in users:
            out.append(scores[offset:offset + len(prompt_ids)])
            offset += len(prompt_ids)
        return out

    def _score_rows_of_users(self, chunk, prefixes) -> np.ndarray:
        """One forward pass over candidate rows of different users (see :meth:`score_users_token_ids`)."""
        from transformers import DynamicCache

        device = self.device
        lengths = [prefixes[user][0] for user, _, _ in chunk]
        longest = max(lengths)
        cand_ids, cand_mask = pad_right([ids[length:] for (_, ids, _), length in zip(chunk, lengths)],
                                        self.pad_token_id, device)
        past = None
        if longest > 0:
            # Per layer: each user's prefix keys/values right-padded to `longest` once, stacked,
            # then gathered per row (a few large copies instead of one per row and layer).
            users = sorted({user for user, _, _ in chunk})
            slot = {user: index for index, user in enumerate(users)}
            rows_of = torch.tensor([slot[user] for user, _, _ in chunk], device=device)
            template = next(prefixes[user][1] for user in users if prefixes[user][1] is not None)
            layers = []
            for layer, (keys, values) in enumerate(template):
                stacked = []
                for tensor_index, like in ((0, keys), (1, values)):
                    per_user = like.new_zeros((len(users), like.shape[1], longest, like.shape[3]))
                    for index, user in enumerate(users):
                        length, cached = prefixes[user]
                        if cached is not None:
                            per_user[index, :, :length] = cached[layer][tensor_index][0]
                    stacked.append(per_user.index_select(0, rows_of))
                layers.append(tuple(stacked))
            past = DynamicCache(ddp_cache_data=layers, config=self.hf_model.config)
        prefix_len = torch.tensor(lengths, device=device)
        prefix_mask = (torch.arange(longest, device=device)[None, :] < prefix_len[:, None]).long()
        full_mask = torch.cat([prefix_mask, cand_mask], dim=1)
        # Each row continues from its own prefix length, not from the padded one.
        position_ids = prefix_len[:, None] + torch.arange(cand_ids.shape[1], device=device)[None, :]
        items = [item for _, _, item in chunk]
        item_ids = None if any(item is None for item in items) else torch.tensor(items, dtype=torch.long)
        hidden, _ = self._hidden_states(cand_ids, full_mask, item_ids=item_ids, past_key_values=past,
                                        position_ids=position_ids, use_cache=past is not None)
        positions = cand_mask.sum(dim=1) - 1
        answer = hidden[torch.arange(len(chunk), device=hidden.device), positions]
        logits = self._answer_logits(answer)[:, self._answer_ids]
        return torch.softmax(logits, dim=-1)[:, 1].double().cpu().numpy()

    def _prefix_length(self, prompts: Sequence[EncodedPrompt]) -> int:
        """Tokens shared by all prompts, leaving each at least its last token to compute."""
        first = prompts[0].input_ids
        length = len(first) - 1
        for prompt in prompts:
            length = min(length, common_prefix_length(first, prompt.input_ids), len(prompt.input_ids) - 1)
        if self.image_token_id is not None:
            # Image tokens must be computed with their features, never read from a prefix cache.
            for index, token in enumerate(first[:length]):
                if token == self.image_token_id:
                    return index
        return max(length, 0)

    def _prefix_cache(self, prefix_ids: List[int], caches: Dict[Tuple[int, ...], Any]):
        """Per-layer (keys, values) of the shared prefix, computed once per distinct prefix."""
        key = tuple(prefix_ids)
        if key not in caches:
            ids = torch.tensor([prefix_ids], dtype=torch.long, device=self.device)
            mask = torch.ones_like(ids)
            position_ids = None
            if self._mrope:
                position_ids = torch.arange(len(prefix_ids), device=self.device).view(1, 1, -1).expand(3, 1, -1)
            _, cache = self._hidden_states(ids, mask, position_ids=position_ids, use_cache=True)
            caches[key] = [(layer.keys, layer.values) for layer in cache.layers]
        return caches[key]

    def _score_shared_prefix(self, prompts: List[EncodedPrompt], prefix_len: int, grids, image_inputs, caches,
                             item_ids=None) -> np.ndarray:
        """P(yes) for prompts sharing their first ``prefix_len`` tokens (one batch)."""
        with self._merged_lora():
            return self._score_batch(prompts, prefix_len, grids, image_inputs, caches, item_ids)

    def _score_batch(self, prompts, prefix_len, grids, image_inputs, caches, item_ids) -> np.ndarray:
        from transformers import DynamicCache

        count = len(prompts)
        per_token = {k: v for k, v in image_inputs.items() if k in _PER_TOKEN_KEYS}
        pixel_inputs = {k: v for k, v in image_inputs.items() if k not in _PER_TOKEN_KEYS}
        cand_ids, cand_mask = pad_right([p.input_ids[prefix_len:] for p in prompts], self.pad_token_id, self.device)
        position_ids = None
        if self._mrope:
            position_ids = self._mrope_positions(prompts, per_token, pixel_inputs)[..., prefix_len:]
        for key, lists in per_token.items():
            pixel_inputs[key], _ = pad_right([row[prefix_len:] for row in lists], 0, self.device)
        past = None
        if prefix_len > 0:
            layers = self._prefix_cache(prompts[0].input_ids[:prefix_len], caches)
            # A fresh cache per batch: forwarding appends the candidates' keys/values to it in
            # place, and batch_repeat_interleave replaces its tensors; the stored prefix
            # tensors themselves are never modified.
            past = DynamicCache(ddp_cache_data=layers, config=self.hf_model.config)
            past.batch_repeat_interleave(count)
        # The mask spans prefix + candidate columns; without the prefix part, the candidate
        # tokens would not attend to the cached prefix correctly.
        full_mask = torch.cat([torch.ones((count, prefix_len), dtype=torch.long, device=self.device), cand_mask], dim=1)
        hidden, _ = self._hidden_states(
            cand_ids, full_mask, item_ids=item_ids, image_features=grids, image_inputs=pixel_inputs,
            past_key_values=past, position_ids=position_ids, use_cache=past is not None,
        )
        positions = cand_mask.sum(dim=1) - 1
        rows = hidden[torch.arange(count, device=hidden.device), positions]
        logits = self._answer_logits(rows)[:, self._answer_ids]
        return torch.softmax(logits, dim=-1)[:, 1].double().cpu().numpy()

    def _mrope_positions(self, prompts, per_token, pixel_inputs) -> torch.Tensor:
        """3-D rotary positions (3, B, L) of the full prompts (Qwen2-VL style models).

        Such models number image tokens by their grid cell, so candidate positions cannot be
        inferred from the cache length; they are computed over prefix + candidate and sliced.
        """
        ids, mask = pad_right([p.input_ids for p in prompts], self.pad_token_id, self.device)
        if "mm_token_type_ids" in per_token:
            types, _ = pad_right(per_token["mm_token_type_ids"], 0, self.device)
        else:
            types = torch.zeros_like(ids)
        rope_kwargs = dict(input_ids=ids, mm_token_type_ids=types, attention_mask=mask)
        if pixel_inputs.get("image_grid_thw") is not None:
            rope_kwargs["image_grid_thw"] = pixel_inputs["image_grid_thw"].to(self.device)
        positions, _ = self._inner.get_rope_index(**rope_kwargs)
        return positions

    @torch.inference_mode()
    def score_independent(self, user_summary: str, candidates: Sequence[Any]) -> np.ndarray:
        """Reference scores: one full forward per candidate (no cache, no padding, batch of 1),
        with LoRA computed unmerged, as in training."""
        scores = []
        self._merge_suspended = True
        try:
            for candidate in candidates:
                batch = self.make_batch([user_summary], [candidate])
                scores.append(float(self(**batch).probs[0]))
        finally:
            self._merge_suspended = False
        return np.asarray(scores, dtype=np.float64)

    @torch.inference_mode()
    def score_generate(self, user_summary: str, candidates: Sequence[Any], *, max_new_tokens: int = 30
                       ) -> Tuple[np.ndarray, int]:
        """The authors' way: ``generate()`` per candidate, P(yes) from the first step's logits.

        Returns
        -------
        (scores, new_tokens) : (np.ndarray, int)
            P(yes) per candidate and the total number of generated tokens.
        """
        scores, new_tokens = [], 0
        for candidate in candidates:
            batch = self.make_batch([user_summary], [candidate])
            kwargs = dict(attention_mask=batch["attention_mask"].to(self.device), max_new_tokens=max_new_tokens,
                          do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=self.pad_token_id)
            if self.config.backend == EMBEDDED:
                kwargs["inputs_embeds"] = self._embed_images(batch["input_ids"].to(self.device), None,
                                                             batch.get("image_features"))
            else:
                kwargs["input_ids"] = batch["input_ids"].to(self.device)
                for key, value in batch.items():
                    if key not in ("input_ids", "attention_mask", "labels"):
                        kwargs[key] = value.to(self.device) if hasattr(value, "to") else value
            # Same weights path as score() (merged LoRA when enabled), so timings compare methods.
            with self._merged_lora():
                out = self.hf_model.generate(**kwargs)
            first = out.logits[0][0].float()[self._answer_ids]
            scores.append(float(torch.softmax(first, dim=-1)[1]))
            new_tokens += len(out.logits)
        return np.asarray(scores, dtype=np.float64), new_tokens


def _make_prompt(processor, image_mode: str, config: RankerConfig) -> RankerPrompt:
    return RankerPrompt.create(
        processor, image_mode=image_mode, num_image_tokens=config.num_image_tokens,
        image_token=config.image_token, max_summary_tokens=config.max_summary_tokens,
        max_title_tokens=config.max_title_tokens,
    )


def _check_features(table: ItemImageFeatures, config: RankerConfig) -> None:
    if len(table) and (table.num_tokens, table.feature_dim) != (config.num_image_tokens, config.vision_feature_dim):
        raise ValueError(
            f"item image table has {table.num_tokens}x{table.feature_dim} grids; this ranker expects "
            f"{config.num_image_tokens}x{config.vision_feature_dim}"
        )
