"""Item image paths stay inside the dataset's image root at every call site.

``data prepare`` records the images folder as ``image_root`` in ``report.json`` and writes
``image_path`` relative to it; the readers (the ranker's item image table, the item summarizer)
resolve every path through that root. A ``../`` escape or an absolute path outside the root is
never opened: the item is treated as having no image, counted and named. A symlink placed
inside the root still works, and a file over the byte limit is refused before it is hashed.

Real files throughout: tiny PNGs made with PIL in tmp folders, the Amazon fixture through
``prepare_dataset``, the embedded EfficientNet-Lite0 and SmolLM2.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from merlin_mllm import image_loading as images_module
from merlin_mllm.data.image_files import ImageRoot, dataset_image_root, image_index, record_image_root
from merlin_mllm.data.tables import Tags, read_table, write_table
from merlin_mllm.image_loading import ImageLoadError, image_sha256

AMAZON = Path(__file__).parent / "fixtures" / "data" / "amazon"
ITEM_TAGS = {"item_id": [Tags.ITEM_ID, Tags.CATEGORICAL], "title": [Tags.TEXT]}


def _png(path: Path, colour=(200, 40, 40), size=(24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def layout(tmp_path):
    """data/ with report.json recording images/ as the root; files inside, outside and linked."""
    root = tmp_path / "images"
    _png(root / "inside.png")
    outside = _png(tmp_path / "secret" / "outside.png", (30, 30, 220))
    os.symlink(outside, root / "link.png")  # placed in the root by the operator: allowed
    data = tmp_path / "data"
    data.mkdir()
    (data / "report.json").write_text(json.dumps({"image_root": str(root)}))
    return {"data": data, "root": root, "outside": outside}


def _write_items(data: Path, paths: list) -> list:
    ids = list(range(1, len(paths) + 1))
    items = pd.DataFrame({"item_id": ids, "title": [f"item {i}" for i in ids], "image_path": paths})
    write_table(items, data / "items", ITEM_TAGS)
    return ids


# ------------------------------------------------------------------------------ the root itself
def test_dataset_image_root_reads_the_recorded_root_and_keeps_old_folders_working(tmp_path, layout):
    root = dataset_image_root(layout["data"])
    assert root == ImageRoot(layout["root"], allow_absolute=None, recorded=True)
    assert root.resolve("inside.png") == layout["root"] / "inside.png"
    with pytest.raises(ImageLoadError, match="leaves the image root") as info:
        root.resolve("../secret/outside.png")
    assert "../secret/outside.png" in str(info.value) and str(layout["root"]) in str(info.value)
    with pytest.raises(ImageLoadError, match="absolute path outside the image root"):
        root.resolve(str(layout["outside"]))
    assert root.resolve(str(layout["outside"]), allow_absolute=True) == layout["outside"]

    # A relative recorded root is taken relative to the data folder (the folder can move).
    (layout["data"] / "report.json").write_text(json.dumps({"image_root": "../images"}))
    assert dataset_image_root(layout["data"]).path == layout["root"]
    # Prepared without images: the data folder itself, absolute paths outside it refused.
    (layout["data"] / "report.json").write_text(json.dumps({"image_root": None}))
    assert dataset_image_root(layout["data"]) == ImageRoot(layout["data"], None, True)

    # An old folder (report.json without image_root) or a hand-made one (no report): today's
    # behaviour, absolute paths read as they are; only a `..` climb out of the folder is refused.
    (layout["data"] / "report.json").write_text(json.dumps({"dataset": "amazon2023", "kept": {}}))
    old = dataset_image_root(layout["data"])
    assert old == ImageRoot(layout["data"], allow_absolute=True, recorded=False)
    assert old.resolve(str(layout["outside"])) == layout["outside"]
    with pytest.raises(ImageLoadError, match="leaves the image root"):
        old.resolve("../images/inside.png")
    (layout["data"] / "report.json").unlink()
    assert dataset_image_root(layout["data"]) == old

    (layout["data"] / "report.json").write_text(json.dumps({"image_root": 7}))
    with pytest.raises(ValueError, match="image_root must be a folder path or null"):
        dataset_image_root(layout["data"])


def test_record_image_root_is_relative_only_inside_the_output(tmp_path):
    assert record_image_root(tmp_path / "out" / "images", tmp_path / "out") == "images"
    assert record_image_root(tmp_path / "pics", tmp_path / "out") == str(tmp_path / "pics")
    # A sibling whose name starts like the output folder is not inside it.
    assert record_image_root(tmp_path / "out2", tmp_path / "out") == str(tmp_path / "out2")


def test_image_index_names_symlinks_inside_the_folder(layout):
    index = image_index(layout["root"])
    assert index == {"inside": layout["root"] / "inside.png", "link": layout["root"] / "link.png"}


# ------------------------------------------------------------------------------ item image table
def test_item_image_table_skips_and_names_paths_outside_the_root(layout, tmp_path, caplog):
    from merlin_mllm.ranker.saved import item_image_table

    paths = ["inside.png", "../secret/outside.png", str(layout["outside"]), "link.png", None]
    ids = _write_items(layout["data"], paths)
    with caplog.at_level(logging.WARNING, logger="merlin_mllm.ranker.image_features"):
        table = item_image_table(layout["data"], tmp_path / "cache.safetensors", progress=False)
    assert table.has_image_for(ids).tolist() == [True, False, False, True, False]
    assert sorted(table.skipped) == [2, 3]
    assert "../secret/outside.png" in table.skipped[2] and "leaves the image root" in table.skipped[2]
    assert str(layout["outside"]) in table.skipped[3] and "MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS" in table.skipped[3]
    assert table.summary() == {"items": 5, "with_image": 2, "missing": 1, "unreadable": 2}
    warning = next(r.getMessage() for r in caplog.records if "leave the image root" in r.getMessage())
    assert warning.startswith("2 item image paths leave the image root") and "first: item 2:" in warning

    # allow_absolute opens the absolute one (never the `..` one).
    allowed = item_image_table(layout["data"], tmp_path / "allowed.safetensors", progress=False, allow_absolute=True)
    assert allowed.has_image_for(ids).tolist() == [True, False, True, True, False]


def test_from_images_with_a_root_never_opens_a_refused_path(layout, monkeypatch):
    from merlin_mllm.ranker.image_features import ItemImageFeatures

    opened = []
    real_open = images_module._open_image_file
    monkeypatch.setattr(images_module, "_open_image_file",
                        lambda path, limit: opened.append(path) or real_open(path, limit))
    table = ItemImageFeatures.from_images(
        [1, 2, 3], ["inside.png", "../secret/outside.png", layout["outside"]], root=layout["root"], progress=False,
    )
    assert table.has_image.tolist() == [True, False, False] and sorted(table.skipped) == [2, 3]
    assert opened == [str(layout["root"] / "inside.png")]
    # Without a root, paths are used as given (unchanged behaviour for in-memory catalogues).
    free = ItemImageFeatures.from_images([1], [layout["outside"]], progress=False)
    assert free.has_image.tolist() == [True]


def test_an_old_folder_without_a_recorded_root_still_reads_its_absolute_paths(layout, tmp_path):
    from merlin_mllm.ranker.saved import item_image_table

    (layout["data"] / "report.json").write_text(json.dumps({"dataset": "amazon2023"}))  # before roots
    ids = _write_items(layout["data"], [str(layout["outside"]), "../images/inside.png"])
    table = item_image_table(layout["data"], tmp_path / "cache.safetensors", progress=False)
    assert table.has_image_for(ids).tolist() == [True, False]
    assert "leaves the image root" in table.skipped[2]


# ------------------------------------------------------------------------------ prepare round trip
def _amazon_images(folder: Path, outside: Path) -> Path:
    """The fixture's pictures copied to ``folder``, one of them a symlink to a file elsewhere."""
    folder.mkdir(parents=True)
    for source in sorted((AMAZON / "images").iterdir()):
        shutil.copyfile(source, folder / source.name)
    outside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder / "B000000002.jpg", outside)
    os.symlink(outside, folder / "B000000002.jpg")
    return folder


