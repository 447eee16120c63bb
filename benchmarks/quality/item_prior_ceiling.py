"""How far can an item prior learned from the ranker's own training rows go?

With generic user summaries, the LoRA ranker can mostly learn which items tend to be positives.
This scores the test groups of a prepared folder with item counts over different event sets,
next to popularity (counts over every event before the test targets), so the LLM rows can be
read against the item prior their training rows could teach them:

- ``training positives``: how often each item is the positive of a training group;
- the same over a ``add_prefix_targets`` folder's training groups (``--prefix-data``);
- every event of the training users with a non-empty history before it: the positives the
  ranker would see if every prefix were a training group.

The scores come from :func:`merlin_mllm.baselines.item_prior_rows`. Prints a table and writes
``item_prior_ceiling.json`` next to this script.

Usage::

    python -m benchmarks.quality.item_prior_ceiling --data benchmarks/results/quality_v2/paper_all/data \
        --prefix-data benchmarks/results/quality_v2/paper_all/data_prefixes
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from merlin_mllm.baselines import item_prior_rows

from benchmarks.common import QUALITY_RESULTS, markdown_table


def markdown(rows: list) -> str:
    def gap(r: dict) -> str:
        g = r.get("minus_popularity")
        return f"{g['difference']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]" if g else "-"

    return "\n".join(markdown_table(
        ["item prior", "events counted", "AUC", "HR@5", "minus popularity, 95% interval"],
        [(r["scorer"], f"{r['events_counted']:,}", f"{r['auc']:.3f}", f"{r['hr@5']:.3f}", gap(r)) for r in rows]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepare_dataset folder")
    parser.add_argument("--prefix-data", type=Path, help="its add_prefix_targets copy (optional)")
    parser.add_argument("--out", type=Path, default=QUALITY_RESULTS / "item_prior_ceiling.json")
    args = parser.parse_args(argv)
    rows = item_prior_rows(args.data, args.prefix_data)
    args.out.write_text(json.dumps({"data": str(args.data), "prefix_data": str(args.prefix_data or ""), "rows": rows},
                                   indent=1) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
