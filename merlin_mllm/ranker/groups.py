"""Forward passes over candidate groups: one user's prefix, its positive and its negatives.

Two ways compute the same answer logits, each candidate seeing its own full prompt:

``"packed"`` (:func:`packed_answer_rows`)
    One row per group: prefix + every candidate part, a block attention mask and per-candidate
    positions (:mod:`merlin_mllm.ranker.packing`); the answer is read at each candidate's last
    token. One forward for a whole batch of groups.
``"expanded"`` (:func:`expanded_answer_rows`)
    The prefix runs once (with gradients when training), its KV cache is repeated over the
    group's candidates (``DynamicCache.batch_repeat_interleave``), and the candidate parts run
    as one right-padded batch after it, as the shared-prefix scorer does. Two forwards per group.

Which one trains is decided by measurement (``benchmarks/bench_training.py``, results in
``benchmarks/speed/training.json``): on the 2-core CPU (one thread, a busy machine), SmolLM2-135M with
LoRA r=8 and AdamW, prompt version 2 groups of 1 + 7 ML-100k candidates (131 prefix tokens, 17
per candidate), forward + backward + step ran 1.53 candidate rows/s packed and 1.29 expanded
(packing 1.18x faster; independent rows of prompt version 1 at batch 8: 0.36). Both compute the
same 267 tokens; the expansion pays for a second forward with small matrices (8 rows of 17
tokens), for copying the prefix's keys and values per candidate and summing their gradients
back, more than packing pays for its (prefix + candidates)^2 masked attention at these lengths;
it also saved 30% more activations for backward (1,447 against 1,114 MiB). So packing is the
default (:data:`DEFAULT_PATH`). A family that cannot take a custom mask or per-candidate
positions (mrope, processor images; see ``RankerBackend.packing_limit``) always runs
``"expanded"``, with one ``log.info`` line naming the family and the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

import torch

from merlin_mllm.ranker.batches import pad_right
from merlin_mllm.ranker.losses import check_loss_name, group_loss
from merlin_mllm.ranker.packing import CandidateGroup, block_attention_mask, pack_groups
from merlin_mllm.ranker.prompt import Candidate, EncodedPrompt

if TYPE_CHECKING:  # for annotations only: the model module imports this one
    from merlin_mllm.ranker.model import RankerModel

__all__ = ["GroupOutput", "PATHS", "DEFAULT_PATH", "make_group", "forward_groups", "group_path",
           "packed_answer_rows", "expanded_answer_rows", "candidate_hidden", "last_rows"]

log = logging.getLogger(__name__)

#: The two ways of running a group (see the module docstring).
PATHS = ("packed", "expanded")
#: The path groups take when the backend can pack (chosen by measurement, see the docstring).
DEFAULT_PATH = "packed"


@dataclass
class GroupOutput:
    """What :func:`forward_groups` returns: one row per candidate, groups one after another.

    Attributes
    ----------
    logits : tensor (N, 2)
        [No, Yes] at each candidate's answer position (float32).
    group_index : tensor (N,) long
        The group of each candidate.
    labels : tensor (N,) long, optional
        The candidates' labels, when every group had them.
    loss : tensor (), optional
        The loss, when labels were given.
    vocab_logits : tensor (N, V), optional
        The full answer-position logits (computed for the "lm" loss only).
    path : str
        Which way ran ("packed" or "expanded").
    """

    logits: torch.Tensor
    group_index: torch.Tensor
    labels: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    vocab_logits: Optional[torch.Tensor] = field(default=None, repr=False)
    path: str = DEFAULT_PATH

    @property
    def probs(self) -> torch.Tensor:
        """P(yes) = softmax([logit_No, logit_Yes])[1], shape (N,)."""
        return torch.softmax(self.logits.float(), dim=-1)[:, 1]


def make_group(ranker: "RankerModel", summary: str, candidates: Sequence[Any],
               labels: Optional[Sequence[int]] = None) -> CandidateGroup:
    """One user's group from text, with the ranker's own prompt (and its prompt version).

    Parameters
    ----------
    summary : str
        The user summary.
    candidates : list of Candidate, str or dict
        The candidates (title, image and/or item_id), e.g. the positive first, then negatives.
    labels : list of int, optional
        1 = positive, 0 = negative.
    """
    candidates = [Candidate.coerce(c, i) for i, c in enumerate(candidates)]
    prompts, grids, image_inputs = ranker.encode([summary] * len(candidates), candidates)
    item_ids = [c.item_id for c in candidates]
    return CandidateGroup.from_prompts(prompts, ranker.image_token_id, item_ids=item_ids, labels=labels,
                                       image_features=grids, image_inputs=image_inputs)


def group_path(ranker: "RankerModel", path: Optional[str] = None) -> str:
    """The path groups run on: ``path`` (default :data:`DEFAULT_PATH`), unless the backend cannot
    pack, which is logged once per ranker."""
    path = DEFAULT_PATH if path is None else path
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    if path == "packed" and not ranker.backend.supports_packing:
        backend = ranker.backend
        if not getattr(backend, "packing_fallback_logged", False):
            log.info("ranker family %s (%s backend) cannot pack candidate groups: %s; groups run on the "
                     "shared-prefix KV path instead", backend.hf_model.config.model_type, backend.name,
                     backend.packing_limit())
            backend.packing_fallback_logged = True
        return "expanded"
    return path


def forward_groups(ranker: "RankerModel", groups: Sequence[CandidateGroup], *, loss: Optional[str] = None,
                   path: Optional[str] = None) -> GroupOutput:
    """Answer logits of every candidate of ``groups`` (and the loss, when every group has labels).

    Parameters
    ----------
    groups : list of CandidateGroup
        E.g. from :func:`make_group` or ``CandidateGroup.from_prompts``.
    loss : {"lm", "binary", "listwise"}, optional
        Default: ``ranker.config.loss``.
    path : {"packed", "expanded"}, optional
        Default :data:`DEFAULT_PATH`; "expanded" whatever is asked when the backend cannot pack.
    """
    groups = list(groups)
    if not groups:
        raise ValueError("no candidate groups")
    loss = check_loss_name(ranker.config.loss if loss is None else loss)
    path = group_path(ranker, path)
    labelled = all(g.labels is not None for g in groups)
    full_vocab = labelled and loss == "lm"
    with ranker.merged_lora(), ranker.autocast():
        rows = packed_answer_rows(ranker, groups) if path == "packed" else expanded_answer_rows(ranker, groups)
        if full_vocab:
            vocab_logits = ranker.backend.answer_logits(rows)
            logits = vocab_logits[:, ranker.answer_token_ids]
        else:
            vocab_logits = None
            logits = ranker.backend.answer_pair_logits(rows, ranker.answer_token_ids)
    group_index = torch.cat([torch.full((g.size,), index, dtype=torch.long) for index, g in enumerate(groups)])
    output = GroupOutput(logits=logits, group_index=group_index.to(logits.device), vocab_logits=vocab_logits,
                         path=path)
    if labelled:
        output.labels = torch.tensor([label for g in groups for label in g.labels], dtype=torch.long,
                                     device=logits.device)
        output.loss = group_loss(loss, logits=logits, labels=output.labels, group_index=output.group_index,
                                 vocab_logits=vocab_logits, answer_ids=ranker.answer_token_ids)
    return output


def _group_image_grids(ranker: "RankerModel", groups: Sequence[CandidateGroup], image_candidates: List[int]):
    """The grids of the candidates with image tokens, in packed reading order (or None)."""
    if not image_candidates:
        return None
    wanted, grids, flat = set(image_candidates), [], 0
    for group in groups:
        showing = [flat + i for i in range(group.size) if flat + i in wanted]
        if group.image_features is not None:
            if len(group.image_features) != len(showing):
                raise ValueError(f"{len(group.image_features)} image grids for {len(showing)} candidates with images")
            grids.append(group.image_features)
        elif showing:
            items = [None if group.item_ids is None else group.item_ids[i - flat] for i in showing]
            grids.append(ranker.backend.item_grids(items))
        flat += group.size
    return torch.cat([g.float() for g in grids])


def packed_answer_rows(ranker: "RankerModel", groups: Sequence[CandidateGroup]) -> torch.Tensor:
    """Hidden states (N, H) at every candidate's answer position, all groups in one packed forward."""
    packed = pack_groups(groups, ranker.pad_token_id, image_token_id=ranker.image_token_id, device=ranker.device)
    grids = _group_image_grids(ranker, groups, packed.image_candidates)
    hidden = ranker.backend.packed_hidden_states(packed.input_ids, block_attention_mask(packed.segment_ids),
                                                 packed.position_ids, image_features=grids)
    return hidden[packed.answer_rows, packed.answer_columns]


