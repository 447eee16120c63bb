"""Builders shared by the serving tests: a real ML-100k subset, a real summary store, a saved ranker.

Plain functions (not fixtures) so each test module builds what it needs once, in its own
module-scoped fixtures.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.tables import read_table
from merlin_mllm.models.vision import TOKEN_DIM
from merlin_mllm.ranker import ItemImageFeatures, RankerModel
from merlin_mllm.ranker.ranker_config import ITEM_IMAGES_FILE
from merlin_mllm.summaries.rows import recent_titles_summaries

#: Items whose id is a multiple of this get an image grid (so prompts mix text-only and image items).
IMAGE_EVERY = 3


def build_dataset(root: Path) -> Path:
    """30 real MovieLens-100k users in the prepared layout; test groups are 1 positive + 4 negatives."""
    prepare_dataset("ml-100k", "paper", root, max_users=30, n_negatives_test=4, seed=7)
    return root


def build_store(data_dir: Path, store_path: Path) -> Path:
    """A real summary store: `summarize_users` with a tiny random LLM (fast; texts are gibberish)."""
    from merlin_mllm.generation import GenerationSettings
    from merlin_mllm.models.tiny import tiny_mllm_path
    from merlin_mllm.summaries.user import summarize_users

    summarize_users(data_dir, store_path, model=str(tiny_mllm_path("llava_next")),
                    settings=GenerationSettings(max_new_tokens=4, batch_size=32), progress=False)
    return store_path


def summary_table(data_dir: Path) -> pd.DataFrame:
    """Placeholder user summaries keyed by (user_id, target_position): the last 3 history titles."""
    return recent_titles_summaries(data_dir, last=3)


def image_table(data_dir: Path) -> ItemImageFeatures:
    """Seeded random 49x1290 grids for every third item (ML-100k has no pictures)."""
    item_ids = read_table(data_dir / "items")["item_id"].to_numpy(np.int64)
    has_image = item_ids % IMAGE_EVERY == 0
    generator = torch.Generator().manual_seed(0)
    grids = torch.randn(int(has_image.sum()), 49, TOKEN_DIM, generator=generator).half()
    return ItemImageFeatures(item_ids, has_image, grids)


def build_ranker(data_dir: Path, model_dir: Path) -> Path:
    """An embedded ranker with images and a non-zero (gaussian) LoRA, saved as training saves it."""
    table = image_table(data_dir)
    ranker = RankerModel.build("embedded", use_images=True, lora_init="gaussian", seed=1, item_features=table)
    ranker.save_pretrained(model_dir)
    table.save(model_dir / ITEM_IMAGES_FILE)
    return model_dir


def load_reference(model_dir: Path) -> RankerModel:
    """The saved ranker loaded in this process, with its image table (the in-process reference)."""
    return RankerModel.from_pretrained(model_dir, item_features=ItemImageFeatures.load(model_dir / ITEM_IMAGES_FILE),
                                       device="cpu")


def titles_of(data_dir: Path) -> dict:
    items = read_table(data_dir / "items")
    return dict(zip(items["item_id"].astype(int), items["title"].astype(str)))