def test_prepare_writes_relative_paths_and_the_root_and_the_table_loads_them(tmp_path):
    from merlin_mllm.data.prepare import prepare_dataset
    from merlin_mllm.ranker.saved import item_image_table

    images = _amazon_images(tmp_path / "images", tmp_path / "elsewhere" / "real.jpg")
    out = tmp_path / "data"
    report = prepare_dataset("amazon2023", "paper", out, input=AMAZON, images=images, n_negatives_test=2)
    assert report["image_root"] == str(images)
    assert json.loads((out / "report.json").read_text())["image_root"] == str(images)
    items = read_table(out / "items")
    paths = items["image_path"].dropna().tolist()
    assert len(paths) == report["items_with_image"] > 0
    assert all(p == os.path.basename(p) and not os.path.isabs(p) for p in paths)
    assert dict(zip(items["item_key"], items["image_path"]))["B000000002"] == "B000000002.jpg"  # the link

    table = item_image_table(out, tmp_path / "cache.safetensors", progress=False)
    with_path = items["image_path"].notna().to_numpy()
    assert table.has_image_for(items["item_id"].to_numpy(np.int64)).numpy().tolist() == with_path.tolist()
    assert table.skipped == {}


def test_images_inside_the_output_are_recorded_relative_and_the_folder_can_move(tmp_path):
    from merlin_mllm.data.prepare import prepare_dataset
    from merlin_mllm.ranker.saved import item_image_table

    out = tmp_path / "data"
    _amazon_images(out / "images", out / "images" / ".." / "real.jpg")
    report = prepare_dataset("amazon2023", "paper", out, input=AMAZON, images=out / "images", n_negatives_test=2)
    assert report["image_root"] == "images"
    moved = tmp_path / "moved"
    os.rename(out, moved)  # the symlink is absolute: point it at the moved file
    os.remove(moved / "images" / "B000000002.jpg")
    os.symlink(moved / "real.jpg", moved / "images" / "B000000002.jpg")
    items = read_table(moved / "items")
    table = item_image_table(moved, tmp_path / "cache.safetensors", progress=False)
    assert int(table.has_image.sum()) == report["items_with_image"] == int(items["image_path"].notna().sum())


