"""Writing and reading the prepared tables as Merlin parquet datasets with tagged schemas.

Merlin writes string columns without a type, so they read back with dtype ``unknown``;
:func:`write_table` marks them ``BYTES`` in both ``schema.pbtxt`` and ``.merlin/schema.json``
so that they read back as strings. Tags are written sorted, so the schema files are the same
from one run to the next (Python's set order changes between processes).

Usage::

    write_table(df, "out/items", {"item_id": [Tags.ITEM_ID, Tags.CATEGORICAL], "title": [Tags.TEXT]})
    items = read_table("out/items")
    schema = read_schema("out/items")
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import pandas as pd

with warnings.catch_warnings():
    # merlin.dtypes warns that TensorFlow is absent; this project does not use it.
    warnings.simplefilter("ignore")
    import merlin.dtypes as md
    import merlin.io
    from merlin.schema import Schema, Tags
    from merlin.schema.io.schema_bp import FeatureType
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

__all__ = ["Tags", "write_table", "read_table", "read_named_table", "read_schema"]

_MERLIN_METADATA_DIR = ".merlin"


def _is_string_column(series: pd.Series) -> bool:
    return series.dtype == object or pd.api.types.is_string_dtype(series.dtype)


def write_table(
    frame: pd.DataFrame,
    path: Path | str,
    tags: Mapping[str, Sequence[Tags]],
    domains: Optional[Mapping[str, int]] = None,
) -> Path:
    """Write ``frame`` as a one-file Merlin parquet dataset at ``path`` (replacing it).

    Parameters
    ----------
    frame : pandas.DataFrame
        Columns of int64/float64/bool or Python strings (``None`` for missing).
    path : Path or str
        The dataset folder; an existing one is removed first, so no stale part files remain.
    tags : mapping
        Column name -> Merlin tags.
    domains : mapping, optional
        Column name -> largest id, written as the categorical domain ``[0, max]`` (0 is padding).
    """
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    frame = frame.reset_index(drop=True)
    string_columns = [name for name in frame.columns if _is_string_column(frame[name])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = merlin.io.Dataset(frame, cpu=True)
        schema = dataset.schema
        for name in frame.columns:
            column = schema[name]
            if name in string_columns:
                column = column.with_dtype(md.string)
            if name in tags:
                column = column.with_tags(list(tags[name]))
            if domains and name in domains:
                column = column.with_properties(
                    {"domain": {"min": 0, "max": int(domains[name]), "name": name}}
                )
            schema[name] = column
        dataset.schema = schema
        dataset.to_parquet(str(path), output_files=1)
    _write_schema(schema, path, string_columns)
    return path


def _write_schema(schema: Schema, path: Path, string_columns: list[str]) -> None:
    metadata = TensorflowMetadata.from_merlin_schema(schema)
    for feature in metadata.proto_schema.feature:
        if feature.name in string_columns:
            feature.type = FeatureType.BYTES
        feature.annotation.tag = sorted(feature.annotation.tag)
    metadata.to_proto_text_file(str(path))
    json_dir = path / _MERLIN_METADATA_DIR
    json_dir.mkdir(exist_ok=True)
    metadata.to_json_file(str(json_dir))
    # The JSON writer keeps the (set-derived) key order of the properties; sort it.
    json_file = json_dir / "schema.json"
    json_file.write_text(json.dumps(json.loads(json_file.read_text()), sort_keys=True))


def read_schema(path: Path | str) -> Schema:
    """The Merlin schema of a dataset written by :func:`write_table`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return merlin.io.Dataset(str(path), engine="parquet", cpu=True).schema


def read_table(path: Path | str, columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """A parquet dataset read back into pandas through ``merlin.io``.

    Parameters
    ----------
    path : Path or str
        A folder written by :func:`write_table`, any folder of ``*.parquet`` part files (read
        as one table, parts in order; ``schema.pbtxt`` and ``_metadata`` are not data), or
        one parquet file.
    columns : sequence of str, optional
        Only these columns (default: all).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist, or is a folder without a ``*.parquet`` file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"parquet data not found: {path}")
    if path.is_dir() and not any(path.glob("*.parquet")):
        raise FileNotFoundError(f"no *.parquet file in {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = merlin.io.Dataset(str(path), engine="parquet", cpu=True)
        frame = dataset.to_ddf(columns=list(columns) if columns is not None else None).compute()
    return frame.reset_index(drop=True)


def read_named_table(path: Path | str, what: str, required: Sequence[str] = (), hint: str = "") -> pd.DataFrame:
    """:func:`read_table`, whose errors name ``what`` (e.g. ``"events table"``) and the path.

    Raises
    ------
    FileNotFoundError
        ``path`` is missing (with ``hint`` appended, e.g. what was expected there).
    ValueError
        The table lacks one of the ``required`` columns (naming them).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    frame = read_table(path)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: {what} lacks column(s) {missing}")
    return frame
