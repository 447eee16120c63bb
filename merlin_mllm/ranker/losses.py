"""The ranker's training losses, over candidate rows or over groups of one user's candidates.

Every loss reads the answer position of each candidate (see :mod:`merlin_mllm.ranker.model`):

``"lm"``
    Cross-entropy of the answer token ("Yes" for positives, "No" for negatives) over the whole
    vocabulary: the paper's SFT objective with the prompt masked. Mean over candidates.
``"binary"``
    Cross-entropy over the two answer logits [No, Yes] only. Mean over candidates.
``"listwise"``
    Per group (one user's positive and its negatives): softmax over the candidates'
    ``logit_Yes - logit_No``, the positive as the target. Mean over groups. It needs groups,
    each with exactly one positive.

Usage::

    from merlin_mllm.ranker.losses import group_loss
    loss = group_loss("listwise", logits=logits, labels=labels, group_index=group_index)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from merlin_mllm.choices import LOSSES

__all__ = ["keep_for_loss", "pop_kept", "check_loss_name", "lm_loss", "binary_loss", "listwise_loss", "group_loss", "check_labels"]


def keep_for_loss(module: torch.nn.Module, name: str, value) -> None:
    """Keep ``value`` on ``module`` for the loss that Merlin calls with the predictions only.

    Set past ``nn.Module.__setattr__``, so that a kept tensor or output is never registered
    as a buffer or submodule.
    """
    object.__setattr__(module, name, value)


def pop_kept(module: torch.nn.Module, name: str):
    """The value :func:`keep_for_loss` kept on ``module`` (``None`` if none), forgotten once read."""
    value = getattr(module, name, None)
    object.__setattr__(module, name, None)
    return value


def check_loss_name(name: str) -> str:
    """``name`` when it is a known loss; else a ValueError listing them."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, not {name!r}")
    return name


def check_labels(labels, rows: int, device) -> torch.Tensor:
    """``labels`` as a long tensor of 0/1 with one entry per row (clear errors otherwise)."""
    labels = torch.as_tensor(labels, device=device).reshape(-1)
    if labels.numel() != rows:
        raise ValueError(f"{labels.numel()} labels for a batch of {rows}")
    if bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()))}")
    return labels.long()


def lm_loss(vocab_logits: torch.Tensor, labels: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each row's answer token over the vocabulary.

    Parameters
    ----------
    vocab_logits : tensor (N, V)
        Answer-position logits.
    labels : tensor (N,) of 0/1
    answer_ids : tensor (2,)
        The token ids [No, Yes].
    """
    return F.cross_entropy(vocab_logits.float(), answer_ids[labels.long()])


def binary_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over [No, Yes] (``logits`` (N, 2), ``labels`` (N,) of 0/1)."""
    return F.cross_entropy(logits.float(), labels.long())


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """Mean over groups of ``-log softmax(yes - no)[positive]`` within each group.

    Parameters
    ----------
    logits : tensor (N, 2)
        [No, Yes] per candidate.
    labels : tensor (N,) of 0/1
        Exactly one 1 per group.
    group_index : tensor (N,) of long
        The group of each candidate, 0..G-1 (any order).
    """
    group_index = group_index.to(logits.device).long()
    groups = int(group_index.max()) + 1 if group_index.numel() else 0
    positives = torch.zeros(groups, dtype=torch.long, device=logits.device).index_add_(0, group_index, labels.long())
    if groups == 0 or bool((positives != 1).any()):
        bad = int(torch.nonzero(positives != 1)[0]) if groups else 0
        raise ValueError(f"the listwise loss needs exactly one positive per group; group {bad} has "
                         f"{int(positives[bad]) if groups else 0}")
    margin = (logits[:, 1] - logits[:, 0]).float()
    # A log-sum-exp per group, stabilised by the group's largest margin.
    top = torch.full((groups,), float("-inf"), device=logits.device).scatter_reduce(
        0, group_index, margin.detach(), reduce="amax")
    shifted = torch.exp(margin - top[group_index])
    log_norm = torch.log(torch.zeros(groups, device=logits.device).index_add(0, group_index, shifted)) + top
    positive_margin = torch.zeros(groups, device=logits.device).index_add(0, group_index, margin * labels.float())
    return (log_norm - positive_margin).mean()


def group_loss(name: str, *, logits: torch.Tensor, labels, group_index: Optional[torch.Tensor] = None,
               vocab_logits: Optional[torch.Tensor] = None, answer_ids: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """The loss ``name`` (see :data:`merlin_mllm.choices.LOSSES`) over candidate rows.

    Parameters
    ----------
    name : {"lm", "binary", "listwise"}
    logits : tensor (N, 2)
        [No, Yes] per candidate.
    labels : sequence or tensor (N,) of 0/1
    group_index : tensor (N,), optional
        Needed by ``"listwise"``.
    vocab_logits, answer_ids :
        Needed by ``"lm"`` (the full answer-position logits and the [No, Yes] ids).
    """
    check_loss_name(name)
    labels = check_labels(labels, logits.shape[0], logits.device)
    if name == "lm":
        if vocab_logits is None or answer_ids is None:
            raise ValueError("the 'lm' loss needs the full-vocabulary answer logits and the answer ids")
        return lm_loss(vocab_logits, labels, answer_ids)
    if name == "binary":
        return binary_loss(logits, labels)
    if group_index is None:
        raise ValueError("the 'listwise' loss needs groups: train with RankerModel.forward_groups")
    return listwise_loss(logits, labels, group_index)
