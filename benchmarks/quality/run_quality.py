"""Quality table on MovieLens-100k: non-LLM baselines vs MLLM-MSR rows, both split protocols.

Every row of one protocol is scored on the same prepared folder, so on the same test users and
the same 1 + 20 candidates per user (see README.md in this folder for what each row is).

Stages are cached under ``--work`` (default ``benchmarks/results/quality``): a finished row is
one JSON file there and is reused by a re-run; an interrupted LLM stage resumes (the summary
store, train_ranker checkpoints and evaluate_ranker partial scores all persist). The table goes
to ``--out``/results.json and results.md (small, committed) and is printed.

Usage::

    python -m benchmarks.quality.run_quality --users 40           # the committed table
    python -m benchmarks.quality.run_quality --users 8 --work /tmp/q --out /tmp/q   # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from benchmarks.common import WORK, log, markdown_table

HERE = Path(__file__).resolve().parent
PROTOCOLS = ("paper", "leave-last-out")
METRICS = ("auc", "hr@5", "mrr@5", "ndcg@5")
# LLM settings as in merlin_mllm/quickstart.py (a small CPU run: faster LoRA lr than the paper).
#: LLM ranker epochs (the rest of the recipe is TrainConfig.small_budget()).
LLM_EPOCHS = 2
MAX_NEW_TOKENS = 48
GENERATION_BATCH = 16
MAX_HISTORY = 12
DATA_SEED = 42
#: Seeds the negatives of the block-prefix training groups (the committed row's data); data, not
#: the LoRA seed, so that --llm-seed does not change which rows are trained on.
PREFIX_NEGATIVES_SEED = 0

# In priority order (a time-boxed run finishes the rows the acceptance test needs first).
LLM_ROWS = {
    "MLLM-MSR zero-shot": "zero_shot",
    "MLLM-MSR": "full",
    "MLLM-MSR_I": "text_only",
    "MLLM-MSR_R": "direct_summaries",
}


def llm_train_settings(epochs: int = LLM_EPOCHS) -> dict:
    # Imported here: the pipelines pull in the Merlin stack, which summaries_on_gpu.py's GPU
    # machine does not have (merlin_mllm.pipelines.train_config itself is light).
    from merlin_mllm.pipelines.train_config import TrainConfig

    budget = TrainConfig.small_budget()
    return dict(lr=budget.lr, batch_size=budget.batch_size, grad_accum=budget.grad_accum, epochs=epochs)


def run_name(kind: str, epochs: int = LLM_EPOCHS) -> str:
    """The cache name of one LLM row's ranker, scores and row file: ``full``, or ``full_e4`` for 4 epochs."""
    return kind if epochs == LLM_EPOCHS else f"{kind}_e{epochs}"


def row_label(name: str, epochs: int = LLM_EPOCHS, kind: str = "full") -> str:
    if kind == "full_prefixes":
        return f"{name}, block-prefix groups, {epochs} epoch{'s' if epochs != 1 else ''}"
    return name if epochs == LLM_EPOCHS else f"{name}, {epochs} epochs"


#: False while ``--skip-baselines``: baseline rows are then only read back from the cache.
COMPUTE_BASELINES = True


