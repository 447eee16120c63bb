"""The hybrid ranker: a small tabular head, plus the LLM's yes-minus-no logit when there is one.

A hybrid scores a (user, candidate) row with

    logit = head(tabular features) + scale * (logit(Yes) - logit(No))

where the features are :data:`merlin_mllm.data.collaborative.HEAD_FEATURES` (by default): the
collaborative columns (``item_log_count``, ``item_log_recent_count``, ``user_log_count``: the
point-in-time NVTabular operator of :mod:`merlin_mllm.data.collaborative`) and an upstream
retrieval score. Leaving the LLM out gives the same head alone: the non-LLM control that says
whether the LLM adds anything. Building the feature tables and training the head alone live one
layer up, in :mod:`merlin_mllm.pipelines.hybrid`.

Pieces (the two Blocks take a Merlin batch's feature dict)
----------------------------------------------------------
:class:`HybridHead`
    Named scalar feature columns -> clipped to the range seen in training -> standardised
    (fixed mean/std) -> ``mm.MLPBlock(hidden)`` -> ``Linear(., 1)`` -> one logit per row,
    shape (B,). :meth:`~HybridHead.fit_scaling` sets the range and the scaling from the
    training rows; both are buffers, saved with the head. The saved file also records the
    recent window its features were counted with (``recent_days``), which serving reads.
:class:`HybridScore`
    ``head(inputs)`` plus the LLM's logit, from a module (e.g.
    :class:`merlin_mllm.ranker.block.RankerBlock`, trained jointly) or from a column of
    precomputed logits. :meth:`~HybridScore.head_logit` and :meth:`~HybridScore.llm_logit`
    keep each part's score available, so its share of the gain can be measured.
:class:`HybridLoss`, :func:`hybrid_loss`
    The ranker's ``binary`` or ``listwise`` loss on the hybrid logit (Merlin's loss interface,
    and the function under it).
:func:`hybrid_probability`
    A hybrid's score from the LLM's P(yes) and the head's logit, as evaluation and serving give it.
:func:`saved_head`
    The head saved in a trained model folder (``HEAD_FILE``), or None for the LLM alone.

Three properties of merlin.models.torch 23.12's ``MLPBlock`` shape the head: its layers are
``LazyLinear`` (so the head runs one dummy row at construction, and an optimizer made right
after sees real parameters), its dict input is concatenated in *sorted* key order (so the head
stacks the columns itself, in ``feature_names`` order), and its batch norm is spelled
``normalization="batchnorm"`` (the docstring's ``"batch_norm"`` raises); the head standardises
with fixed statistics instead, so a score does not depend on the batch it came in.

Why clip: an MLP extrapolates without bound, so one served input far outside anything it was
trained on (a ``retrieval_scores`` of 1e30 from a misbehaving upstream stage) would decide the
candidate's score alone (it turned the score to 0.0). Clipping in ``forward`` is the one place
that in-process evaluation and both serving paths go through, so they clip alike; a value inside
the training range is unchanged, so training is too.

Usage::

    import torch
    from merlin_mllm.ranker.hybrid_head import HybridHead, HybridScore, saved_head

    head = HybridHead(["item_log_count", "retrieval_score"], hidden=(16,))
    head.fit_scaling(train_features)                  # (N, 2) array of the training rows
    logits = head({"item_log_count": counts, "retrieval_score": scores})          # (B,)
    hybrid = HybridScore(head, llm_column="llm_logit")  # or HybridScore(head, llm=ranker_block)
    hybrid({**features, "llm_logit": llm_logits})     # head logit + LLM logit
    head.save("runs/ranker/model/hybrid_head.safetensors")   # beside the ranker it was trained with
    saved_head("runs/ranker/model")                   # the head again (None: not a hybrid)
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from merlin_mllm import merlin_compat
from merlin_mllm.data.collaborative import DEFAULT_RECENT_DAYS
from merlin_mllm.ranker.ranker_config import HEAD_FILE, LEGACY_HEAD_FILE
from merlin_mllm.ranker.groups import GroupOutput
from merlin_mllm.ranker.losses import group_loss, keep_for_loss, pop_kept
from merlin_mllm.ranker.saved import trained_model_dir

merlin_compat.apply()

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # merlin warns about absent TensorFlow / GPU libraries
    import merlin.models.torch as mm
    from merlin.models.torch.batch import Batch

__all__ = ["HybridHead", "HybridScore", "HybridLoss", "hybrid_loss", "hybrid_probability", "saved_head_path",
           "saved_head"]

Features = Union[torch.Tensor, Dict[str, torch.Tensor]]
#: A feature whose training spread is below this is only centred, not scaled (e.g. a user
#: activity that every training user shares).
_MIN_STD = 1e-6


class HybridHead(mm.Block):
    """An MLP from named scalar feature columns to one logit per row.

    Parameters
    ----------
    feature_names : sequence of str
        The input columns, in the order the head stacks them.
    hidden : sequence of int
        Widths of the hidden layers (``mm.MLPBlock``); ``()`` makes the head linear.
    dropout : float, optional
        Dropout after each hidden layer.
    activation : type of nn.Module
        Activation after each hidden layer (default ReLU).
    recent_days : float
        The recent window (days) the training rows' ``item_log_recent_count`` was counted with
        (:class:`~merlin_mllm.data.collaborative.CollaborativeFeatures`): saved with the head, so
        that serving counts requests alike.

    Examples
    --------
    >>> head = HybridHead(["a", "b"], hidden=(4,))
    >>> head({"a": torch.zeros(3), "b": torch.ones(3, 1)}).shape
    torch.Size([3])
    """

    def __init__(self, feature_names: Sequence[str], hidden: Sequence[int] = (16,), *,
                 dropout: Optional[float] = None, activation=nn.ReLU, recent_days: float = DEFAULT_RECENT_DAYS):
        super().__init__()
        if not recent_days > 0:
            raise ValueError(f"recent_days must be positive, got {recent_days!r}")
        self.recent_days = float(recent_days)
        if isinstance(feature_names, str) or not len(feature_names):
            raise ValueError(f"feature_names must be a non-empty sequence of column names, got {feature_names!r}")
        if len(set(feature_names)) != len(feature_names):
            raise ValueError(f"feature_names repeat a column: {list(feature_names)}")
        self.feature_names = tuple(str(name) for name in feature_names)
        self.hidden = tuple(int(width) for width in hidden)
        if any(width < 1 for width in self.hidden):
            raise ValueError(f"hidden widths must be positive, got {self.hidden}")
        width = len(self.feature_names)
        self.register_buffer("feature_mean", torch.zeros(width))
        self.register_buffer("feature_std", torch.ones(width))
        # The range of each column over the training rows (unbounded until fit_scaling).
        self.register_buffer("feature_min", torch.full((width,), float("-inf")))
        self.register_buffer("feature_max", torch.full((width,), float("inf")))
        self.mlp = mm.MLPBlock(list(self.hidden), activation=activation, dropout=dropout) if self.hidden else None
        self.output_layer = nn.Linear(self.hidden[-1] if self.hidden else width, 1)
        if self.mlp is not None:
            with torch.no_grad():  # materialise MLPBlock's LazyLinear layers
                self.mlp(torch.zeros(1, width))

    def feature_matrix(self, inputs: Features) -> torch.Tensor:
        """The inputs as a float (B, n_features) tensor, columns in ``feature_names`` order."""
        if isinstance(inputs, torch.Tensor):
            matrix = inputs.reshape(-1, 1) if inputs.dim() == 1 and len(self.feature_names) == 1 else inputs
            if matrix.dim() != 2 or matrix.shape[1] != len(self.feature_names):
                raise ValueError(f"expected a (B, {len(self.feature_names)}) tensor of {list(self.feature_names)}, "
                                 f"got shape {tuple(inputs.shape)}")
            return matrix.float()
        missing = [name for name in self.feature_names if name not in inputs]
        if missing:
            raise KeyError(f"HybridHead needs feature column(s) {missing}; the inputs have {sorted(inputs)}")
        return torch.stack([inputs[name].reshape(-1).float() for name in self.feature_names], dim=1)

    @torch.no_grad()
    def fit_scaling(self, features) -> "HybridHead":
        """Standardise each column by its mean and std over ``features`` (the training rows), and
        clip it to their min and max.

        Parameters
        ----------
        features : array-like, tensor or mapping of columns
            (N, n_features) in ``feature_names`` order, or a DataFrame / dict with those columns.

        Returns
        -------
        HybridHead
            ``self``.
        """
        if hasattr(features, "columns") or isinstance(features, dict):
            features = np.stack([np.asarray(features[name], dtype=np.float64) for name in self.feature_names], axis=1)
        matrix = torch.as_tensor(np.asarray(features, dtype=np.float64))
        if matrix.dim() != 2 or matrix.shape[1] != len(self.feature_names) or matrix.shape[0] == 0:
            raise ValueError(f"fit_scaling needs an (N, {len(self.feature_names)}) matrix, got {tuple(matrix.shape)}")
        if not torch.isfinite(matrix).all():
            row = int(torch.nonzero(~torch.isfinite(matrix).all(dim=1))[0, 0])
            raise ValueError(f"fit_scaling: training row {row} holds a non-finite feature value "
                             f"{dict(zip(self.feature_names, matrix[row].tolist()))}")
        std = matrix.std(dim=0, unbiased=False)
        self.feature_min.copy_(matrix.min(dim=0).values.float())
        self.feature_max.copy_(matrix.max(dim=0).values.float())
        self.feature_mean.copy_(matrix.mean(dim=0).float())
        self.feature_std.copy_(torch.where(std < _MIN_STD, torch.ones_like(std), std).float())
        return self

    def clip(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix`` (B, n_features) with each column clipped to its training range."""
        return torch.minimum(torch.maximum(matrix, self.feature_min), self.feature_max)

    def forward(self, inputs: Features, batch: Optional[Batch] = None) -> torch.Tensor:
        x = self.clip(self.feature_matrix(inputs).to(self.feature_mean.device))
        x = (x - self.feature_mean) / self.feature_std
        if self.mlp is not None:
            x = self.mlp(x)
        return self.output_layer(x).squeeze(-1)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the head (weights, scaling, feature names, widths, recent window) to one safetensors file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in self.state_dict().items()}
        meta = {"feature_names": json.dumps(list(self.feature_names)), "hidden": json.dumps(list(self.hidden)),
                "recent_days": json.dumps(self.recent_days)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)  # a reader never sees half a head
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "HybridHead":
        """A head written by :meth:`save`, in eval mode."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if "feature_names" not in meta or "hidden" not in meta:
            raise ValueError(f"{path} is not a HybridHead file (no feature_names/hidden metadata)")
        # A head saved before the recent window was recorded was trained with the default one.
        head = cls(json.loads(meta["feature_names"]), json.loads(meta["hidden"]),
                   recent_days=json.loads(meta.get("recent_days", "null")) or DEFAULT_RECENT_DAYS)
        state = load_file(str(path))
        # A head saved before the training range was recorded stays unclipped (its buffers' default).
        for name in ("feature_min", "feature_max"):
            state.setdefault(name, getattr(head, name))
        head.load_state_dict(state)
        return head.eval()


class HybridScore(mm.Block):
    """The head's logit plus the LLM's yes-minus-no logit (absent LLM: the head alone).

    Parameters
    ----------
    head : HybridHead
    llm : nn.Module, optional
        Maps the inputs (and ``batch``) to the LLM's logit(Yes) - logit(No), shape (B,): e.g. a
        :class:`merlin_mllm.ranker.block.RankerBlock`, trained jointly with the head.
    llm_column : str, optional
        Instead of ``llm``: the input column holding precomputed LLM logits (a frozen ranker's).
        When set, a batch without it raises.
    learn_llm_scale : bool
        Multiply the LLM logit by a trainable scalar (initialised to 1) instead of the fixed 1.

    Examples
    --------
    >>> head = HybridHead(["a"], hidden=())
    >>> hybrid = HybridScore(head, llm_column="llm_logit")
    >>> inputs = {"a": torch.ones(2), "llm_logit": torch.tensor([1.0, -1.0])}
    >>> torch.allclose(hybrid(inputs), head(inputs) + inputs["llm_logit"])
    True
    """

    def __init__(self, head: HybridHead, llm: Optional[nn.Module] = None, *,
                 llm_column: Optional[str] = None, learn_llm_scale: bool = False):
        super().__init__()
        if llm is not None and llm_column is not None:
            raise ValueError("give the LLM either as a module (llm) or as a column of logits (llm_column), not both")
        self.head = head
        self.llm = llm
        self.llm_column = llm_column
        if learn_llm_scale:
            self.llm_scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer("llm_scale", torch.tensor(1.0))

    @property
    def has_llm(self) -> bool:
        return self.llm is not None or self.llm_column is not None

    def head_logit(self, inputs: Features, batch: Optional[Batch] = None) -> torch.Tensor:
        """The tabular head's logit alone, (B,)."""
        return self.head(inputs)

    def llm_logit(self, inputs: Dict[str, torch.Tensor], batch: Optional[Batch] = None) -> Optional[torch.Tensor]:
        """The LLM's yes-minus-no logit, (B,), unscaled; None without an LLM."""
        if self.llm is not None:
            return self.llm(inputs, batch=batch).reshape(-1)
        if self.llm_column is not None:
            if self.llm_column not in inputs:
                raise KeyError(f"HybridScore reads the LLM logit from column {self.llm_column!r}; "
                               f"the inputs have {sorted(inputs)}")
            return inputs[self.llm_column].reshape(-1).float()
        return None

    def forward(self, inputs: Features, batch: Optional[Batch] = None) -> torch.Tensor:
        logit = self.head_logit(inputs, batch)
        llm = self.llm_logit(inputs, batch) if self.has_llm else None
        if llm is not None:
            logit = logit + self.llm_scale * llm.to(logit.dtype)
        # Kept for the training loss, which Merlin calls with P = sigmoid(logit) only.
        keep_for_loss(self, "_last_logit", logit)
        return logit

    def pop_logit(self) -> Optional[torch.Tensor]:
        """The logit of the last forward pass, forgotten once read."""
        return pop_kept(self, "_last_logit")


class HybridLoss(nn.Module):
    """Merlin loss ``(predictions, targets) -> loss`` of a :class:`HybridScore` around a ``RankerBlock``.

    Parameters
    ----------
    hybrid : HybridScore
        Its ``llm`` is the ranker block (:class:`merlin_mllm.ranker.block.RankerBlock`); its last
        logit is what the loss reads.
    """

    def __init__(self, hybrid: HybridScore):
        super().__init__()
        object.__setattr__(self, "_hybrid", hybrid)  # not a submodule: the model registers it

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        block = self._hybrid.llm
        output, logit = block.pop_output(), self._hybrid.pop_logit()
        rows = predictions.reshape(-1).shape[0]
        if output is None or logit is None or logit.shape[0] != rows:
            raise RuntimeError("HybridLoss must be computed right after its HybridScore's forward pass on the same batch")
        labels = targets.reshape(-1).round().long()
        name = block.ranker.config.loss
        group_index = output.group_index if isinstance(output, GroupOutput) else None
        if name == "listwise" and group_index is None:
            raise RuntimeError("the listwise loss needs groups: train the hybrid with batching='groups'")
        return hybrid_loss(name, logit, labels, group_index)


def hybrid_loss(name: str, logit: torch.Tensor, labels, group_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ranker's ``binary`` or ``listwise`` loss (:mod:`merlin_mllm.ranker.losses`) on hybrid logits.

    The hybrid logit plays the part of ``logit(Yes) - logit(No)``: ``binary`` is then the
    cross-entropy of sigmoid(logit), ``listwise`` the softmax over each group's logits. ``lm``
    has no meaning here (the head adds no vocabulary logits) and is refused.
    """
    if name == "lm":
        raise ValueError("a hybrid (head features) trains with loss='binary' or 'listwise'; "
                         "'lm' is a loss over the LLM's vocabulary, which the tabular head has no part in")
    logit = logit.reshape(-1).float()
    pair = torch.stack([torch.zeros_like(logit), logit], dim=1)  # [No, Yes] with Yes - No = logit
    return group_loss(name, logits=pair, labels=labels, group_index=group_index)


def hybrid_probability(p_yes, head_logit) -> "tuple[np.ndarray, np.ndarray]":
    """A hybrid's score from the LLM's P(yes) and the head's logit, as evaluation and serving give it.

    Returns ``(llm_logit, score)`` in float64: ``llm_logit`` = log(P) - log(1 - P), which is
    logit(Yes) - logit(No), and ``score`` = sigmoid(llm_logit + head_logit).
    """
    p_yes = np.asarray(p_yes, dtype=np.float64).reshape(-1)
    llm_logit = np.log(p_yes) - np.log1p(-p_yes)
    total = llm_logit + np.asarray(head_logit, dtype=np.float64).reshape(-1)
    return llm_logit, 1.0 / (1.0 + np.exp(-total))


def saved_head_path(model_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The head file of a saved ranker (:data:`~merlin_mllm.ranker.ranker_config.HEAD_FILE`), or None.

    ``model_dir`` is the saved ranker or the run folder holding it (``trained_model_dir``).
    Folders saved before the hybrid had one name hold it as ``LEGACY_HEAD_FILE``; it is read too.
    """
    model_dir = trained_model_dir(model_dir)
    for name in (HEAD_FILE, LEGACY_HEAD_FILE):
        path = model_dir / name
        if path.is_file():
            return path
    return None


def saved_head(model_dir: Union[str, os.PathLike]) -> Optional[HybridHead]:
    """The hybrid's head saved in a ranker folder (the ranker's ``model/``), or None: not a hybrid."""
    path = saved_head_path(model_dir)
    return HybridHead.load(path) if path is not None else None
