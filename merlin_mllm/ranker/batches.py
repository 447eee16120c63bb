"""Batch helpers of the ranker: right-padded token batches and the answer-only SFT labels.

The ranker reads each row's answer at its last real token, so every batch is padded on the
right (:func:`pad_right`, :func:`batch_from_ragged` for Merlin's ragged list columns).
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import torch

__all__ = ["IGNORE_INDEX", "pad_right", "batch_from_ragged", "answer_positions", "answer_only_labels", "chunks"]

#: Label value that the loss ignores (Hugging Face convention).
IGNORE_INDEX = -100


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


def answer_positions(attention_mask: torch.Tensor) -> torch.Tensor:
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
            "(merlin_mllm.ranker.pad_right)"
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
    positions = answer_positions(attention_mask) + 1  # where the answer token is placed
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


def chunks(items: Sequence, size: int) -> Iterator[Tuple[int, Sequence]]:
    """``(start, items[start:start + size])`` over ``items``, in order."""
    for start in range(0, len(items), size):
        yield start, items[start:start + size]
