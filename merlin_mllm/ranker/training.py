"""``train_ranker``: LoRA SFT of the MLLM-MSR ranker through Merlin's dataloader and Lightning.

Pipeline (every step on the Merlin stack)::

    data_dir/{train,valid}  + items/ (title, image_path) + user summaries (store)
        -> pandas rows: user_summary, title, has_image, item_id, group_id, label
        -> nvt.Workflow: [user_summary, title, has_image] >> TokenizePrompt  (+ item_id, group_id, label)
        -> merlin.io.Dataset -> merlin.dataloader.torch.Loader (one shard per DDP rank)
        -> RankerMerlinModel = mm.Model(RankerBlock(ranker), YesNoOutput(label))
        -> pytorch_lightning.Trainer (checkpoints, resume, gradient accumulation, DDP)

Outputs under ``out_dir``::

    model/                 the trained ranker (RankerModel.save_pretrained) + item_images.safetensors
    checkpoints/last.ckpt  trainable tensors + optimizer state; resumed from when present
    item_images.safetensors  item-keyed EfficientNet grids (embedded model with images)
    train_config.json      the settings; a resume with different ones is refused
    training.json          loss per optimizer step, per-epoch means, row counts, timings
    ranks/rank<r>.json     per-process record (rows seen, final trainable-weights digest)

User summaries (``summaries``) may be a summary store folder (written by
``merlin-mllm summarize users``: each row gets the summary of its own history, the items before
its target, so nothing leaks), a DataFrame or parquet path with ``user_id``,
``target_position``, ``user_summary``, or a callable ``rows -> list of str``.

Usage::

    from merlin_mllm.ranker.training import train_ranker
    model_dir = train_ranker("data/ml100k", "data/summaries", "runs/ranker", epochs=1)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

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
    from merlin.schema import Tags

from merlin_mllm.data.tables import read_table
from merlin_mllm.operators.tokenize_prompt import TokenizePrompt
from merlin_mllm.ranker.features import ENCODER_NAME, ItemImageFeatures
from merlin_mllm.ranker.config import EMBEDDED, ITEM_IMAGES_FILE
from merlin_mllm.ranker.model import RankerModel
from merlin_mllm.ranker.saved import item_image_table

log = logging.getLogger(__name__)

__all__ = [
    "train_ranker",
    "load_rows",
    "row_summaries",
    "tokenize_rows",
    "item_image_table",
    "RankerDataModule",
    "MODEL_DIR",
    "ITEM_IMAGES_FILE",
    "SMALL_BUDGET_TRAINING",
]

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
TRAIN_CONFIG_FILE = "train_config.json"
#: Settings that must match for a checkpoint to be resumed. ``image_encoder`` names what made the
#: image tokens: a checkpoint from another encoder has another projector shape, refused here by
#: name rather than by a size mismatch deep inside Lightning.
_RESUME_KEYS = ("model", "image", "image_encoder", "lora_r", "lora_alpha", "lora_dropout", "loss", "max_length", "seed")
_ROW_TAGS = {
    "label": [Tags.TARGET, Tags.BINARY_CLASSIFICATION],
    "item_id": [Tags.ITEM_ID, Tags.CATEGORICAL],
    "user_id": [Tags.USER_ID, Tags.CATEGORICAL],
}
PASSTHROUGH_COLUMNS = ("item_id", "user_id", "group_id", "label")
#: LoRA settings for runs of a few hundred optimizer steps (the quickstart, the CPU benchmarks).
#: Measured by benchmarks/quality/sft_vs_zero_shot.py on all ML-100k users: one epoch of 189
#: steps gives AUC 0.69 against 0.52 zero-shot. The paper's lr 2e-5 (or 1e-4 with batches of
#: 4 x 4) needs far more steps; over a few hundred the ranker stays at the Yes/No prior.
SMALL_BUDGET_TRAINING = {"lr": 5e-4, "batch_size": 8, "grad_accum": 1}

SummarySource = Union[str, os.PathLike, pd.DataFrame, Callable[[pd.DataFrame], Sequence[str]]]


# ----------------------------------------------------------------------------- summaries
def _is_store(path: Path) -> bool:
    from merlin_mllm.summaries.store import MARKER_FILE, SEGMENT_DIR

    return path.is_dir() and ((path / MARKER_FILE).exists() or (path / SEGMENT_DIR).is_dir())


def _histories(data_dir: Path, rows: pd.DataFrame) -> List[Tuple[int, ...]]:
    if "history_item_ids" in rows.columns:
        return [tuple(int(i) for i in h) if h is not None else () for h in rows["history_item_ids"]]
    from merlin_mllm.summaries.user import history_lists

    events = read_table(data_dir / "events")
    return [tuple(h) for h in history_lists(events, rows["user_id"], rows["target_position"])]


def _store_summaries(store_dir: Path, data_dir: Path, rows: pd.DataFrame) -> List[str]:
    """Each row's user summary from the store: the chain over its own history (items before the target)."""
    from merlin_mllm.summaries import user as user_stage
    from merlin_mllm.summaries.store import open_store

    store = open_store(store_dir)
    config_key = store.get_ref(user_stage.CONFIG_REF_NAMESPACE, "latest")
    if config_key is None or store.get(config_key) is None:
        raise ValueError(
            f"{store_dir}: the store holds no user summaries; run "
            f"`merlin-mllm summarize users --data {data_dir} --out {store_dir}` first"
        )
    config = user_stage.UserSummaryConfig.from_dict(json.loads(store.get(config_key)))
    summarizer = user_stage.UserSummarizer(store, user_stage.read_items(data_dir / "items"), config, progress=False)
    histories = _histories(data_dir, rows)
    summarizer.texts.prepare(i for h in set(histories) for i in h)
    keys: Dict[Tuple[int, ...], Optional[str]] = {}
    for history in set(histories):
        plan = summarizer.plan(history)
        keys[history] = plan[-1].key if plan else None
    missing = [h for h, k in keys.items() if k is not None and k not in store]
    if missing:
        example = rows.loc[[h == missing[0] for h in histories], "user_id"].iloc[0]
        raise ValueError(
            f"{store_dir}: {len(missing)} row histories have no stored summary (e.g. user {int(example)}, "
            f"{len(missing[0])} history items); run `merlin-mllm summarize users --data {data_dir} --out {store_dir}`"
        )
    texts = dict(zip(keys, summarizer.summary_texts(list(keys.values()))))
    return [texts[h] for h in histories]


