"""Item-keyed image features for the embedded ranker: computed once per item, looked up by id.

The embedded MLLM sees an item's picture as EfficientNet-Lite0's 7x7 grid of image tokens
(49 tokens of 1290 features: EfficientNet plus cell colours). Running the CNN for every
(user, candidate) pair would repeat the same work for each popular item, so the grids are
computed once per item and stored in a table keyed by item id; training and scoring batches
carry only item ids.

File format: one safetensors file with

* ``item_ids``  int64 (N,)  every item of the catalogue, sorted, unique;
* ``has_image`` uint8 (N,)  1 when the item has a usable picture;
* ``rows``      int64 (N,)  row of ``features`` for items with a picture, -1 otherwise;
* ``features``  float16 (M, 49, 1290), M = number of items with a picture;

plus metadata naming the encoder, so a table made by another encoder is refused at load.

Usage::

    from merlin_mllm.ranker.image_features import ItemImageFeatures

    table = ItemImageFeatures.from_images([10, 11, 12], ["a.jpg", None, "c.png"])
    table.summary()               # {'items': 3, 'with_image': 2, 'missing': 1, 'unreadable': 0}
    table.save("item_images.safetensors")
    table = ItemImageFeatures.load("item_images.safetensors")
    grids, has_image = table.lookup(torch.tensor([12, 11]))   # (1, 49, 1290), [True, False]
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from merlin_mllm.image_loading import ImageLoadError, is_missing, load_image, resolve_image_path
from merlin_mllm.models.vision import VisionEncoder
from merlin_mllm.ranker.item_table_file import read_tables_file, write_tables_file

__all__ = ["ItemImageFeatures", "FEATURES_FORMAT"]

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "merlin-mllm-item-image-features"
FEATURES_VERSION = "1"
#: Names what made the grids; a table made otherwise (e.g. the earlier 1280-feature grids without
#: cell colours) is refused at load, and ``saved.item_image_table`` rebuilds such a cache.
ENCODER_NAME = "efficientnet-lite0-grid+cell-colour"


def _is_path(source: Any) -> bool:
    """A file path (not bytes, an image or a URL, which load_image handles or refuses itself)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    text = os.fspath(source)
    return not (isinstance(text, str) and text.startswith(("http://", "https://")))


