"""The ranker as a merlin.models.torch model: a Block, a binary output, and a Lightning module.

Pieces
------
:class:`RankerBlock` (an ``mm.Block``)
    Turns a Merlin batch into the ranker's forward: the ragged ``prompt_ids`` column
    (``prompt_ids__values`` / ``prompt_ids__offsets``, made by
    :class:`~merlin_mllm.operators.tokenize_prompt.TokenizePrompt`) is right-padded, ``item_id``
    keys the item image table, and the block returns the answer-position logit difference
    ``logit(Yes) - logit(No)``, shape (B,). With ``groups=True`` the batch holds whole groups
    (contiguous rows of one ``group_id``: a user's positive and its negatives) and each group
    runs as one packed sequence (:meth:`RankerModel.forward_groups`), its loss computed there.
:class:`YesNoOutput` (an ``mm.BinaryOutput``)
    A sigmoid of that difference, i.e. P(yes) = softmax([logit_No, logit_Yes])[1], with no
    extra linear layer (the stock ``BinaryOutput`` adds a randomly initialised one, which would
    change the zero-shot scores). Its loss is :class:`AnswerTokenLoss`.
:class:`AnswerTokenLoss`
    The ranker's own answer-token loss (:meth:`RankerModel.compute_loss`): with
    ``loss="lm"`` the full-vocabulary negative log-likelihood of the answer token, every prompt
    position masked; with ``loss="binary"`` the cross-entropy over [No, Yes] (= BCE on the
    output). Merlin hands a loss only the (B,) predictions, which cannot carry the
    full-vocabulary term, so the loss reads the answer logits that its block kept from the
    forward pass of the same step.
A hybrid (``head`` given) uses :class:`merlin_mllm.ranker.hybrid_head.HybridScore` as the block and
:class:`~merlin_mllm.ranker.hybrid_head.HybridLoss` as the loss (the ranker's ``binary`` or
``listwise`` loss on ``head(features) + logit(Yes) - logit(No)``).
:class:`RankerMerlinModel` (an ``mm.Model``)
    ``mm.Model(RankerBlock(ranker), YesNoOutput(target))``, or with a ``head``
    ``mm.Model(HybridScore(head, llm=RankerBlock(ranker)), YesNoOutput(target))``, plus what
    training a LoRA model needs: AdamW over the trainable parameters only (LoRA at ``lr``, the image projector at
    ``projector_lr``), compact checkpoints (trainable tensors only; the frozen base is rebuilt
    from its name), and initialisation on the ranker's device and dtype.

Usage::

    import pytorch_lightning as pl
    from merlin.dataloader.torch import Loader
    from merlin_mllm.ranker import RankerModel
    from merlin_mllm.ranker.block import RankerMerlinModel

    ranker = RankerModel.build("embedded", use_images=False)
    model = RankerMerlinModel(ranker, tokenized.schema["label"], lr=2e-5)
    pl.Trainer(accelerator="cpu", max_epochs=1).fit(model, Loader(tokenized, batch_size=4))
    probs = model(batch_features)          # P(yes), shape (B,)

    # or with the stock mm.Model (its default Adam, all parameters):
    block = RankerBlock(ranker)
    model = mm.Model(block, YesNoOutput(tokenized.schema["label"], block))
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from merlin_mllm import merlin_compat

merlin_compat.apply()

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import merlin.models.torch as mm
    import torchmetrics as tm
    from merlin.models.torch.batch import Batch, sample_batch
    from merlin.models.torch.utils import module_utils
    from merlin.schema import ColumnSchema, Schema

from merlin_mllm.ranker.batches import batch_from_ragged
from merlin_mllm.ranker.groups import GroupOutput
from merlin_mllm.ranker.hybrid_head import HybridHead, HybridLoss, HybridScore
from merlin_mllm.ranker.losses import keep_for_loss, pop_kept
from merlin_mllm.ranker.model import RankerModel, RankerOutput
from merlin_mllm.ranker.packing import CandidateGroup
from merlin_mllm.ranker.prompt import EncodedPrompt

__all__ = ["RankerBlock", "YesNoOutput", "AnswerTokenLoss", "RankerMerlinModel"]


class RankerBlock(mm.Block):
    """A Merlin Block around a :class:`~merlin_mllm.ranker.model.RankerModel`.

    Input (a Merlin batch's features): ``<prompt_column>__values`` and ``__offsets`` (ragged
    int token ids, one prompt per row, without the answer), and ``<item_column>`` (B,) when the
    ranker shows images. Output: ``logit(Yes) - logit(No)`` at each row's last prompt token, (B,).

    Parameters
    ----------
    ranker : RankerModel
    prompt_column : str
        The token-id list column (default ``"prompt_ids"``).
    item_column : str
        The item id column that keys the item image table (default ``"item_id"``).
    groups : bool
        The batch holds whole groups, each run as one packed sequence (see the module docstring);
        it then also reads ``group_column`` and the prompt's prefix length column
        (``<prompt_column minus _ids>_prefix_length``, as ``TokenizePrompt`` names it), and the
        labels from the batch's target.
    group_column : str
        The group id column (default ``"group_id"``).
    """

    def __init__(self, ranker: RankerModel, *, prompt_column: str = "prompt_ids", item_column: str = "item_id",
                 groups: bool = False, group_column: str = "group_id"):
        super().__init__()
        self.ranker = ranker
        self.prompt_column = prompt_column
        self.item_column = item_column
        self.groups = bool(groups)
        self.group_column = group_column
        base = prompt_column[: -len("_ids")] if prompt_column.endswith("_ids") else prompt_column
        self.prefix_column = f"{base}_prefix_length"
        keep_for_loss(self, "_last_output", None)

    def forward(self, inputs: Dict[str, torch.Tensor], batch: Optional[Batch] = None) -> torch.Tensor:
        values_key, offsets_key = f"{self.prompt_column}__values", f"{self.prompt_column}__offsets"
        if values_key not in inputs or offsets_key not in inputs:
            raise KeyError(
                f"RankerBlock needs the ragged list column {self.prompt_column!r} "
                f"({values_key}, {offsets_key}); the batch has {sorted(inputs)}. Tokenize the text "
                "with merlin_mllm.operators.tokenize_prompt.TokenizePrompt"
            )
        if self.groups:
            return self._forward_groups(inputs, batch)
        ids, mask = batch_from_ragged(inputs[values_key], inputs[offsets_key], self.ranker.pad_token_id)
        item_ids = None
        if self.ranker.backend.uses_item_images(self.ranker.config):
            item_ids = inputs.get(self.item_column)
            if item_ids is not None:
                item_ids = item_ids.reshape(-1)
        output = self.ranker(ids, mask, item_ids=item_ids)
        # Kept for AnswerTokenLoss, which Merlin calls with the (B,) predictions only.
        keep_for_loss(self, "_last_output", output)
        return output.logits[:, 1] - output.logits[:, 0]

    def _forward_groups(self, inputs: Dict[str, torch.Tensor], batch: Optional[Batch]) -> torch.Tensor:
        """The batch's groups, each one packed sequence; rows of a group must be contiguous."""
        for column in (self.group_column, self.prefix_column):
            if column not in inputs:
                raise KeyError(f"RankerBlock(groups=True) needs the column {column!r}; the batch has {sorted(inputs)}")
        values = inputs[f"{self.prompt_column}__values"].reshape(-1).tolist()
        offsets = inputs[f"{self.prompt_column}__offsets"].reshape(-1).tolist()
        prompt_ids = [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        prefix = inputs[self.prefix_column].reshape(-1).tolist()
        group_ids = inputs[self.group_column].reshape(-1).tolist()
        items = None
        if self.ranker.backend.uses_item_images(self.ranker.config) and self.item_column in inputs:
            items = inputs[self.item_column].reshape(-1).tolist()
        labels = None
        if batch is not None and len(batch.targets) == 1:
            labels = next(iter(batch.targets.values())).reshape(-1).round().long().tolist()
        image_token = self.ranker.image_token_id
        candidate_groups, seen, start = [], set(), 0
        for stop in range(1, len(prompt_ids) + 1):
            if stop < len(prompt_ids) and group_ids[stop] == group_ids[start]:
                continue
            if group_ids[start] in seen:
                raise ValueError(f"the rows of group {group_ids[start]} are not contiguous in the batch")
            seen.add(group_ids[start])
            rows = range(start, stop)
            prompts = [EncodedPrompt(prompt_ids[r], int(prefix[r]), image_token is not None and image_token in prompt_ids[r])
                       for r in rows]
            group_labels = [labels[r] for r in rows] if labels is not None else None
            if group_labels is not None and self.ranker.config.loss == "listwise" and sum(group_labels) != 1:
                group_labels = None  # no listwise loss without one positive (a one-row schema probe)
            candidate_groups.append(CandidateGroup.from_prompts(
                prompts, image_token, item_ids=[items[r] for r in rows] if items is not None else None,
                labels=group_labels))
            start = stop
        output = self.ranker.forward_groups(candidate_groups)
        # Kept for AnswerTokenLoss: the groups' loss (lm, binary or listwise) was computed above.
        keep_for_loss(self, "_last_output", output)
        return output.logits[:, 1] - output.logits[:, 0]

    def pop_output(self) -> Optional[Union[RankerOutput, GroupOutput]]:
        """The ranker output of the last forward pass, forgotten once read."""
        return pop_kept(self, "_last_output")


class AnswerTokenLoss(nn.Module):
    """Merlin loss ``(predictions, targets) -> loss`` that applies the ranker's answer-token loss.

    Parameters
    ----------
    block : RankerBlock
        The block whose forward produced the predictions (it keeps the answer logits).
    """

    def __init__(self, block: RankerBlock):
        super().__init__()
        # Not a submodule: the block is already registered in the model.
        object.__setattr__(self, "_block", block)

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        output = self._block.pop_output()
        if output is None or output.logits.shape[0] != predictions.reshape(-1).shape[0]:
            raise RuntimeError(
                "AnswerTokenLoss must be computed right after its RankerBlock's forward pass on the same batch"
            )
        labels = targets.reshape(-1).round().long()
        if isinstance(output, GroupOutput):
            if output.loss is None or output.labels is None or not torch.equal(output.labels.cpu(), labels.cpu()):
                raise RuntimeError("the groups' loss needs every group's labels (one positive each for 'listwise'), "
                                   "in the batch's row order")
            return output.loss
        return self._block.ranker.compute_loss(output, labels)


class YesNoOutput(mm.BinaryOutput):
    """Binary output P(yes) = sigmoid(logit_Yes - logit_No) with the ranker's answer-token loss.

    Parameters
    ----------
    schema : ColumnSchema or Schema, optional
        The binary target column (e.g. ``label``; its name names the prediction).
    block : RankerBlock or HybridScore, optional
        Gives :class:`AnswerTokenLoss` (a :class:`HybridLoss` for a HybridScore). Without it the
        loss is BCE on P(yes), which equals the ranker's ``loss="binary"``.
    metrics : sequence of torchmetrics.Metric, optional
        Default: binary accuracy and AUROC (per batch, as Merlin logs them).
    """

    def __init__(
        self,
        schema: Optional[Union[ColumnSchema, Schema]] = None,
        block: Optional[RankerBlock] = None,
        metrics: Sequence[tm.Metric] = (),
    ):
        # Skip BinaryOutput.__init__: it would add a LazyLinear(1) in front of the sigmoid.
        mm.ModelOutput.__init__(
            self,
            nn.Sigmoid(),
            loss=(HybridLoss(block) if isinstance(block, HybridScore) else AnswerTokenLoss(block))
            if block is not None else nn.BCELoss(),
            metrics=list(metrics) or [tm.Accuracy(task="binary"), tm.AUROC(task="binary")],
        )
        if schema is not None:
            self.initialize_from_schema(schema)
            self._initialized_from_schema = True


class RankerMerlinModel(mm.Model):
    """``mm.Model(RankerBlock(ranker), YesNoOutput(target, block))`` set up for LoRA training.

    Parameters
    ----------
    ranker : RankerModel
        Built with :meth:`RankerModel.build` or loaded with ``is_trainable=True``.
    target : ColumnSchema, Schema or str
        The binary label column (default ``"label"``).
    lr : float
        Learning rate of the LoRA weights (paper: 2e-5).
    projector_lr : float, optional
        Learning rate of the embedded image projector, which trains from scratch (default ``lr``).
    weight_decay : float
    prompt_column, item_column : str
        Passed to :class:`RankerBlock`.
    groups : bool
        Batches of whole groups, each one packed sequence (passed to :class:`RankerBlock`).
    head : HybridHead, optional
        Train a hybrid: the score is ``head(features) + logit(Yes) - logit(No)``, the
        head trained jointly with the LoRA weights (loss ``binary`` or ``listwise``). The batch
        must carry the head's feature columns.
    head_lr : float, optional
        Learning rate of the head (default ``lr``).
    """

    def __init__(
        self,
        ranker: RankerModel,
        target: Union[ColumnSchema, Schema, str] = "label",
        *,
        lr: float = 2e-5,
        projector_lr: Optional[float] = None,
        weight_decay: float = 0.0,
        prompt_column: str = "prompt_ids",
        item_column: str = "item_id",
        groups: bool = False,
        head: Optional[HybridHead] = None,
        head_lr: Optional[float] = None,
    ):
        if isinstance(target, str):
            target = ColumnSchema(target)
        block = RankerBlock(ranker, prompt_column=prompt_column, item_column=item_column, groups=groups)
        if head is not None:
            if ranker.config.loss == "lm":
                raise ValueError("a hybrid (head) trains with loss='binary' or 'listwise', not 'lm'")
            block = HybridScore(head.to(ranker.device), llm=block)
        super().__init__(block, YesNoOutput(target, block))
        self.head_lr = None if head_lr is None else float(head_lr)
        self.lr = float(lr)
        self.projector_lr = None if projector_lr is None else float(projector_lr)
        self.weight_decay = float(weight_decay)
        # Checkpoints hold the trainable tensors only; the frozen base comes from its name.
        self.strict_loading = False

    @property
    def ranker(self) -> RankerModel:
        first = self.first()
        return first.llm.ranker if isinstance(first, HybridScore) else first.ranker

    @property
    def head(self) -> Optional[HybridHead]:
        """The hybrid's tabular head, or None for the LLM alone."""
        first = self.first()
        return first.head if isinstance(first, HybridScore) else None

    def validation_step(self, batch, batch_idx):
        # merlin.models.torch 23.12's _val_step wraps a tensor target as {"default": t}, which
        # compute_loss then looks up under the output's name, misses, and replaces by zeros: the
        # validation loss was the loss against all-"No" labels. Name the target as training does.
        if isinstance(batch, (tuple, list)) and isinstance(batch[1], torch.Tensor):
            batch = (batch[0], {self.last().output_schema.first.name: batch[1]})
        return super().validation_step(batch, batch_idx)

    def configure_optimizers(self):
        groups = self.ranker.parameter_groups(self.lr, self.projector_lr, self.weight_decay)
        if not groups:
            raise ValueError("the ranker has no trainable parameters (zero-shot?): nothing to train")
        for group in groups:
            group.pop("name", None)
        if self.head is not None:
            groups.append({"params": list(self.head.parameters()), "lr": self.head_lr or self.lr,
                           "weight_decay": self.weight_decay})
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)

    def initialize(self, data):
        """Run Merlin's schema tracing on one row, on the ranker's device, keeping its dtypes.

        (``mm.Model.initialize`` would cast the whole model to float32 and move it to the
        loader's device.)
        """
        batch = data if isinstance(data, Batch) else sample_batch(data, batch_size=1, shuffle=False)
        batch = batch.to(None, device=self.ranker.device)
        return module_utils.initialize(self, batch, dtype=None)

    def trainable_names(self) -> set:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = self.trainable_names() - set(checkpoint.get("state_dict", {}))
        if missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}): "
                "it was saved by a differently configured ranker"
            )