# ------------------------------------------------------------------------------ hashing
class _HashSpy:
    """Stands in for hashlib in merlin_mllm.image_loading: records the size of every update."""

    def __init__(self):
        self.updates = []

    def sha256(self):
        real, updates = hashlib.sha256(), self.updates

        class Digest:
            def update(self, data):
                updates.append(memoryview(data).nbytes)
                real.update(data)

            def hexdigest(self):
                return real.hexdigest()

        return Digest()


def test_an_oversized_file_is_refused_before_it_is_read_or_hashed(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    with open(big, "wb") as handle:
        handle.truncate(5000)  # sparse: no data needs writing
    spy = _HashSpy()
    monkeypatch.setattr(images_module, "hashlib", spy)
    monkeypatch.setenv("MERLIN_MLLM_MAX_IMAGE_BYTES", "4096")
    with pytest.raises(ImageLoadError, match="over the limit of 4,096") as info:
        image_sha256(big)
    assert str(big) in str(info.value) and spy.updates == []
    with pytest.raises(ImageLoadError, match="over the limit"):
        image_sha256(b"x" * 5000)
    assert spy.updates == []


def test_a_file_is_hashed_in_blocks(tmp_path, monkeypatch):
    data = os.urandom(1024) * (2 * 1024 + 512)  # 2.5 MiB
    path = tmp_path / "large.bin"
    path.write_bytes(data)
    spy = _HashSpy()
    monkeypatch.setattr(images_module, "hashlib", spy)
    assert image_sha256(path) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert spy.updates == [1 << 20, 1 << 20, 512 * 1024]
    with pytest.raises(ImageLoadError, match="file not found"):
        image_sha256(tmp_path / "absent.png")
    with pytest.raises(ImageLoadError, match="is a directory"):
        image_sha256(tmp_path)
    with pytest.raises(TypeError):
        image_sha256(42)


# ------------------------------------------------------------------------------ item summaries
def test_item_summarizer_refuses_paths_outside_the_root_and_oversized_files(layout, smollm2, monkeypatch, caplog):
    from merlin_mllm.generation import GenerationSettings
    from merlin_mllm.summaries.item import ItemSummarizer

    big = layout["root"] / "big.png"
    with open(big, "wb") as handle:
        handle.truncate(5000)
    monkeypatch.setenv("MERLIN_MLLM_MAX_IMAGE_BYTES", "4096")
    opened, spy = [], _HashSpy()
    real_open = images_module._open_image_file
    monkeypatch.setattr(images_module, "_open_image_file",
                        lambda path, limit: opened.append(path) or real_open(path, limit))
    monkeypatch.setattr(images_module, "hashlib", spy)

    frame = pd.DataFrame({
        "item_id": [1, 2, 3, 4, 5],
        "title": ["Red card", "Blue card", "Blue card again", "Linked card", "Big card"],
        "image_path": ["inside.png", "../secret/outside.png", str(layout["outside"]), "link.png", "big.png"],
    })
    # image_root is the prepared data folder: its report.json names the images folder.
    summarizer = ItemSummarizer(model=smollm2, settings=GenerationSettings(max_new_tokens=4, batch_size=8),
                                image_root=layout["data"])
    with caplog.at_level(logging.WARNING, logger="merlin_mllm.summaries.item"):
        texts, report = summarizer.summarize(frame)
    assert all(texts) and report.generated == 5
    assert (report.bad_images, report.missing_images) == (3, 0)  # two outside the root, one too big
    assert str(layout["outside"]) not in opened and not any("secret" in p for p in opened)
    assert str(big) in opened  # opened to check its size ...
    good = (layout["root"] / "inside.png").stat().st_size + layout["outside"].stat().st_size  # inside.png, link.png
    assert sum(spy.updates) == good  # ... but only the two usable files were hashed
    warning = next(r.getMessage() for r in caplog.records if "leave the image root" in r.getMessage())
    assert warning.startswith("2 item image paths leave the image root") and "first: item 2:" in warning
    reasons = " ".join(r.getMessage() for r in caplog.records)
    assert "item 5: image not used" in reasons and "over the limit of 4,096" in reasons

    # allow_absolute reads the absolute path outside the root (never the `..` one).
    allowed = ItemSummarizer(model=smollm2, settings=GenerationSettings(max_new_tokens=4, batch_size=8),
                             image_root=layout["data"], allow_absolute=True)
    _, report = allowed.summarize(frame.iloc[[1, 2]])
    assert report.bad_images == 1
