"""The interface between :class:`~merlin_mllm.ranker.model.RankerModel` and one model family.

A backend owns a loaded Hugging Face model and knows how that family's prompts reach its
language model: how images enter (projected item grids, or the processor's pixel tensors),
which extra inputs a forward pass takes, and how positions are numbered. The ranker, its
scorers (:mod:`merlin_mllm.ranker.scoring`) and the Merlin block call only the methods below,
so adding a model family means adding one subclass and naming it in
:mod:`merlin_mllm.ranker.backend_registry`.

Interface
---------
Class level (before any weights load):
    ``name``, ``canonical_base_model(base_model)``, ``load(config, device=, dtype=)``,
    ``uses_item_images(config)``, ``merges_lora_for_scoring``, ``images_without_training``.
Instance:
    ``hf_model``, ``tokenizer``, ``processor``, ``prompt``, ``projector``, ``item_features``,
    ``device``, ``image_rows(candidates)``, ``batch_inputs(image_inputs)``,
    ``hidden_states(...)`` (over the subclass's ``model_inputs(...)``), ``answer_logits(rows)``,
    ``generate_inputs(batch)``,
    ``prefix_position_ids(length)``, ``candidate_inputs(prompts, prefix_len, image_inputs)``,
    ``scores_users_together``.
Packed candidate groups (:mod:`merlin_mllm.ranker.packing`):
    ``packing_limit()`` (why this family cannot pack, or None), ``supports_packing``,
    ``attention_implementation``, ``packed_hidden_states(...)`` (over ``packed_model_inputs``),
    ``answer_pair_logits(rows, answer_ids)``.
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from merlin_mllm.image_loading import is_missing
from merlin_mllm.ranker.ranker_config import RankerConfig
from merlin_mllm.ranker.image_features import ItemImageFeatures
from merlin_mllm.ranker.packing import MASKABLE_ATTENTION, attention_mask_for
from merlin_mllm.ranker.prompt import Candidate, EncodedPrompt, RankerPrompt

__all__ = ["RankerBackend"]


def without_lm_head(hf_model: nn.Module) -> nn.Module:
    """The model under its lm_head: ``base_model``, or ``.model`` where that is empty.

    transformers 4.x gives the LLaVA-style ``...ForConditionalGeneration`` classes an empty
    ``base_model_prefix``, so their ``base_model`` is the whole model (5.x: its ``.model``).
    """
    inner = hf_model.base_model
    if inner is hf_model and isinstance(getattr(hf_model, "model", None), nn.Module):
        return hf_model.model
    return inner


class RankerBackend:
    """One model family behind the ranker: a loaded model and how its inputs are made.

    Build it with the subclass's :meth:`load`. The base class holds what every family shares:
    the forward pass to the language model's last hidden states and the answer logits.

    Parameters
    ----------
    config : RankerConfig
    hf_model : nn.Module
        The Hugging Face model (LoRA layers are later injected into it in place).
    tokenizer, processor :
        Its tokenizer and processor (the tokenizer again for text LLMs).
    image_mode : {"placeholder", "processor", "none"}
        How the prompt shows images (see :mod:`merlin_mllm.ranker.prompt`).
    prompt_processor :
        What :class:`RankerPrompt` renders with (the processor of an MLLM, else the tokenizer).
    projector : nn.Module, optional
        A trainable image projector (the embedded backend with images).
    """

    #: ``RankerConfig.backend`` of this family.
    name: ClassVar[str] = ""
    #: Default of ``RankerModel.merge_lora_for_scoring``: the merged copy costs one copy of the
    #: language model's Linear weights, cheap for small models only.
    merges_lora_for_scoring: ClassVar[bool] = False
    #: Whether a zero-shot (untrained) ranker can show images usefully.
    images_without_training: ClassVar[bool] = True
    #: Whether candidates of several users may share one forward pass (positions per row).
    scores_users_together: bool = True

    def __init__(self, config: RankerConfig, hf_model: nn.Module, tokenizer, processor, *, image_mode: str,
                 prompt_processor, projector: Optional[nn.Module] = None):
        self.config = config
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.processor = processor
        self.projector = projector
        #: The ranker's prompt for this model, with the config's token budgets.
        self.prompt = RankerPrompt.create(
            prompt_processor, image_mode=image_mode, num_image_tokens=config.num_image_tokens,
            image_token=config.image_token, max_summary_tokens=config.max_summary_tokens,
            max_title_tokens=config.max_title_tokens, version=config.prompt_version,
            **({"collab_tokens": True} if config.collab_tokens else {}),
        )
        self.item_features: Optional[ItemImageFeatures] = None
        #: The collaborative tokens' projector and item embedding table (``config.collab_tokens``;
        #: families that take them set the projector in ``load``).
        self.collab_projector: Optional[nn.Module] = None
        self.collab_embeddings = None
        #: The model without its lm_head (LoRA layers, once attached, are injected inside it).
        self.inner = without_lm_head(hf_model)
        # The forward's keyword names: processor outputs it does not take are dropped.
        self.inner_params = set(inspect.signature(self.inner.forward).parameters)

    # ------------------------------------------------------------------ class level
    @classmethod
    def canonical_base_model(cls, base_model: str) -> str:
        """The ``base_model`` name saved in the config."""
        return str(base_model)

    @classmethod
    def load(cls, config: RankerConfig, *, device: torch.device, dtype: torch.dtype) -> "RankerBackend":
        """Load the base model of ``config`` and prepare it for this family (no LoRA yet)."""
        raise NotImplementedError

    @classmethod
    def uses_item_images(cls, config: RankerConfig) -> bool:
        """True when image tokens come from the item image table (by item id) through a
        trained projector, saved as ``projector.safetensors``."""
        return False

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return self.hf_model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ inputs
    def image_rows(self, candidates: Sequence[Candidate]) -> Tuple[List[bool], Optional[torch.Tensor]]:
        """Whether each candidate's prompt shows an image, and the image grids of those that do
        (None when the pictures travel as the processor's pixel tensors)."""
        return [not is_missing(c.image) for c in candidates], None

    def batch_inputs(self, image_inputs: Dict[str, Any]) -> Dict[str, Any]:
        """The processor's image inputs as entries of a right-padded forward batch."""
        return dict(image_inputs)

    def model_inputs(self, input_ids: torch.Tensor, *, item_ids=None, image_features=None,
                     image_inputs=None) -> Dict[str, Any]:
        """The token inputs of a forward pass (``input_ids`` or ``inputs_embeds``, plus images)."""
        raise NotImplementedError

    def generate_inputs(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """The inputs of ``hf_model.generate`` for a batch from ``RankerModel.make_batch``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ positions
    def prefix_position_ids(self, length: int) -> Optional[torch.Tensor]:
        """Position ids of a shared prompt prefix of ``length`` tokens (None: the default 0..n-1)."""
        return None

    def candidate_inputs(self, prompts: Sequence[EncodedPrompt], prefix_len: int,
                         image_inputs: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[torch.Tensor]]:
        """Image inputs and position ids for the candidate parts (after ``prefix_len``) of
        ``prompts`` whose prefix is read from a cache (position ids None: continue from it)."""
        return dict(image_inputs), None

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids, attention_mask, *, item_ids=None, image_features=None,
                      image_inputs=None, past_key_values=None, position_ids=None, use_cache=False):
        """Last hidden states (B, L, H) of the language model (and the cache)."""
        kwargs = dict(attention_mask=attention_mask, past_key_values=past_key_values, use_cache=use_cache)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        kwargs.update(self.model_inputs(input_ids, item_ids=item_ids, image_features=image_features,
                                        image_inputs=image_inputs))
        outputs = self.inner(**kwargs)
        return outputs.last_hidden_state, outputs.past_key_values

    def answer_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (B, V) for the gathered answer-position rows only."""
        return self.hf_model.get_output_embeddings()(hidden_rows).float()

    def answer_pair_logits(self, hidden_rows: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) of the answer tokens only: two rows of lm_head instead of the vocabulary.

        Computed in fp32 whatever the model's precision (outside any autocast): two rows cost
        nothing, and a bf16 logit (8 bits of mantissa, a step of 0.06 at a logit of 10) would
        round P(yes) to a few dozen distinct values.
        """
        head = self.hf_model.get_output_embeddings()
        bias = None if getattr(head, "bias", None) is None else head.bias[answer_ids].float()
        with torch.autocast(device_type=hidden_rows.device.type, enabled=False):
            return F.linear(hidden_rows.float(), head.weight[answer_ids].float(), bias)

    # ------------------------------------------------------------------ packed groups
    @property
    def attention_implementation(self) -> str:
        """The language model's attention implementation (``config._attn_implementation``)."""
        return str(self.hf_model.get_decoder().config._attn_implementation)

    def packing_limit(self) -> Optional[str]:
        """Why this model cannot run packed candidate groups (a block attention mask and
        per-candidate positions in one row), or None when it can."""
        if self.attention_implementation not in MASKABLE_ATTENTION:
            return (f"attention implementation {self.attention_implementation!r} takes no custom 4-D mask "
                    f"(packing needs one of {MASKABLE_ATTENTION})")
        return None

    @property
    def supports_packing(self) -> bool:
        """Whether candidate groups can run packed (else the shared-prefix KV path runs them)."""
        return self.packing_limit() is None

    def packed_model_inputs(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor] = None
                            ) -> Dict[str, Any]:
        """The token inputs of a packed forward; ``image_features``: one grid per image block of
        placeholders, in reading order (families with item image tables only)."""
        if image_features is not None and len(image_features):
            raise ValueError(f"the {self.name} backend takes no image grids in packed rows")
        return self.model_inputs(input_ids)

    def packed_hidden_states(self, input_ids: torch.Tensor, allowed: torch.Tensor, position_ids: torch.Tensor,
                             image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last hidden states (G, L, H) of packed rows.

        Parameters
        ----------
        input_ids, position_ids : tensors (G, L)
        allowed : tensor (G, 1, L, L) bool
            :func:`~merlin_mllm.ranker.packing.block_attention_mask`.
        image_features : tensor (M, 49, D), optional
            See :meth:`packed_model_inputs`.
        """
        inputs = self.packed_model_inputs(input_ids, image_features)
        mask = attention_mask_for(allowed, self.attention_implementation,
                                  self.hf_model.get_input_embeddings().weight.dtype)
        outputs = self.inner(attention_mask=mask, position_ids=position_ids, use_cache=False, **inputs)
        return outputs.last_hidden_state
