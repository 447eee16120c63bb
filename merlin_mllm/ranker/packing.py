"""Candidate groups and their packed layout: one user's prompt prefix and all its candidates in one row.

A :class:`CandidateGroup` is one user's shared prompt prefix (system message, summary, and with
prompt version 2 the question) and the candidate parts that follow it, each ending where its
answer token goes. :func:`pack_groups` lays a batch of groups out as right-padded rows::

    row g:  [ prefix | candidate 0 | candidate 1 | ... | candidate K | padding ]
    segment    0          1             2                   K+1          -1

with a block attention mask (:func:`block_attention_mask`): the prefix attends causally to
itself; each candidate attends to the whole prefix and causally to itself, never to another
candidate; padding attends only to itself (a query row with nothing to attend to would give
NaN, and NaN times a zero gradient is still NaN). Each candidate's position ids continue from
the end of the prefix, as if it stood alone after it, so every candidate sees exactly what its
own full prompt would show, at the same positions: packed and independent scores agree up to
float rounding.

Nothing here runs a model; :mod:`merlin_mllm.ranker.groups` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from merlin_mllm.ranker.prompt import EncodedPrompt, shared_prefix_length

__all__ = ["CandidateGroup", "PackedGroups", "pack_groups", "block_attention_mask", "attention_mask_for",
           "MASKABLE_ATTENTION"]

#: Attention implementations that take a custom 4-D mask (Hugging Face ``_attn_implementation``):
#: sdpa reads a boolean mask (True = attend), eager an additive float mask.
MASKABLE_ATTENTION = ("sdpa", "eager")


@dataclass
class CandidateGroup:
    """One user's candidates after a shared prompt prefix.

    Parameters
    ----------
    prefix_ids : list of int
        The shared prompt prefix (may be empty).
    candidate_ids : list of list of int
        Each candidate's own part: with the prefix in front, its full prompt up to the answer.
    item_ids : list of int or None, optional
        Each candidate's item id (the embedded backend looks image grids up by it).
    labels : list of int, optional
        1 for the positive(s), 0 for negatives.
    image_features : tensor (M, 49, D), optional
        Embedded backend: the grids of the candidates whose parts hold image tokens, in order
        (instead of looking ``item_ids`` up in the item image table).
    image_inputs : dict, optional
        HF backend: the processor's tensors for the full prompts (shared-prefix path only).
    """

    prefix_ids: List[int]
    candidate_ids: List[List[int]]
    item_ids: Optional[List[Optional[int]]] = None
    labels: Optional[List[int]] = None
    image_features: Optional[torch.Tensor] = field(default=None, repr=False)
    image_inputs: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.prefix_ids = [int(t) for t in self.prefix_ids]
        self.candidate_ids = [[int(t) for t in ids] for ids in self.candidate_ids]
        if not self.candidate_ids:
            raise ValueError("a candidate group needs at least one candidate")
        empty = [i for i, ids in enumerate(self.candidate_ids) if not ids]
        if empty:
            raise ValueError(f"candidate {empty[0]} has no tokens after the prefix (its answer position)")
        for name in ("item_ids", "labels"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.candidate_ids):
                raise ValueError(f"{len(values)} {name} for {len(self.candidate_ids)} candidates")
        if self.labels is not None:
            self.labels = [int(label) for label in self.labels]

    @property
    def size(self) -> int:
        """Number of candidates."""
        return len(self.candidate_ids)

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    def prompts(self) -> List[EncodedPrompt]:
        """Each candidate's full prompt (prefix + its part), split at the group's prefix."""
        return [EncodedPrompt(self.prefix_ids + ids, self.prefix_len, False) for ids in self.candidate_ids]

    @classmethod
    def from_prompts(cls, prompts: Sequence[EncodedPrompt], image_token_id: Optional[int] = None,
                     **fields) -> "CandidateGroup":
        """A group from one user's full prompts, split at their longest shared token prefix.

        The prefix never reaches past a prompt's own user part (``EncodedPrompt.prefix_len``,
        0 for ids without a known split), never holds image tokens, and leaves each candidate at
        least its last token, as the shared-prefix scorer splits them.

        Parameters
        ----------
        prompts : list of EncodedPrompt
        image_token_id : int, optional
            The image placeholder token (kept out of the prefix).
        **fields :
            ``item_ids``, ``labels``, ``image_features``, ``image_inputs``.
        """
        if not prompts:
            raise ValueError("a candidate group needs at least one candidate")
        length = shared_prefix_length(prompts, image_token_id)
        if all(p.prefix_len > 0 for p in prompts):
            length = min(length, min(p.prefix_len for p in prompts))
        first = prompts[0].input_ids
        return cls(list(first[:length]), [list(p.input_ids[length:]) for p in prompts], **fields)


@dataclass
class PackedGroups:
    """A batch of groups laid out by :func:`pack_groups` (all tensors on one device).

    Attributes
    ----------
    input_ids, position_ids, segment_ids : tensors (G, L) long
        Token ids (padding: the pad id), positions (each candidate continues from its prefix),
        and segments (0 prefix, j + 1 candidate j, -1 padding).
    answer_rows, answer_columns : tensors (N,) long
        Where each candidate's answer is read: its row and its last token's column.
    group_index : tensor (N,) long
        The group of each candidate (candidates are numbered group by group, in order).
    image_candidates : list of int
        Flat indices of the candidates whose parts hold image tokens, in reading order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    answer_rows: torch.Tensor
    answer_columns: torch.Tensor
    group_index: torch.Tensor
    image_candidates: List[int]

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int((self.segment_ids >= 0).sum())