def candidate_hidden(ranker: "RankerModel", prompts: Sequence[EncodedPrompt], prefix_len: int, past, *,
                     grids=None, image_inputs=None, item_ids=None):
    """Hidden states of candidate parts (after ``prefix_len``) run after a prefix cache.

    Parameters
    ----------
    prompts : list of EncodedPrompt
        Full prompts sharing their first ``prefix_len`` tokens.
    past : DynamicCache or None
        The prefix's cache, already repeated to ``len(prompts)`` rows (None: no prefix).
    grids, image_inputs, item_ids :
        The candidates' images, as ``RankerBackend.hidden_states`` takes them.

    Returns
    -------
    (hidden, candidate_mask) : tensors (B, Lc, H) and (B, Lc)
    """
    device = ranker.device
    cand_ids, cand_mask = pad_right([p.input_ids[prefix_len:] for p in prompts], ranker.pad_token_id, device)
    pixel_inputs, position_ids = ranker.backend.candidate_inputs(prompts, prefix_len, image_inputs or {})
    # The mask spans prefix + candidate columns; without the prefix part, the candidate
    # tokens would not attend to the cached prefix correctly.
    full_mask = torch.cat([torch.ones((len(prompts), prefix_len), dtype=torch.long, device=device), cand_mask], dim=1)
    hidden, _ = ranker.backend.hidden_states(
        cand_ids, full_mask, item_ids=item_ids, image_features=grids, image_inputs=pixel_inputs,
        past_key_values=past, position_ids=position_ids, use_cache=past is not None,
    )
    return hidden, cand_mask


def last_rows(hidden: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, H) at each row's last real candidate token."""
    positions = cand_mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]


def expanded_answer_rows(ranker: "RankerModel", groups: Sequence[CandidateGroup]) -> torch.Tensor:
    """Hidden states (N, H) at every candidate's answer position: per group, the prefix once,
    its KV cache repeated over the candidates (differentiable), the candidates in one batch."""
    rows = []
    for group in groups:
        prompts = group.prompts()
        past = None
        if group.prefix_len > 0:
            ids = torch.tensor([group.prefix_ids], dtype=torch.long, device=ranker.device)
            _, past = ranker.backend.hidden_states(ids, torch.ones_like(ids), use_cache=True,
                                                   position_ids=ranker.backend.prefix_position_ids(group.prefix_len))
            past.batch_repeat_interleave(group.size)
        item_ids = None
        if group.image_features is None and group.item_ids is not None:
            item_ids = torch.tensor([-1 if i is None else int(i) for i in group.item_ids], dtype=torch.long)
        hidden, cand_mask = candidate_hidden(ranker, prompts, group.prefix_len, past, grids=group.image_features,
                                             image_inputs=group.image_inputs, item_ids=item_ids)
        rows.append(last_rows(hidden, cand_mask))
    return torch.cat(rows)
