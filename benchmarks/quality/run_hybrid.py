"""The hybrid-ranker table on all MovieLens-100k users, every feature as of the row's time.

Protocols, one prepared folder each (``prepare_dataset("ml-100k", protocol, ...,
seed=42, n_negatives_test=20)`` with the protocol's default ``max_history``,
``merlin_mllm.data.prepare.DEFAULT_MAX_HISTORY``): ``timeline`` (the primary
table: one global time cut for valid and one for test), then ``leave-last-out`` (each user's last
event; the old "temporal") and ``paper``.

Point in time: every row's counts are those of the events strictly before its own timestamp
(``CollaborativeFeatures``; the recent window is the 30 days before the row), SASRec for split S
is trained on the events before S's cut (``merlin_mllm.data.splits.training_events``) and scores
each row from the row's own history. Nothing is tuned on test groups: the heads and late fusions
are fitted or early-stopped on valid.

Rows, every one scored on the same test groups of a protocol's folder:

* non-LLM, computed here: popularity and recent popularity (as of the row); SASRec and GRU4Rec
  (compact); the **non-LLM fusion** (``HybridHead`` over the collaborative features and
  the SASRec score, trained on the training split's groups, early-stopped on valid); the late
  fusion of [log(1 + popularity), SASRec score] by a logistic regression fitted on valid.
* LLM rows, read from score files made elsewhere (``--llm-scores``, once per training seed): LLM
  only; the late fusion of [log(1 + popularity), SASRec score, LLM logit] fitted on valid (one
  per LLM seed, from its valid scores); hybrid with tabular fusion; hybrid with collaborative
  tokens.

Slices are chosen without the label: cold users (at most 5 events before the target) and cold
items (candidates with at most 5 events before the row, positive and negative alike). Paired
intervals are bootstraps over test users with seeds as strata (``merlin_mllm.metrics``).

Every stage is cached under ``--work`` (default ``benchmarks/results/hybrid/``, git-ignored): the
prepared data, each split's features, each (model, split, seed)'s scores with its wall and CPU
time, each fusion's scores and fit. A re-run reuses them and only recomputes the tables. It
also writes, per protocol and seed, ``<work>/<protocol>_all/hybrid_inputs/<split>_s<seed>.parquet``:
each split's rows with the four fusion features, what the hybrid ranker trains and is scored on.

Outputs (committed): ``--out``/hybrid_rows.json and hybrid_rows.md (every row, every protocol,
the slices, paired bootstrap intervals), and hybrid_summary.json (per protocol: every row's
metrics and seeds, and the hybrid's three differences, null until hybrid rows exist).

Usage::

    python -m benchmarks.quality.run_hybrid                     # the non-LLM rows, every protocol
    python -m benchmarks.quality.run_hybrid --users 30 --protocols timeline --seeds 0 --work /tmp/h --out /tmp/h
    # with LLM rows (evaluate_ranker's <out>.scores.parquet, score = P(yes)), one flag per seed:
    python -m benchmarks.quality.run_hybrid --protocols timeline \\
        --llm-scores timeline llm_only runs/llm_s1/test.scores.parquet runs/llm_s1/valid.scores.parquet \\
        --llm-scores timeline hybrid_tabular runs/hybrid_s1/test.scores.parquet
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from merlin_mllm import baselines
from merlin_mllm.data.collaborative import (
    DEFAULT_RECENT_DAYS,
    HEAD_FEATURES,
    collaborative_features,
)
from merlin_mllm.data.prepare import DEFAULT_MAX_HISTORY, prepare_dataset
from merlin_mllm.data.splits import split_rows
from merlin_mllm.metrics import auc, auc_difference_interval, paired_scores, ranking_metrics
from merlin_mllm.ranker.saved import read_train_config
from merlin_mllm.pipelines.hybrid import HeadSettings, add_retrieval_scores, head_scores, train_head

from benchmarks.common import WORK, log, write_json
from benchmarks.quality.hybrid_table import (
    EXTERNAL_ROWS,
    HYBRID_PARTS,
    INTERVALS,
    METRICS,
    ROW_BY_KEY,
    ROWS,
    SLICES,
    RowSpec,
    markdown,
)

HERE = Path(__file__).resolve().parent

#: The global timeline first (the primary table), then leave-last-out and the paper's protocol.
PROTOCOLS = ("timeline", "leave-last-out", "paper")
SPLITS = ("train", "valid", "test")
DATA_SEED = 42
N_NEGATIVES_TEST = 20
#: Label-free slices: a user, or an item, with at most this many events before the row's time.
COLD_MAX_EVENTS = 5
SCORE_COLUMNS = ["group_id", "user_id", "item_id", "label", "score"]



def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def logit_of_probability(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def prepare_folder(data: Path, protocol: str, users: int = 0) -> dict:
    """The protocol's prepared ML-100k folder at ``data`` (made when missing), and its report."""
    if not (data / "report.json").is_file():
        log(f"prepare ml-100k {protocol}, max_users={users or 'all'}")
        prepare_dataset("ml-100k", protocol, data, max_users=users, seed=DATA_SEED, n_negatives_test=N_NEGATIVES_TEST)
    return json.loads((data / "report.json").read_text())


