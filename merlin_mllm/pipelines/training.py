"""``train_ranker``: LoRA SFT of the MLLM-MSR ranker through Merlin's dataloader and Lightning.

Pipeline (every step on the Merlin stack)::

    data_dir/{train,valid}  + items/ (title, attributes, image_path) + user summaries (store)
        -> pandas rows: user_summary, candidate_text, has_image, item_id, group_id, label
        -> nvt.Workflow: [user_summary, candidate_text, has_image] >> TokenizePrompt  (+ item_id, group_id, label)
        -> merlin.io.Dataset -> merlin.dataloader.torch.Loader (one shard per DDP rank)
        -> RankerMerlinModel = mm.Model(RankerBlock(ranker), YesNoOutput(label))
        -> pytorch_lightning.Trainer (checkpoints, resume, gradient accumulation, DDP)

Batching (``TrainConfig.batching``): ``"rows"`` shuffles candidate rows one by one, and each
row runs its whole prompt. ``"groups"`` keeps each group (``group_id``: one user's positive
and its K negatives at one target; K is the data's ``--train-negatives``) together: micro-
batches hold whole groups, in a seeded order reshuffled every epoch (:class:`RankerDataModule`),
and the block runs each group as one packed sequence, the user's prefix once and every candidate
after it (``RankerModel.forward_groups``). The loss (``TrainConfig.loss``) is then ``lm``,
``binary`` or ``listwise`` over the group's candidates (:mod:`merlin_mllm.ranker.losses`).
Training rows of a folder prepared with ``--train-targets every`` read their user summaries with
``partial_block="titles"`` (:func:`merlin_mllm.summaries.rows.partial_block_rule`).

Outputs under ``out_dir`` (the names: :mod:`merlin_mllm.ranker.saved`)::

    model/                 the trained ranker (RankerModel.save_pretrained) + item_images.safetensors
    checkpoints/last.ckpt  trainable tensors + optimizer state; resumed from when present
    item_images.safetensors  item-keyed EfficientNet grids (embedded model with images)
    collab_embeddings.safetensors  SASRec item embeddings of the collaborative tokens (collab_tokens)
    train_config.json      the settings; a resume with different ones is refused
    training.json          loss per optimizer step, per-epoch means, row counts, timings
    ranks/rank<r>.json     per-process record (rows seen, final trainable-weights digest)

User summaries (``summaries``) may be a summary store folder (written by
``merlin-mllm summarize users``: each row gets the summary of its own history, the items before
its target, so nothing leaks), a DataFrame or parquet path with ``user_id``,
``target_position``, ``user_summary``, or a callable ``rows -> list of str``.

Usage::

    from merlin_mllm.pipelines import TrainConfig, train_ranker
    model_dir = train_ranker("data/ml100k", "data/summaries", "runs/ranker", TrainConfig(epochs=1))
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from merlin_mllm import merlin_compat

merlin_compat.apply()

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import merlin.io
    import nvtabular as nvt
    import pytorch_lightning as pl
    from merlin.dataloader.torch import Loader
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.strategies import DDPStrategy

from merlin_mllm.data.collaborative import DEFAULT_RECENT_DAYS
from merlin_mllm.data.prepare import ROW_TAGS
from merlin_mllm.data.splits import prepared_tables
from merlin_mllm.operators.tokenize_prompt import TokenizePrompt
from merlin_mllm.pipelines.train_config import TrainConfig
from merlin_mllm.pipelines.collab import train_collab_embeddings
from merlin_mllm.pipelines.hybrid import HeadSettings, attach_features, train_head
from merlin_mllm.ranker.collab_tokens import CollabEmbeddings
from merlin_mllm.ranker.block import RankerMerlinModel
from merlin_mllm.ranker.ranker_config import COLLAB_EMBEDDINGS_FILE, EMBEDDED, HEAD_FILE, ITEM_IMAGES_FILE
from merlin_mllm.ranker.image_features import ENCODER_NAME, ItemImageFeatures
from merlin_mllm.ranker.hybrid_head import HybridHead
from merlin_mllm.ranker.model import RankerModel
from merlin_mllm.ranker.prompt import DEFAULT_MAX_PROMPT_TOKENS
from merlin_mllm.ranker.saved import (CHECKPOINT_DIR, LAST_CHECKPOINT, MODEL_DIR, TRAIN_CONFIG_FILE, TRAINING_LOG_FILE,
                                      item_image_table, read_train_config)
from merlin_mllm.summaries.candidates import CandidateText, ItemSummarySource, candidate_summaries
from merlin_mllm.summaries.rows import SummarySource, partial_block_rule, user_context_texts

log = logging.getLogger(__name__)

__all__ = [
    "train_ranker",
    "saved_settings",
    "load_rows",
    "tokenize_rows",
    "RankerDataModule",
    "group_size",
    "shuffle_groups",
    "initial_head",
]

#: Settings that must match for a checkpoint to be resumed: TrainConfig's resume fields, and
#: ``image_encoder``, what made the image tokens: a checkpoint from another encoder has another
#: projector shape, refused here by name rather than by a size mismatch deep inside Lightning.
RESUME_KEYS = TrainConfig.resume_fields() + ("image_encoder",)
PASSTHROUGH_COLUMNS = ("item_id", "user_id", "group_id", "label")
#: Full-batch epochs of the hybrid head's warm start (no validation rows here to stop on): the
#: non-LLM head's fits early-stopped on ML-100k's valid splits (benchmarks/quality/run_hybrid.py,
#: both protocols, seeds 0-2) peaked at epochs 35 to 184, median 57.
WARM_START_EPOCHS = 60


def saved_settings(config: TrainConfig, data_dir: Union[str, os.PathLike]) -> Dict:
    """What ``train_config.json`` (and ``training.json``'s ``settings``) record of a run: the
    config's saved fields (``base_model`` resolved, ``strategy`` as text), the image encoder and the data."""
    return {
        **config.saved_fields(),
        "base_model": config.base_model or EMBEDDED,
        "image_encoder": ENCODER_NAME if config.use_images else None,
        "strategy": str(config.strategy),
        "data_dir": str(Path(data_dir).resolve()),
    }


# ----------------------------------------------------------------------------- rows
def load_rows(
    data_dir: Union[str, os.PathLike],
    split: str,
    summaries: Optional[SummarySource],
    *,
    max_groups: Optional[int] = None,
    seed: int = 0,
    user_context: str = "summary",
    context_titles: int = 5,
    candidate_text: Union[str, CandidateText] = "title",
    item_slots: bool = False,
    context_ratings: bool = False,
    context_attributes: bool = False,
) -> pd.DataFrame:
    """One split's rows with the text the prompt needs: ``user_summary`` and ``candidate_text``.

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset`` (``<split>/`` and ``items/``).
    split : str
        ``"train"``, ``"valid"`` or ``"test"``.
    summaries : path, DataFrame or callable
        See :func:`row_summaries`.
    max_groups : int, optional
        Keep this many groups (a seeded random choice), for quick runs.
    seed : int
    user_context, context_titles :
        What ``user_summary`` holds (the ranker's ``user_context``): see
        :func:`merlin_mllm.summaries.rows.user_context_texts`. With "titles", ``summaries`` may be None.
    candidate_text : str or CandidateText
        What ``candidate_text`` holds (the ranker's ``candidate_text``; see
        :class:`merlin_mllm.summaries.candidates.CandidateText`, whose ``for_ranker`` cuts each
        part as the ranker does). Default: the title.
    item_slots : bool
        A collaborative-token slot after each history title (a ranker with ``collab_tokens``).
    context_ratings, context_attributes : bool
        Each history title's rating and catalogue attributes (the ranker's settings of the same
        names; :func:`merlin_mllm.summaries.rows.user_context_texts` ``ratings``/``attributes``).

    Returns
    -------
    DataFrame
        The split's columns plus ``title``, ``candidate_text``, ``image_path`` and
        ``user_summary``, in file order.
    """
    data = prepared_tables(data_dir)  # a PreparedTables passed in keeps its tables: each read once
    data_dir = data.folder
    split_dir = data_dir / split
    if not split_dir.exists():
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    rows = data.table(split)
    needed = ["user_id", "item_id", "label", "group_id"]
    missing = [c for c in needed if c not in rows.columns]
    if missing:
        raise ValueError(f"{split_dir}: rows lack column(s) {missing}")
    if max_groups is not None and max_groups < rows["group_id"].nunique():
        groups = np.sort(rows["group_id"].unique())
        chosen = np.random.default_rng(seed).choice(groups, size=int(max_groups), replace=False)
        rows = rows[rows["group_id"].isin(chosen).to_numpy()].reset_index(drop=True)
    items = data.items
    columns = ["item_id", "title"] + (["image_path"] if "image_path" in items.columns else [])
    frame = rows.merge(items[columns], on="item_id", how="left", validate="many_to_one", indicator=True)
    unknown = frame["_merge"] != "both"
    if unknown.any():
        raise ValueError(
            f"{split_dir}: {int(unknown.sum())} rows name items missing from {data_dir / 'items'} "
            f"(e.g. item_id {int(frame.loc[unknown, 'item_id'].iloc[0])})"
        )
    frame = frame.drop(columns="_merge")
    if "image_path" not in frame.columns:
        frame["image_path"] = None
    maker = CandidateText(candidate_text) if isinstance(candidate_text, str) else candidate_text
    shown = items[items["item_id"].isin(frame["item_id"].unique())]  # only the items the rows name
    texts = maker.texts(shown, where=str(data_dir / "items"))
    frame["candidate_text"] = frame["item_id"].map(pd.Series(texts.to_numpy(), index=shown["item_id"].to_numpy()))
    frame["user_summary"] = user_context_texts(summaries, data, frame, context=user_context, titles=context_titles,
                                               partial_block=partial_block_rule(data_dir, split), item_slots=item_slots,
                                               ratings=context_ratings, attributes=context_attributes)
    return frame


def tokenize_rows(frame: pd.DataFrame, ranker: RankerModel, *, max_length: int = DEFAULT_MAX_PROMPT_TOKENS,
                  item_features: Optional[ItemImageFeatures] = None,
                  extra_columns: Sequence[str] = ()) -> merlin.io.Dataset:
    """Rows with text -> a Merlin dataset of token ids, through an NVTabular workflow.

    The prompt is the ranker's own (same tokenizer, chat template, image tokens and budgets).
    ``has_image`` comes from ``item_features`` (an item whose picture is missing or unreadable
    gets a text-only prompt). ``extra_columns`` (e.g. a hybrid's feature columns) pass through.
    """
    passthrough = list(PASSTHROUGH_COLUMNS) + [c for c in extra_columns if c not in PASSTHROUGH_COLUMNS]
    data = frame[["user_summary", "candidate_text"] + passthrough].copy()
    if ranker.config.use_images and ranker.prompt.image_mode == "placeholder" and item_features is not None:
        data["has_image"] = item_features.has_image_for(torch.as_tensor(data["item_id"].to_numpy())).numpy()
    else:
        data["has_image"] = False
    data["label"] = data["label"].astype(np.int64)
    dataset = merlin.io.Dataset(data, cpu=True)
    schema = dataset.schema
    for name in PASSTHROUGH_COLUMNS:
        if name in ROW_TAGS:  # the tags of the prepared splits (group_id has none)
            schema[name] = schema[name].with_tags(ROW_TAGS[name])
    dataset.schema = schema
    prompt = (["user_summary", "candidate_text", "has_image"] + (["item_id"] if ranker.config.collab_tokens else [])
              >> TokenizePrompt.for_ranker(ranker, max_length=max_length, title_column="candidate_text"))
    workflow = nvt.Workflow(prompt + passthrough)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return workflow.fit_transform(dataset)


# ----------------------------------------------------------------------------- Lightning
class RankerDataModule(pl.LightningDataModule):
    """Merlin loaders over tokenized rows; under DDP each rank gets an equal, disjoint shard.

    Equal shards give every rank the same number of batches, which DDP needs (a rank with one
    batch more would wait forever for the others' gradients).

    With ``groups=True`` every micro-batch holds whole groups (``group_id``: one user's positive
    and its negatives at one target, rows in file order): the groups are shuffled as units
    (seeded, reshuffled every epoch: the trainer reloads the loader each epoch), the loader reads
    them in that order without shuffling rows, and its batch size is ``batch_size`` rounded down
    to whole groups (at least one). Every group must then have the same size (what
    ``prepare_dataset`` writes: 1 + K), so no batch cuts a group.

    Parameters
    ----------
    train : merlin.io.Dataset
        Output of :func:`tokenize_rows`.
    valid : merlin.io.Dataset, optional
    batch_size : int
        Rows per micro-batch.
    seed : int
        Seeds the assignment of rows to ranks and, with the epoch, the order of the rows or groups.
    groups : bool
        Micro-batches of whole groups (see above).
    """

    def __init__(self, train: merlin.io.Dataset, valid: Optional[merlin.io.Dataset] = None, *,
                 batch_size: int = 4, seed: int = 0, groups: bool = False):
        super().__init__()
        self.schema = train.schema
        self.train_frame = train.to_ddf().compute().reset_index(drop=True)
        self.valid_frame = valid.to_ddf().compute().reset_index(drop=True) if valid is not None else None
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.groups = bool(groups)
        self.group_size = {}
        if self.groups:
            self.group_size = {"train": group_size(self.train_frame, "train")}
            if self.valid_frame is not None:
                self.group_size["valid"] = group_size(self.valid_frame, "valid")
        if valid is None:
            # Lightning looks for the hook by name: without validation data there is none.
            self.val_dataloader = None  # type: ignore[assignment]

    def rows_per_batch(self, split: str) -> int:
        """The loader's batch size: ``batch_size`` rows, or with ``groups`` that many rows of whole groups."""
        if not self.groups:
            return self.batch_size
        size = self.group_size[split]
        return max(1, self.batch_size // size) * size

    def _world(self) -> Tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def shard(self, frame: pd.DataFrame) -> pd.DataFrame:
        """This rank's rows: groups in a seeded random order, cut into ``world_size`` equal parts.

        Whole groups stay on one rank except at the cuts; the remainder rows (fewer than
        ``world_size``) are left out so that every rank has the same number of rows.
        """
        world, rank = self._world()
        if world == 1:
            return frame
        per_rank = len(frame) // world
        if self.groups:  # whole groups per rank
            size = int(frame.groupby("group_id", sort=False).size().iloc[0])
            per_rank -= per_rank % size
        if per_rank == 0:
            raise ValueError(f"{len(frame)} rows cannot be shared by {world} processes")
        mine = shuffle_groups(frame, self.seed).iloc[rank * per_rank:(rank + 1) * per_rank]
        return mine.reset_index(drop=True)

    def _loader(self, frame: pd.DataFrame, shuffle: bool, split: str = "train") -> Loader:
        frame = self.shard(frame)
        if shuffle:
            # Seeded by epoch here rather than by the loader's own shuffle, so that a resumed
            # epoch can be rebuilt in the order it started in (see train_dataloader).
            seed = self.seed + 1 + self._epoch()
            frame = (shuffle_groups(frame, seed) if self.groups
                     else frame.iloc[np.random.default_rng(seed).permutation(len(frame))].reset_index(drop=True))
        dataset = merlin.io.Dataset(frame, schema=self.schema, cpu=True)
        return Loader(dataset, batch_size=self.rows_per_batch(split), shuffle=False)

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def _batches_already_trained(self) -> int:
        """On a resume from a checkpoint saved mid-epoch: how many of this epoch's batches it had trained."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def train_dataloader(self):
        loader = self._loader(self.train_frame, shuffle=True)
        trained = self._batches_already_trained()
        return RestOfEpoch(loader, trained) if 0 < trained < len(loader) else loader

    def val_dataloader(self) -> Loader:  # noqa: F811 - replaced by None when there is no valid set
        return self._loader(self.valid_frame, shuffle=False, split="valid")


class RestOfEpoch:
    """The batches of ``loader`` after its first ``skip``, reporting the whole epoch's length.

    Lightning restarts a loader from its first batch when it resumes a checkpoint saved
    mid-epoch (it warns that the loader is "not resumable"), while it counts the epoch on from
    the checkpoint: the resumed run trained the epoch's first batches twice and never its last.
    The epoch's order is a function of the seed and the epoch (:class:`RankerDataModule`), so
    rebuilding it and skipping the batches already trained continues it exactly. The length
    stays the epoch's, which Lightning compares with the batches it has counted.
    """

    def __init__(self, loader: Loader, skip: int):
        self.loader = loader
        self.skip = int(skip)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.skip, None)


def group_size(frame: pd.DataFrame, what: str = "rows") -> int:
    """The common size of the groups of ``frame`` (rows of one ``group_id`` must be contiguous);
    a ValueError naming the sizes when they differ, or when a group's rows are scattered."""
    groups = frame["group_id"].to_numpy()
    if groups.size == 0:
        raise ValueError(f"{what}: no rows")
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    if len(starts) != len(np.unique(groups)):
        raise ValueError(f"{what}: the rows of a group are not contiguous; training on groups reads them in file order")
    sizes = np.diff(np.r_[starts, groups.size])
    if (sizes != sizes[0]).any():
        counts = pd.Series(sizes).value_counts().sort_index().to_dict()
        raise ValueError(
            f"{what}: training on groups needs groups of one size (1 positive + K negatives), got sizes {counts} "
            f"(size: groups); prepare the data with one --train-negatives K, or train with batching='rows'"
        )
    return int(sizes[0])


def shuffle_groups(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """``frame`` with its groups in a seeded random order, each group's rows kept in order."""
    groups = frame["group_id"].to_numpy()
    unique = np.unique(groups)
    place = np.argsort(np.random.default_rng(seed).permutation(unique.size))
    order = np.lexsort((np.arange(len(frame)), place[np.searchsorted(unique, groups)]))
    return frame.iloc[order].reset_index(drop=True)


class LastCheckpoint(pl.callbacks.ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps and at every epoch end.

    Lightning's own ``ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=N)``
    writes ``last.ckpt`` at an epoch end only after validation. With ``validate=False`` a
    finished epoch was left at its last N-step mark, and a resumed run trained that epoch's tail
    again on a restarted loader.

    ``last.ckpt`` is the one file a resume reads, so it is always overwritten. Lightning would
    otherwise write ``last-v1.ckpt`` beside a ``last.ckpt`` it did not write itself in this
    run's folder (a run folder that was copied or moved), and the next resume would restart
    from the stale one.
    """

    def __init__(self, **kwargs):
        super().__init__(enable_version_counter=False, **kwargs)

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TrainingRecord(pl.Callback):
    """Records the loss of every micro-batch and, at the end, this rank's summary file."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.steps: List[dict] = []
        self.rows_seen = 0
        self.groups_seen: set = set()
        self._step = 0
        self._rank = 0
        self._restored: Optional[dict] = None

    # Kept in the checkpoint, so a run resumed after a crash records the steps before it too.
    # Only rank 0 writes the checkpoint: the other ranks of a DDP run start their records again.
    def state_dict(self) -> dict:
        return {"rank": self._rank, "steps": self.steps, "rows_seen": self.rows_seen,
                "groups_seen": sorted(self.groups_seen)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict

    def on_train_start(self, trainer, pl_module):
        self._rank = int(trainer.global_rank)
        restored, self._restored = self._restored, None
        if restored is not None and restored["rank"] == self._rank:
            self.steps = list(restored["steps"])
            self.rows_seen = int(restored["rows_seen"])
            self.groups_seen = set(restored["groups_seen"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # The optimizer step this micro-batch contributes to (before it is taken).
        self._step = int(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # Lightning hands over the loss already divided by accumulate_grad_batches (the part this
        # micro-batch adds to the accumulated gradient); record the micro-batch's own loss.
        loss = float(loss) * int(trainer.accumulate_grad_batches)
        self.steps.append({"epoch": int(trainer.current_epoch), "optimizer_step": self._step, "loss": loss})
        features = batch[0] if isinstance(batch, (tuple, list)) else batch.features
        if "group_id" in features:
            groups = features["group_id"].reshape(-1)
            self.rows_seen += int(groups.numel())
            self.groups_seen.update(int(g) for g in groups.tolist())
            self.steps[-1]["group_ids"] = sorted({int(g) for g in groups.tolist()})
            self.steps[-1]["rows"] = int(groups.numel())

    def on_train_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.ranker.trainable_state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
        record = {
            "rank": int(trainer.global_rank),
            "world_size": int(trainer.world_size),
            "global_step": int(trainer.global_step),
            "rows_seen": self.rows_seen,
            "groups_seen": sorted(self.groups_seen),
            "epochs_completed": int(trainer.current_epoch),
            "trainable_sha256": digest.hexdigest(),
            "micro_batch_losses": self.steps,
        }
        ranks = self.out_dir / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        (ranks / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=2) + "\n")


def _strategy(strategy, devices: int, accelerator: str):
    """DDP on CPU uses gloo; unused parameters are allowed (a batch without images leaves the
    image projector without gradients)."""
    if isinstance(strategy, str) and strategy in ("ddp", "ddp_spawn") and (devices > 1 or devices == -1):
        return DDPStrategy(
            start_method="spawn" if strategy == "ddp_spawn" else "popen",
            find_unused_parameters=True,
            process_group_backend="gloo" if accelerator == "cpu" else None,
        )
    return strategy


def _check_resume(out_dir: Path, settings: dict, resume: bool) -> Optional[Path]:
    """The checkpoint to resume from, if any; refused (naming the fields) when the saved
    ``train_config.json`` differs from ``settings`` in a :data:`RESUME_KEYS` field."""
    checkpoint = out_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not resume or not checkpoint.exists():
        return None
    saved = read_train_config(out_dir)
    if saved is not None:
        changed = {k: (saved.get(k), settings.get(k)) for k in RESUME_KEYS if saved.get(k) != settings.get(k)}
        if changed:
            raise ValueError(
                f"{checkpoint} was trained with other settings {changed} (saved, now); "
                "use another out_dir or resume=False"
            )
    return checkpoint


def _local_rank() -> int:
    # Set by Lightning for the processes it launches; the launching process is rank 0.
    return int(os.environ.get("LOCAL_RANK", "0"))


def train_ranker(
    data_dir: Union[str, os.PathLike],
    summaries: Optional[SummarySource],
    out_dir: Union[str, os.PathLike],
    config: Optional[TrainConfig] = None,
    *,
    features=None,
    item_summaries: Optional[ItemSummarySource] = None,
    collab_embeddings: Optional[CollabEmbeddings] = None,
    progress: bool = True,
) -> Path:
    """Fine-tune the ranker with LoRA (answer-token loss) and save it under ``out_dir/model``.

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset`` (``train/``, ``valid/``, ``items/``; ``events/`` when rows
        lack ``history_item_ids``).
    summaries : path, DataFrame, callable or None
        User summaries: see :func:`merlin_mllm.summaries.rows.row_summaries` (None with
        ``config.user_context="titles"``, which reads none). With
        ``strategy="ddp_spawn"`` it must be picklable.
    out_dir : path
        Run folder (see the module docstring); created when missing.
    config : TrainConfig, optional
        The settings (default ``TrainConfig()``: the paper's LoRA recipe). Its saved fields go to
        ``out_dir/train_config.json``; a resume (``config.resume``, the default) continues from
        ``out_dir/checkpoints/last.ckpt`` and is refused when a resume field differs from the
        saved one. With ``strategy="ddp"`` Lightning starts the other processes by re-running
        the launching script, so code after this call runs in every process (guard it with
        ``os.environ.get("LOCAL_RANK", "0") == "0"``).
    features : path or DataFrame, optional
        With ``config.head_features`` (a hybrid): the training split's rows with those columns,
        matched on (group_id, item_id), e.g. ``write_feature_table(data_dir, "train", path)``
        (:mod:`merlin_mllm.pipelines.hybrid`). The head is saved beside the ranker
        (``model/hybrid_head.safetensors``, with its columns and ``config.head_recent_days``).
    item_summaries : store folder or item id -> text, optional
        With a ``config.candidate_text`` that shows item summaries: where they are. Default:
        ``summaries`` when it is a summary store folder (the item and user stages share one).
    collab_embeddings : CollabEmbeddings, optional
        With ``config.collab_tokens``: the item table to use (default: the run's
        ``collab_embeddings.safetensors`` when it has one, else SASRec trained here on the events
        before the train split's cut, :func:`merlin_mllm.pipelines.collab.train_collab_embeddings`,
        seeded with ``config.seed``). Saved as the run's ``collab_embeddings.safetensors`` and in
        ``model/``.
    progress : bool
        Progress bars.

    Returns
    -------
    Path
        ``out_dir/model``, loadable with ``RankerModel.from_pretrained``.
    """
    started = time.time()
    config = config if config is not None else TrainConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    accelerator = config.accelerator or ("gpu" if torch.cuda.is_available() else "cpu")
    settings = saved_settings(config, data_dir)
    is_launcher = _local_rank() == 0
    if is_launcher:
        out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = _check_resume(out_dir, settings, config.resume)
    pl.seed_everything(config.seed, workers=True, verbose=False)

    device = torch.device("cuda", _local_rank()) if accelerator == "gpu" else torch.device("cpu")
    if collab_embeddings is not None and not config.collab_tokens:
        raise ValueError("collab_embeddings were given but config.collab_tokens is False")
    collab = dict(collab_tokens=True, collab_embeddings=_collab_table(
        config, data_dir, out_dir, collab_embeddings, is_launcher, resumed=checkpoint is not None)
    ) if config.collab_tokens else {}
    ranker = RankerModel.build(
        settings["base_model"], use_images=config.use_images, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout, loss=config.loss, seed=config.seed, device=device,
        prompt_version=config.prompt_version, user_context=config.user_context, context_titles=config.context_titles,
        candidate_text=config.candidate_text, precision=config.precision, context_ratings=config.context_ratings,
        context_attributes=config.context_attributes, **collab,
    )
    groups = config.batching == "groups"
    table = None
    if ranker.config.use_images and ranker.prompt.image_mode == "placeholder":
        table = item_image_table(data_dir, out_dir / ITEM_IMAGES_FILE, progress=progress and is_launcher)
        ranker.set_item_features(table)
    elif ranker.config.use_images:
        raise ValueError(
            f"{settings['base_model']}: Hugging Face MLLMs expand image tokens from the pixels, which the "
            "token-id pipeline does not carry; train them with use_images=False (text-only), or use the "
            "embedded model for images"
        )

    context = dict(user_context=config.user_context, context_titles=config.context_titles, item_slots=config.collab_tokens,
                   context_ratings=config.context_ratings, context_attributes=config.context_attributes,
                   candidate_text=CandidateText.for_ranker(ranker, candidate_summaries(summaries, item_summaries)))
    train_rows = load_rows(data_dir, "train", summaries, max_groups=config.max_groups, seed=config.seed, **context)
    head, head_columns = None, list(config.head_features or ())
    if head_columns:
        if features is None:
            raise ValueError(f"head_features {head_columns} need features=<the training rows with those columns>")
        train_rows = attach_features(train_rows, features, head_columns, what="training rows")
        head = initial_head(config, train_rows)
    elif features is not None:
        raise ValueError("features were given but config.head_features is None: name the columns the head reads")
    too_few = config.too_few_steps(len(train_rows), max(1, config.devices)) if is_launcher else None
    if too_few:
        log.warning(too_few)
    valid_rows = None
    if config.validate and (data_dir / "valid").exists() and head is None:  # a hybrid has no valid features here
        valid_rows = load_rows(data_dir, "valid", summaries, max_groups=config.max_groups, seed=config.seed, **context)
    train_data = tokenize_rows(train_rows, ranker, max_length=config.max_length, item_features=table,
                               extra_columns=head_columns)
    valid_data = (tokenize_rows(valid_rows, ranker, max_length=config.max_length, item_features=table)
                  if valid_rows is not None else None)
    datamodule = RankerDataModule(train_data, valid_data, batch_size=config.batch_size, seed=config.seed, groups=groups)

    merlin_model = RankerMerlinModel(ranker, train_data.schema["label"], lr=config.lr, projector_lr=config.projector_lr,
                                     groups=groups, head=head, head_lr=config.head_lr)
    if is_launcher:
        (out_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    record = TrainingRecord(out_dir)
    checkpointing = LastCheckpoint(
        dirpath=out_dir / CHECKPOINT_DIR, save_last=True, save_top_k=0,
        every_n_train_steps=config.checkpoint_every_n_steps,
    )
    trainer = pl.Trainer(
        accelerator=accelerator, devices=config.devices, strategy=_strategy(config.strategy, config.devices, accelerator),
        max_epochs=config.epochs, max_steps=config.max_steps, accumulate_grad_batches=config.grad_accum,
        callbacks=[checkpointing, record], logger=CSVLogger(str(out_dir), name="logs"),
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=1, deterministic=False,
        # Rows or groups are reshuffled when the loader is made: make it again every epoch.
        reload_dataloaders_every_n_epochs=1,
    )
    with merlin_compat.quiet_known_warnings():
        trainer.fit(merlin_model, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None)

    model_dir = out_dir / MODEL_DIR
    if trainer.is_global_zero:
        ranker.save_pretrained(model_dir)
        if table is not None:
            table.save(model_dir / ITEM_IMAGES_FILE)
        if head is not None:
            merlin_model.head.save(model_dir / HEAD_FILE)
        _write_training_summary(out_dir, trainer, settings, train_rows, valid_rows, checkpoint, started)
    if trainer.world_size > 1:
        trainer.strategy.barrier("ranker-saved")
    return model_dir


def _collab_table(config: TrainConfig, data_dir: Path, out_dir: Path, given: Optional[CollabEmbeddings],
                 is_launcher: bool, resumed: bool) -> CollabEmbeddings:
    """The run's collaborative item table: ``given``; when a checkpoint is resumed, the run's own
    file (the table its projector learned on); else SASRec trained now. Written to the run folder."""
    path = out_dir / COLLAB_EMBEDDINGS_FILE
    reuse = given is None and resumed and path.is_file()
    if given is not None:
        table = given
    elif reuse:
        table = CollabEmbeddings.load(path)
    else:
        table = train_collab_embeddings(data_dir, seed=config.seed)
    log.info("collaborative tokens: %s", table.summary())
    if is_launcher and not reuse:
        table.save(path)
    return table


def initial_head(config: TrainConfig, train_rows: pd.DataFrame) -> HybridHead:
    """The hybrid's head as joint training starts, deterministic given ``config.seed``.

    Its scaling is set from the training rows. With ``head_warm_start`` it is first fitted on
    them alone (the non-LLM head's recipe), so that joint training starts from the
    collaborative score and the LLM's gradient is what that score gets wrong.
    """
    columns = list(config.head_features)
    recent_days = config.head_recent_days or DEFAULT_RECENT_DAYS
    if config.head_warm_start:
        fit = train_head(train_rows, None, columns, seed=config.seed, recent_days=recent_days,
                         settings=HeadSettings(hidden=config.head_hidden, epochs=WARM_START_EPOCHS))
        log.info("hybrid head warm start: %d full-batch epochs on %d training rows, final loss %.4f",
                 len(fit.train_loss), len(train_rows), fit.train_loss[-1])
        return fit.head
    torch.manual_seed(config.seed)
    return HybridHead(columns, config.head_hidden, recent_days=recent_days).fit_scaling(train_rows[columns])


def _write_training_summary(out_dir, trainer, settings, train_rows, valid_rows, checkpoint, started):
    # Read back what rank 0 recorded: with ddp_spawn it trained in a child process, and this
    # process's callbacks saw nothing.
    rank0 = json.loads((out_dir / "ranks" / "rank0.json").read_text())
    # A resumed run's record holds the steps before the checkpoint too (TrainingRecord.state_dict).
    steps = list(rank0["micro_batch_losses"])
    per_epoch: Dict[int, List[float]] = {}
    for step in steps:
        per_epoch.setdefault(step["epoch"], []).append(step["loss"])
    summary = {
        "settings": settings,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "global_step": int(rank0["global_step"]),
        "epochs_completed": int(rank0["epochs_completed"]),
        "world_size": int(rank0["world_size"]),
        "train_rows": int(len(train_rows)),
        "train_groups": int(train_rows["group_id"].nunique()),
        "rows_seen": sum(int(s.get("rows", 0)) for s in steps),
        "valid_rows": int(len(valid_rows)) if valid_rows is not None else 0,
        "epoch_mean_loss": {str(e): float(np.mean(v)) for e, v in sorted(per_epoch.items())},
        "micro_batch_losses": steps,
        "val_loss": float(trainer.callback_metrics["val_loss"]) if "val_loss" in trainer.callback_metrics else None,
        "seconds": round(time.time() - started, 1),
    }
    (out_dir / TRAINING_LOG_FILE).write_text(json.dumps(summary, indent=2) + "\n")
