"""A multimodal recommendation set whose users prefer something seen only in the item's picture.

Items are emoji from the npm package ``emoji-datasource-google`` (a name, a category and a
64 px PNG each). Each item gets a hidden *visual* attribute computed from its pixels: its
colour temperature, ``"warm"`` (reds, oranges, yellows) or ``"cool"`` (greens, blues,
purples). The item text the models see (title = the emoji's name, description = its category)
never names a colour: names holding a colour word or an attribute word are left out.

Simulated users each have a hidden taste for one attribute value. Their time-ordered histories
are mostly liked items plus a fixed share of noise, and their last item (the target the ranker
must find) always has the liked value. A model that cannot see pictures has no way to know
which value an item has, except through whatever its title happens to reveal, which
:func:`title_leak_check` measures.

Attribute rule (:func:`colour_temperature`)
-------------------------------------------
* Opaque pixels are those with alpha >= 128 (all pixels for images without alpha).
* A pixel is *coloured* when its HSV saturation >= 0.35 and value >= 0.25 (not grey, white or
  black).
* Hue families: warm = hue in [330 deg, 360 deg) or [0 deg, 70 deg); cool = [70 deg, 330 deg).
* The item is labelled with the family holding most coloured pixels, provided at least
  ``min_coloured`` (0.30) of its opaque pixels are coloured and the winning family holds at
  least ``min_share`` (0.70) of them; otherwise it is ``None`` (neutral or mixed: left out).

Catalogue rule (:func:`build_catalogue`): within each category, as many warm as cool items are
drawn at random (the smaller count), so the category says nothing about the attribute.

Simulation rule (:func:`simulate_users`): see that function.

The set of the visual-preference check (``python -m benchmarks.visual.run_visual``, see
``benchmarks/visual/README.md``), tested in ``tests/test_visual_set.py``.

Usage::

    from merlin_mllm.data.visual_set import load_emoji_items, build_catalogue, simulate_users, write_amazon_jsonl
    items = load_emoji_items("cache/npm/node_modules/emoji-datasource-google")
    catalogue = build_catalogue(items, seed=0, max_items=300)
    events = simulate_users(catalogue, n_users=300, seed=0)
    reviews = write_amazon_jsonl(events, catalogue, "cache/raw")
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pandas as pd
from PIL import Image

ATTRIBUTE_VALUES = ("warm", "cool")
#: Words that name a colour (or the attribute itself); a title holding one is left out.
ATTRIBUTE_WORDS = frozenset(
    {
        "warm", "cool", "red", "orange", "yellow", "green", "blue", "purple", "violet", "pink",
        "brown", "black", "white", "grey", "gray", "gold", "golden", "silver", "bronze",
        "beige", "cyan", "turquoise", "teal", "magenta", "navy", "maroon", "crimson", "scarlet",
        "amber", "indigo", "lime", "olive", "colour", "color", "colored", "coloured",
    }
)
MIN_SATURATION = 0.35
MIN_VALUE = 0.25
WARM_HUES = ((330.0, 360.0), (0.0, 70.0))
PACKAGE = "emoji-datasource-google"
PACKAGE_VERSION = "16.0.0"
IMAGE_FOLDER = Path("img") / "google" / "64"

_WORD = re.compile(r"[a-z]+")


def title_words(title: str) -> set[str]:
    """Lower-case alphabetic words of a title ("Man's Shoe" -> {"man", "s", "shoe"})."""
    return set(_WORD.findall(title.lower()))


def has_attribute_word(title: str) -> bool:
    """True when the title names a colour or an attribute value."""
    return bool(title_words(title) & ATTRIBUTE_WORDS)


def colour_temperature(image, min_coloured: float = 0.30, min_share: float = 0.70) -> tuple[Optional[str], dict]:
    """The hidden attribute of one picture: ``"warm"``, ``"cool"`` or ``None`` (see module rule).

    Parameters
    ----------
    image : path or PIL.Image.Image
        An image file or an image (RGBA, RGB, L, P, ...).
    min_coloured : float
        Least share of opaque pixels that must be coloured (else neutral: ``None``).
    min_share : float
        Least share of coloured pixels the winning family must hold (else mixed: ``None``).

    Returns
    -------
    (str or None, dict)
        The value and the measured shares: ``coloured`` (of opaque pixels), ``warm`` and
        ``cool`` (of coloured pixels), ``opaque`` (pixel count).

    Examples
    --------
    >>> colour_temperature(Image.new("RGB", (8, 8), (220, 30, 30)))[0]
    'warm'
    """
    picture = image if isinstance(image, Image.Image) else Image.open(image)
    rgba = np.asarray(picture.convert("RGBA"))
    opaque = rgba[..., 3] >= 128
    hsv = np.asarray(Image.fromarray(rgba[..., :3]).convert("HSV"), dtype=np.float64)[opaque]
    n_opaque = int(opaque.sum())
    if n_opaque == 0:
        return None, {"opaque": 0, "coloured": 0.0, "warm": 0.0, "cool": 0.0}
    hue = hsv[:, 0] * 360.0 / 255.0
    coloured = (hsv[:, 1] / 255.0 >= MIN_SATURATION) & (hsv[:, 2] / 255.0 >= MIN_VALUE)
    warm = np.zeros_like(coloured)
    for low, high in WARM_HUES:
        warm |= (hue >= low) & (hue < high)
    n_coloured = int(coloured.sum())
    n_warm = int((coloured & warm).sum())
    stats = {
        "opaque": n_opaque,
        "coloured": n_coloured / n_opaque,
        "warm": n_warm / n_coloured if n_coloured else 0.0,
        "cool": (n_coloured - n_warm) / n_coloured if n_coloured else 0.0,
    }
    if stats["coloured"] < min_coloured:
        return None, stats
    if stats["warm"] >= min_share:
        return "warm", stats
    if stats["cool"] >= min_share:
        return "cool", stats
    return None, stats


def load_emoji_items(package_dir: Path | str) -> pd.DataFrame:
    """Every emoji of the package with its pixel attribute.

    Parameters
    ----------
    package_dir : path
        The installed ``emoji-datasource-google`` folder (``emoji.json`` + ``img/google/64``).

    Returns
    -------
    DataFrame
        ``item_key`` (the PNG's stem), ``title`` (the emoji's name), ``category``,
        ``image_path``, ``attribute`` (``warm``/``cool``/None), ``coloured``, ``warm_pixel_share``.

    Raises
    ------
    FileNotFoundError
        ``emoji.json`` or a listed PNG is missing (the message names it).
    """
    package_dir = Path(package_dir)
    listing = package_dir / "emoji.json"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} not found: is {PACKAGE} installed there?")
    records = json.loads(listing.read_text())
    rows = []
    for index, record in enumerate(records):
        name, image = record.get("name"), record.get("image")
        if not name or not image or not record.get("has_img_google", True):
            continue  # nameless entries or no Google picture: nothing to show
        path = package_dir / IMAGE_FOLDER / image
        if not path.is_file():
            raise FileNotFoundError(f"{listing} entry {index} ({name!r}) lists {path}, which is missing")
        value, stats = colour_temperature(path)
        rows.append(
            {
                "item_key": Path(image).stem,
                "title": name.title(),
                "category": record.get("category") or "",
                "image_path": str(path),
                "attribute": value,
                "coloured": stats["coloured"],
                "warm_pixel_share": stats["warm"],
            }
        )
    return pd.DataFrame(rows)


def build_catalogue(items: pd.DataFrame, seed: int = 0, max_items: int = 0) -> pd.DataFrame:
    """The balanced catalogue: attribute known, no attribute word in the title, balanced per category.

    Parameters
    ----------
    items : DataFrame
        ``item_key``, ``title``, ``category``, ``attribute`` (as from :func:`load_emoji_items`).
    seed : int
        Seeds which items are kept.
    max_items : int
        Keep at most this many (0 = all balanced items), still balanced within each category
        (each category keeps its share, rounded to an even count, at least 2 per category).

    Returns
    -------
    DataFrame
        The kept rows, sorted by ``item_key``, with an added ``description`` ("Category: ...").
    """
    rng = np.random.default_rng(seed)
    usable = items[items["attribute"].isin(ATTRIBUTE_VALUES).to_numpy()]
    usable = usable[~usable["title"].map(has_attribute_word).to_numpy()]
    usable = usable.drop_duplicates("title")  # equal titles would be indistinguishable to the text arm
    per_category = {}
    for category, group in usable.groupby("category", sort=True):
        counts = group["attribute"].value_counts()
        per_category[category] = min(int(counts.get(value, 0)) for value in ATTRIBUTE_VALUES)
    per_category = {c: n for c, n in per_category.items() if n > 0}
    total = 2 * sum(per_category.values())
    if max_items and max_items < total:
        scale = max_items / total
        per_category = {c: max(1, min(n, int(round(n * scale)))) for c, n in per_category.items()}
    chosen = []
    for category, n in per_category.items():
        group = usable[(usable["category"] == category).to_numpy()]
        for value in ATTRIBUTE_VALUES:
            pool = group[(group["attribute"] == value).to_numpy()].sort_values("item_key")
            chosen.append(pool.iloc[np.sort(rng.choice(len(pool), size=n, replace=False))])
    catalogue = pd.concat(chosen).sort_values("item_key").reset_index(drop=True)
    catalogue["description"] = "Category: " + catalogue["category"] + "."
    return catalogue


def simulate_users(
    catalogue: pd.DataFrame,
    n_users: int,
    history_length: int = 9,
    liked_fraction: float = 0.8,
    seed: int = 0,
    warm_share: float = 0.5,
    start_ms: int = 1_700_000_000_000,
) -> pd.DataFrame:
    """Time-ordered interactions of simulated users with a hidden visual taste.

    Rules, per user (all draws from one ``numpy`` generator seeded with ``seed``):

    1. The taste is ``"warm"`` with probability ``warm_share``, else ``"cool"``.
    2. The history has ``history_length`` distinct items: exactly
       ``round(liked_fraction * history_length)`` of them have the liked value, the rest the
       other value (noise); the liked/noise positions are shuffled; items are drawn uniformly
       without replacement within their value.
    3. One more item, the target (the user's last event), has the liked value and is not in
       the history.
    4. Timestamps (ms) rise by one minute per position; users are spaced 10^7 ms apart.

    Negatives are not drawn here: the project's data layer draws them from the items the user
    never touched.

    Parameters
    ----------
    catalogue : DataFrame
        ``item_key`` and ``attribute`` columns.
    n_users, history_length : int
        Users, and history items per user before the target.
    liked_fraction : float
        Share of the history with the liked value (0..1).
    seed : int
    warm_share : float
        Probability that a user's taste is ``"warm"`` (0.5: both tastes equally common).
    start_ms : int
        The first timestamp.

    Returns
    -------
    DataFrame
        ``user_key``, ``item_key``, ``timestamp``, ``position`` (0-based), ``taste``,
        ``attribute`` (the item's), ``is_target``; sorted by user then position.
    """
    if not 0.0 <= liked_fraction <= 1.0:
        raise ValueError(f"liked_fraction must be within [0, 1], got {liked_fraction}")
    if not 0.0 <= warm_share <= 1.0:
        raise ValueError(f"warm_share must be within [0, 1], got {warm_share}")
    if n_users < 1 or history_length < 1:
        raise ValueError("n_users and history_length must be >= 1")
    pools = {value: catalogue.loc[(catalogue["attribute"] == value).to_numpy(), "item_key"].to_numpy() for value in ATTRIBUTE_VALUES}
    n_liked = int(round(liked_fraction * history_length))
    n_noise = history_length - n_liked
    for value, pool in pools.items():
        if len(pool) < n_liked + 1 or len(pool) < n_noise:
            raise ValueError(f"the catalogue has {len(pool)} {value!r} items; a history needs {n_liked + 1}")
    rng = np.random.default_rng(seed)
    rows = []
    width = len(str(n_users))
    for user in range(n_users):
        taste = "warm" if rng.random() < warm_share else "cool"
        other = next(value for value in ATTRIBUTE_VALUES if value != taste)
        liked = list(rng.choice(pools[taste], size=n_liked + 1, replace=False))
        noise = list(rng.choice(pools[other], size=n_noise, replace=False))
        target = liked.pop()
        is_liked = np.array([True] * n_liked + [False] * n_noise)
        rng.shuffle(is_liked)
        liked_iter, noise_iter = iter(liked), iter(noise)
        sequence = [(next(liked_iter), taste) if flag else (next(noise_iter), other) for flag in is_liked]
        sequence.append((target, taste))
        user_key = f"U{user:0{width}d}"
        for position, (item_key, value) in enumerate(sequence):
            rows.append(
                {
                    "user_key": user_key,
                    "item_key": str(item_key),
                    "timestamp": start_ms + user * 10_000_000 + position * 60_000,
                    "position": position,
                    "taste": taste,
                    "attribute": value,
                    "is_target": position == history_length,
                }
            )
    return pd.DataFrame(rows)


def write_amazon_jsonl(events: pd.DataFrame, catalogue: pd.DataFrame, folder: Path | str, category: str = "Emoji") -> Path:
    """Write the set as one Amazon Reviews 2023 category, for ``prepare_dataset("amazon2023", ...)``.

    ``<category>.jsonl`` holds one review per event (``user_id``, ``parent_asin``,
    ``timestamp``, ``rating`` 5.0); ``meta_<category>.jsonl`` one record per catalogue item
    (``parent_asin``, ``title``, ``description``). No image field: pictures come from a local
    folder of ``<item_key>.png`` files passed as ``images=``.

    Returns
    -------
    Path
        The reviews file (its meta file sits beside it).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    reviews = folder / f"{category}.jsonl"
    meta = folder / f"meta_{category}.jsonl"
    with open(reviews, "w", encoding="utf-8") as handle:
        for row in events.itertuples(index=False):
            record = {"user_id": row.user_key, "parent_asin": row.item_key, "timestamp": int(row.timestamp), "rating": 5.0}
            handle.write(json.dumps(record) + "\n")
    with open(meta, "w", encoding="utf-8") as handle:
        for row in catalogue.itertuples(index=False):
            record = {"parent_asin": row.item_key, "title": row.title, "description": [row.description]}
            handle.write(json.dumps(record) + "\n")
    return reviews


def title_leak_check(catalogue: pd.DataFrame, seed: int = 0, folds: int = 5) -> dict:
    """How well the item text alone predicts the hidden attribute (should be near chance).

    A TF-IDF (word 1-2-grams + character 2-4-grams of title and description) logistic
    regression, scored by stratified ``folds``-fold cross-validated accuracy, against the
    majority-class rate.

    Returns
    -------
    dict
        ``accuracy`` (mean over folds), ``accuracy_std``, ``majority_rate``, ``items``, ``folds``.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline, make_union

    texts = (catalogue["title"] + " " + catalogue["description"]).tolist()
    labels = catalogue["attribute"].to_numpy()
    model = make_pipeline(
        make_union(
            TfidfVectorizer(analyzer="word", ngram_range=(1, 2)),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4)),
        ),
        LogisticRegression(max_iter=2000),
    )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(model, texts, labels, cv=splitter, scoring="accuracy")
    majority = pd.Series(labels).value_counts(normalize=True).iloc[0]
    return {
        "accuracy": float(scores.mean()),
        "accuracy_std": float(scores.std()),
        "majority_rate": float(majority),
        "items": int(len(labels)),
        "folds": int(folds),
    }


def image_token_probe(catalogue: pd.DataFrame, seed: int = 0, folds: int = 5, encoder=None) -> dict:
    """How well each part of the ranker's image tokens predicts the hidden attribute.

    Each item's picture goes through the embedded vision encoder (``VisionEncoder.grid``: 49
    tokens of 1280 EfficientNet features + 10 cell colour statistics); the tokens are averaged
    and a logistic regression on (standardised) features is scored by stratified ``folds``-fold
    cross-validated accuracy, once on the EfficientNet part and once on the colour part. It says
    what the ranker's projector has to work with; it is not the ranker.

    Returns
    -------
    dict
        ``efficientnet`` and ``colour``: {``accuracy``, ``accuracy_std``}; ``majority_rate``,
        ``items``, ``folds``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from merlin_mllm.models.vision import FEATURE_DIM, VisionEncoder

    encoder = encoder or VisionEncoder.load("cpu")
    tokens = encoder.grid(catalogue["image_path"].tolist()).float().mean(dim=1).cpu().numpy()
    labels = catalogue["attribute"].to_numpy()
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    result = {}
    for name, features in (("efficientnet", tokens[:, :FEATURE_DIM]), ("colour", tokens[:, FEATURE_DIM:])):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        scores = cross_val_score(model, features, labels, cv=splitter, scoring="accuracy")
        result[name] = {"accuracy": float(scores.mean()), "accuracy_std": float(scores.std())}
    result.update(majority_rate=float(pd.Series(labels).value_counts(normalize=True).iloc[0]),
                  items=int(len(labels)), folds=int(folds))
    return result


def liked_share(events: pd.DataFrame) -> float:
    """Share of history events (targets excluded) whose item has the user's liked value."""
    history = events[~events["is_target"].to_numpy()]
    return float((history["attribute"] == history["taste"]).mean())


def attribute_words_in(titles: Iterable[str]) -> list[str]:
    """Titles holding an attribute or colour word (should be empty for a catalogue)."""
    return [title for title in titles if has_attribute_word(title)]