def pack_groups(groups: Sequence[CandidateGroup], pad_id: int, *, image_token_id: Optional[int] = None,
                device=None) -> PackedGroups:
    """Lay ``groups`` out as right-padded packed rows (see the module docstring).

    Parameters
    ----------
    groups : list of CandidateGroup
    pad_id : int
        Fills the padding.
    image_token_id : int, optional
        Marks the candidate parts that show an image (``image_candidates``).
    device :
        Where the tensors go (default: CPU).
    """
    if not groups:
        raise ValueError("no candidate groups to pack")
    lengths = [g.prefix_len + sum(len(ids) for ids in g.candidate_ids) for g in groups]
    width = max(lengths)
    input_ids = torch.full((len(groups), width), int(pad_id), dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    segment_ids = torch.full((len(groups), width), -1, dtype=torch.long)
    answer_rows, answer_columns, group_index, image_candidates = [], [], [], []
    flat = 0
    for row, group in enumerate(groups):
        prefix = group.prefix_len
        input_ids[row, :prefix] = torch.as_tensor(group.prefix_ids, dtype=torch.long)
        position_ids[row, :prefix] = torch.arange(prefix)
        segment_ids[row, :prefix] = 0
        column = prefix
        for index, ids in enumerate(group.candidate_ids):
            end = column + len(ids)
            input_ids[row, column:end] = torch.as_tensor(ids, dtype=torch.long)
            position_ids[row, column:end] = torch.arange(prefix, prefix + len(ids))
            segment_ids[row, column:end] = index + 1
            answer_rows.append(row)
            answer_columns.append(end - 1)
            group_index.append(row)
            if image_token_id is not None and image_token_id in ids:
                image_candidates.append(flat)
            column, flat = end, flat + 1
    answers = torch.tensor([answer_rows, answer_columns, group_index], dtype=torch.long, device=device)
    return PackedGroups(input_ids.to(device), position_ids.to(device), segment_ids.to(device),
                        answers[0], answers[1], answers[2], image_candidates)


def block_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The packed rows' attention mask (G, 1, L, L), True where a query may attend to a key.

    Causal in the packed order, and a key counts only when it is in the prefix (segment 0) or
    in the query's own segment; a padding query attends to itself only.
    """
    width = segment_ids.shape[1]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & ((key == 0) | (key == query)) & (key >= 0) & (query >= 0)
    diagonal = torch.eye(width, dtype=torch.bool, device=segment_ids.device)
    allowed = allowed | (diagonal & (query < 0))
    return allowed[:, None]


def attention_mask_for(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask from :func:`block_attention_mask` as the attention ``implementation`` reads it.

    sdpa takes it as is; eager adds it to the scores, so it becomes 0 / the dtype's minimum.
    """
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"attention implementation {implementation!r} takes no custom 4-D mask "
                     f"(packing needs one of {MASKABLE_ATTENTION})")
