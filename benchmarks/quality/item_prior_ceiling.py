"""How far can an item prior learned from the ranker's own training rows go?

With generic user summaries, the LoRA ranker can mostly learn which items tend to be positives.
This scores the test groups of a prepared folder with item counts over different event sets,
next to popularity (counts over every event before the test targets), so the LLM rows can be
read against the item prior their training rows could teach them:

- ``training positives``: how often each item is the positive of a training group;
- the same over a ``add_prefix_targets`` folder's training groups (``--prefix-data``);
- every event of the training users with a non-empty history before it: the positives the
  ranker would see if every prefix were a training group.

Prints a table and writes ``item_prior_ceiling.json`` next to this script.

Usage::

    python -m benchmarks.quality.item_prior_ceiling --data benchmarks/results/quality_v2/paper_all/data \
        --prefix-data benchmarks/results/quality_v2/paper_all/data_prefixes
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from merlin_mllm import baselines
from merlin_mllm.data.splits import training_events
from merlin_mllm.data.tables import read_table
from merlin_mllm.metrics import auc_difference_interval, paired_scores, ranking_metrics

HERE = Path(__file__).resolve().parent


def ceiling_rows(data: Path, prefix_data: Optional[Path] = None) -> list:
    test = read_table(data / "test")[["group_id", "item_id", "label"]]
    popularity = baselines.popularity_scores(data)
    counted = int(len(training_events(data, "test")))
    scorers = {"popularity (every event before the test targets)": (popularity, counted)}
    sources = [("training positives", data)] + ([("block-prefix training positives", prefix_data)] if prefix_data else [])
    for name, folder in sources:
        if not read_table(folder / "test")[["group_id", "item_id", "label"]].equals(test):
            raise ValueError(f"{folder} has other test groups than {data}: the rows would not be comparable")
        positives = read_table(folder / "train").query("label == 1")
        scorers[name] = (baselines.item_count_scores(test, positives), int(len(positives)))
    # Every prefix as a training group: each event of a training user after its first.
    train_users = read_table(data / "train")["user_id"].unique()
    events = read_table(data / "events")
    every = events[events["user_id"].isin(train_users).to_numpy() & (events["position"] >= 1).to_numpy()]
    scorers["every-prefix training positives"] = (baselines.item_count_scores(test, every), int(len(every)))
    rows = []
    for name, (scores, counted) in scorers.items():
        metrics = ranking_metrics(scores["label"], scores["score"], scores["group_id"], ks=(5,))
        row = {"scorer": name, "events_counted": counted, "auc": metrics["auc"], "hr@5": metrics["hr@5"]}
        if not name.startswith("popularity"):
            paired = paired_scores(scores, popularity, ("counts", "popularity"), where=name)
            row["minus_popularity"] = auc_difference_interval(paired["label"], paired["score_counts"],
                                                              paired["score_popularity"], paired["group_id"])
        rows.append(row)
    return rows


def markdown(rows: list) -> str:
    lines = ["| item prior | events counted | AUC | HR@5 | minus popularity, 95% interval |", "|---|---|---|---|---|"]
    for r in rows:
        gap = r.get("minus_popularity")
        gap_text = f"{gap['difference']:+.3f} [{gap['low']:+.3f}, {gap['high']:+.3f}]" if gap else "-"
        lines.append(f"| {r['scorer']} | {r['events_counted']:,} | {r['auc']:.3f} | {r['hr@5']:.3f} | {gap_text} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepare_dataset folder")
    parser.add_argument("--prefix-data", type=Path, help="its add_prefix_targets copy (optional)")
    parser.add_argument("--out", type=Path, default=HERE / "item_prior_ceiling.json")
    args = parser.parse_args(argv)
    rows = ceiling_rows(args.data, args.prefix_data)
    args.out.write_text(json.dumps({"data": str(args.data), "prefix_data": str(args.prefix_data or ""), "rows": rows},
                                   indent=1) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
