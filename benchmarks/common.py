"""What the benchmark scripts share: where results and work folders live, progress lines,
markdown tables and JSON writing.

Committed results sit in one folder per kind (``benchmarks/README.md``): speed in
``benchmarks/speed/`` (``speed_table.py`` renders the README's table from them), quality in
``benchmarks/quality/``, the visual-preference check in ``benchmarks/visual/``. Caches and work
folders go under ``benchmarks/results/``, which git ignores. The scripts import this module as
``benchmarks.common``: run them as modules from the repository root
(``python -m benchmarks.quality.run_hybrid``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, List, Sequence

__all__ = ["BENCHMARKS", "QUALITY_RESULTS", "REPO", "SPEED_RESULTS", "VISUAL_RESULTS", "WORK", "log",
           "markdown_table", "write_json"]

#: The ``benchmarks/`` folder and the repository root.
BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
#: The committed results, one folder per kind.
SPEED_RESULTS = BENCHMARKS / "speed"
QUALITY_RESULTS = BENCHMARKS / "quality"
VISUAL_RESULTS = BENCHMARKS / "visual"
#: Caches and work folders of the runs (git-ignored); each script uses its own subfolder.
WORK = BENCHMARKS / "results"


def log(message: str) -> None:
    """One progress line, stamped with the wall-clock time, flushed at once (runs are long)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]] = ()) -> List[str]:
    """The lines of a markdown table: ``header``, its separator, then one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def write_json(path, result: dict) -> dict:
    """Write ``result`` as indented JSON to ``path`` (folders created), say so, and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return result
