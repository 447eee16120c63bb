"""The visual-preference set builder (merlin_mllm/data/visual_set.py) on small local images.

Checks that the hidden attribute computed from pixels is right on pictures of known colours,
that catalogue titles never name the attribute, that simulated histories follow the stated
rules (seeded, liked share as configured, target liked and new), and that the written files go
through the project's own ``prepare_dataset("amazon2023", ...)`` with local image paths.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from merlin_mllm.data import visual_set

RED, ORANGE, YELLOW = (220, 30, 30), (240, 140, 20), (250, 210, 30)
GREEN, BLUE, PURPLE = (40, 170, 60), (30, 80, 220), (140, 50, 200)
GREY, WHITE = (128, 128, 128), (255, 255, 255)


def _emoji_png(colour, size=32, background=None, second=None, second_share=0.0) -> Image.Image:
    """An RGBA picture: a centred disc of ``colour`` (part of it ``second``) on transparency."""
    image = np.zeros((size, size, 4), dtype=np.uint8)
    if background is not None:
        image[...] = (*background, 0)  # transparent pixels that carry a colour: must be ignored
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size * 0.45) ** 2
    image[disc] = (*colour, 255)
    if second is not None:
        rows = disc & (yy < int(size * second_share))
        image[rows] = (*second, 255)
    return Image.fromarray(image, "RGBA")


@pytest.mark.parametrize(
    "colour, expected",
    [(RED, "warm"), (ORANGE, "warm"), (YELLOW, "warm"), (GREEN, "cool"), (BLUE, "cool"), (PURPLE, "cool"),
     (GREY, None), (WHITE, None)],
)
def test_attribute_from_pixels_of_known_colours(tmp_path, colour, expected):
    path = tmp_path / "item.png"
    _emoji_png(colour).save(path)
    value, stats = visual_set.colour_temperature(path)
    assert value == expected
    assert stats["opaque"] > 0


def test_attribute_ignores_transparent_pixels_and_rejects_mixed_pictures():
    # Blue hidden under full transparency does not count: the visible disc is red.
    assert visual_set.colour_temperature(_emoji_png(RED, background=BLUE))[0] == "warm"
    # Half red, half blue: neither family reaches the 70% share, so the item is left out.
    value, stats = visual_set.colour_temperature(_emoji_png(RED, second=BLUE, second_share=0.5))
    assert value is None and 0.3 < stats["warm"] < 0.7
    # A mostly blue picture with a small red part is still cool.
    assert visual_set.colour_temperature(_emoji_png(BLUE, second=RED, second_share=0.2))[0] == "cool"
    # Mostly grey with a little colour: too few coloured pixels.
    assert visual_set.colour_temperature(_emoji_png(GREY, second=RED, second_share=0.2))[0] is None


def test_attribute_on_a_real_photo():
    skimage_data = pytest.importorskip("skimage.data")
    # The coffee photo: a red-brown cup and saucer on a warm table.
    value, stats = visual_set.colour_temperature(Image.fromarray(skimage_data.coffee()))
    assert value == "warm" and stats["warm"] > 0.9
    # The same photo with red and blue channels swapped turns cool.
    swapped = skimage_data.coffee()[..., ::-1].copy()
    assert visual_set.colour_temperature(Image.fromarray(swapped))[0] == "cool"


def _fake_package(folder: Path, entries) -> Path:
    """A minimal emoji-datasource-google layout: emoji.json + img/google/64/<code>.png."""
    images = folder / visual_set.IMAGE_FOLDER
    images.mkdir(parents=True)
    records = []
    for index, (name, category, colour) in enumerate(entries):
        code = f"1f{index:03x}"
        if colour is not None:
            _emoji_png(colour).save(images / f"{code}.png")
        records.append({"name": name.upper(), "image": f"{code}.png", "category": category, "has_img_google": True})
    (folder / "emoji.json").write_text(json.dumps(records))
    return folder


def test_load_items_and_catalogue_titles_never_name_the_attribute(tmp_path):
    entries = [
        ("apple", "Food", RED), ("pear", "Food", GREEN), ("blue heart", "Symbols", BLUE),
        ("red circle", "Symbols", RED), ("star", "Symbols", YELLOW), ("gem", "Symbols", PURPLE),
        ("rock", "Nature", GREY), ("cool button", "Symbols", BLUE), ("tree", "Nature", GREEN),
    ]
    package = _fake_package(tmp_path / "pkg", entries)
    items = visual_set.load_emoji_items(package)
    by_title = dict(zip(items["title"], items["attribute"]))
    assert by_title["Apple"] == "warm" and by_title["Pear"] == "cool" and by_title["Rock"] is None
    catalogue = visual_set.build_catalogue(items, seed=0)
    assert visual_set.attribute_words_in(catalogue["title"]) == []
    assert not {"Blue Heart", "Red Circle", "Cool Button", "Rock"} & set(catalogue["title"])
    # Balanced per category: Food 1+1, Symbols 1+1 (star, gem); Nature has no warm item: dropped.
    counts = catalogue.groupby(["category", "attribute"]).size().to_dict()
    assert counts == {("Food", "cool"): 1, ("Food", "warm"): 1, ("Symbols", "cool"): 1, ("Symbols", "warm"): 1}
    assert (catalogue["description"] == "Category: " + catalogue["category"] + ".").all()


def test_missing_picture_is_named(tmp_path):
    package = _fake_package(tmp_path / "pkg", [("apple", "Food", RED), ("ghost", "Food", None)])
    with pytest.raises(FileNotFoundError, match="(?i)ghost"):
        visual_set.load_emoji_items(package)


def _synthetic_catalogue(n_per_value=30) -> pd.DataFrame:
    rows = []
    for value in visual_set.ATTRIBUTE_VALUES:
        for index in range(n_per_value):
            rows.append({"item_key": f"{value[0]}{index:03d}", "title": f"Thing {value[0]}{index}",
                         "category": f"C{index % 3}", "attribute": value})
    frame = pd.DataFrame(rows)
    frame["description"] = "Category: " + frame["category"] + "."
    return frame


def test_simulated_histories_follow_the_rules():
    catalogue = _synthetic_catalogue()
    attribute = dict(zip(catalogue["item_key"], catalogue["attribute"]))
    events = visual_set.simulate_users(catalogue, n_users=40, history_length=10, liked_fraction=0.8, seed=3)
    assert len(events) == 40 * 11
    for _, user in events.groupby("user_key"):
        user = user.sort_values("position")
        taste = user["taste"].iloc[0]
        assert (user["attribute"] == user["item_key"].map(attribute)).all()
        history, target = user.iloc[:-1], user.iloc[-1]
        assert bool(target["is_target"]) and not history["is_target"].any()
        assert (history["attribute"] == taste).sum() == 8  # round(0.8 * 10) liked, 2 noise
        assert target["attribute"] == taste
        assert user["item_key"].is_unique  # the target is new to the user
        assert user["timestamp"].is_monotonic_increasing and user["timestamp"].is_unique
    assert visual_set.liked_share(events) == pytest.approx(0.8)
    # Tastes are drawn for every user, both values occur.
    assert set(events["taste"]) == set(visual_set.ATTRIBUTE_VALUES)
    # Liked and noise positions are shuffled, not always at the same places.
    noise_positions = events[(events["attribute"] != events["taste"])]["position"]
    assert noise_positions.nunique() > 5


def test_simulation_is_seeded():
    catalogue = _synthetic_catalogue()
    first = visual_set.simulate_users(catalogue, n_users=12, seed=7)
    again = visual_set.simulate_users(catalogue, n_users=12, seed=7)
    other = visual_set.simulate_users(catalogue, n_users=12, seed=8)
    pd.testing.assert_frame_equal(first, again)
    assert not first["item_key"].equals(other["item_key"])
    all_liked = visual_set.simulate_users(catalogue, n_users=5, liked_fraction=1.0, seed=1)
    assert visual_set.liked_share(all_liked) == 1.0
    all_warm = visual_set.simulate_users(catalogue, n_users=8, warm_share=1.0, seed=1)
    assert set(all_warm["taste"]) == {"warm"}
    skewed = visual_set.simulate_users(catalogue, n_users=400, warm_share=0.75, seed=2, history_length=3)
    assert skewed.drop_duplicates("user_key")["taste"].eq("warm").mean() == pytest.approx(0.75, abs=0.06)
    with pytest.raises(ValueError, match="warm_share"):
        visual_set.simulate_users(catalogue, n_users=5, warm_share=-0.1)
    with pytest.raises(ValueError, match="liked_fraction"):
        visual_set.simulate_users(catalogue, n_users=5, liked_fraction=1.5)
    with pytest.raises(ValueError, match="items; a history needs"):
        visual_set.simulate_users(_synthetic_catalogue(n_per_value=5), n_users=2, history_length=9)


def test_title_leak_check_detects_a_leak_and_passes_a_clean_catalogue():
    clean = _synthetic_catalogue(40)
    rng = np.random.default_rng(0)
    # Titles drawn independently of the attribute: accuracy near chance.
    words = ["lamp", "bell", "kite", "drum", "shoe", "coin", "map", "key"]
    clean["title"] = [f"{rng.choice(words)} {rng.choice(words)}" for _ in range(len(clean))]
    result = visual_set.title_leak_check(clean)
    assert result["majority_rate"] == 0.5 and result["items"] == 80
    assert abs(result["accuracy"] - 0.5) < 0.2
    # Titles that carry the attribute: the checker must see it.
    leaky = clean.assign(title=clean["title"] + " " + clean["attribute"].map({"warm": "sunny", "cool": "icy"}))
    assert visual_set.title_leak_check(leaky)["accuracy"] > 0.95


def test_written_set_goes_through_prepare_dataset_with_local_images(tmp_path):
    from merlin_mllm.data.image_files import dataset_image_root
    from merlin_mllm.data.prepare import prepare_dataset
    from merlin_mllm.data.tables import read_table

    catalogue = _synthetic_catalogue(20)
    images = tmp_path / "images"
    images.mkdir()
    for key, value in zip(catalogue["item_key"], catalogue["attribute"]):
        _emoji_png(RED if value == "warm" else BLUE, size=16).save(images / f"{key}.png")
    events = visual_set.simulate_users(catalogue, n_users=20, history_length=6, seed=0)
    reviews = visual_set.write_amazon_jsonl(events, catalogue, tmp_path / "raw")
    report = prepare_dataset("amazon2023", "paper", tmp_path / "data", input=reviews, images=images, max_history=0,
                             min_user_interactions=1, min_item_interactions=1, n_negatives_test=5, seed=0)
    assert report["kept"]["users"] == 20 and report["kept"]["events"] == len(events)
    assert report["items_without_image"] == 0
    items = read_table(tmp_path / "data" / "items")
    # The pictures the pipeline will show carry the attribute the simulation used.
    attribute = dict(zip(catalogue["item_key"], catalogue["attribute"]))
    root = dataset_image_root(tmp_path / "data")  # image_path values are relative to the images folder
    assert root.recorded and root.path == images
    for key, path in zip(items["item_key"], items["image_path"]):
        assert visual_set.colour_temperature(root.resolve(path))[0] == attribute[key]
    assert visual_set.attribute_words_in(items["title"]) == []
    # Each user's target (its last event) is the positive test/train/valid row, and it has the liked value.
    rows = pd.concat([read_table(tmp_path / "data" / split) for split in ("train", "valid", "test")])
    users = read_table(tmp_path / "data" / "users")
    key_of_item = dict(zip(items["item_id"], items["item_key"]))
    key_of_user = dict(zip(users["user_id"], users["user_key"]))
    taste = events.drop_duplicates("user_key").set_index("user_key")["taste"]
    positives = rows[rows["label"] == 1]
    assert len(positives) == 20
    for user_id, item_id in zip(positives["user_id"], positives["item_id"]):
        assert attribute[key_of_item[item_id]] == taste[key_of_user[user_id]]
