"""Train and score the LLM rows of issue 16's hybrid table, on the all-users folders of ``run_hybrid.py``.

Each stage is skipped when its output exists, and training and scoring resume from their own
checkpoints (``train_ranker``'s ``last.ckpt``, ``evaluate_ranker``'s partial scores), so a stop
loses at most a few minutes. Run one at a time: two torch jobs thrash the 2-core CPU.

Rows (per protocol, one seed, the same recipe):

* ``llm_only``: the ranker alone, recent-titles user context, groups / listwise / prompt v2,
  ``TrainConfig.small_budget(epochs=1, use_images=False)``; scored on valid (for the late fusion) and test.
* ``hybrid_tabular``: the same ranker trained jointly with a ``HybridHead`` over
  ``run_hybrid.py``'s head features (``hybrid_inputs/<split>_s0.parquet``); scored on test.
* ``<row>_k<K>``: the same, trained on a folder prepared with ``train_negatives=K`` (``data_k<K>/``,
  same valid and test rows; its training rows' features in ``hybrid_inputs_k<K>/``).
* ``<row>_s<S>``: the same, trained with seed S (default 42): one run per seed, for the seeds
  that ``run_hybrid.py`` takes as bootstrap strata.

Scores land in ``<work>/<protocol>_all/<row>/{valid,test}.scores.parquet`` for
``run_hybrid.py --llm-scores``; each stage's wall and CPU time (summed over resumed invocations) goes to
``<row>/stages.json``.

Usage::

    python -m benchmarks.quality.train_llm_rows --stages leave-last-out:llm_only:train leave-last-out:llm_only:valid
    python -m benchmarks.quality.train_llm_rows --stages timeline:hybrid_tabular_s43:train timeline:hybrid_tabular_s43:test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import WORK as BENCHMARK_WORK, log
from benchmarks.quality.run_hybrid import DATA_SEED, N_NEGATIVES_TEST

HERE = Path(__file__).resolve().parent
WORK = BENCHMARK_WORK / "hybrid"
SEED = 42


@contextmanager
def timed_stage(row_dir: Path, stage: str):
    """Add this invocation's wall and CPU time to ``stage``'s entry in ``<row_dir>/stages.json``,
    also when it is stopped: a stage resumed from its checkpoints costs the sum of its
    invocations (``runs``), and ``finished`` says whether the last one completed. An entry
    without ``finished`` was written only on success."""
    started, cpu, finished = time.time(), time.process_time(), False
    try:
        yield
        finished = True
    finally:
        path = row_dir / "stages.json"
        stages = json.loads(path.read_text()) if path.exists() else {}
        before = stages.get(stage, {})
        if before.get("finished", True):
            before = {}  # a finished stage run again is a new run, not a resumed one
        stages[stage] = {"wall_s": round(before.get("wall_s", 0) + time.time() - started, 1),
                         "cpu_s": round(before.get("cpu_s", 0) + time.process_time() - cpu, 1),
                         "torch_threads": torch.get_num_threads(), "runs": before.get("runs", 0) + 1,
                         "finished": finished}
        row_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stages, indent=2) + "\n")


def prepare_variant(work: Path, protocol: str, negatives: int) -> Path:
    """The protocol's folder again with ``negatives`` training negatives per target, and its training
    rows' head features. Valid and test are drawn from their own seeded streams, so they are the
    same rows as the base folder's (checked), and reuse its ``hybrid_inputs``."""
    from merlin_mllm.data.prepare import prepare_dataset
    from merlin_mllm.data.tables import read_table
    from merlin_mllm.pipelines.hybrid import write_feature_table

    root = work / f"{protocol}_all"
    data_dir = root / f"data_k{negatives}"
    if not (data_dir / "report.json").is_file():
        # run_hybrid's own data settings (the protocol's default max_history), so the rows match its folder.
        prepare_dataset("ml-100k", protocol, data_dir, seed=DATA_SEED, n_negatives_test=N_NEGATIVES_TEST,
                        train_negatives=negatives)
    for split in ("valid", "test"):
        base, variant = read_table(root / "data" / split), read_table(data_dir / split)
        columns = ["group_id", "user_id", "item_id", "label", "target_position"]
        if not base[columns].equals(variant[columns]):
            raise RuntimeError(f"{data_dir}/{split} differs from {root / 'data' / split}")
    write_feature_table(data_dir, "train", root / f"hybrid_inputs_k{negatives}" / "train_s0.parquet", seed=0)
    return data_dir


