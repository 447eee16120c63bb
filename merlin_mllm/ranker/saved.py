"""The saved run folder, and loading a saved ranker with the item image table of a dataset.

A training run (``train_ranker``'s ``out/``) is one folder; these names are defined here only::

    model/                 the saved ranker (MODEL_DIR; its own layout: merlin_mllm.ranker.ranker_config)
    checkpoints/last.ckpt  the resumable training state (CHECKPOINT_DIR, LAST_CHECKPOINT)
    train_config.json      the run's settings, max_length among them (TRAIN_CONFIG_FILE)
    training.json          the training log: losses, row counts, timings (TRAINING_LOG_FILE)

* :func:`load_ranker`: a folder written by ``RankerModel.save_pretrained`` (or, zero-shot, its
  base model without adapter), ready to score a dataset; evaluation and serving load through it.
* :func:`item_image_table`: the item-keyed image grids of every item in ``data_dir/items``,
  computed once into a cache file.
* :func:`trained_model_dir`: the saved ranker a run folder (or the ranker folder itself) names.
* :func:`trained_max_length`: the prompt cut the run that trained a ranker recorded.
* :func:`read_train_config`: a run's recorded settings, older runs' keys read as today's.

Usage::

    from merlin_mllm.ranker.saved import load_ranker
    ranker = load_ranker("runs/ranker/model", "data/ml100k")
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from merlin_mllm.data.image_files import dataset_image_root
from merlin_mllm.data.splits import prepared_tables
from merlin_mllm.ranker.backend_registry import backend_class, backend_class_for_model
from merlin_mllm.ranker.ranker_config import CONFIG_FILE, EMBEDDED, ITEM_IMAGES_FILE, RankerConfig, is_saved_ranker
from merlin_mllm.ranker.image_features import ItemImageFeatures
from merlin_mllm.ranker.model import RankerModel
from merlin_mllm.ranker.prompt import DEFAULT_MAX_PROMPT_TOKENS

log = logging.getLogger(__name__)

__all__ = ["load_ranker", "item_image_table", "trained_model_dir", "trained_max_length", "read_train_config",
           "MODEL_DIR", "CHECKPOINT_DIR", "LAST_CHECKPOINT", "TRAIN_CONFIG_FILE", "TRAINING_LOG_FILE",
           "LEGACY_TRAIN_KEYS"]

#: The saved ranker's folder inside a run folder (``out/model``).
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
#: The run's settings (``TrainConfig.saved_fields`` and more), beside ``model/``.
TRAIN_CONFIG_FILE = "train_config.json"
TRAINING_LOG_FILE = "training.json"
#: Keys of ``train_config.json`` as older runs wrote them -> today's (``TrainConfig`` took
#: ``RankerConfig``'s names for the base model and the image switch).
LEGACY_TRAIN_KEYS = {"model": "base_model", "image": "use_images"}


def load_ranker(model_dir, data_dir, *, zero_shot: bool = False, cache_dir: Optional[Path] = None,
                progress: bool = True, device=None, precision: Optional[str] = None, dtype=None) -> RankerModel:
    """A saved ranker with the image table of ``data_dir``'s items, or (``zero_shot``) its base model.

    Parameters
    ----------
    model_dir : path or str or None
        A folder written by ``RankerModel.save_pretrained`` (``train_ranker``'s ``out/model``);
        with ``zero_shot`` also a base model id/folder, or ``None``/``"embedded"``.
    data_dir : path
        The dataset (its ``items/`` give the image table when the model folder lacks one).
    cache_dir : path, optional
        Where to build a missing item image table.
    device : optional
        Default: :func:`~merlin_mllm.models.loading.default_device`.
    precision : {"float32", "bfloat16", "auto"}, optional
        Run in this precision (default: the saved ranker's; a base model's: "float32").
    dtype : torch.dtype, optional
        The weights' dtype, overriding any precision (benchmarks, tests).
    """
    table = None
    if not zero_shot:
        if not is_saved_ranker(model_dir):
            raise FileNotFoundError(f"{model_dir} is not a saved ranker (no {CONFIG_FILE}); pass zero_shot=True for a base model")
        config = RankerConfig.read(model_dir)
        if backend_class(config.backend).uses_item_images(config):
            saved = Path(model_dir) / ITEM_IMAGES_FILE
            if saved.exists():
                table = ItemImageFeatures.load(saved)
            else:
                table = item_image_table(data_dir, Path(cache_dir or Path(model_dir)) / ITEM_IMAGES_FILE, progress=progress)
        ranker = RankerModel.from_pretrained(model_dir, item_features=table, device=device, precision=precision,
                                             dtype=dtype)
        if table is not None and not all(int(i) in table for i in _catalogue_item_ids(data_dir)):
            # A catalogue with items the training table did not see: extend it.
            ranker.set_item_features(item_image_table(data_dir, Path(cache_dir or ".") / ITEM_IMAGES_FILE, progress=progress))
        return ranker
    options = {"device": device, "dtype": dtype}
    if precision is not None:
        options["precision"] = precision
    if is_saved_ranker(model_dir):
        config = RankerConfig.read(model_dir)
        base, use_images = config.base_model, config.use_images
        # The "without SFT" baseline of a trained ranker asks its question the same way.
        options.update(prompt_version=config.prompt_version, candidate_text=config.candidate_text,
                       precision=precision or config.precision)
    else:
        base, use_images = (model_dir or EMBEDDED), True
    if not backend_class_for_model(base).images_without_training:
        use_images = False  # no trained projector: images would enter as noise
    try:
        return RankerModel.build(str(base), zero_shot=True, use_images=use_images, **options)
    except ValueError as exc:
        if use_images and "text-only" in str(exc):
            return RankerModel.build(str(base), zero_shot=True, use_images=False, **options)
        raise


def item_image_table(data_dir: Union[str, os.PathLike], path: Union[str, os.PathLike], *, progress: bool = True,
                     allow_absolute: Optional[bool] = None) -> ItemImageFeatures:
    """The item-keyed image grids of every item in ``data_dir/items``, computed once into ``path``.

    An existing file is reused when it covers every item; otherwise it is rebuilt.

    Parameters
    ----------
    data_dir : str or path
        A prepared dataset. Its ``image_path`` values are read inside its image root
        (:func:`merlin_mllm.data.image_files.dataset_image_root`: the ``image_root`` that
        ``report.json`` records; a folder prepared before roots were recorded reads relative
        paths inside ``data_dir`` and absolute ones as they are). An item whose path leaves the
        root is not read: it gets no image, and is named in the table's ``skipped`` and in the
        logged count, like an unreadable picture.
    path : str or path
        The cache file (safetensors).
    progress : bool
        Show a tqdm bar while encoding.
    allow_absolute : bool, optional
        Read absolute paths outside the image root; default: the root's own rule.
    """
    items = prepared_tables(data_dir).items
    item_ids = items["item_id"].to_numpy(np.int64)
    path = Path(path)
    if path.exists():
        try:
            table = ItemImageFeatures.load(path)
        except ValueError as exc:  # another encoder's grids, or a torn file: it is only a cache
            log.info("%s; rebuilding it", exc)
        else:
            if all(int(i) in table for i in item_ids):
                return table
            log.info("%s does not cover every item; rebuilding it", path)
    images = items["image_path"].tolist() if "image_path" in items.columns else [None] * len(items)
    root = dataset_image_root(data_dir)
    flag = root.allow_absolute if allow_absolute is None else allow_absolute
    table = ItemImageFeatures.from_images(item_ids, images, progress=progress, root=root.path, allow_absolute=flag)
    if int(table.has_image.sum()) == 0:
        log.warning("no item of %s has a readable image: the image slots stay empty (text-only in effect)", data_dir)
    table.save(path)
    return table


def _catalogue_item_ids(data_dir) -> np.ndarray:
    return prepared_tables(data_dir).items["item_id"].to_numpy(np.int64)


def trained_model_dir(path: Union[str, os.PathLike]) -> Path:
    """The saved ranker that ``path`` names: ``path`` itself, or ``path/model`` when ``path`` is
    the run folder ``train_ranker`` wrote (``out/``, holding ``model/``). Anything else comes
    back unchanged, for the caller to report.
    """
    path = Path(path)
    if not is_saved_ranker(path) and is_saved_ranker(path / MODEL_DIR):
        return path / MODEL_DIR
    return path


def trained_max_length(model_dir) -> Tuple[int, str]:
    """The prompt cut of the run that trained ``model_dir``, and where it came from.

    Evaluation and serving cut prompts as training did (a longer prompt gets a shorter user
    summary), so they read the ``max_length`` that training recorded in ``train_config.json``
    beside its ``model/`` folder.

    Parameters
    ----------
    model_dir : path or None
        The saved ranker, or the run folder holding it.

    Returns
    -------
    (int, str)
        The limit, and its source: the ``train_config.json`` path, or ``"default"``
        (:data:`~merlin_mllm.ranker.prompt.DEFAULT_MAX_PROMPT_TOKENS`: no training record beside
        the model).
    """
    if model_dir is not None:
        model_dir = trained_model_dir(model_dir)
        record = model_dir.parent / TRAIN_CONFIG_FILE
        if model_dir.name == MODEL_DIR and record.is_file():
            try:
                return int(read_train_config(model_dir.parent)["max_length"]), str(record)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{record}: cannot read the training run's max_length ({exc}); "
                                 "pass the prompt length explicitly") from exc
    return DEFAULT_MAX_PROMPT_TOKENS, "default"


def read_train_config(run_dir: Union[str, os.PathLike]) -> Optional[dict]:
    """The settings a training run recorded (``run_dir/train_config.json``), or None without one.

    A run folder written by an older merlin-mllm reads with today's keys: ``model`` and
    ``image`` as ``base_model`` and ``use_images`` (:data:`LEGACY_TRAIN_KEYS`), the hybrid's
    ``fusion_*`` settings as ``head_*``, so such a run still resumes.

    Raises
    ------
    ValueError
        When the file is not valid JSON.
    """
    path = Path(run_dir) / TRAIN_CONFIG_FILE
    if not path.is_file():
        return None
    settings = json.loads(path.read_text(encoding="utf-8"))
    # Compat shim for run folders already on disk (see the docstring); nothing writes these keys now.
    for old, new in LEGACY_TRAIN_KEYS.items():
        if old in settings and new not in settings:
            settings[new] = settings.pop(old)
    for key in [k for k in settings if k.startswith("fusion_")]:
        settings.setdefault("head_" + key[len("fusion_"):], settings.pop(key))
    return settings