# ----------------------------------------------------------------------------- cached stages
class ProtocolStages:
    """The cached stages of one protocol's folder (see the module docstring)."""

    def __init__(self, protocol: str, work: Path, users: int, recent_days: float,
                 sequential: baselines.SequentialSettings, fusion: HeadSettings):
        self.protocol = protocol
        self.root = work / (f"{protocol}_all" if not users else f"{protocol}_u{users}")
        self.data = self.root / "data"
        self.cache = self.root / "cache"
        self.users = users
        self.recent_days = recent_days
        self.sequential_settings = sequential
        self.fusion_settings = fusion
        self.times: Dict[str, dict] = {}

    # -- generic cache
    def cached_frame(self, name: str, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """The parquet ``cache/<name>.parquet``, or ``compute()`` written there with its timing."""
        path, timing = self.cache / f"{name}.parquet", self.cache / f"{name}.timing.json"
        if path.is_file() and timing.is_file():
            self.times[name] = json.loads(timing.read_text())
            return pd.read_parquet(path)
        wall, cpu = time.time(), time.process_time()
        frame = compute()
        self.times[name] = {"wall_seconds": round(time.time() - wall, 2), "cpu_seconds": round(time.process_time() - cpu, 2)}
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
        atomic_write(timing, lambda tmp: tmp.write_text(json.dumps(self.times[name]) + "\n"))
        log(f"  {self.protocol}: {name} ({self.times[name]['wall_seconds']:.0f} s)")
        return frame

    def seconds(self, names: Sequence[str]) -> dict:
        """Summed wall and CPU time of the cached stages ``names`` (as measured when each was computed)."""
        for name in names:
            if name not in self.times:
                self.times[name] = json.loads((self.cache / f"{name}.timing.json").read_text())
        return {kind: round(sum(self.times[n][kind] for n in names), 1) for kind in ("wall_seconds", "cpu_seconds")}

    # -- data
    def prepare(self) -> dict:
        return prepare_folder(self.data, self.protocol, self.users)

    def rows(self, split: str) -> pd.DataFrame:
        return split_rows(self.data, split).drop(columns=["history_item_ids"])

    def test_fingerprint(self) -> str:
        """sha256 of the test rows (group, user, item, label): the same value means the same test groups."""
        rows = self.rows("test")[["group_id", "user_id", "item_id", "label"]].to_numpy(np.int64)
        return hashlib.sha256(rows.tobytes()).hexdigest()[:16]

    def slices(self) -> Dict[str, pd.DataFrame]:
        """The test rows of each label-free slice, as (group_id, item_id) keys.

        ``cold_users``: every row of the groups whose user had at most COLD_MAX_EVENTS events
        before the target's time. ``cold_items``: the rows whose candidate had at most
        COLD_MAX_EVENTS events before the row's time, in the groups where the positive is such an
        item and at least one negative is too (an AUC over cold positive / cold negative pairs).
        Neither looks at the label to decide which rows are in: coldness is a count, positive and
        negative alike.
        """
        features = self.features("test")
        user_events = np.rint(np.expm1(features["user_log_count"].to_numpy(np.float64)))
        item_events = np.rint(np.expm1(features["item_log_count"].to_numpy(np.float64)))
        cold_user_groups = features.loc[user_events <= COLD_MAX_EVENTS, "group_id"].unique()
        cold_items = features[item_events <= COLD_MAX_EVENTS]
        both = cold_items.groupby("group_id")["label"].agg(["min", "max"])
        usable = both.index[(both["min"] == 0) & (both["max"] == 1)]
        return {"all": features[["group_id", "item_id"]],
                "cold_users": features.loc[features["group_id"].isin(cold_user_groups), ["group_id", "item_id"]],
                "cold_items": cold_items.loc[cold_items["group_id"].isin(usable), ["group_id", "item_id"]]}

    # -- non-LLM scores
    def popularity(self, split: str, recent: bool = False) -> pd.DataFrame:
        """Each row's candidate counted from the events strictly before the row (the last 30 days if ``recent``)."""
        name = f"{'recent_' if recent else ''}popularity_{split}"
        return self.cached_frame(name, lambda: baselines.popularity_as_of_scores(
            self.data, split, recent_days=self.recent_days if recent else None)[SCORE_COLUMNS])

    def sequential(self, kind: str, split: str, seed: int) -> pd.DataFrame:
        """``kind`` trained on ``split``'s training-time events, scoring ``split``'s rows (SCORE_COLUMNS)."""
        def compute() -> pd.DataFrame:
            model = baselines.train_sequential_baseline(kind, self.data, seed, split=split, settings=self.sequential_settings)
            scored = add_retrieval_scores(self.rows(split), self.data, split, baseline=model, column="score")
            return scored[SCORE_COLUMNS]
        return self.cached_frame(f"{kind}_{split}_s{seed}", compute)

    def features(self, split: str) -> pd.DataFrame:
        # Every event fitted, each row counted as of its own time (merlin_mllm.data.collaborative).
        return self.cached_frame(f"features_{split}", lambda: collaborative_features(
            self.data, recent_days=self.recent_days).transform(self.rows(split)))

    def hybrid_inputs(self, split: str, seed: int) -> pd.DataFrame:
        """``split``'s rows with HEAD_FEATURES (SASRec seed ``seed``), also written for the hybrid runs."""
        # The SASRec row's own scores are the retrieval column: one trained model for both.
        frame = add_retrieval_scores(self.features(split), self.data, split, scores=self.sequential("sasrec", split, seed))
        path = self.root / "hybrid_inputs" / f"{split}_s{seed}.parquet"
        if not path.is_file():
            atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
        return frame

    def fusion(self, seed: int) -> pd.DataFrame:
        # The inputs are their own cached stages, made first so that this stage's time is the head's alone.
        inputs = {split: self.hybrid_inputs(split, seed) for split in SPLITS}

        def compute() -> pd.DataFrame:
            import torch  # the head trains in torch; one thread (the CPU is shared)

            torch.set_num_threads(1)
            fit = train_head(inputs["train"], inputs["valid"], HEAD_FEATURES, seed=seed,
                             settings=self.fusion_settings, recent_days=self.recent_days)
            torch.save(fit.head.state_dict(), self.cache / f"fusion_s{seed}.head.pt")
            (self.cache / f"fusion_s{seed}.fit.json").write_text(json.dumps(fit.summary(), indent=1) + "\n")
            return head_scores(fit.head, inputs["test"])[SCORE_COLUMNS]
        return self.cached_frame(f"fusion_s{seed}", compute)

    def stage_seconds_total(self) -> dict:
        """Wall and CPU time of every cached stage of this protocol, as measured when computed."""
        timings = [json.loads(path.read_text()) for path in sorted(self.cache.glob("*.timing.json"))]
        return {kind: round(sum(t[kind] for t in timings), 1) for kind in ("wall_seconds", "cpu_seconds")}

    def feature_valid_auc(self, seed: int) -> dict:
        """Each fusion feature alone, scored by its pooled AUC on the valid rows (what the head can build on)."""
        valid = self.hybrid_inputs("valid", seed)
        return {column: round(ranking_metrics(valid["label"].to_numpy(), valid[column].to_numpy(),
                                              valid["group_id"].to_numpy(), ks=(5,))["auc"], 4)
                for column in HEAD_FEATURES}

    def fusion_fit(self, seed: int) -> dict:
        return json.loads((self.cache / f"fusion_s{seed}.fit.json").read_text())

    def late_fusion(self, seed: int, llm: Optional[Dict[str, pd.DataFrame]] = None) -> Tuple[pd.DataFrame, dict]:
        """Logistic regression over [log(1 + popularity), SASRec score(, LLM logit)], fitted on valid.

        ``llm`` maps "valid" and "test" to the LLM-only row's scores as logits. Not cached (seconds).
        """
        from sklearn.linear_model import LogisticRegression  # benchmark-only dependency
        from sklearn.preprocessing import StandardScaler

        def design(split: str) -> Tuple[pd.DataFrame, np.ndarray]:
            rows = self.popularity(split).rename(columns={"score": "popularity"})
            sasrec = self.sequential("sasrec", split, seed)[["group_id", "item_id", "score"]]
            rows = rows.merge(sasrec.rename(columns={"score": "sasrec"}), on=["group_id", "item_id"], validate="1:1")
            columns = [np.log1p(rows["popularity"].to_numpy()), rows["sasrec"].to_numpy()]
            if llm is not None:
                scores = llm[split][["group_id", "item_id", "score"]]
                rows = rows.merge(scores.rename(columns={"score": "llm"}), on=["group_id", "item_id"], validate="1:1")
                columns.append(rows["llm"].to_numpy())
            if len(rows) != len(self.rows(split)):
                raise RuntimeError(f"{self.protocol} {split}: the late fusion's inputs scored different rows")
            return rows, np.stack(columns, axis=1)

        started = time.time()
        valid, x_valid = design("valid")
        test, x_test = design("test")
        scaler = StandardScaler().fit(x_valid)
        model = LogisticRegression(max_iter=1000).fit(scaler.transform(x_valid), valid["label"].to_numpy())
        scored = test.assign(score=model.decision_function(scaler.transform(x_test)))[SCORE_COLUMNS]
        names = ["log1p_popularity", "sasrec"] + (["llm_logit"] if llm is not None else [])
        fit = {"coefficients_standardised": dict(zip(names, np.round(model.coef_[0], 4).tolist())),
               "fit_seconds": round(time.time() - started, 2)}
        return scored, fit


# ----------------------------------------------------------------------------- rows and intervals
def in_slice(scores: pd.DataFrame, keys: Optional[pd.DataFrame]) -> pd.DataFrame:
    """The rows of ``scores`` whose (group_id, item_id) are in ``keys`` (all rows when None)."""
    if keys is None:
        return scores
    return scores.merge(keys, on=["group_id", "item_id"], how="inner")


def metrics_of(scores: pd.DataFrame, keys: Optional[pd.DataFrame] = None) -> dict:
    """AUC, HR@1, HR@5 and NDCG@5 of the rows in ``keys``; a slice of partial groups gets AUC only."""
    scores = in_slice(scores, keys)
    labels, values, groups = (scores["label"].to_numpy(), scores["score"].to_numpy(), scores["group_id"].to_numpy())
    n_groups = int(pd.unique(groups).size)
    if keys is not None and len(scores) != n_groups * int(pd.Series(groups).value_counts().max()):
        return {"auc": auc(labels, values), "n_groups": n_groups, "n_rows": int(len(scores))}
    result = ranking_metrics(labels, values, groups, ks=(1, 5))
    return {**{m: result[m] for m in METRICS}, "n_groups": result["n_groups"]}


def summarise(per_seed: List[dict], part: str) -> dict:
    out = {key: per_seed[0][part][key] for key in ("n_groups", "n_rows") if key in per_seed[0][part]}
    for metric in METRICS:
        if metric not in per_seed[0][part]:
            continue
        values = np.array([record[part][metric] for record in per_seed], dtype=float)
        out[metric] = round(float(values.mean()), 4)
        out[metric + "_std"] = round(float(values.std(ddof=1)), 4) if len(values) > 1 else None
    return out


def measured_row(spec: RowSpec, scored: List[Tuple[Optional[int], pd.DataFrame, dict]],
                 slices: Dict[str, pd.DataFrame], extra: Optional[dict] = None) -> dict:
    """A row of the table from its per-seed (seed, scores, timing) triples; each seed's metrics are kept."""
    per_seed = [{"seed": seed, **{name: metrics_of(scores, None if name == "all" else keys)
                                  for name, keys in slices.items()}, **timing}
                for seed, scores, timing in scored]
    row = {"key": spec.key, "label": spec.label, "kind": spec.kind, "what": spec.what, "status": "measured",
           "seeds": [s for s, _, _ in scored], **{name: summarise(per_seed, name) for name in slices},
           "wall_seconds_per_seed": round(float(np.mean([r["wall_seconds"] for r in per_seed])), 1)
           if all(r.get("wall_seconds") is not None for r in per_seed) else None,
           "cpu_seconds_per_seed": round(float(np.mean([r["cpu_seconds"] for r in per_seed])), 1)
           if all(r.get("cpu_seconds") is not None for r in per_seed) else None,
           "per_seed": per_seed}
    if extra:
        row.update(extra)
    return row


def hybrid_parts(paths: List[Path], slices: Dict[str, pd.DataFrame]) -> Optional[dict]:
    """Metrics of a hybrid's parts (``HYBRID_PARTS`` columns of its score files, mean over seeds), or None."""
    frames = [pd.read_parquet(path) for path in paths]
    if not all(set(HYBRID_PARTS) <= set(frame.columns) for frame in frames):
        return None
    return {column: {name: summarise([{name: metrics_of(frame.assign(score=frame[column]),
                                                        None if name == "all" else keys)} for frame in frames], name)
                     for name, keys in slices.items()} for column in HYBRID_PARTS}


def pending_row(spec: RowSpec, note: str) -> dict:
    return {"key": spec.key, "label": spec.label, "kind": spec.kind, "what": spec.what, "status": "pending",
            "note": note, "seeds": [], **{name: None for name in SLICES}}


def paired_difference(a: List[pd.DataFrame], b: List[pd.DataFrame], keys: Optional[pd.DataFrame], resamples: int,
                      where: str) -> dict:
    """AUC(a) - AUC(b) with a paired bootstrap over test users; seeds are strata.

    Equal seed counts pair seed i with seed i; a single-seed side is repeated beside every seed
    of the other (popularity, an LLM row). With seeds as strata, the interval carries the
    training variance of both sides' seeds, and the difference is the mean over seeds.
    """
    n = max(len(a), len(b))
    if len(a) not in (1, n) or len(b) not in (1, n):
        raise ValueError(f"{where}: cannot pair {len(a)} seeds with {len(b)}")
    frames = []
    for stratum in range(n):
        paired = paired_scores(a[stratum if len(a) > 1 else 0], b[stratum if len(b) > 1 else 0], ("a", "b"), where)
        frames.append(in_slice(paired, keys).assign(stratum=stratum))
    paired = pd.concat(frames, ignore_index=True)
    # Every protocol has one test group per user, so resampling groups resamples users.
    result = auc_difference_interval(paired["label"], paired["score_a"], paired["score_b"], paired["group_id"],
                                     strata=paired["stratum"], resamples=resamples)
    return {"diff": round(result["difference"], 4), "low": round(result["low"], 4), "high": round(result["high"], 4),
            "groups": result["groups"], "strata": n, "resamples": result["resamples"]}


def read_external(path: Path, reference: pd.DataFrame, score_kind: str, where: str) -> Tuple[pd.DataFrame, dict]:
    """An LLM row's scores (evaluate_ranker's parquet), checked to be exactly ``reference``'s rows."""
    scores = pd.read_parquet(path)
    paired_scores(scores, reference, ("external", "reference"), where)  # raises unless the same rows and labels
    if score_kind == "probability":
        scores = scores.assign(score=logit_of_probability(scores["score"].to_numpy()))
    info = {"scores": str(path)}
    metrics_json = path.with_name(path.name.replace(".scores.parquet", ".json"))
    if metrics_json.is_file():
        run = json.loads(metrics_json.read_text()).get("run", {})
        info.update(run_seconds=run.get("seconds"), run_seed=run.get("seed"))
    # A run folder of train_llm_rows.py: the training seed, and every stage's time (training included).
    stages, settings = path.parent / "stages.json", read_train_config(path.parent)
    if settings is not None:
        info["run_seed"] = settings.get("seed")
    if stages.is_file():
        times = json.loads(stages.read_text())
        info["stages"] = times
        info["run_seconds"] = round(sum(t["wall_s"] for t in times.values()), 1)
        info["run_cpu_seconds"] = round(sum(t["cpu_s"] for t in times.values()), 1)
    return scores[SCORE_COLUMNS], info


# ----------------------------------------------------------------------------- one protocol
def run_protocol(stages: ProtocolStages, seeds: List[int], external: Dict[str, List[List[Path]]], score_kind: str,
                 resamples: int) -> dict:
    report = stages.prepare()
    every_slice = stages.slices()
    # An empty slice (no full-data ML-100k user is cold at the test cut) is reported as such, not scored.
    slices = {name: keys for name, keys in every_slice.items() if len(keys)}
    test_rows = stages.rows("test")
    scores: Dict[str, List[pd.DataFrame]] = {}
    rows: Dict[str, dict] = {}

    for key, recent in (("popularity", False), ("recent_popularity", True)):
        scored = stages.popularity("test", recent=recent)
        scores[key] = [scored]
        rows[key] = measured_row(ROW_BY_KEY[key], [(None, scored, stages.seconds([f"{key}_test"]))], slices)
        log(f"  {stages.protocol}: {key} AUC {rows[key]['all']['auc']:.4f}")
    for kind in ("sasrec", "gru4rec"):
        triples = []
        for seed in seeds:
            triples.append((seed, stages.sequential(kind, "test", seed), stages.seconds([f"{kind}_test_s{seed}"])))
        scores[kind] = [t[1] for t in triples]
        rows[kind] = measured_row(ROW_BY_KEY[kind], triples, slices)
        log(f"  {stages.protocol}: {kind} AUC {rows[kind]['all']['auc']:.4f}")

    triples, fits = [], []
    for seed in seeds:
        scored = stages.fusion(seed)
        names = [f"features_{s}" for s in SPLITS] + [f"sasrec_{s}_s{seed}" for s in SPLITS] + [f"fusion_s{seed}"]
        triples.append((seed, scored, stages.seconds(names)))
        fit = stages.fusion_fit(seed)
        fits.append({k: fit[k] for k in ("seed", "best_epoch", "best_valid_auc", "epochs_run", "seconds")})
    scores["fusion"] = [t[1] for t in triples]
    rows["fusion"] = measured_row(ROW_BY_KEY["fusion"], triples, slices, {
        "features": list(HEAD_FEATURES), "fits": fits,
        "wall_time_covers": "the three splits' features and SASRec models, and the head's training"})
    log(f"  {stages.protocol}: non-LLM fusion AUC {rows['fusion']['all']['auc']:.4f}")

    triples, fits = [], []
    for seed in seeds:
        scored, fit = stages.late_fusion(seed)
        timing = stages.seconds(["popularity_valid", "popularity_test", f"sasrec_valid_s{seed}", f"sasrec_test_s{seed}"])
        triples.append((seed, scored, timing))
        fits.append(fit)
    scores["late_fusion"] = [t[1] for t in triples]
    rows["late_fusion"] = measured_row(ROW_BY_KEY["late_fusion"], triples, slices, {
        "fits": fits, "wall_time_covers": "popularity and the valid- and test-time SASRec models"})
    log(f"  {stages.protocol}: late fusion [pop, SASRec] AUC {rows['late_fusion']['all']['auc']:.4f}")

    # LLM rows: from score files when given (one --llm-scores per training seed), else pending.
    llm_valid: List[pd.DataFrame] = []
    for key in EXTERNAL_ROWS:
        runs = external.get(key)
        if not runs:
            rows[key] = pending_row(ROW_BY_KEY[key], "not run yet: pass its score files with --llm-scores")
            continue
        triples, sources = [], []
        for paths in runs:
            test, info = read_external(paths[0], scores["popularity"][0], score_kind, f"{stages.protocol} {key} test")
            triples.append((info.get("run_seed"), test, {"wall_seconds": info.get("run_seconds"),
                                                         "cpu_seconds": info.get("run_cpu_seconds")}))
            sources.append(info)
            if key == "llm_only" and len(paths) > 1:
                valid, _ = read_external(paths[1], stages.popularity("valid"), score_kind,
                                         f"{stages.protocol} {key} valid")
                llm_valid.append(valid)
        scores[key] = [t[1] for t in triples]
        rows[key] = measured_row(ROW_BY_KEY[key], triples, slices,
                                 {"sources": sources, "parts": hybrid_parts([p[0] for p in runs], slices)})
    if llm_valid and len(llm_valid) == len(scores.get("llm_only", [])):
        # One late fusion per LLM seed (SASRec seed paired in order, the first when there are fewer).
        triples, fits = [], []
        for index, (valid, test) in enumerate(zip(llm_valid, scores["llm_only"])):
            seed = seeds[min(index, len(seeds) - 1)]
            scored, fit = stages.late_fusion(seed, {"valid": valid, "test": test})
            triples.append((rows["llm_only"]["seeds"][index], scored, {"wall_seconds": None, "cpu_seconds": None}))
            fits.append(fit)
        scores["late_fusion_llm"] = [t[1] for t in triples]
        rows["late_fusion_llm"] = measured_row(ROW_BY_KEY["late_fusion_llm"], triples, slices, {"fits": fits})
    else:
        rows["late_fusion_llm"] = pending_row(ROW_BY_KEY["late_fusion_llm"],
                                              "needs the LLM-only row's valid and test scores (--llm-scores), per seed")

    keyed = {name: (None if name == "all" else keys) for name, keys in slices.items()}
    intervals = {}
    for a, b in INTERVALS:
        if a in scores and b in scores:
            name = f"{a}_minus_{b}"
            intervals[name] = {part: paired_difference(scores[a], scores[b], keys, resamples,
                                                       f"{stages.protocol} {name} {part}")
                               for part, keys in keyed.items()}
    summary = hybrid_summary(rows, scores, resamples, stages.protocol)
    return {
        "data": {"folder": str(stages.data), "users": report["kept"]["users"], "items": report["kept"]["items"],
                 "events": report["kept"]["events"], "cuts": report.get("cuts"),
                 "groups_per_split": {s: int(stages.rows(s)["group_id"].nunique()) for s in SPLITS},
                 "test_candidates_per_group": int(len(test_rows) // test_rows["group_id"].nunique()),
                 "test_rows_sha256_16": stages.test_fingerprint()},
        "slices": {
            "cold_users": {"definition": f"test groups whose user had at most {COLD_MAX_EVENTS} events before the "
                                         "target's time", "groups": int(every_slice["cold_users"]["group_id"].nunique())},
            "cold_items": {"definition": f"test rows whose candidate had at most {COLD_MAX_EVENTS} events before the "
                                         "row's time, in groups with such a positive and such a negative: an AUC over "
                                         "cold-positive / cold-negative pairs",
                           "groups": int(every_slice["cold_items"]["group_id"].nunique()),
                           "rows": int(len(every_slice["cold_items"]))},
        },
        "feature_valid_auc": {"seed": seeds[0], **stages.feature_valid_auc(seeds[0])},
        "rows": [rows[spec.key] for spec in ROWS],
        "intervals": intervals,
        "stage_seconds_total": stages.stage_seconds_total(),
        "summary": summary,
    }


def hybrid_summary(rows: Dict[str, dict], scores: Dict[str, List[pd.DataFrame]], resamples: int, protocol: str) -> dict:
    """One protocol's hybrid_summary.json entry: every row's metrics, seeds and the three differences."""
    measured = {k: r for k, r in rows.items() if r["status"] == "measured"}
    table = {k: {**{m: r["all"][m] for m in (*METRICS, "n_groups")}, "seeds": r["seeds"],
                 "auc_per_seed": [s["all"]["auc"] for s in r["per_seed"]]} for k, r in measured.items()}
    non_llm = [k for k, r in measured.items() if r["kind"] == "non_llm"]
    hybrids = [k for k, r in measured.items() if r["kind"] == "hybrid"]
    best_non_llm = max(non_llm, key=lambda k: measured[k]["all"]["auc"])
    out = {"rows": table, "best_non_llm": best_non_llm, "best_hybrid": None,
           "best_hybrid_minus_best_non_llm": None, "best_hybrid_minus_fusion": None,
           "best_hybrid_minus_late_fusion": None}
    if not hybrids:
        out["note"] = ("no hybrid row measured yet (LLM rows pending): the three differences are null until "
                       "run_hybrid.py gets the hybrid rows' score files (--llm-scores)")
        return out
    best = max(hybrids, key=lambda k: measured[k]["all"]["auc"])
    out["best_hybrid"] = best
    for name, other in (("best_hybrid_minus_best_non_llm", best_non_llm), ("best_hybrid_minus_fusion", "fusion"),
                        ("best_hybrid_minus_late_fusion", "late_fusion_llm")):
        if other in scores:
            diff = paired_difference(scores[best], scores[other], None, resamples, f"{protocol} {name}")
            out[name] = {"diff": diff["diff"], "low": diff["low"], "high": diff["high"], "versus": other,
                         "strata": diff["strata"]}
        else:
            out[name + "_note"] = f"{other} not measured"
    return out


# ----------------------------------------------------------------------------- main
def parse_external(specs: List[List[str]], protocols: Sequence[str]) -> Dict[str, Dict[str, List[List[Path]]]]:
    """``--llm-scores`` arguments by protocol and row: one list of paths per training seed."""
    out: Dict[str, Dict[str, List[List[Path]]]] = {p: {} for p in protocols}
    for spec in specs or []:
        if len(spec) not in (3, 4):
            raise SystemExit(f"--llm-scores takes PROTOCOL ROW TEST [VALID], got {spec}")
        protocol, key, *paths = spec
        protocol = "leave-last-out" if protocol == "temporal" else protocol
        if protocol not in out:
            raise SystemExit(f"--llm-scores: protocol {protocol!r} is not among --protocols {list(protocols)}")
        if key not in EXTERNAL_ROWS:
            raise SystemExit(f"--llm-scores: row must be one of {EXTERNAL_ROWS}, got {key!r}")
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise SystemExit(f"--llm-scores: no such file {missing[0]}")
        out[protocol].setdefault(key, []).append([Path(p) for p in paths])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocols", nargs="+", choices=(*PROTOCOLS, "temporal"), default=list(PROTOCOLS),
                        help="temporal: the old name of leave-last-out")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="seeds of SASRec, GRU4Rec and the fusion head (each seed trains its own models)")
    parser.add_argument("--users", type=int, default=0, help="0 = all users (the committed table); else a random subset")
    parser.add_argument("--recent-days", type=float, default=DEFAULT_RECENT_DAYS, help="the recent-count window, in days")
    parser.add_argument("--sequential-epochs", type=int, default=None,
                        help="epochs of the compact SASRec/GRU4Rec (default: SequentialSettings', 40)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per interval")
    parser.add_argument("--llm-scores", nargs="+", action="append", metavar="ARG",
                        help="PROTOCOL ROW TEST_SCORES [VALID_SCORES]: an LLM row's evaluate_ranker scores parquet, "
                             f"once per training seed; ROW is one of {', '.join(EXTERNAL_ROWS)} (llm_only's "
                             "VALID_SCORES enable late_fusion_llm)")
    parser.add_argument("--llm-score-kind", choices=("probability", "logit"), default="probability",
                        help="what the score column of --llm-scores files holds (evaluate_ranker writes P(yes))")
    parser.add_argument("--work", type=Path, default=WORK / "hybrid")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    args.protocols = list(dict.fromkeys("leave-last-out" if p == "temporal" else p for p in args.protocols))
    external = parse_external(args.llm_scores, args.protocols)
    sequential = baselines.SequentialSettings()
    if args.sequential_epochs is not None:
        sequential.epochs = args.sequential_epochs
    fusion = HeadSettings()
    started_wall, started_cpu = time.time(), time.process_time()
    protocols = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Initializing an NVTabular Dataset in CPU mode")
        for protocol in args.protocols:
            log(f"{protocol} protocol")
            stages = ProtocolStages(protocol, args.work, args.users, args.recent_days, sequential, fusion)
            protocols[protocol] = run_protocol(stages, args.seeds, external[protocol], args.llm_score_kind, args.resamples)
    results = {
        "what": "the hybrid table on MovieLens-100k, every feature as of the row's time: the non-LLM rows measured "
                "here, the LLM rows read from score files",
        "dataset": "ml-100k", "users": args.users or "all",
        "max_history": {p: DEFAULT_MAX_HISTORY[p] for p in args.protocols}, "data_seed": DATA_SEED,
        "n_negatives_test": N_NEGATIVES_TEST, "seeds": args.seeds,
        "features": {"columns": list(HEAD_FEATURES), "recent_days": args.recent_days,
                     "counted": "Counted for each row from the folder's events strictly before the row's timestamp "
                                "(merlin_mllm.data.collaborative); SASRec trained per split on the events before "
                                "the split's cut (merlin_mllm.data.splits.training_events), scoring each row from "
                                "its own history",
                     "recent_window": "interactions in the recent_days before the row's timestamp"},
        "fusion_settings": fusion.to_dict(), "sequential_settings": vars(sequential),
        "metrics": "AUC pooled over all test rows; HR@1, HR@5 and NDCG@5 per group (ties at their expected value); "
                   "± is the sample std over seeds; intervals: paired bootstrap over test users, seeds as strata",
        "protocols": {p: {k: v for k, v in block.items() if k != "summary"} for p, block in protocols.items()},
        "command": "python -m benchmarks.quality.run_hybrid " + " ".join(argv if argv is not None else sys.argv[1:]),
        "this_run": {"wall_seconds": round(time.time() - started_wall, 1),
                     "cpu_seconds_main_process": round(time.process_time() - started_cpu, 1),
                     "note": "cached stages are reused and not timed again; each row's own times are its stages'"},
    }
    summary = {"what": "the hybrid summary per protocol (benchmarks/quality/run_hybrid.py); timeline is the primary one",
               "protocols": {p: block["summary"] for p, block in protocols.items()}}
    write_json(args.out / "hybrid_rows.json", results)
    write_json(args.out / "hybrid_summary.json", summary)
    (args.out / "hybrid_rows.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
