"""Does training on groups rank as well as training on rows, with the same candidate rows seen?

Issue 15's quality check for groupwise training, and the measurement behind two defaults of
``TrainConfig`` (``batching`` and ``loss``). Same model (embedded SmolLM2-135M, LoRA r=8, the
small-budget recipe ``TrainConfig.small_budget()``: lr 5e-4, 8 candidate rows per optimizer
step), same training rows, one epoch each, so every run sees exactly the same candidate rows:

* ``rows``: today's training: the rows shuffled one by one, each its own full prompt
  (prompt version 1), answer-token loss ``lm`` (``--rows-losses`` adds ``binary``);
* ``groups``: one group (the user's positive and its 7 negatives) per optimizer step, run as one
  packed sequence (prompt version 2: the question in the shared part), with each loss: ``lm``,
  ``binary`` and ``listwise``.

Data: the quickstart's seeded subset of MovieLens-100k (40 users, 9 most recent events each,
seed 42), prepared with the **leave-last-out** protocol rather than the quickstart's paper protocol:
the paper split leaves 4 validation and 4 test users out of 40, too few for any AUC to mean
something, while the leave-last-out split scores every user on its own later items (40 valid groups
of 1 + 9, 40 test groups of 1 + 20) and trains on each user's third-to-last item (40 groups of
1 + 7: ``--train-negatives 7``). User summaries are the titles of each row's last five history
items (``recent_titles_summaries``), so no LLM generation is needed.

Held-out AUC (pooled over the split's rows, ``merlin_mllm.metrics``) on valid and test, each
run against the rows baseline with a paired bootstrap interval over users
(``auc_difference_interval``), plus training and scoring wall and CPU time (the CPU is shared:
wall time varies with the other work on it, CPU time less). The valid split picks the loss;
groups become the default only if they reach at least the rows' valid AUC.

What this compares is the two *defaults* as a whole: groups differ from rows in batching (one
user per step against 8 users' rows), in prompt layout (2 against 1) and in the loss. It is one
seed on 40 users, so only large differences show; the JSON keeps the intervals.

Usage::

    .venv/bin/python -m benchmarks.quality.group_training_quality            # 16 CPU-minutes (26 on a busy 2-core CPU)
    .venv/bin/python -m benchmarks.quality.group_training_quality --users 12 --runs groups-listwise rows-lm  # smoke

Writes ``benchmarks/quality/group_training_quality.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from merlin_mllm.pipelines.train_config import TrainConfig

from benchmarks.common import QUALITY_RESULTS, WORK, write_json

OUT = QUALITY_RESULTS / "group_training_quality.json"
#: run name -> (batching, loss, prompt version)
RUNS = {
    "rows-lm": ("rows", "lm", "1"),
    "rows-binary": ("rows", "binary", "1"),
    "groups-lm": ("groups", "lm", "2"),
    "groups-binary": ("groups", "binary", "2"),
    "groups-listwise": ("groups", "listwise", "2"),
}
DEFAULT_RUNS = ("rows-lm", "groups-lm", "groups-binary", "groups-listwise")
BASELINE = "rows-lm"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=40, help="ML-100k users (the quickstart's 40)")
    parser.add_argument("--max-history", type=int, default=9, help="the quickstart's 9")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-negatives", type=int, default=7)
    parser.add_argument("--valid-negatives", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(DEFAULT_RUNS))
    parser.add_argument("--work", type=Path, default=WORK / "group_training_quality")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if BASELINE not in args.runs:
        parser.error(f"--runs must include the baseline {BASELINE}")

    from merlin_mllm.data.prepare import prepare_dataset
    from merlin_mllm.metrics import auc_difference_interval, paired_scores
    from merlin_mllm.pipelines import evaluate_ranker, train_ranker
    from merlin_mllm.ranker.saved import TRAINING_LOG_FILE
    from merlin_mllm.summaries.rows import recent_titles_summaries

    started_all = time.perf_counter()
    work = args.work / f"u{args.users}_h{args.max_history}_s{args.seed}_k{args.train_negatives}"
    data = work / "data"
    report = prepare_dataset("ml-100k", "leave-last-out", data, max_users=args.users, max_history=args.max_history,
                             seed=args.seed, n_negatives_train=args.valid_negatives,
                             train_negatives=args.train_negatives)
    summaries = recent_titles_summaries(data, last=5)

    results, scores = {}, {}
    for name in args.runs:
        batching, loss, version = RUNS[name]
        run_dir = work / name
        config = TrainConfig.small_budget(batching=batching, loss=loss, prompt_version=version, use_images=False,
                                          epochs=args.epochs, validate=False, seed=args.seed, resume=False)
        tick, cpu = time.perf_counter(), time.process_time()
        train_ranker(data, summaries, run_dir, config, progress=False)
        train_seconds, train_cpu = time.perf_counter() - tick, time.process_time() - cpu
        training = json.loads((run_dir / TRAINING_LOG_FILE).read_text())
        entry = {"batching": batching, "loss": loss, "prompt_version": version,
                 "rows_seen": training["rows_seen"], "optimizer_steps": training["global_step"],
                 "train_seconds": round(train_seconds, 1), "train_cpu_seconds": round(train_cpu, 1),
                 "first_loss": training["micro_batch_losses"][0]["loss"],
                 "last_epoch_mean_loss": list(training["epoch_mean_loss"].values())[-1]}
        for split in ("valid", "test"):
            tick, cpu = time.perf_counter(), time.process_time()
            metrics = evaluate_ranker(data, summaries, run_dir, work / f"{name}.{split}.json", split=split,
                                      resume=False, progress=False)
            entry[split] = {"auc": metrics["auc"], "ndcg@5": metrics["ndcg@5"], "mrr@10": metrics["mrr@10"],
                            "groups": metrics["n_groups"], "rows": metrics["n_rows"],
                            "score_seconds": round(time.perf_counter() - tick, 1),
                            "score_cpu_seconds": round(time.process_time() - cpu, 1)}
            scores[name, split] = pd.read_parquet(metrics["run"]["scores"])
        results[name] = entry
        print(f"{name}: valid AUC {entry['valid']['auc']:.4f}, test AUC {entry['test']['auc']:.4f}, "
              f"{entry['rows_seen']} rows in {entry['train_seconds']} s", flush=True)

    for name in args.runs:
        if name == BASELINE:
            continue
        for split in ("valid", "test"):
            paired = paired_scores(scores[name, split], scores[BASELINE, split], ("run", "base"), where=f"{name} {split}")
            results[name][split][f"minus_{BASELINE}"] = auc_difference_interval(
                paired["label"], paired["score_run"], paired["score_base"], paired["group_id"], seed=args.seed)

    groups = {n: r for n, r in results.items() if r["batching"] == "groups"}
    best = max(groups, key=lambda n: groups[n]["valid"]["auc"]) if groups else None
    decision = None
    if best is not None:
        reaches = groups[best]["valid"]["auc"] >= results[BASELINE]["valid"]["auc"]
        decision = {"best_group_loss_on_valid": groups[best]["loss"], "best_group_run": best,
                    "groups_reach_rows_valid_auc": bool(reaches),
                    "default_batching": "groups" if reaches else "rows",
                    "default_loss": groups[best]["loss"] if reaches else "lm"}

    out = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "setup": {
            "data": f"ml-100k leave-last-out protocol, {report['kept']['users']} users (seed {args.seed}, max_history "
                    f"{args.max_history}), train groups 1 + {args.train_negatives}, valid 1 + {args.valid_negatives}, "
                    f"test 1 + {report['settings']['n_negatives_test']}",
            "train_rows": report["rows_per_split"]["train"],
            "summaries": "recent_titles_summaries (last 5 titles)",
            "recipe": "TrainConfig.small_budget(): lr 5e-4, 8 rows per micro-batch (groups: 1 group of 8), no "
                      f"accumulation, {args.epochs} epoch(s), text-only prompts, seed {args.seed}",
            "auc": "pooled over the split's rows (merlin_mllm.metrics.auc); intervals: paired bootstrap over "
                   "users, 2000 resamples, 95%",
            "baseline": BASELINE,
        },
        "runs": results,
        "decision": decision,
        "seconds": round(time.perf_counter() - started_all, 1),
        "cpu_seconds": round(time.process_time(), 1),
    }
    _print_table(out)
    return write_json(args.out, out)


def _print_table(out: dict) -> None:
    print(f"\n{'run':<17} {'rows':>5} {'train s':>8}  {'valid AUC':>9} {'vs rows [95%]':>24}  {'test AUC':>8} "
          f"{'vs rows [95%]':>24}")
    for name, r in out["runs"].items():
        cells = []
        for split in ("valid", "test"):
            d = r[split].get(f"minus_{BASELINE}")
            diff = f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "(baseline)"
            cells.append(f"{r[split]['auc']:>9.4f} {diff:>24}")
        print(f"{name:<17} {r['rows_seen']:>5} {r['train_seconds']:>8.0f}  {cells[0]}  {cells[1]}")
    if out["decision"]:
        print(f"\ndecision: {out['decision']}")


if __name__ == "__main__":
    main()