class ItemImageFeatures:
    """A table item id -> (49, 1290) image feature grid, with a has-image flag per item.

    Items without a picture (or whose picture could not be read) are in the table with
    ``has_image`` False, so "no image" is a known state, distinct from an unknown item id.

    Parameters
    ----------
    item_ids : array of int (N,)
        Every item id, unique.
    has_image : array of bool (N,)
    features : tensor (M, T, D)
        Grids of the items with an image, in the order of ``item_ids`` (M = has_image.sum()).
    skipped : dict, optional
        ``item_id -> reason`` for pictures that could not be read (kept for reports).
    """

    def __init__(self, item_ids, has_image, features: torch.Tensor, skipped: Optional[Dict[int, str]] = None):
        item_ids = np.asarray(item_ids, dtype=np.int64)
        has_image = np.asarray(has_image, dtype=bool)
        if item_ids.ndim != 1 or has_image.shape != item_ids.shape:
            raise ValueError(f"item_ids {item_ids.shape} and has_image {has_image.shape} must be matching 1-D arrays")
        order = np.argsort(item_ids, kind="stable")
        sorted_ids = item_ids[order]
        duplicated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if duplicated.size:
            raise ValueError(f"item id {int(duplicated[0])} appears more than once")
        if features.dim() != 3 or features.shape[0] != int(has_image.sum()):
            raise ValueError(
                f"features must be (items with an image = {int(has_image.sum())}, tokens, dim), "
                f"got {tuple(features.shape)}"
            )
        # Feature rows follow the input order; re-index them to the sorted order.
        rows_in_input_order = np.full(len(item_ids), -1, dtype=np.int64)
        rows_in_input_order[has_image] = np.arange(int(has_image.sum()))
        self.item_ids = torch.from_numpy(sorted_ids.copy())
        self.has_image = torch.from_numpy(has_image[order].copy())
        self.rows = torch.from_numpy(rows_in_input_order[order].copy())
        self.features = features
        self.skipped = dict(skipped or {})

    # ------------------------------------------------------------------ building
    @classmethod
    def from_images(
        cls,
        item_ids: Sequence[int],
        images: Sequence[Any],
        *,
        encoder=None,
        batch_size: int = 32,
        dtype: torch.dtype = torch.float16,
        progress: bool = True,
        root: Optional[Union[str, os.PathLike]] = None,
        allow_absolute: Optional[bool] = None,
    ) -> "ItemImageFeatures":
        """Encode every item's picture once with EfficientNet-Lite0.

        Parameters
        ----------
        item_ids : list of int
            One id per item (unique).
        images : list
            The matching pictures: paths, bytes, PIL images or arrays. Missing values (None,
            NaN, "") mean "no image". A picture that cannot be read is skipped and counted
            (``skipped`` maps its item id to the reason), not fatal: catalogues have broken files.
        encoder : VisionEncoder, optional
            Default: ``VisionEncoder.load()``.
        batch_size : int
        dtype : torch.dtype
            Storage type; float16 halves the size (about 125 KB per item) at no ranking cost.
        progress : bool
            Show a tqdm bar.
        root : str or path, optional
            The image root of path sources (see :func:`merlin_mllm.image_loading.resolve_image_path`):
            relative paths are read inside it; a path that leaves it (``..``, or an absolute path
            outside it unless ``allow_absolute``) is not read: the item is skipped, named in
            ``skipped`` and counted in the warning. ``None``: paths are used as given.
        allow_absolute : bool, optional
            With a ``root``, read absolute paths outside it. Default:
            ``MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS``, else refused.
        """
        item_ids = [int(i) for i in item_ids]
        if len(item_ids) != len(images):
            raise ValueError(f"{len(item_ids)} item ids but {len(images)} images")
        encoder = encoder or VisionEncoder.load()
        has_image = np.zeros(len(item_ids), dtype=bool)
        skipped: Dict[int, str] = {}
        outside_root: list = []  # item ids whose path leaves the image root
        chunks = []
        pending: list = []
        pending_index: list = []

        def flush():
            if pending:
                with torch.inference_mode():
                    grid = encoder(encoder.preprocess(pending))
                chunks.append(grid.to("cpu", dtype))
                has_image[pending_index] = True
                pending.clear()
                pending_index.clear()

        for index, (item_id, source) in enumerate(
            tqdm(list(zip(item_ids, images)), desc="item images", disable=not progress, unit="item")
        ):
            if is_missing(source):
                continue
            if root is not None and _is_path(source):
                try:
                    source = resolve_image_path(source, root, allow_absolute=allow_absolute)
                except ImageLoadError as exc:
                    skipped[item_id] = str(exc)
                    outside_root.append(item_id)
                    continue
            try:
                picture = load_image(source)
            except ImageLoadError as exc:
                skipped[item_id] = str(exc)
                continue
            pending.append(picture)
            pending_index.append(index)
            if len(pending) >= batch_size:
                flush()
        flush()
        if outside_root:
            logger.warning("%d item image paths leave the image root %s and were not read; those items "
                           "have no image (first: item %s: %s)", len(outside_root), root, outside_root[0],
                           skipped[outside_root[0]])
        if skipped:
            logger.warning("%d item pictures could not be read and were skipped (e.g. item %s: %s)",
                           len(skipped), next(iter(skipped)), next(iter(skipped.values())))
        features = torch.cat(chunks) if chunks else torch.empty((0, encoder.num_tokens, encoder.feature_dim), dtype=dtype)
        return cls(item_ids, has_image, features, skipped)

    # ------------------------------------------------------------------ facts
    def __len__(self) -> int:
        return int(self.item_ids.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[2])

    def summary(self) -> Dict[str, int]:
        """Counts: items, items with an image, missing pictures, unreadable pictures."""
        with_image = int(self.has_image.sum())
        return {
            "items": len(self),
            "with_image": with_image,
            "missing": len(self) - with_image - len(self.skipped),
            "unreadable": len(self.skipped),
        }

    def __contains__(self, item_id: int) -> bool:
        pos = int(torch.searchsorted(self.item_ids, torch.tensor(int(item_id))))
        return pos < len(self) and int(self.item_ids[pos]) == int(item_id)

    # ------------------------------------------------------------------ lookup
    def _positions(self, item_ids: torch.Tensor) -> torch.Tensor:
        item_ids = torch.as_tensor(item_ids, dtype=torch.long).reshape(-1).cpu()
        pos = torch.searchsorted(self.item_ids, item_ids).clamp(max=max(len(self) - 1, 0))
        if len(self) == 0:
            known = torch.zeros_like(item_ids, dtype=torch.bool)
        else:
            known = self.item_ids[pos] == item_ids
        if not bool(known.all()):
            bad = int(item_ids[~known][0])
            raise KeyError(
                f"item id {bad} is not in the item image table ({len(self)} items); build the "
                "table over the whole catalogue (items without pictures are kept as has_image=False)"
            )
        return pos

    def has_image_for(self, item_ids) -> torch.Tensor:
        """Bool tensor: whether each item id has a picture (KeyError for unknown ids)."""
        return self.has_image[self._positions(item_ids)]

    def lookup(self, item_ids) -> Tuple[torch.Tensor, torch.Tensor]:
        """Grids of the items that have a picture, and the has-image flags.

        Parameters
        ----------
        item_ids : tensor or list of int (B,)

        Returns
        -------
        (grids, has_image) : (tensor (K, T, D), bool tensor (B,))
            ``grids`` holds one grid per item with ``has_image`` True, in batch order
            (K = has_image.sum()); on CPU, in the table's dtype.
        """
        pos = self._positions(item_ids)
        has = self.has_image[pos]
        return self.features[self.rows[pos[has]]], has

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the table as one safetensors file (see the module docstring)."""
        # Store features in sorted-id order, so the file's rows follow item_ids.
        order = self.rows[self.has_image]
        tensors = {"item_ids": self.item_ids, "has_image": self.has_image.to(torch.uint8),
                   "features": self.features[order]}
        metadata = {
            "format": FEATURES_FORMAT,
            "version": FEATURES_VERSION,
            "encoder": ENCODER_NAME,
            "skipped": json.dumps({str(k): v for k, v in self.skipped.items()}),
        }
        return write_tables_file(path, tensors, metadata)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ItemImageFeatures":
        """Read a table written by :meth:`save`; a file of another kind is refused by name."""
        tensors, metadata = read_tables_file(path, "item image features", FEATURES_FORMAT,
                                             {"item_ids", "has_image", "features"})
        if metadata.get("encoder") != ENCODER_NAME:
            raise ValueError(f"{path} was made by encoder {metadata.get('encoder')!r}, not {ENCODER_NAME!r}")
        skipped = {int(k): v for k, v in json.loads(metadata.get("skipped") or "{}").items()}
        return cls(tensors["item_ids"].numpy(), tensors["has_image"].bool().numpy(), tensors["features"], skipped)