def run_row_stage(data_dir: Path, row_dir: Path, stage: str, *, seed: int, hybrid: bool, features_dir: Path,
                  train_features_dir: Optional[Path] = None, config: Optional[dict] = None, summaries=None,
                  item_summaries=None) -> None:
    """Train (``stage="train"``) or score (``"valid"``/``"test"``) one LLM row in ``row_dir``.

    The recipe of every LLM row: ``TrainConfig.small_budget(epochs=1, use_images=False)`` with the
    recent-titles user context, one seed; a hybrid also trains the head over ``HEAD_FEATURES``
    (``<features_dir>/<split>_s0.parquet``). ``config`` adds TrainConfig settings (an input arm of
    ``llm_inputs.py``); ``summaries`` replaces the recent-titles summary table; ``item_summaries``
    is where a ``candidate_text`` with a summary part reads them.
    """
    from merlin_mllm.data.collaborative import HEAD_FEATURES
    from merlin_mllm.pipelines import TrainConfig, evaluate_ranker, train_ranker
    from merlin_mllm.ranker.saved import MODEL_DIR
    from merlin_mllm.summaries.rows import recent_titles_summaries

    if stage == "train" and (row_dir / MODEL_DIR).exists():
        log(f"{row_dir.name}: trained already")
        return
    if stage != "train" and (row_dir / f"{stage}.json").exists():
        log(f"{row_dir.name}: {stage} scored already")
        return
    summaries = recent_titles_summaries(data_dir) if summaries is None else summaries
    with timed_stage(row_dir, stage):
        if stage == "train":
            # The recent-titles user context: the same prompts as the llm_only row's recent_titles_summaries table.
            settings = {"user_context": "titles"} if hybrid else {}
            settings.update(config or {})
            train_config = TrainConfig.small_budget(epochs=1, use_images=False, validate=False, seed=seed,
                                                    head_features=HEAD_FEATURES if hybrid else None, **settings)
            features = (train_features_dir or features_dir) / "train_s0.parquet"
            train_ranker(data_dir, summaries, row_dir, train_config, features=features if hybrid else None,
                         item_summaries=item_summaries)
        else:
            features = features_dir / f"{stage}_s0.parquet" if hybrid else None
            result = evaluate_ranker(data_dir, summaries, row_dir, row_dir / f"{stage}.json", split=stage,
                                     features=features, item_summaries=item_summaries)
            log(f"{row_dir.name}: {stage} AUC {result['auc']:.4f}")


def run_stage(work: Path, protocol: str, row: str, stage: str) -> None:
    # row: llm_only | hybrid_tabular, optionally _k<K> (K negatives per training target), then _s<S> (seed S)
    name, _, seed_text = row.rpartition("_s")
    seed = int(seed_text) if name and seed_text.isdigit() else SEED
    kind, _, variant = (name if name and seed_text.isdigit() else row).partition("_k")
    negatives = int(variant) if variant else None
    root = work / f"{protocol}_all"
    data_dir = prepare_variant(work, protocol, negatives) if negatives else root / "data"
    run_row_stage(data_dir, root / row, stage, seed=seed, hybrid=kind == "hybrid_tabular",
                  features_dir=root / "hybrid_inputs",
                  train_features_dir=root / f"hybrid_inputs_k{negatives}" if negatives else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--stages", nargs="+", required=True, help="protocol:row:stage (stage: train, valid, test)")
    args = parser.parse_args(argv)
    for spec in args.stages:
        protocol, row, stage = spec.split(":")
        log(f"stage {spec}")
        run_stage(args.work, protocol, row, stage)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