def cached(path: Path, compute: Callable[[], dict], baseline: bool = False) -> Optional[dict]:
    """The JSON at ``path``, or ``compute()`` written there (with its wall time) when missing.

    A missing baseline row under ``--skip-baselines`` gives None (left out of the table).
    """
    if path.is_file():
        return json.loads(path.read_text())
    if baseline and not COMPUTE_BASELINES:
        return None
    started = time.time()
    record = compute()
    record["wall_seconds"] = round(time.time() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return record


def prepare(protocol: str, users: int, folder: Path) -> dict:
    from merlin_mllm.data.prepare import prepare_dataset

    if not (folder / "report.json").is_file():
        log(f"prepare ml-100k {protocol}, max_users={users or 'all'}")
        prepare_dataset("ml-100k", protocol, folder, max_users=users, max_history=MAX_HISTORY, seed=DATA_SEED,
                        n_negatives_test=20)
    return json.loads((folder / "report.json").read_text())


def metrics_only(result: dict) -> dict:
    return {k: result[k] for k in (*METRICS, "n_groups", "n_rows")}


# ----------------------------------------------------------------------------- baselines
def baseline_rows(data: Path, rows_dir: Path, seeds: List[int], recbole: Optional[dict]) -> Dict[str, List[dict]]:
    from merlin_mllm import baselines

    out: Dict[str, List[dict]] = {}
    out["Popularity"] = [cached(rows_dir / "popularity.json", lambda: {
        "seed": None, **metrics_only(baselines.evaluate_popularity(data, rows_dir / "eval" / "popularity.json"))}, True)]
    def per_seed(row: str, file_stem: str, implementation: str, run: Callable[[int], dict]) -> None:
        records = []
        for seed in seeds:
            records.append(cached(rows_dir / f"{file_stem}_s{seed}.json",
                                  lambda: {"seed": seed, "implementation": implementation, **run(seed)}, True))
            if records[-1] is not None:
                log(f"  {row} seed {seed}: AUC {records[-1]['auc']:.3f}")
        out[row] = records

    for kind, name in (("sasrec", "SASRec"), ("gru4rec", "GRU4Rec")):
        if recbole is not None:
            per_seed(f"{name} (RecBole)", f"recbole_{kind}", "RecBole 1.2.1",
                     lambda seed: run_recbole(kind, data, seed, rows_dir / "recbole", recbole))
        per_seed(f"{name} (compact)", kind, "compact (merlin_mllm.baselines)",
                 lambda seed: metrics_only(baselines.evaluate_sequential(
                     kind, data, rows_dir / "eval" / f"{kind}_s{seed}.json", seed)))
    return out


def run_recbole(kind: str, data: Path, seed: int, work: Path, recbole: dict) -> dict:
    """RecBole's model, trained and scored by ``recbole_rows.py`` in its own virtualenv."""
    work = work.resolve()
    data = data.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{kind}_s{seed}.scores.parquet"
    command = [recbole["python"], str(HERE / "recbole_rows.py"), "--data", str(data), "--model", kind,
               "--seed", str(seed), "--work", str(work), "--out", str(out)]
    # cwd=work: RecBole writes log_tensorboard/ into the current folder.
    subprocess.run(command, check=True, cwd=work,
                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    import pandas as pd
    from merlin_mllm.metrics import ranking_metrics

    table = pd.read_parquet(out)
    result = ranking_metrics(table["label"], table["score"], table["group_id"])
    training = json.loads(out.with_suffix(".train.json").read_text())
    return {**metrics_only(result), "epoch_loss_first_last": [training["epoch_loss"][0], training["epoch_loss"][-1]]}


def recbole_python(mode: str) -> Optional[dict]:
    """The RecBole virtualenv's python when ``mode`` allows it and RecBole can train there."""
    if mode == "off":
        return None
    python = HERE / ".venv-recbole" / "bin" / "python"
    if not python.exists():
        if mode == "auto":
            log("no benchmarks/quality/.venv-recbole: using the compact SASRec/GRU4Rec (see README)")
            return None
        subprocess.run([sys.executable, str(HERE / "recbole_rows.py"), "--make-venv"], check=True)
    return {"python": str(python)}


# ----------------------------------------------------------------------------- LLM rows
def merge_store(source: Path, target: Path) -> None:
    """Copy the segment files of summary store ``source`` into ``target`` (created when missing).

    Segment names are unique per writer process, so copies never collide.
    """
    if not (source / "segments").is_dir():
        raise FileNotFoundError(f"{source} is not a summary store (no segments/ folder)")
    (target / "segments").mkdir(parents=True, exist_ok=True)
    if (source / "STORE.json").exists() and not (target / "STORE.json").exists():
        shutil.copy2(source / "STORE.json", target / "STORE.json")
    for segment in (source / "segments").iterdir():
        if not (target / "segments" / segment.name).exists():
            shutil.copy2(segment, target / "segments" / segment.name)


class LLMStages:
    """Summaries, training and scoring of the MLLM-MSR rows for one prepared folder."""

    def __init__(self, data: Path, work: Path, seed: int, max_groups: Optional[int], seed_stores: List[Path],
                 generation_batch: int = GENERATION_BATCH):
        self.data, self.work, self.seed, self.max_groups = data, work, seed, max_groups
        self.seed_stores, self.generation_batch = seed_stores, generation_batch
        self.stages_file = work / "stages.json"
        self.stages = json.loads(self.stages_file.read_text()) if self.stages_file.is_file() else {}

    def _timed(self, name: str, run: Callable[[], object]) -> None:
        started = time.time()
        result = run()
        if name not in self.stages:
            self.stages[name] = {"seconds": round(time.time() - started, 1), "result": str(result)[:300]}
            self.stages_file.write_text(json.dumps(self.stages, indent=2) + "\n")
        log(f"  {name}: {self.stages[name]['seconds']} s (first run)")

    def _settings(self):
        from merlin_mllm.generation import GenerationSettings

        return GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=self.generation_batch)

    def store(self, mode: str) -> Path:
        return self.work / f"summaries_{mode}"

    def summaries(self, seed_stores: List[Path], mode: str) -> Path:
        """The summary store for user-summary ``mode`` ("recurrent" or "direct"), built on demand.

        Item summaries are made once; each mode's store starts as a copy of that store.
        ``seed_stores`` are earlier stores whose records are merged in first. The store is
        content-addressed (model, prompt version, settings and inputs make the key), so only
        summaries of identical prompts are reused; refs are time-ordered, so this run's refs win.
        """
        from merlin_mllm.summaries.item import summarize_items
        from merlin_mllm.summaries.user import summarize_users

        items = self.work / "summaries_items"
        done = self.work / "summaries_items.done"
        if not done.exists():
            for seed in seed_stores:
                merge_store(seed / "summaries_items" if (seed / "summaries_items").is_dir() else seed, items)
            self._timed("item summaries", lambda: summarize_items(self.data, items, settings=self._settings(), progress=True))
            done.write_text("ok\n")
        store, marker = self.store(mode), self.work / f"summaries_{mode}.done"
        if not marker.exists():
            if not store.exists():
                shutil.copytree(items, store)
            for seed in seed_stores:
                if (seed / f"summaries_{mode}").is_dir():
                    merge_store(seed / f"summaries_{mode}", store)
                elif mode == "recurrent" and (seed / "segments").is_dir():
                    merge_store(seed, store)  # a plain store (e.g. the quickstart's) holds recurrent ones
            # Train and test rows only: training runs with validate=False, so valid rows are never read.
            self._timed(f"user summaries ({mode})", lambda: summarize_users(
                self.data, store, splits=("train", "test"), mode=mode, settings=self._settings(), progress=True))
            marker.write_text("ok\n")
        return store

    def prefix_data(self) -> Path:
        """The prepared folder plus a training group at every block boundary (``add_prefix_targets``):
        same test groups, more training rows, and every extra row's user summary is already stored."""
        from merlin_mllm.data.prefix_targets import add_prefix_targets
        from merlin_mllm.summaries.user_summarizer import DEFAULT_BLOCK_SIZE

        out = self.work / "data_prefixes"
        if not (out / "report.json").is_file():
            self._timed("block-prefix training groups", lambda: add_prefix_targets(
                self.data, out, block_size=DEFAULT_BLOCK_SIZE, seed=PREFIX_NEGATIVES_SEED))
        return out

    def row(self, kind: str, epochs: int = LLM_EPOCHS) -> dict:
        """Train (unless zero-shot) and score one LLM row; ``epochs`` beyond a finished shorter run
        of the same row continue that run from its checkpoint (the learning rate is constant, so
        this is the longer run's training without redoing the first epochs)."""
        from merlin_mllm.pipelines import TrainConfig, evaluate_ranker, train_ranker
        from merlin_mllm.ranker.saved import MODEL_DIR, TRAINING_LOG_FILE

        eval_json = self.work / "eval" / f"{run_name(kind, epochs)}.json"
        if kind == "zero_shot":
            result = evaluate_ranker(self.data, self.summaries(self.seed_stores, "recurrent"), None, eval_json, zero_shot=True,
                                     max_groups=self.max_groups, progress=True)
            return {"seed": None, **metrics_only(result), "scoring_seconds": result["run"]["scoring_seconds"]}
        store = self.summaries(self.seed_stores, "direct" if kind == "direct_summaries" else "recurrent")
        run_dir = self.work / "ranker" / run_name(kind, epochs)
        continued_from = None
        # The longest finished shorter run of this row (its model saved) is where this one starts;
        # with none, it trains from scratch (the same training: the learning rate is constant).
        shorter = [e for e in range(1, epochs) if (self.work / "ranker" / run_name(kind, e) / TRAINING_LOG_FILE).is_file()]
        if shorter:
            source = self.work / "ranker" / run_name(kind, max(shorter))
            if not run_dir.exists():
                shutil.copytree(source, run_dir)
            continued_from = f"{source.name} ({max(shorter)} epochs)"
        started = time.time()
        # validate=False: the validation loss is only reported, never used to pick a model; skipping
        # it saves scoring the valid rows twice per run on this shared CPU.
        train_data = self.prefix_data() if kind == "full_prefixes" else self.data
        train_ranker(train_data, store, run_dir, TrainConfig(use_images=kind != "text_only", seed=self.seed, validate=False, batching="rows",
                     **llm_train_settings(epochs)), progress=True)
        train_seconds = time.time() - started
        result = evaluate_ranker(self.data, store, run_dir / MODEL_DIR, eval_json, max_groups=self.max_groups, progress=True)
        training = json.loads((run_dir / TRAINING_LOG_FILE).read_text())
        return {"seed": self.seed, **metrics_only(result), "train_seconds": round(train_seconds, 1),
                "scoring_seconds": result["run"]["scoring_seconds"], "use_images": result["run"]["use_images"],
                "train_rows": training.get("rows", training.get("train_rows")),
                "epoch_mean_loss": training.get("epoch_mean_loss"), "epochs": epochs,
                "continued_from": continued_from}


def llm_gain_notes(data: Path, eval_dir: Path, runs: List[Tuple[str, int]]) -> List[str]:
    """Each trained full model's AUC gain over zero-shot and popularity, with paired bootstrap
    intervals; ``runs`` are ``(kind, epochs)`` of the rows in the table."""
    import pandas as pd

    from merlin_mllm import baselines
    from merlin_mllm.metrics import auc_difference_interval, paired_scores

    others = {"popularity": baselines.popularity_scores(data)}
    if (eval_dir / "zero_shot.scores.parquet").is_file():
        others["MLLM-MSR zero-shot"] = pd.read_parquet(eval_dir / "zero_shot.scores.parquet")
    notes = []
    for kind, count in runs:
        full = eval_dir / f"{run_name(kind, count)}.scores.parquet"
        if not full.is_file():
            continue
        scores, label = pd.read_parquet(full), row_label("MLLM-MSR", count, kind)
        for name, other in others.items():
            paired = paired_scores(scores, other, ("model", "other"), where=f"{label} vs {name}")
            gain = auc_difference_interval(paired["label"], paired["score_model"], paired["score_other"], paired["group_id"])
            notes.append(f"{label} minus {name}: AUC {gain['difference']:+.3f}, 95% paired bootstrap interval over "
                         f"the {gain['groups']} test users [{gain['low']:+.3f}, {gain['high']:+.3f}]")
    return notes


# ----------------------------------------------------------------------------- table
def summarise(name: str, records: List[Optional[dict]], users: int, note: str = "") -> Optional[dict]:
    records = [r for r in records if r is not None]
    if not records:
        return None
    row = {"row": name, "seeds": len(records), "users": users, "note": note,
           "wall_seconds": round(float(np.mean([r["wall_seconds"] for r in records])), 1)}
    for metric in METRICS:
        values = np.array([r[metric] for r in records], dtype=float)
        row[metric] = round(float(values.mean()), 4)
        row[metric + "_std"] = round(float(values.std(ddof=1)), 4) if len(values) > 1 else None
    implementation = {r.get("implementation") for r in records} - {None}
    if implementation:
        row["implementation"] = ", ".join(sorted(implementation))
    return row


def markdown(results: dict) -> str:
    lines = []
    for block in results["tables"]:
        lines += [f"### {block['title']}", "",
                  *markdown_table(["row", "AUC", "HR@5", "MRR@5", "NDCG@5", "seeds", "wall s / seed", "test users"])]
        for row in block["rows"]:
            cells = []
            for metric in METRICS:
                std = row[metric + "_std"]
                cells.append(f"{row[metric]:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
            lines.append(f"| {row['row']} | " + " | ".join(cells) + f" | {row['seeds']} | {row['wall_seconds']:.0f} | {row['users']} |")
        if block.get("notes"):
            lines += [""] + [f"- {n}" for n in block["notes"]]
        lines.append("")
    return "\n".join(lines)


def subset_table(args, protocol: str, recbole: Optional[dict], llm_protocols: List[str], llm_done: List[str]) -> dict:
    """The table of ``protocol`` on the ``--users`` subset: the baselines, then the MLLM-MSR rows
    when ``protocol`` is in ``llm_protocols`` (``llm_done``: protocols whose stores it may reuse; it is
    appended to)."""
    work = args.work / f"{protocol}_u{args.users}"
    data = work / "data"
    report = prepare(protocol, args.users, data)
    test_users = report["users_per_split"]["test"]
    log(f"{protocol}: {report['kept']['users']} users, {report['kept']['items']} items, {test_users} test users")
    rows: List[dict] = []
    for name, records in baseline_rows(data, work / "rows", args.seeds, recbole).items():
        rows.append(summarise(name, records, test_users))
    rows = [r for r in rows if r is not None]
    if protocol in llm_protocols:
        # Earlier protocols' stores share most summaries (same users, items and histories).
        stages = LLMStages(data, work, args.llm_seed, None,
                           list(args.seed_store) + [args.work / f"{p}_u{args.users}" for p in llm_done])
        llm_done.append(protocol)
        unfinished = []
        for name, kind in LLM_ROWS.items():
            path = work / "rows" / f"llm_{kind}.json"
            if args.table_only and not path.is_file():
                unfinished.append(name)
                continue
            log(f"  {name} ...")
            record = cached(path, lambda: stages.row(kind))
            log(f"  {name}: AUC {record['auc']:.3f} HR@5 {record['hr@5']:.3f} ({record['wall_seconds']:.0f} s)")
            rows.append(summarise(name, [record], test_users))
        notes = [f"{k}: {v['seconds']:.0f} s ({v['result'].split(', LLM calls')[0]})" for k, v in stages.stages.items()]
        stage_note = "shared stages (not in the rows' wall time): " + "; ".join(notes)
        if unfinished:
            stage_note += f". Not finished in the time box (re-run without --table-only to finish): {', '.join(unfinished)}"
    else:
        stage_note = "MLLM-MSR rows not run for this protocol (--llm-protocols)"
    return {"title": f"{protocol} protocol, {report['kept']['users']} users "
                     f"({'all' if not args.users else f'random {args.users}, seed {DATA_SEED}'}), 1 + 20 candidates",
            "protocol": protocol, "users_kept": report["kept"]["users"], "items": report["kept"]["items"],
            "test_users": test_users, "train_rows": report["rows_per_split"]["train"],
            "rows": rows, "notes": [stage_note]}


def all_users_table(args, protocol: str, recbole: Optional[dict]) -> dict:
    """The table of ``protocol`` on every ML-100k user: the baselines, and the MLLM-MSR rows asked for
    by ``--all-users-llm-rows`` (with the longer and block-prefix runs)."""
    full = args.work / f"{protocol}_all" / "data"
    full_report = prepare(protocol, 0, full)
    full_rows = [summarise(name, records, full_report["users_per_split"]["test"])
                 for name, records in baseline_rows(full, full.parent / "rows", args.seeds,
                                                    recbole if args.all_users_recbole else None).items()]
    full_rows = [r for r in full_rows if r is not None]
    full_notes = []
    if args.all_users_llm_rows and protocol in args.all_users_llm_protocols:
        # All users: the summaries take ~2 h on a 2-core CPU, so they are usually made on a
        # GPU first (summaries_on_gpu.py --work <work>/<protocol>_all) and reused from there.
        stages = LLMStages(full, full.parent, args.llm_seed, None, [])
        runs = [(name, kind, LLM_EPOCHS) for name, kind in LLM_ROWS.items() if kind in args.all_users_llm_rows]
        runs += [("MLLM-MSR", "full", e) for e in sorted(set(args.all_users_longer_epochs))]
        runs += [("MLLM-MSR", "full_prefixes", e) for e in sorted(set(args.all_users_prefix_epochs))]
        for name, kind, epochs in runs:
            label = row_label(name, epochs, kind)
            path = full.parent / "rows" / f"llm_{run_name(kind, epochs)}.json"
            if args.table_only and not path.is_file():
                full_notes.append(f"{label}: not finished (re-run without --table-only)")
                continue
            log(f"  all users: {label} ...")
            record = cached(path, lambda: stages.row(kind, epochs))
            log(f"  all users: {label}: AUC {record['auc']:.3f} ({record['wall_seconds']:.0f} s)")
            full_rows.append(summarise(label, [record], full_report["users_per_split"]["test"]))
            if record.get("continued_from"):
                full_notes.append(f"{label}: continues the {record['continued_from']} run from its checkpoint; "
                                  "its wall time is the extra epochs plus scoring")
        gpu = full.parent / "summaries_on_gpu.json"
        if gpu.is_file():
            made = json.loads(gpu.read_text())
            full_notes.append(f"summaries made by summaries_on_gpu.py on {made['device']} "
                              f"(batch {made['batch']}), reused here")
        full_notes.append("shared stages (not in the rows' wall time): "
                          + "; ".join(f"{k}: {v['seconds']:.0f} s" for k, v in stages.stages.items()))
        full_notes += llm_gain_notes(full, full.parent / "eval", [(k, e) for _, k, e in runs if k in ("full", "full_prefixes")])
        skipped = [n for n, k in LLM_ROWS.items() if k not in args.all_users_llm_rows]
        full_notes.append(f"not run on all users (CPU time): {', '.join(skipped)}")
    what = "baselines only" if not full_notes else "baselines and " + ", ".join(
        n for n, k in LLM_ROWS.items() if k in args.all_users_llm_rows)
    return {"title": f"{protocol} protocol, all {full_report['kept']['users']} users: {what} "
                     "(not comparable row-for-row with the subset table above)", "notes": full_notes,
            "protocol": protocol, "users_kept": full_report["kept"]["users"],
            "items": full_report["kept"]["items"], "test_users": full_report["users_per_split"]["test"],
            "train_rows": full_report["rows_per_split"]["train"], "rows": full_rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=40,
                        help="ml-100k users kept (random, seed 42) for the table; 0 = all (LLM rows then take hours)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the sequential baselines")
    parser.add_argument("--llm-seed", type=int, default=42, help="seed of the LoRA runs (one seed per LLM row)")
    parser.add_argument("--llm-protocols", nargs="*", default=None, choices=PROTOCOLS,
                        help="protocols that get the MLLM-MSR rows (default: all of --protocols; none: baselines only)")
    parser.add_argument("--table-only", action="store_true",
                        help="compute nothing: build the table from the finished (cached) rows")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="do not compute baseline rows (reuse cached ones): for a run beside a baselines-only run")
    parser.add_argument("--seed-store", type=Path, nargs="*", default=[],
                        help="summary stores to reuse identical summaries from (e.g. a quickstart run's summaries/)")
    parser.add_argument("--all-users-baselines", action="store_true",
                        help="also report the baselines on every ml-100k user (a separate table)")
    parser.add_argument("--all-users-llm-rows", nargs="*", default=[], choices=list(LLM_ROWS.values()),
                        help="MLLM-MSR rows to add to the all-users tables (with --all-users-baselines)")
    parser.add_argument("--all-users-llm-protocols", nargs="*", default=["paper"], choices=PROTOCOLS,
                        help="protocols whose all-users table gets --all-users-llm-rows (default: paper, "
                             "94 test users; leave-last-out would score 943 groups of 21 per row)")
    parser.add_argument("--all-users-longer-epochs", type=int, nargs="*", default=[],
                        help="also train the all-users MLLM-MSR row for these many epochs (each > "
                             f"{LLM_EPOCHS}), each continuing the checkpoint of the longest finished shorter run; "
                             "one row each")
    parser.add_argument("--all-users-prefix-epochs", type=int, nargs="*", default=[],
                        help="also train the all-users MLLM-MSR row on block-prefix training groups (a group at "
                             "every summary-block boundary of each training user, add_prefix_targets) for these "
                             "many epochs, each continuing the longest finished shorter one; one row each")
    parser.add_argument("--all-users-recbole", action="store_true",
                        help="run RecBole in the all-users table too (slow on a shared CPU)")
    parser.add_argument("--recbole", choices=("auto", "on", "off"), default="auto",
                        help="also run RecBole's SASRec/GRU4Rec in benchmarks/quality/.venv-recbole "
                             "(auto: when that venv exists; on: build it when missing)")
    parser.add_argument("--work", type=Path, default=WORK / "quality",
                        help="cache of every stage (git-ignored)")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json and results.md go")
    args = parser.parse_args(argv)
    too_short = [e for e in args.all_users_longer_epochs if e <= LLM_EPOCHS]
    if too_short:
        parser.error(f"--all-users-longer-epochs must exceed the table's {LLM_EPOCHS} epochs, got {too_short}")
    if args.all_users_longer_epochs and "full" not in args.all_users_llm_rows:
        parser.error("--all-users-longer-epochs continues the full row: add full to --all-users-llm-rows")
    global COMPUTE_BASELINES
    COMPUTE_BASELINES = not (args.skip_baselines or args.table_only)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.time()
    recbole = recbole_python(args.recbole)
    tables = []
    llm_protocols = args.protocols if args.llm_protocols is None else args.llm_protocols
    llm_done: List[str] = []
    for protocol in args.protocols:
        tables.append(subset_table(args, protocol, recbole, llm_protocols, llm_done))
        if args.all_users_baselines and args.users:
            tables.append(all_users_table(args, protocol, recbole))
    results = {"dataset": "ml-100k", "max_history": MAX_HISTORY, "data_seed": DATA_SEED, "users": args.users,
               "llm_settings": {**llm_train_settings(), "max_new_tokens": MAX_NEW_TOKENS, "llm_seed": args.llm_seed,
                                "model": "embedded SmolLM2-135M-Instruct + EfficientNet-Lite0"},
               "baseline_seeds": args.seeds, "tables": tables,
               "total_wall_seconds_this_run": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
