"""prepare_dataset on the small fixture files (tests/fixtures/data, see make_fixtures.py there):
malformed lines, duplicates, Amazon Reviews 2023 (gzip reviews + plain meta), MicroLens, images.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.sources import amazon_files, amazon_main_image_url, microlens_files
from merlin_mllm.data.tables import Tags, read_schema, read_table

FIXTURES = Path(__file__).parent / "fixtures" / "data"
MINI = FIXTURES / "ml-100k-mini"
AMAZON = FIXTURES / "amazon"
MICROLENS = FIXTURES / "microlens"


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    return {name: read_table(out / name) for name in ("train", "valid", "test", "events", "items", "users")}


def _keyed_events(tables) -> pd.DataFrame:
    users = tables["users"].set_index("user_id")["user_key"]
    items = tables["items"].set_index("item_id")["item_key"]
    events = tables["events"]
    return events.assign(user_key=events["user_id"].map(users), item_key=events["item_id"].map(items))


# ---- malformed lines and duplicates (RecBole format) ----------------------------------------


def test_malformed_line_raises_naming_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"ml-100k\.inter:7: expected 4 tab-separated fields, found 3"):
        prepare_dataset("ml-100k", "paper", tmp_path, input=MINI, n_negatives_test=2)
    assert not (tmp_path / "train").exists()


def test_malformed_lines_skipped_and_duplicates_counted(tmp_path):
    report = prepare_dataset("ml-100k", "paper", tmp_path, input=MINI, on_bad_line="skip", n_negatives_test=2, max_history=0)
    assert report["malformed_lines_skipped"] == 2
    lines = [re.search(r"ml-100k\.inter:(\d+): ", example).group(1) for example in report["malformed_line_examples"]]
    assert lines == ["7", "12"] and "yesterday" in report["malformed_line_examples"][1]
    assert report["raw_interactions"] == 50 and report["duplicates_removed"] == 2
    events = _keyed_events(_tables(tmp_path))
    assert len(events) == 48 and not events.duplicated(["user_key", "item_key"]).any()
    # The earliest copy of each duplicated pair is the one kept.
    user1 = events[events["user_key"] == "1"].set_index("item_key")
    assert user1.loc["2", "timestamp"] == 880001000 and user1.loc["3", "timestamp"] == 880001100
    assert user1.loc["2", "rating"] == 2.0
    # Item 8's year and genre are "unknown" in the file.
    items = read_table(tmp_path / "items").set_index("item_key")
    assert items.loc["8", "year"] == 0 and items.loc["8", "genres"] == "" and items.loc["8", "description"] == ""
    assert items.loc["1", "description"] == "Genres: Animation, Comedy. Released 1991."


def test_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare_dataset("movielens", "paper", tmp_path)
    with pytest.raises(ValueError, match="unknown protocol"):
        prepare_dataset("ml-100k", "random", tmp_path)
    with pytest.raises(ValueError, match="max_history >= 4"):
        prepare_dataset("ml-100k", "leave-last-out", tmp_path, max_history=3)
    with pytest.raises(ValueError, match="on_bad_line"):
        prepare_dataset("ml-100k", "paper", tmp_path, input=MINI, on_bad_line="ignore")
    with pytest.raises(ValueError, match="cannot draw 3 negatives: only 2 of 8 items"):
        prepare_dataset("ml-100k", "paper", tmp_path, input=MINI, on_bad_line="skip", n_negatives_test=3, max_history=0)


# ---- Amazon Reviews 2023 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def amazon(tmp_path_factory):
    out = tmp_path_factory.mktemp("amazon")
    report = prepare_dataset("amazon2023", "paper", out, input=AMAZON, images=AMAZON / "images", n_negatives_test=2)
    return out, report, _tables(out)


def test_amazon_counts_and_k_core(amazon):
    _, report, tables = amazon
    assert report["files"]["interactions"].endswith("Toy_Games.jsonl.gz")
    assert report["raw_interactions"] == 86 and report["duplicates_removed"] == 1
    # AUSER11 (3 reviews) fails the 6-core; B000000011 (2 reviews) fails the 5-core.
    assert report["after_k_core"] == {"users": 10, "items": 10, "interactions": 80, "rounds": 2}
    assert set(tables["users"]["user_key"]) == {f"AUSER{n:02d}" for n in range(1, 11)}
    assert "B000000011" not in set(tables["items"]["item_key"])
    assert report["timestamp_unit"] == "ms" and tables["events"]["timestamp"].min() > 1_600_000_000_000
    assert report["users_per_split"] == {"train": 8, "valid": 1, "test": 1}


def test_amazon_negatives_are_exactly_the_unseen_items(amazon):
    _, _, tables = amazon
    events = _keyed_events(tables)
    all_items = set(tables["items"]["item_key"])
    seen = events.groupby("user_key")["item_key"].agg(set)
    item_keys = tables["items"].set_index("item_id")["item_key"]
    user_keys = tables["users"].set_index("user_id")["user_key"]
    for rows in (tables["test"],):
        for _, group in rows.groupby("group_id"):
            user = user_keys[group["user_id"].iloc[0]]
            negatives = set(group.loc[group["label"] == 0, "item_id"].map(item_keys))
            # Every user reviewed 8 of the 10 items, so its 2 negatives are forced.
            assert negatives == all_items - seen[user]


def test_amazon_items_text_and_images(amazon):
    out, report, tables = amazon
    items = tables["items"].set_index("item_key")
    assert items.loc["B000000001", "title"] == "Toy number 1"
    assert items.loc["B000000001", "description"] == "Toy 1 is fun. Ages 3+."
    assert items.loc["B000000010", "description"] == "feature 10a feature 10b"  # no description: features
    assert items.loc["B000000004", "image_url"] == "https://example.invalid/B000000004.jpg"  # the MAIN image
    assert items.loc["B000000009", "title"] == "" and report["items_without_metadata"] == 1
    assert report["missing_image_files"] == 1 and report["missing_image_examples"] == ["B000000007"]
    assert report["items_with_image"] == 9 and report["items_without_image"] == 1
    assert pd.isna(items.loc["B000000007", "image_path"])
    assert items.loc["B000000003", "image_path"] == "B000000003.png"  # relative to the image root
    assert report["image_root"] == str((AMAZON / "images").absolute())
    assert (Path(report["image_root"]) / items.loc["B000000001", "image_path"]).read_bytes()[:2] == b"\xff\xd8"
    schema = read_schema(out / "items")
    assert set(schema.select_by_tag(Tags.TEXT).column_names) == {"title", "description", "attributes"}
    # The catalogue attributes: the fixture's meta records name a main category and no brand.
    assert items.loc["B000000001", "attributes"] == "Category: Toys & Games."
    assert items.loc["B000000009", "attributes"] == ""  # no metadata


def test_amazon_input_forms(tmp_path):
    reviews, meta = amazon_files(AMAZON)
    assert reviews.name == "Toy_Games.jsonl.gz" and meta.name == "meta_Toy_Games.jsonl"
    assert amazon_files(reviews) == (reviews, meta)
    # A second category in the folder makes the folder ambiguous.
    folder = tmp_path / "two"
    shutil.copytree(AMAZON, folder)
    shutil.copy(folder / "meta_Toy_Games.jsonl", folder / "meta_Baby.jsonl")
    shutil.copy(folder / "Toy_Games.jsonl.gz", folder / "Baby.jsonl.gz")
    with pytest.raises(ValueError, match=r"holds 2 review categories \['Baby', 'Toy_Games'\]"):
        amazon_files(folder)
    assert amazon_files(folder / "Baby.jsonl.gz")[1].name == "meta_Baby.jsonl"
    (folder / "meta_Baby.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="meta_Baby"):
        amazon_files(folder / "Baby.jsonl.gz")
    with pytest.raises(ValueError, match="needs input"):
        prepare_dataset("amazon2023", "paper", tmp_path / "out")


def test_amazon_bad_json_line_in_gzip(tmp_path):
    folder = tmp_path / "amazon"
    folder.mkdir()
    shutil.copy(AMAZON / "meta_Toy_Games.jsonl", folder)
    lines = gzip.decompress((AMAZON / "Toy_Games.jsonl.gz").read_bytes()).decode().splitlines()
    lines[4] = lines[4][:-5]  # truncated JSON on line 5
    lines.insert(9, '{"user_id": "AUSER01", "rating": 5.0, "timestamp": 1}')  # line 10: no parent_asin
    (folder / "Toy_Games.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(ValueError, match=r"Toy_Games\.jsonl\.gz:5: invalid JSON"):
        prepare_dataset("amazon2023", "paper", tmp_path / "out", input=folder, n_negatives_test=2)
    report = prepare_dataset("amazon2023", "paper", tmp_path / "out", input=folder, n_negatives_test=1, on_bad_line="skip")
    assert report["malformed_lines_skipped"] == 2 and report["raw_interactions"] == 85
    assert "Toy_Games.jsonl.gz:10: missing user_id or parent_asin" in report["malformed_line_examples"][1]


def test_amazon_main_image_url():
    images = [{"large": "https://x/alt.jpg", "variant": "PT01"}, {"large": None, "hi_res": "https://x/main_hi.jpg", "variant": "MAIN"}]
    assert amazon_main_image_url(images) == "https://x/main_hi.jpg"
    assert amazon_main_image_url([{"thumb": "https://x/t.jpg"}]) == "https://x/t.jpg"
    assert amazon_main_image_url([]) is None and amazon_main_image_url(None) is None


# ---- MicroLens ------------------------------------------------------------------------------


def test_microlens_leave_last_out(tmp_path):
    pairs, titles, covers = microlens_files(MICROLENS)
    assert (pairs.name, titles.name, covers.name) == ("MicroLens-100k_pairs.csv", "MicroLens-100k_title_en.csv", "MicroLens-100k_covers")
    report = prepare_dataset("microlens", "leave-last-out", tmp_path, input=MICROLENS, n_negatives_test=2)
    tables = _tables(tmp_path)
    # User 50 (2 videos) fails the 7-core; the covers folder is found without `images`.
    assert report["after_k_core"]["users"] == 9 and "50" not in set(tables["users"]["user_key"])
    assert report["files"]["images"].endswith("MicroLens-100k_covers")
    assert report["missing_image_files"] == 1 and report["missing_image_examples"] == ["105"]
    items = tables["items"].set_index("item_key")
    assert items.loc["103", "title"] == "cats, dogs, and more cats"  # unquoted commas kept
    # Paths are relative to the image root, which report.json records (here the covers folder).
    assert items.loc["101", "image_path"] == "101.jpg"
    assert report["image_root"].endswith("MicroLens-100k_covers")
    assert (Path(report["image_root"]) / items.loc["101", "image_path"]).is_file()
    assert "rating" not in tables["events"].columns
    events = _keyed_events(tables)
    raw = pd.read_csv(MICROLENS / "MicroLens-100k_pairs.csv", dtype=str)
    raw = raw[raw["user"] != "50"].assign(timestamp=lambda f: f["timestamp"].astype(np.int64))
    latest = raw.sort_values("timestamp").groupby("user").tail(1).set_index("user")
    test_pos = tables["test"][tables["test"]["label"] == 1]
    test_pos = test_pos.assign(user_key=test_pos["user_id"].map(tables["users"].set_index("user_id")["user_key"]))
    test_pos = test_pos.assign(item_key=test_pos["item_id"].map(tables["items"].set_index("item_id")["item_key"])).set_index("user_key")
    assert (test_pos["item_key"] == latest.loc[test_pos.index, "item"]).all()
    assert len(events) == 72 and tables["test"].groupby("group_id").size().eq(3).all()


def test_users_too_short_for_the_protocol_are_dropped_and_counted(tmp_path):
    # Without the 7-core, user 50 (2 videos) stays, but leave-last-out needs 4 events per user.
    report = prepare_dataset("microlens", "leave-last-out", tmp_path, input=MICROLENS, min_user_interactions=1, min_item_interactions=1, n_negatives_test=2)
    assert report["after_k_core"]["users"] == 10 and report["users_dropped_too_short"] == 1
    assert report["kept"]["users"] == 9 and "50" not in set(read_table(tmp_path / "users")["user_key"])


def test_same_seed_same_bytes_across_processes(tmp_path):
    # Another interpreter with another hash seed (set order differs) must write the same files.
    prepare_dataset("microlens", "paper", tmp_path / "here", input=MICROLENS, n_negatives_test=2, seed=9)
    code = (
        "from merlin_mllm.data import prepare_dataset; "
        f"prepare_dataset('microlens', 'paper', {str(tmp_path / 'there')!r}, input={str(MICROLENS)!r}, n_negatives_test=2, seed=9)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}, capture_output=True)

    def digests(root: Path) -> dict:
        files = [p for p in root.rglob("*") if p.is_file() and p.name != "_file_list.txt"]  # that one holds the path
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    here, there = digests(tmp_path / "here"), digests(tmp_path / "there")
    assert len(here) == 6 * 5 + 1 and here == there