def _table_summaries(table: pd.DataFrame, rows: pd.DataFrame, where: str) -> List[str]:
    needed = ["user_id", "target_position", "user_summary"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"{where}: the summaries table lacks column(s) {missing}")
    table = table[needed].drop_duplicates(["user_id", "target_position"])
    merged = rows[["user_id", "target_position"]].merge(table, on=["user_id", "target_position"], how="left")
    absent = merged["user_summary"].isna()
    if absent.any():
        first = merged[absent].iloc[0]
        raise ValueError(
            f"{where}: {int(absent.sum())} rows have no user summary (e.g. user {int(first.user_id)}, "
            f"target_position {int(first.target_position)})"
        )
    return merged["user_summary"].astype(str).tolist()


def recent_titles_summaries(data_dir: Union[str, os.PathLike], last: int = 5) -> pd.DataFrame:
    """Placeholder user summaries without an LLM: "Recently watched: A; B; C." per row.

    For ranker-only experiments and tests. Each row of every split gets the titles of the last
    ``last`` items of its own ``history_item_ids`` (items before its target: no leakage). The
    result is a summary table for :func:`row_summaries` / ``train_ranker`` / ``evaluate_ranker``.

    Usage::

        table = recent_titles_summaries("data/ml100k", last=5)
        train_ranker("data/ml100k", table, "runs/ranker")

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset``.
    last : int
        Titles per summary (most recent last).
    """
    data_dir = Path(data_dir)
    titles = read_table(data_dir / "items").set_index("item_id")["title"]
    frames = []
    for split in ("train", "valid", "test"):
        rows = read_table(data_dir / split).drop_duplicates(["user_id", "target_position"])
        texts = ["Recently watched: " + "; ".join(str(titles[int(i)]) for i in list(history)[-last:]) + "."
                 for history in rows["history_item_ids"]]
        frames.append(pd.DataFrame({"user_id": rows["user_id"].to_numpy(),
                                    "target_position": rows["target_position"].to_numpy(), "user_summary": texts}))
    return pd.concat(frames, ignore_index=True)


