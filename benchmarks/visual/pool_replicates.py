"""Pool independent replicates of the visual-preference check into one image-vs-text estimate.

Each replicate is a finished ``run_visual.py`` run made with a different ``--seed`` (its own
catalogue, users, negatives and trained rankers) and otherwise the same settings. It is named by
its ``results.json``, which records the run's cache, where both arms' test scores are. Scores of
different models need not share a scale, so each replicate's AUCs are computed within it; the
pooled gain is the mean over replicates of AUC(image arm) - AUC(text arm), and its 95% interval
comes from a bootstrap that resamples test users within each replicate
(``merlin_mllm.metrics.auc_difference_interval(strata=...)``).

Prints the table and writes ``replicates.json`` / ``replicates.md`` into ``--out``::

    .venv/bin/python -m benchmarks.visual.pool_replicates --results benchmarks/visual/results.json \\
        benchmarks/visual/results_seed1.json benchmarks/visual/results_seed2.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from merlin_mllm.metrics import auc, auc_difference_interval, paired_scores

from benchmarks.common import VISUAL_RESULTS, markdown_table

# Settings that may differ between replicates: the seed is the point, the rest are locations/logging.
PER_REPLICATE = {"seed", "cache", "results_dir", "results_name", "arms", "progress", "package_dir"}


def load_replicate(results_file: Path) -> dict:
    """One finished run's paired test scores (image arm vs text arm) and its settings."""
    if not results_file.is_file():
        raise FileNotFoundError(f"{results_file} not found: finish that run_visual.py run (both arms) first")
    settings = json.loads(results_file.read_text())["settings"]
    cache = Path(settings["cache"])
    arms = {}
    for arm in ("image", "text"):
        scores = cache / "eval" / f"MLLM-MSR_{arm}.scores.parquet"
        if not scores.is_file():
            raise FileNotFoundError(f"{scores} not found: the {arm} arm of {results_file} has not been scored "
                                    f"(its cache is {cache})")
        arms[arm] = pd.read_parquet(scores)[["group_id", "item_id", "label", "score"]]
    paired = paired_scores(arms["image"], arms["text"], ("image", "text"), where=str(results_file))
    return {"results": str(results_file), "cache": str(cache), "settings": settings, "paired": paired}


def check_same_design(replicates: list) -> None:
    """Refuse to pool runs whose settings differ in anything but the seed and file locations."""
    first = replicates[0]
    for other in replicates[1:]:
        keys = (set(first["settings"]) | set(other["settings"])) - PER_REPLICATE
        differing = sorted(k for k in keys if first["settings"].get(k) != other["settings"].get(k))
        if differing:
            raise ValueError(f"{other['results']} differs from {first['results']} in {differing}: "
                             f"only --seed may differ between pooled replicates")
    seeds = [r["settings"]["seed"] for r in replicates]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"replicates must have distinct seeds, got {seeds}")


def pool(replicates: list, resamples: int = 2000) -> dict:
    rows = []
    for r in replicates:
        p = r["paired"]
        gain = auc_difference_interval(p["label"], p["score_image"], p["score_text"], p["group_id"], resamples=resamples)
        rows.append({"seed": r["settings"]["seed"], "results": r["results"], "test_users": gain["groups"],
                     "auc_image": auc(p["label"], p["score_image"]), "auc_text": auc(p["label"], p["score_text"]),
                     "image_minus_text": gain})
    frame = pd.concat([r["paired"].assign(replicate=i) for i, r in enumerate(replicates)], ignore_index=True)
    pooled = auc_difference_interval(frame["label"], frame["score_image"], frame["score_text"], frame["group_id"],
                                     strata=frame["replicate"], resamples=resamples)
    return {"replicates": rows, "pooled": pooled,
            "mean_auc_image": float(np.mean([r["auc_image"] for r in rows])),
            "mean_auc_text": float(np.mean([r["auc_text"] for r in rows])),
            "settings": {k: v for k, v in replicates[0]["settings"].items() if k not in PER_REPLICATE}}


def markdown(result: dict) -> str:
    lines = markdown_table(["replicate (seed)", "test users", "MLLM-MSR (images) AUC", "MLLM-MSR_I (text) AUC",
                            "image minus text", "95% bootstrap interval"])
    for r in result["replicates"]:
        g = r["image_minus_text"]
        lines.append(f"| {r['seed']} | {r['test_users']} | {r['auc_image']:.3f} | {r['auc_text']:.3f} | "
                     f"{g['difference']:+.3f} | [{g['low']:+.3f}, {g['high']:+.3f}] |")
    p = result["pooled"]
    lines.append(f"| **pooled** ({len(result['replicates'])} replicates) | {p['groups']} | {result['mean_auc_image']:.3f} (mean) | "
                 f"{result['mean_auc_text']:.3f} (mean) | **{p['difference']:+.3f}** | **[{p['low']:+.3f}, {p['high']:+.3f}]** |")
    lines += ["", f"Pooled: mean over replicates of each one's AUC gain; {p['resamples']} bootstrap resamples of the "
                  "test users within each replicate. Common settings: "
                  + ", ".join(f"{k}={v}" for k, v in sorted(result["settings"].items())) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, nargs="+", required=True,
                        help="results.json of finished run_visual.py runs, one per seed")
    parser.add_argument("--out", type=Path, default=VISUAL_RESULTS, help="where replicates.json / replicates.md go")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    if len(args.results) < 2:
        parser.error("pooling needs at least two replicates")
    replicates = [load_replicate(path) for path in args.results]
    check_same_design(replicates)
    result = pool(replicates, resamples=args.resamples)
    table = markdown(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicates.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (args.out / "replicates.md").write_text("# Visual-preference check: replicates pooled\n\n" + table)
    print(f"wrote {args.out / 'replicates.json'} and {args.out / 'replicates.md'}")
    return result


if __name__ == "__main__":
    main()
