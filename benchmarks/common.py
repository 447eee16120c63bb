"""What the benchmark scripts share: where speed results live, and how a result is written.

Speed results are committed next to the table that cites them, in ``benchmarks/speed/``
(``speed_table.py`` renders ``benchmarks/README.md``'s table from them). The scripts in
``benchmarks/`` import this module directly; those in ``benchmarks/quality/`` and
``benchmarks/visual/`` put ``benchmarks/`` on ``sys.path`` first.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["SPEED_RESULTS", "write_json"]

#: The committed speed results (one JSON per benchmark script).
SPEED_RESULTS = Path(__file__).resolve().parent / "speed"


def write_json(path, result: dict) -> dict:
    """Write ``result`` as indented JSON to ``path`` (folders created), say so, and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return result