def row_summaries(summaries: SummarySource, data_dir: Union[str, os.PathLike], rows: pd.DataFrame) -> List[str]:
    """The user summary of each row (one string per row, in order).

    Parameters
    ----------
    summaries : path, DataFrame or callable
        A summary store folder; a parquet file/folder or DataFrame with ``user_id``,
        ``target_position``, ``user_summary``; or ``callable(rows) -> list of str``.
    data_dir : path
        The prepared dataset (for ``items/`` and ``events/``).
    rows : DataFrame
        Rows with ``user_id`` and ``target_position`` (and ``history_item_ids`` when present).

    Raises
    ------
    ValueError
        When a row has no summary (naming the user), or the source is not recognised.
    """
    data_dir = Path(data_dir)
    if callable(summaries):
        texts = list(summaries(rows))
        if len(texts) != len(rows):
            raise ValueError(f"the summaries callable returned {len(texts)} texts for {len(rows)} rows")
        return [str(t) for t in texts]
    if isinstance(summaries, pd.DataFrame):
        return _table_summaries(summaries, rows, "the summaries DataFrame")
    path = Path(summaries)
    if _is_store(path):
        return _store_summaries(path, data_dir, rows)
    if path.exists():
        return _table_summaries(pd.read_parquet(path), rows, str(path))
    raise FileNotFoundError(f"user summaries not found: {path} is neither a summary store nor a parquet table")


