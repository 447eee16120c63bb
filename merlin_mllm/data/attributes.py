"""Catalogue attributes: the one text column of facts about an item beyond its title.

``data prepare`` writes an ``attributes`` column into every prepared ``items/`` table, made by
the dataset's reader (:mod:`merlin_mllm.data.sources`) with the functions here:

* MovieLens-100k: the genres and the release year, ``"Genres: Animation, Children's, Comedy.
  Released 1995."`` (:func:`ml100k_attributes`);
* Amazon Reviews 2023: the category path and the brand, ``"Category: Video Games > Accessories.
  Brand: Nintendo."`` (:func:`amazon_attributes`);
* MicroLens: ``""`` (its files give a title only).

An item without any attribute gets ``""``. The ranker's candidate text reads the column through
:func:`item_attributes` (``candidate_text="title+attributes"``), which also reads ML-100k
folders prepared before the column existed, from their ``genres`` and ``year`` columns.

Usage::

    from merlin_mllm.data.attributes import item_attributes
    items["attributes"] = item_attributes(prepared_tables("data/ml100k").items)
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

__all__ = ["ATTRIBUTES_COLUMN", "ml100k_attributes", "amazon_attributes", "item_attributes"]

#: The prepared items table's column of catalogue attributes (text; ``""`` for none).
ATTRIBUTES_COLUMN = "attributes"


def ml100k_attributes(genres: Sequence[str], year: int) -> str:
    """``"Genres: A, B. Released 1995."``; a part without a value is left out (``""`` for neither)."""
    parts = []
    if genres:
        parts.append(f"Genres: {', '.join(genres)}.")
    if year:
        parts.append(f"Released {year}.")
    return " ".join(parts)


def _text(value: Any) -> str:
    return " ".join(value.split()) if isinstance(value, str) else ""


def amazon_attributes(record: Mapping[str, Any]) -> str:
    """``"Category: A > B. Brand: C."`` from an Amazon Reviews 2023 meta record.

    The category is the ``categories`` path (``main_category`` when the path is empty); the
    brand is ``details["Brand"]`` (the ``store`` when the details name none). A part without a
    value is left out.
    """
    categories = record.get("categories")
    path = [_text(c) for c in categories if _text(c)] if isinstance(categories, list) else []
    category = " > ".join(path) or _text(record.get("main_category"))
    details = record.get("details")
    brand = _text(details.get("Brand")) if isinstance(details, dict) else ""
    brand = brand or _text(record.get("store"))
    parts = ([f"Category: {category}."] if category else []) + ([f"Brand: {brand}."] if brand else [])
    return " ".join(parts)


def item_attributes(items: pd.DataFrame, where: str = "items") -> pd.Series:
    """Each item's catalogue attributes (text, ``""`` for none), aligned with ``items``.

    Parameters
    ----------
    items : DataFrame
        A prepared ``items/`` table.
    where : str
        Names the table in errors (its folder).

    Raises
    ------
    ValueError
        When the table has no ``attributes`` column and is not an ML-100k table with ``genres``
        and ``year`` (a folder prepared before the column existed): prepare it again.
    """
    if ATTRIBUTES_COLUMN in items.columns:
        return items[ATTRIBUTES_COLUMN].fillna("").astype(str)
    if "genres" in items.columns and "year" in items.columns:
        # ML-100k prepared before the column existed: the same text its reader writes today.
        genres = items["genres"].fillna("").astype(str)
        return pd.Series([ml100k_attributes([g for g in text.split(", ") if g], int(year))
                          for text, year in zip(genres, items["year"].fillna(0))], index=items.index, dtype=object)
    raise ValueError(f"{where} has no {ATTRIBUTES_COLUMN!r} column (it was prepared before catalogue attributes were "
                     "kept): run `merlin-mllm data prepare` again")
