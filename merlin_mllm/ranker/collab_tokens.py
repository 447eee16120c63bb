"""Collaborative tokens, LLaRA-style: an item's SASRec embedding as one soft token of the prompt.

With ``RankerConfig.collab_tokens`` the prompt holds one collaborative token after each history
title of the user part and one after the candidate's title. Such a token is a token id at or
above :data:`merlin_mllm.text.ITEM_TOKEN_BASE` that names its item (see
:func:`merlin_mllm.text.item_token_id`); the ranker never looks it up in the language model's
vocabulary. Its input embedding is instead ``CollabProjector(vector)``, where ``vector`` is the
item's row in a frozen :class:`CollabEmbeddings` table (SASRec item embeddings trained on the
events before the training split's cut, :func:`merlin_mllm.pipelines.collab.train_collab_embeddings`).
The projector is LLaVA's 2-layer GELU MLP (:class:`~merlin_mllm.ranker.embedded_backend.ImageProjector`,
the same module the image tokens go through), trained with LoRA.

Cold items (no event before the cut, an item id the table lacks, or an empty slot) all take one
learned vector, ``CollabProjector.cold`` (zeros at the start, in the table's space), through the
same projector; :meth:`CollabEmbeddings.summary` counts them.

Table file (``collab_embeddings.safetensors``, :data:`COLLAB_EMBEDDINGS_FILE`): ``item_ids`` int64
(N,) sorted, ``vectors`` float32 (N, dim), ``known`` uint8 (N,) (0: cold, the vector is not
used); metadata: format, dim, item count and what it was trained on (``trained_before``: the
split, its cut, the protocol; the model's settings and seed).

Usage::

    table = CollabEmbeddings.load("runs/ranker/model/collab_embeddings.safetensors")
    vectors, known = table.lookup(torch.tensor([3, 99999]))    # (2, 64), [True, False]
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from merlin_mllm.ranker.item_table_file import read_tables_file, write_tables_file
from merlin_mllm.text import ITEM_TOKEN_BASE

__all__ = ["CollabEmbeddings", "CollabProjector", "COLLAB_FORMAT", "collab_token_mask", "token_items",
           "embed_tokens"]

COLLAB_FORMAT = "merlin-mllm-collab-item-embeddings"


class CollabEmbeddings:
    """A frozen table item id -> item embedding (the collaborative tokens' inputs).

    Parameters
    ----------
    item_ids : array of int (N,)
        Unique item ids.
    vectors : array or tensor (N, dim)
    known : array of bool (N,)
        False for cold items (no event before the cut): their vector is not used.
    metadata : dict
        What made the table (see the module docstring); saved with it.
    """

    def __init__(self, item_ids, vectors, known, metadata: Optional[Dict[str, Any]] = None):
        item_ids = np.asarray(item_ids, dtype=np.int64)
        known = np.asarray(known, dtype=bool)
        vectors = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if item_ids.ndim != 1 or known.shape != item_ids.shape or vectors.dim() != 2 or vectors.shape[0] != len(item_ids):
            raise ValueError(f"item_ids {item_ids.shape}, known {known.shape} and vectors {tuple(vectors.shape)} "
                             "must be (N,), (N,) and (N, dim)")
        order = np.argsort(item_ids, kind="stable")
        sorted_ids = item_ids[order]
        if sorted_ids.size > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
            raise ValueError(f"item id {int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])} appears more than once")
        self.item_ids = torch.from_numpy(sorted_ids.copy())
        self.known = torch.from_numpy(known[order].copy())
        self.vectors = vectors[torch.from_numpy(order)].contiguous()
        self.metadata = dict(metadata or {})

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.item_ids.numel())

    def summary(self) -> Dict[str, int]:
        """Counts: items in the table, items with an embedding, cold items."""
        known = int(self.known.sum())
        return {"items": len(self), "with_embedding": known, "cold": len(self) - known}

    def lookup(self, item_ids) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(vectors (B, dim), known (B,))``; an id the table lacks (or -1: no item) is cold (zeros)."""
        item_ids = torch.as_tensor(item_ids, dtype=torch.long).reshape(-1).cpu()
        vectors = torch.zeros((item_ids.numel(), self.dim), dtype=torch.float32)
        known = torch.zeros(item_ids.numel(), dtype=torch.bool)
        if len(self) and item_ids.numel():
            pos = torch.searchsorted(self.item_ids, item_ids).clamp(max=len(self) - 1)
            found = (self.item_ids[pos] == item_ids) & self.known[pos]
            vectors[found] = self.vectors[pos[found]]
            known = found
        return vectors, known

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the table as one safetensors file (see the module docstring)."""
        metadata = {"format": COLLAB_FORMAT, "dim": str(self.dim), "items": str(len(self)),
                    "details": json.dumps(self.metadata, sort_keys=True)}
        return write_tables_file(path, {"item_ids": self.item_ids, "vectors": self.vectors,
                                        "known": self.known.to(torch.uint8)}, metadata)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "CollabEmbeddings":
        """Read a table written by :meth:`save`; another kind of file is refused by name."""
        tensors, metadata = read_tables_file(path, "collaborative item embeddings", COLLAB_FORMAT,
                                             {"item_ids", "vectors", "known"})
        return cls(tensors["item_ids"].numpy(), tensors["vectors"].numpy(), tensors["known"].bool().numpy(),
                   json.loads(metadata.get("details") or "{}"))


class CollabProjector(nn.Module):
    """Item embeddings (..., dim) -> the language model's embedding space, plus the cold vector.

    Parameters
    ----------
    mlp : nn.Module
        dim -> hidden: the embedded backend gives LLaVA's projector
        (:class:`~merlin_mllm.ranker.embedded_backend.ImageProjector`), seeded.
    dim : int
        The item embeddings' size; ``cold`` (dim,) is the learned input of every cold item,
        zeros at the start.
    """

    def __init__(self, mlp: nn.Module, dim: int):
        super().__init__()
        self.mlp = mlp
        self.cold = nn.Parameter(torch.zeros(int(dim)))

    @property
    def dim(self) -> int:
        return int(self.cold.numel())

    def forward(self, vectors: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        vectors = vectors.to(self.cold.device, self.cold.dtype)
        inputs = torch.where(known.to(self.cold.device)[:, None], vectors, self.cold.expand_as(vectors))
        return self.mlp(inputs)


def collab_token_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """Where ``input_ids`` hold collaborative tokens (ids at or above ``ITEM_TOKEN_BASE``)."""
    return input_ids >= ITEM_TOKEN_BASE


def token_items(token_ids: torch.Tensor) -> torch.Tensor:
    """The item id of each collaborative token id (-1 for an empty slot: cold)."""
    return token_ids - (ITEM_TOKEN_BASE + 1)


def embed_tokens(embedding: nn.Module, input_ids: torch.Tensor, projector: Optional[CollabProjector],
                 table: Optional[CollabEmbeddings], pad_token_id: int) -> torch.Tensor:
    """Input embeddings of ``input_ids``, the collaborative tokens' replaced by their projection.

    Without collaborative tokens in ``input_ids`` this is ``embedding(input_ids)`` (plus, while
    the projector trains, a zero that keeps it in the autograd graph, as the image projector does).
    """
    collab = collab_token_mask(input_ids)
    if projector is None:
        if bool(collab.any()):
            row = int(torch.nonzero(collab)[0][0])
            raise ValueError(f"row {row}: the prompt holds collaborative tokens but this ranker was built "
                             "without collab_tokens")
        return embedding(input_ids)
    embeds = embedding(input_ids.masked_fill(collab, int(pad_token_id)))
    if not bool(collab.any()):
        if projector.training and torch.is_grad_enabled() and projector.cold.requires_grad:
            empty = projector(embeds.new_zeros((0, projector.dim), dtype=torch.float32),
                              torch.zeros(0, dtype=torch.bool, device=embeds.device))
            embeds = embeds + empty.sum().to(embeds.dtype)
        return embeds
    if table is None:
        raise ValueError("the prompt holds collaborative tokens but no item embedding table is attached "
                         "(RankerModel.set_collab_embeddings)")
    vectors, known = table.lookup(token_items(input_ids[collab]).cpu())
    projected = projector(vectors, known)
    return embeds.masked_scatter(collab.unsqueeze(-1), projected.to(embeds.dtype))