# ----------------------------------------------------------------------------- rows
def load_rows(
    data_dir: Union[str, os.PathLike],
    split: str,
    summaries: SummarySource,
    *,
    max_groups: Optional[int] = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One split's rows with the text the prompt needs: ``user_summary`` and ``title``.

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

    Returns
    -------
    DataFrame
        The split's columns plus ``title``, ``image_path`` and ``user_summary``, in file order.
    """
    data_dir = Path(data_dir)
    split_dir = data_dir / split
    if not split_dir.exists():
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    rows = read_table(split_dir)
    needed = ["user_id", "item_id", "label", "group_id"]
    missing = [c for c in needed if c not in rows.columns]
    if missing:
        raise ValueError(f"{split_dir}: rows lack column(s) {missing}")
    if max_groups is not None and max_groups < rows["group_id"].nunique():
        groups = np.sort(rows["group_id"].unique())
        chosen = np.random.default_rng(seed).choice(groups, size=int(max_groups), replace=False)
        rows = rows[rows["group_id"].isin(chosen).to_numpy()].reset_index(drop=True)
    items = read_table(data_dir / "items")
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
    frame["user_summary"] = row_summaries(summaries, data_dir, frame)
    return frame


def tokenize_rows(frame: pd.DataFrame, ranker: RankerModel, *, max_length: int = 512,
                  item_features: Optional[ItemImageFeatures] = None) -> merlin.io.Dataset:
    """Rows with text -> a Merlin dataset of token ids, through an NVTabular workflow.

    The prompt is the ranker's own (same tokenizer, chat template, image tokens and budgets).
    ``has_image`` comes from ``item_features`` (an item whose picture is missing or unreadable
    gets a text-only prompt).
    """
    data = frame[["user_summary", "title"] + list(PASSTHROUGH_COLUMNS)].copy()
    if ranker.config.use_images and ranker.prompt.image_mode == "placeholder" and item_features is not None:
        data["has_image"] = item_features.has_image_for(torch.as_tensor(data["item_id"].to_numpy())).numpy()
    else:
        data["has_image"] = False
    data["label"] = data["label"].astype(np.int64)
    dataset = merlin.io.Dataset(data, cpu=True)
    schema = dataset.schema
    for name, tags in _ROW_TAGS.items():
        schema[name] = schema[name].with_tags(tags)
    dataset.schema = schema
    prompt = ["user_summary", "title", "has_image"] >> TokenizePrompt.for_ranker(ranker, max_length=max_length)
    workflow = nvt.Workflow(prompt + list(PASSTHROUGH_COLUMNS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return workflow.fit_transform(dataset)


# ----------------------------------------------------------------------------- Lightning
class RankerDataModule(pl.LightningDataModule):
    """Merlin loaders over tokenized rows; under DDP each rank gets an equal, disjoint shard.

    Equal shards give every rank the same number of batches, which DDP needs (a rank with one
    batch more would wait forever for the others' gradients).

    Parameters
    ----------
    train : merlin.io.Dataset
        Output of :func:`tokenize_rows`.
    valid : merlin.io.Dataset, optional
    batch_size : int
    seed : int
        Seeds the assignment of rows to ranks.
    """

    def __init__(self, train: merlin.io.Dataset, valid: Optional[merlin.io.Dataset] = None, *,
                 batch_size: int = 4, seed: int = 0):
        super().__init__()
        self.schema = train.schema
        self.train_frame = train.to_ddf().compute().reset_index(drop=True)
        self.valid_frame = valid.to_ddf().compute().reset_index(drop=True) if valid is not None else None
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        if valid is None:
            # Lightning looks for the hook by name: without validation data there is none.
            self.val_dataloader = None  # type: ignore[assignment]

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
        if per_rank == 0:
            raise ValueError(f"{len(frame)} rows cannot be shared by {world} processes")
        groups = frame["group_id"].to_numpy()
        unique = np.unique(groups)
        # place[i]: where group unique[i] falls in a seeded random order of the groups.
        place = np.argsort(np.random.default_rng(self.seed).permutation(unique.size))
        order = np.lexsort((np.arange(len(frame)), place[np.searchsorted(unique, groups)]))
        mine = order[rank * per_rank:(rank + 1) * per_rank]
        return frame.iloc[mine].reset_index(drop=True)

    def _loader(self, frame: pd.DataFrame, shuffle: bool) -> Loader:
        dataset = merlin.io.Dataset(self.shard(frame), schema=self.schema, cpu=True)
        return Loader(dataset, batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> Loader:
        return self._loader(self.train_frame, shuffle=True)

    def val_dataloader(self) -> Loader:  # noqa: F811 - replaced by None when there is no valid set
        return self._loader(self.valid_frame, shuffle=False)


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
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(
            start_method="spawn" if strategy == "ddp_spawn" else "popen",
            find_unused_parameters=True,
            process_group_backend="gloo" if accelerator == "cpu" else None,
        )
    return strategy


def _check_resume(out_dir: Path, settings: dict, resume: bool) -> Optional[Path]:
    config_file = out_dir / TRAIN_CONFIG_FILE
    checkpoint = out_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not resume or not checkpoint.exists():
        return None
    if config_file.exists():
        saved = json.loads(config_file.read_text())
        changed = {k: (saved.get(k), settings.get(k)) for k in _RESUME_KEYS if saved.get(k) != settings.get(k)}
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
    summaries_store: SummarySource,
    out_dir: Union[str, os.PathLike],
    *,
    model: Optional[str] = None,
    image: bool = True,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lr: float = 2e-5,
    projector_lr: Optional[float] = None,
    epochs: int = 1,
    max_steps: int = -1,
    grad_accum: int = 8,
    max_length: int = 512,
    batch_size: int = 4,
    seed: int = 42,
    loss: str = "lm",
    devices: int = 1,
    strategy: Any = "auto",
    accelerator: Optional[str] = None,
    resume: bool = True,
    validate: bool = True,
    max_groups: Optional[int] = None,
    checkpoint_every_n_steps: int = 50,
    progress: bool = True,
) -> Path:
    """Fine-tune the ranker with LoRA (answer-token loss) and save it under ``out_dir/model``.

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset`` (``train/``, ``valid/``, ``items/``; ``events/`` when rows
        lack ``history_item_ids``).
    summaries_store : path, DataFrame or callable
        User summaries: see :func:`row_summaries`.
    out_dir : path
        Run folder (see the module docstring); created when missing.
    model : str, optional
        ``None``/``"embedded"`` (SmolLM2 + EfficientNet-Lite0), or a Hugging Face id/folder
        (text-only through this pipeline: pass ``image=False``).
    image : bool
        Show candidate images (embedded model). False: the text-only ablation.
    lora_r, lora_alpha, lora_dropout : LoRA settings (paper: r=8).
    lr : float
        LoRA learning rate (paper: 2e-5).
    projector_lr : float, optional
        Learning rate of the image projector, which starts from random (default ``lr``).
    epochs, max_steps : int
        Stop after ``epochs`` epochs or ``max_steps`` optimizer steps (-1: no step limit).
    grad_accum : int
        Micro-batches per optimizer step.
    max_length : int
        Longest prompt in tokens; longer ones get a shorter user summary.
    batch_size : int
        Rows per micro-batch (per process).
    seed : int
        Seeds LoRA/projector initialisation, shuffling and the DDP shards.
    loss : {"lm", "binary"}
        ``lm``: full-vocabulary NLL of the answer token (the paper); ``binary``: CE over [No, Yes].
    devices, strategy, accelerator :
        Lightning settings. ``devices=2, strategy="ddp"`` (or ``"ddp_spawn"``) runs two
        processes; on CPU they talk over gloo. ``accelerator`` defaults to CUDA when available.
        With ``"ddp"`` Lightning starts the other processes by re-running the launching
        script, so code after this call runs in every process (guard it with
        ``os.environ.get("LOCAL_RANK", "0") == "0"``); ``"ddp_spawn"`` needs the script's
        ``if __name__ == "__main__":`` guard and a picklable ``summaries_store``.
    resume : bool
        Continue from ``out_dir/checkpoints/last.ckpt`` when it exists (same settings required).
    validate : bool
        Compute the validation loss after each epoch when ``valid/`` exists.
    max_groups : int, optional
        Train on this many groups only (and validate on as many), chosen at random with ``seed``.
    checkpoint_every_n_steps : int
        Also save ``last.ckpt`` every this many optimizer steps (besides each epoch end).
    progress : bool
        Progress bars.

    Returns
    -------
    Path
        ``out_dir/model``, loadable with ``RankerModel.from_pretrained``.
    """
    started = time.time()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    accelerator = accelerator or ("gpu" if torch.cuda.is_available() else "cpu")
    settings = {
        "model": model or EMBEDDED, "image": bool(image), "image_encoder": ENCODER_NAME if image else None,
        "lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "lr": lr, "projector_lr": projector_lr, "epochs": epochs,
        "max_steps": max_steps, "grad_accum": grad_accum, "max_length": max_length, "batch_size": batch_size,
        "seed": seed, "loss": loss, "devices": devices, "strategy": str(strategy), "max_groups": max_groups,
        "data_dir": str(data_dir.resolve()),
    }
    is_launcher = _local_rank() == 0
    if is_launcher:
        out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = _check_resume(out_dir, settings, resume)
    pl.seed_everything(seed, workers=True, verbose=False)

    device = torch.device("cuda", _local_rank()) if accelerator == "gpu" else torch.device("cpu")
    ranker = RankerModel.build(
        model or EMBEDDED, use_images=image, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        loss=loss, seed=seed, device=device,
    )
    table = None
    if ranker.config.use_images and ranker.prompt.image_mode == "placeholder":
        table = item_image_table(data_dir, out_dir / ITEM_IMAGES_FILE, progress=progress and is_launcher)
        ranker.set_item_features(table)
    elif ranker.config.use_images:
        raise ValueError(
            f"{settings['model']}: Hugging Face MLLMs expand image tokens from the pixels, which the "
            "token-id pipeline does not carry; train them with image=False (text-only), or use the "
            "embedded model for images"
        )

    train_rows = load_rows(data_dir, "train", summaries_store, max_groups=max_groups, seed=seed)
    valid_rows = None
    if validate and (data_dir / "valid").exists():
        valid_rows = load_rows(data_dir, "valid", summaries_store, max_groups=max_groups, seed=seed)
    train_data = tokenize_rows(train_rows, ranker, max_length=max_length, item_features=table)
    valid_data = tokenize_rows(valid_rows, ranker, max_length=max_length, item_features=table) if valid_rows is not None else None
    datamodule = RankerDataModule(train_data, valid_data, batch_size=batch_size, seed=seed)

    from merlin_mllm.ranker.block import RankerMerlinModel
    from pytorch_lightning.loggers import CSVLogger

    merlin_model = RankerMerlinModel(ranker, train_data.schema["label"], lr=lr, projector_lr=projector_lr)
    if is_launcher:
        (out_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    record = TrainingRecord(out_dir)
    checkpointing = LastCheckpoint(
        dirpath=out_dir / CHECKPOINT_DIR, save_last=True, save_top_k=0,
        every_n_train_steps=max(1, int(checkpoint_every_n_steps)),
    )
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=_strategy(strategy, devices, accelerator),
        max_epochs=epochs, max_steps=max_steps, accumulate_grad_batches=grad_accum,
        callbacks=[checkpointing, record], logger=CSVLogger(str(out_dir), name="logs"),
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=1, deterministic=False,
    )
    with merlin_compat.quiet_known_warnings():
        trainer.fit(merlin_model, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None)

    model_dir = out_dir / MODEL_DIR
    if trainer.is_global_zero:
        ranker.save_pretrained(model_dir)
        if table is not None:
            table.save(model_dir / ITEM_IMAGES_FILE)
        _write_training_summary(out_dir, trainer, settings, train_rows, valid_rows, checkpoint, started)
    if trainer.world_size > 1:
        trainer.strategy.barrier("ranker-saved")
    return model_dir


def _write_training_summary(out_dir, trainer, settings, train_rows, valid_rows, checkpoint, started):
    # Read back what rank 0 recorded: with ddp_spawn it trained in a child process, and this
    # process's callbacks saw nothing.
    rank0 = json.loads((out_dir / "ranks" / "rank0.json").read_text())
    steps = list(rank0["micro_batch_losses"])
    previous_file = out_dir / "training.json"
    if checkpoint is not None and previous_file.exists():
        # A resumed run: keep the losses of the steps before the checkpoint.
        first = min((s["optimizer_step"] for s in steps), default=int(rank0["global_step"]))
        earlier = json.loads(previous_file.read_text()).get("micro_batch_losses", [])
        steps = [s for s in earlier if s["optimizer_step"] < first] + steps
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
        "valid_rows": int(len(valid_rows)) if valid_rows is not None else 0,
        "epoch_mean_loss": {str(e): float(np.mean(v)) for e, v in sorted(per_epoch.items())},
        "micro_batch_losses": steps,
        "val_loss": float(trainer.callback_metrics["val_loss"]) if "val_loss" in trainer.callback_metrics else None,
        "seconds": round(time.time() - started, 1),
    }
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
