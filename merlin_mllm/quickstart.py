"""``merlin-mllm quickstart``: the whole MLLM-MSR pipeline on the embedded defaults, end to end.

The ranker is the hybrid of issue 16: the LoRA-tuned LLM's yes-minus-no logit plus a tabular
head over the pipeline's collaborative features (NVTabular ``CollaborativeFeatures`` counts as
of each row's time, and a SASRec retrieval score), trained jointly on the timeline protocol:
two global cut times ``T_valid < T_test``; the model learns from the events before ``T_valid``
and is tested on each sampled user's last event at or after ``T_test``, every feature of a row
from the events strictly before the row's time. The report puts it beside popularity, SASRec
and its own LLM part alone, each AUC with a bootstrap interval over the test users; the hybrid
is then exported and served by Triton.

The sample (:class:`QuickstartSettings`). MovieLens-100k users rate in bursts, so the global cut
splits users more than their histories: 303 of the 943 users have an event after ``T_test``
(193 of them none before it), and a uniform 40-user sample would hold about 13 test groups. So
``test_users`` of the ``max_users`` users are drawn among those with an event at or after
``T_test`` (the users waiting for recommendations at the test moment, as in Elliot's
``fixed_timestamp`` split; each one test group, unless its target has no earlier event) and the
rest among the others, whose past before ``T_valid`` trains the hybrid, with a training group
at every summary-block boundary too (``train_targets="blocks"``). Both draws are uniform, so the
test groups are a uniform sample of the full timeline test split's.

Each stage prints one summary line and caches its output under ``--out``, so a second run
reuses every finished stage. A ``--out`` whose data was prepared with other settings (e.g. by
an older quickstart, on the paper protocol) is rebuilt stage by stage; its summary store is
kept (it is keyed by content, so nothing in it goes stale).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pandas as pd
import typer

from merlin_mllm.baselines import evaluate_popularity_as_of, evaluate_scores
from merlin_mllm.data.collaborative import HEAD_FEATURES, RETRIEVAL_COLUMN, CollaborativeFeatures
from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.tables import read_table
from merlin_mllm.generation import GenerationSettings
from merlin_mllm.pipelines.train_config import TrainConfig
from merlin_mllm.pipelines.evaluation import evaluate_ranker
from merlin_mllm.pipelines.hybrid import write_feature_table
from merlin_mllm.pipelines.training import train_ranker
from merlin_mllm.ranker.ranker_config import HEAD_FILE
from merlin_mllm.ranker.hybrid_head import hybrid_probability, saved_head, saved_head_path
from merlin_mllm.ranker.saved import MODEL_DIR, TRAINING_LOG_FILE
from merlin_mllm.reporting import protocol_summary, write_quickstart_report
from merlin_mllm.serving.client import RerankClient
from merlin_mllm.serving.export import MANIFEST_FILE, events_before_serving, export
from merlin_mllm.serving.tritonserver import TritonServer
from merlin_mllm.summaries.candidates import candidate_parts
from merlin_mllm.summaries.item import ItemSummarizer
from merlin_mllm.summaries.user import summarize_users


@dataclass
class QuickstartSettings:
    out: Path = Path("runs/quickstart")
    # Sized for 15 minutes on a 2-core CPU: the summaries dominate (SmolLM2; only the items of
    # the users' events are summarised, 320 here, and 149 recurrent steps), so the cost follows
    # max_users * max_history: 400 events, about the work of the 40-user leave-last-out
    # quickstart measured at 9.6 minutes (277 items, 173 steps, 74 training rows).
    max_users: int = 80
    # Of the max_users, the users drawn among those with an event at or after T_test (see the
    # module docstring); None: half of max_users. 40 give 38 test groups (ties leave two
    # targets without an earlier event).
    test_users: Optional[int] = None
    max_history: int = 5
    protocol: str = "timeline"
    # Also a training group at every summary-block boundary before each user's last event before
    # T_valid: 52 training groups instead of 36, at no extra summary cost (whole blocks).
    train_targets: str = "blocks"
    seed: int = 42
    # Summaries are short on this CPU default: the ranker reads them, nobody has to.
    max_new_tokens: int = 40
    batch_size: int = 32  # measured: 4.6x the items/s of batch 1 on 2 cores (16: 3.7x)
    epochs: int = 2
    # What the ranker shows of each candidate (merlin_mllm.choices.CANDIDATE_TEXTS).
    candidate_text: str = "title"

    def __post_init__(self):
        if self.test_users is None:
            self.test_users = self.max_users // 2 if self.protocol == "timeline" else 0


@dataclass
class StageResult:
    name: str
    seconds: float
    summary: str
    cached: bool = False


#: The report's rows (:attr:`Quickstart.results` maps each to its metrics JSON).
HYBRID = "MLLM-MSR hybrid (LLM + tabular head)"
LLM_PART = "hybrid's LLM part alone (llm_logit)"
SASREC = "SASRec (retrieval score)"
POPULARITY = "popularity (as of the row)"
#: How long the Triton server may take to load the ensemble.
TRITON_START_SECONDS = 600
#: The folders under ``--out`` made from the prepared data (rebuilt when the data settings change).
DATA_STAGE_FOLDERS = ("data", "features", "ranker", "eval", "triton_repo")


def _newer(path: Path, *sources: Path) -> bool:
    """``path`` exists and was written after every existing ``source``."""
    if not path.is_file():
        return False
    return all(path.stat().st_mtime >= source.stat().st_mtime for source in sources if source.exists())


@dataclass
class Quickstart:
    settings: QuickstartSettings
    stages: List[StageResult] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.settings.out / "data"

    def stage(self, name: str, done: Callable[[], bool], run: Callable[[], str], describe: Callable[[], str]) -> None:
        start = time.perf_counter()
        cached = done()
        summary = describe() if cached else run()
        result = StageResult(name, time.perf_counter() - start, summary, cached)
        self.stages.append(result)
        typer.echo(f"[{name}] {'(cached) ' if cached else ''}{summary}  ({result.seconds:.1f} s)")

    # -- stages ---------------------------------------------------------------------------
    def _data_settings_match(self, report: dict) -> bool:
        s, kept = self.settings, report.get("settings", {})
        return (report.get("protocol") == s.protocol and report.get("seed") == s.seed
                and kept.get("max_users") == s.max_users and kept.get("max_history") == s.max_history
                and kept.get("test_users", 0) == s.test_users and kept.get("train_targets") == s.train_targets)

    def prepare_data(self) -> None:
        report_path = self.data_dir / "report.json"

        def describe() -> str:
            r = json.loads(report_path.read_text())
            rows = r["rows_per_split"]
            groups = {split: read_table(self.data_dir / split)["group_id"].nunique() for split in ("train", "valid")}
            test_users = r["settings"].get("test_users", 0)
            drawn = f" ({test_users} drawn among those with an event at or after T_test)" if test_users else ""
            return (f"MovieLens-100k, {protocol_summary(r)}: {r['kept']['users']} users{drawn}, "
                    f"{r['kept']['items']} items, {r['kept']['events']} events; groups train/valid = "
                    f"{groups['train']}/{groups['valid']}, rows train/valid/test = {rows['train']}/{rows['valid']}/"
                    f"{rows['test']}; {self.test_groups()} test groups of 1 + {r['settings']['n_negatives_test']}")

        def run() -> str:
            s = self.settings
            prepare_dataset("ml-100k", s.protocol, self.data_dir, max_users=s.max_users, max_history=s.max_history,
                            seed=s.seed, test_users=s.test_users, train_targets=s.train_targets)
            return describe()

        def done() -> bool:
            if not report_path.is_file():
                return False
            report = json.loads(report_path.read_text())
            if self._data_settings_match(report):
                return True
            stale = [name for name in DATA_STAGE_FOLDERS if (self.settings.out / name).exists()]
            typer.echo(f"[data] {self.settings.out} holds a run on other data ({report.get('protocol')} protocol, "
                       f"{report.get('settings', {}).get('max_users')} users, seed {report.get('seed')}): rebuilding "
                       f"{', '.join(stale)} (the summary store is kept)")
            for name in stale:
                shutil.rmtree(self.settings.out / name)
            return False

        self.stage("data", done, run, describe)

    def test_groups(self) -> int:
        """How many test groups the prepared data holds (one per test user)."""
        return int(read_table(self.data_dir / "test")["group_id"].nunique())

    @property
    def summaries(self) -> Path:
        """The summary store folder."""
        return self.settings.out / "summaries"

    def _generation(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.settings.max_new_tokens, batch_size=self.settings.batch_size)

    def summarize_items(self) -> None:
        # Only the items the user summaries read: those of the users' events (their histories,
        # and the last items, which the recorded user states cover too). A ranker that sees its
        # candidates without their summary (candidate_text) reads no other item's summary; with
        # 1 + 20 candidates per test user they would be most of the catalogue.
        # The store makes this stage idempotent: a re-run finds every summary and generates none.
        def run() -> str:
            items = read_table(self.data_dir / "items")
            if "summary" in candidate_parts(self.settings.candidate_text):
                chosen, what = items, "every catalogue item (the candidates show their summary)"
            else:
                chosen = items[items["item_id"].isin(read_table(self.data_dir / "events")["item_id"])]
                what = (f"the {len(chosen)} items of the users' events (of {len(items)}; candidates reach the "
                        "ranker without their summary)")
            summarizer = ItemSummarizer(settings=self._generation(), store=self.summaries, image_root=self.data_dir,
                                        progress=True)
            _, report = summarizer.summarize(chosen)
            return f"item summaries (EfficientNet textualizer + SmolLM2) of {what}: {report}"

        self.stage("item summaries", lambda: False, run, run)

    def summarize_users(self) -> None:
        def run() -> str:
            report = summarize_users(self.data_dir, self.summaries, settings=self._generation(), progress=True)
            return f"recurrent user summaries (blocks of 3): {report}"

        self.stage("user summaries", lambda: False, run, run)

    @property
    def features_dir(self) -> Path:
        return self.settings.out / "features"

    def features_path(self, split: str) -> Path:
        """The ``split`` rows with the hybrid's feature columns (parquet)."""
        return self.features_dir / f"{split}.parquet"

    def features(self) -> None:
        """The hybrid's tabular features of the train and test rows: counts as of each row's time, and
        the score of a SASRec trained on the events before the split's cut."""
        paths = [self.features_path(split) for split in ("train", "test")]

        def describe() -> str:
            counts = "; ".join(f"{p.stem} {len(pd.read_parquet(p, columns=['group_id']))} rows" for p in paths)
            return (f"hybrid features {', '.join(HEAD_FEATURES)} (NVTabular CollaborativeFeatures counts as of "
                    f"each row's time, and a SASRec score, trained on the events before the split): {counts}")

        def run() -> str:
            for split, path in zip(("train", "test"), paths):
                write_feature_table(self.data_dir, split, path, seed=self.settings.seed)
            return describe()

        self.stage("features", lambda: all(_newer(p, self.data_dir / "report.json") for p in paths), run, describe)

    @property
    def run_dir(self) -> Path:
        return self.settings.out / "ranker"

    @property
    def model_dir(self) -> Path:
        return self.run_dir / MODEL_DIR

    def train(self) -> None:
        model_dir = self.model_dir

        def describe() -> str:
            return f"hybrid ranker at {model_dir} (head: {HEAD_FILE})"

        def run() -> str:
            # A small run has few steps, so LoRA learns faster than with the paper's lr 2e-5.
            config = TrainConfig.small_budget(epochs=self.settings.epochs, seed=self.settings.seed,
                                              head_features=HEAD_FEATURES, candidate_text=self.settings.candidate_text)
            train_ranker(self.data_dir, self.summaries, self.run_dir, config,
                         features=pd.read_parquet(self.features_path("train")), progress=True)
            log = json.loads((self.run_dir / TRAINING_LOG_FILE).read_text())
            epochs = log["epoch_mean_loss"]
            trend = " -> ".join(f"{float(v):.3f}" for _, v in sorted(epochs.items(), key=lambda kv: int(kv[0])))
            trend = f"; mean {config.loss} loss per epoch {trend}"
            return (f"joint training of the LoRA SmolLM2 (+EfficientNet projector) and the tabular head over "
                    f"{len(HEAD_FEATURES)} features{trend}; {describe()}")

        def done() -> bool:
            return (model_dir / "ranker_config.json").is_file() and saved_head_path(model_dir) is not None

        self.stage("train", done, run, describe)

    @property
    def eval_dir(self) -> Path:
        return self.settings.out / "eval"

    @property
    def results(self) -> Dict[str, Path]:
        """Rows of the metrics table: name -> metrics JSON (all on the same test groups)."""
        return {HYBRID: self.eval_dir / "hybrid.json",
                LLM_PART: self.eval_dir / "hybrid_llm.json",
                SASREC: self.eval_dir / "sasrec.json",
                POPULARITY: self.eval_dir / "popularity.json"}

    def evaluate(self) -> None:
        results = self.results
        test_features = self.features_path("test")

        def describe() -> str:
            rows = []
            for name, path in results.items():
                r = json.loads(path.read_text())
                rows.append(f"{name}: AUC {r['auc']:.3f} HR@5 {r['hr@5']:.3f} MRR@5 {r['mrr@5']:.3f} NDCG@5 {r['ndcg@5']:.3f}")
            return " | ".join(rows)

        def run() -> str:
            started = time.time()
            hybrid = evaluate_ranker(self.data_dir, self.summaries, self.model_dir, results[HYBRID],
                                     features=test_features, progress=True)
            # The hybrid's LLM part alone: the same scores file, ranked by its llm_logit column.
            scores = pd.read_parquet(hybrid["run"]["scores"])
            evaluate_scores(scores.assign(score=scores["llm_logit"]), results[LLM_PART],
                            {**hybrid["run"], "model": f"{self.model_dir} (llm_logit only)", "part": "llm_logit"},
                            started=started)
            # SASRec: the retrieval score the hybrid reads, trained on the events before the test split's cut.
            features = pd.read_parquet(test_features)
            evaluate_scores(features.assign(score=features[RETRIEVAL_COLUMN]), results[SASREC],
                            {"model": "sasrec", "seed": self.settings.seed, "split": "test",
                             "source": f"{RETRIEVAL_COLUMN} of {test_features}"})
            evaluate_popularity_as_of(self.data_dir, results[POPULARITY])
            return describe()

        def done() -> bool:
            return all(_newer(path, self.model_dir / "ranker_config.json", test_features) for path in results.values())

        self.stage("evaluate", done, run, describe)

    @property
    def repo_dir(self) -> Path:
        return self.settings.out / "triton_repo"

    def export(self) -> None:
        manifest_path = self.repo_dir / MANIFEST_FILE
        model_config = self.model_dir / "ranker_config.json"

        def describe() -> str:
            manifest = json.loads(manifest_path.read_text())
            hybrid = manifest["hybrid"]
            return (f"Triton ensemble {manifest['ensemble']} = {' -> '.join(manifest['steps'])} in {self.repo_dir}; "
                    f"hybrid head over {', '.join(hybrid['feature_names'])}, counts fitted on {hybrid['events']} events")

        def run() -> str:
            # The hybrid's collaborative features are fitted on the events before the test split's
            # cut (T_test), and served as of the first second after the last of them.
            export(self.model_dir, self.summaries, self.data_dir, self.repo_dir, progress=True)
            return describe()

        # Re-exported when the ranker was retrained after the last export.
        def done() -> bool:
            return _newer(manifest_path, model_config) and json.loads(manifest_path.read_text()).get("hybrid") is not None

        self.stage("export", done, run, describe)

    def serve_and_query(self) -> None:
        """Start the bundled Triton server, rank one test user's candidates over gRPC, shut down."""
        def run() -> str:
            scores = pd.read_parquet(json.loads(self.results[HYBRID].read_text())["run"]["scores"])
            # The first test group: 1 positive + the negatives that evaluate scored, with the
            # retrieval stage's (SASRec's) score of each, as a retrieval -> rerank pipeline sends them.
            group = scores[scores["group_id"] == scores["group_id"].iloc[0]].merge(
                pd.read_parquet(self.features_path("test"), columns=["group_id", "item_id", RETRIEVAL_COLUMN]),
                on=["group_id", "item_id"], how="left", validate="1:1")
            user_id, item_ids = int(group["user_id"].iloc[0]), group["item_id"].astype(int).tolist()
            retrieval = group[RETRIEVAL_COLUMN].to_numpy(np.float32)
            items = read_table(self.data_dir / "items")
            titles = dict(zip(items["item_id"].astype(int), items["title"].fillna("").astype(str)))
            server = TritonServer(self.repo_dir, http_port=0, grpc_port=0, metrics_port=0,
                                  log_file=self.settings.out / "triton.log")
            # Both models load SmolLM2: on a busy 2-core machine that took over the default 120 s.
            with server.start(timeout=TRITON_START_SECONDS):
                with RerankClient(server.grpc_url) as client:
                    result = client.rank(user_id, item_ids, top_k=10, retrieval_scores=retrieval)
            served = dict(zip(result.item_ids, result.scores))
            expected = self.scores_as_of_serving(group)
            diff = max(abs(float(served[i]) - float(s)) for i, s in zip(group["item_id"], expected))
            positive = int(group.loc[group["label"] == 1, "item_id"].iloc[0])
            lines = [f"user {user_id}: top {len(result.ranked)} of {len(item_ids)} candidates, scored by the hybrid "
                     f"(served by Triton, gRPC, with SASRec's retrieval_scores); * = the held-out positive"]
            lines += [f"{rank:>4}. {score:.4f}  {titles.get(item, '')}{' *' if item == positive else ''}"
                      for rank, (item, score) in enumerate(result.ranked, 1)]
            lines.append(f"max |served - in-process| over the {len(item_ids)} scores, the counts of both as of "
                         f"the serving time: {diff:.2e}")
            self.query_lines = lines
            typer.echo("\n".join(lines))
            return f"served, queried and shut down the Triton server (max score diff vs evaluate {diff:.1e})"

        self.stage("triton", lambda: False, run, run)

    def scores_as_of_serving(self, group: pd.DataFrame) -> np.ndarray:
        """The hybrid's in-process scores of evaluated rows, their counts as of the export's serving time.

        Evaluation counts each test row as of its own time; the server counts a request as of
        the moment it serves (``as_of`` in the export manifest). Same LLM logit (from the
        scores file), same head, counts recomputed at that moment from the exported events.
        """
        import torch

        record = json.loads((self.repo_dir / MANIFEST_FILE).read_text())["hybrid"]
        counts = CollaborativeFeatures(record["recent_days"], time_unit=record["time_unit"]).fit(
            events_before_serving(self.data_dir)).transform(group, as_of=record["as_of"])
        head = saved_head(self.model_dir)
        with torch.no_grad():
            head_logit = head(torch.as_tensor(counts[list(head.feature_names)].to_numpy(np.float32))).double().numpy()
        p_yes = 1.0 / (1.0 + np.exp(-group["llm_logit"].to_numpy(np.float64)))
        return hybrid_probability(p_yes, head_logit)[1]

    def write_report(self) -> Path:
        """``report.md``: the metrics table with bootstrap intervals, a plot and the stage timings."""
        data = json.loads((self.data_dir / "report.json").read_text())
        negatives = data["settings"]["n_negatives_test"]
        if data["protocol"] == "timeline":
            test_users = data["settings"].get("test_users", 0)
            drawn = (f", {test_users} of them drawn among the users with an event at or after T_test and the "
                     "others among the rest" if test_users else "")
            description = (f"MovieLens-100k, {data['kept']['users']} users{drawn}. Each of the {self.test_groups()} "
                           f"test users ranks their last event at or after T_test against {negatives} negatives "
                           "(items seen before the row's time that the user never rated). The hybrid trains on "
                           "targets before T_valid, the SASRec that scores test rows on the events before T_test, "
                           "and every count of a row counts only events strictly before the row's time. All rows "
                           "score the same test groups.")
        else:
            description = (f"MovieLens-100k, {data['protocol']} protocol ({data['kept']['users']} users): each of the "
                           f"{self.test_groups()} test users ranks their held-out last item against {negatives} "
                           "negatives. All rows score the same test groups.")
        notes = [f"- **{HYBRID}**: sigmoid(head logit + LLM logit), the LoRA-tuned SmolLM2's yes-minus-no logit "
                 f"plus a tabular head over {', '.join(HEAD_FEATURES)}, trained jointly.",
                 f"- **{LLM_PART}**: the same run's scores file ranked by its `llm_logit` column, the LLM's "
                 "part of the hybrid without the head (not a separately trained LLM-only ranker).",
                 f"- **{SASREC}**: the compact SASRec whose score is the hybrid's `{RETRIEVAL_COLUMN}` feature, "
                 "trained on the events before the test split's cut (training_events).",
                 f"- **{POPULARITY}**: each candidate's count of events strictly before the row's time."]
        path = write_quickstart_report(self.settings.out / "report.md", self.results, self.stages,
                                       getattr(self, "query_lines", []), self.settings, description=description,
                                       reference=HYBRID, notes=notes, data_report=data)
        typer.echo(f"[report] {path}")
        return path

    def run(self, serve: bool = True) -> List[StageResult]:
        """Every stage, then ``report.md``; ``serve=False`` stops at the export (no Triton server
        is started, and the report, which shows the live server's answer, is left as it is)."""
        self.settings.out.mkdir(parents=True, exist_ok=True)
        self.prepare_data()
        self.summarize_items()
        self.summarize_users()
        self.features()
        self.train()
        self.evaluate()
        self.export()
        if not serve:
            return self.stages
        self.serve_and_query()
        self.write_report()
        return self.stages
