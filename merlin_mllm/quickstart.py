"""``merlin-mllm quickstart``: the whole MLLM-MSR pipeline on the embedded defaults, end to end.

Each stage prints one summary line and caches its output under ``--out``, so a second run
reuses every finished stage.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

import pandas as pd
import typer

from merlin_mllm.baselines import evaluate_popularity
from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.tables import read_table
from merlin_mllm.generation import GenerationSettings
from merlin_mllm.pipelines.config import TrainConfig
from merlin_mllm.pipelines.evaluation import evaluate_ranker
from merlin_mllm.pipelines.training import train_ranker
from merlin_mllm.reporting import write_quickstart_report
from merlin_mllm.serving.client import RerankClient
from merlin_mllm.serving.export import MANIFEST_FILE, export
from merlin_mllm.serving.tritonserver import TritonServer
from merlin_mllm.summaries.item import summarize_items
from merlin_mllm.summaries.user import summarize_users


@dataclass
class QuickstartSettings:
    out: Path = Path("runs/quickstart")
    # Sized for ~15 minutes on a 2-core CPU: item summaries dominate (~1 s of SmolLM2 per item,
    # and each user brings ~7 items: 9 history items, negatives, candidates).
    max_users: int = 40
    max_history: int = 9
    seed: int = 42
    # Summaries are short on this CPU default: the ranker reads them, nobody has to.
    max_new_tokens: int = 40
    batch_size: int = 32  # measured: 4.6x the items/s of batch 1 on 2 cores (16: 3.7x)
    epochs: int = 2


@dataclass
class StageResult:
    name: str
    seconds: float
    summary: str
    cached: bool = False


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
    def prepare_data(self) -> None:
        report_path = self.data_dir / "report.json"

        def describe() -> str:
            r = json.loads(report_path.read_text())
            rows = r["rows_per_split"]
            return (f"MovieLens-100k, paper protocol: {r['kept']['users']} users, {r['kept']['items']} items; "
                    f"rows train/valid/test = {rows['train']}/{rows['valid']}/{rows['test']}")

        def run() -> str:
            s = self.settings
            prepare_dataset("ml-100k", "paper", self.data_dir, max_users=s.max_users, max_history=s.max_history, seed=s.seed)
            return describe()

        self.stage("data", report_path.is_file, run, describe)

    @property
    def summaries(self) -> Path:
        """The summary store folder."""
        return self.settings.out / "summaries"

    def _generation(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.settings.max_new_tokens, batch_size=self.settings.batch_size)

    def summarize_items(self) -> None:
        # The store makes this stage idempotent: a re-run finds every summary and generates none.
        def run() -> str:
            report = summarize_items(self.data_dir, self.summaries, settings=self._generation(), progress=True)
            return f"item summaries (EfficientNet textualizer + SmolLM2): {report}"

        self.stage("item summaries", lambda: False, run, run)

    def summarize_users(self) -> None:
        def run() -> str:
            report = summarize_users(self.data_dir, self.summaries, settings=self._generation(), progress=True)
            return f"recurrent user summaries (blocks of 3): {report}"

        self.stage("user summaries", lambda: False, run, run)

    @property
    def run_dir(self) -> Path:
        return self.settings.out / "ranker"

    def train(self) -> None:
        model_dir = self.run_dir / "model"

        def describe() -> str:
            return f"ranker at {model_dir}"

        def run() -> str:
            # A small run has few steps, so LoRA learns faster than with the paper's lr 2e-5.
            config = TrainConfig.small_budget(epochs=self.settings.epochs, seed=self.settings.seed)
            train_ranker(self.data_dir, self.summaries, self.run_dir, config, progress=True)
            log = json.loads((self.run_dir / "training.json").read_text())
            epochs = log["epoch_mean_loss"]
            trend = " -> ".join(f"{float(v):.3f}" for _, v in sorted(epochs.items(), key=lambda kv: int(kv[0])))
            trend = f"; mean loss per epoch {trend}"
            return f"LoRA SFT of SmolLM2 (+EfficientNet projector){trend}; {describe()}"

        self.stage("train", lambda: (model_dir / "ranker_config.json").is_file(), run, describe)

    @property
    def eval_dir(self) -> Path:
        return self.settings.out / "eval"

    @property
    def results(self) -> dict:
        """Rows of the metrics table: name -> metrics JSON (all on the same test groups)."""
        return {"MLLM-MSR (SFT)": self.eval_dir / "sft.json",
                "MLLM-MSR zero-shot": self.eval_dir / "zero_shot.json",
                "popularity": self.eval_dir / "popularity.json"}

    def evaluate(self) -> None:
        results = self.results

        def describe() -> str:
            rows = []
            for name, path in results.items():
                r = json.loads(path.read_text())
                rows.append(f"{name}: AUC {r['auc']:.3f} HR@5 {r['hr@5']:.3f} MRR@5 {r['mrr@5']:.3f} NDCG@5 {r['ndcg@5']:.3f}")
            return " | ".join(rows)

        def run() -> str:
            evaluate_ranker(self.data_dir, self.summaries, self.run_dir / "model", results["MLLM-MSR (SFT)"], progress=True)
            evaluate_ranker(self.data_dir, self.summaries, None, results["MLLM-MSR zero-shot"], zero_shot=True,
                            progress=True)
            evaluate_popularity(self.data_dir, results["popularity"])
            return describe()

        self.stage("evaluate", lambda: all(p.is_file() for p in results.values()), run, describe)

    @property
    def repo_dir(self) -> Path:
        return self.settings.out / "triton_repo"

    def export(self) -> None:
        manifest_path = self.repo_dir / MANIFEST_FILE
        model_config = self.run_dir / "model" / "ranker_config.json"

        def describe() -> str:
            manifest = json.loads(manifest_path.read_text())
            return (f"Triton ensemble {manifest['ensemble']} = {' -> '.join(manifest['steps'])} "
                    f"in {self.repo_dir}")

        def run() -> str:
            export(self.run_dir / "model", self.summaries, self.data_dir, self.repo_dir, progress=True)
            return describe()

        # Re-exported when the ranker was retrained after the last export.
        def done() -> bool:
            return manifest_path.is_file() and manifest_path.stat().st_mtime >= model_config.stat().st_mtime

        self.stage("export", done, run, describe)

    def serve_and_query(self) -> None:
        """Start the bundled Triton server, rank one test user's candidates over gRPC, shut down."""
        def run() -> str:
            scores = pd.read_parquet(self.eval_dir / "sft.scores.parquet")
            # The first test group: 1 positive + the negatives that evaluate scored.
            group = scores[scores["group_id"] == scores["group_id"].iloc[0]]
            user_id, item_ids = int(group["user_id"].iloc[0]), group["item_id"].astype(int).tolist()
            items = read_table(self.data_dir / "items")
            titles = dict(zip(items["item_id"].astype(int), items["title"].fillna("").astype(str)))
            with TritonServer(self.repo_dir, http_port=0, grpc_port=0, metrics_port=0,
                              log_file=self.settings.out / "triton.log") as server:
                with RerankClient(server.grpc_url) as client:
                    result = client.rank(user_id, item_ids, top_k=10)
            served = dict(zip(result.item_ids, result.scores))
            diff = max(abs(float(served[i]) - float(s)) for i, s in zip(group["item_id"], group["score"]))
            positive = int(group.loc[group["label"] == 1, "item_id"].iloc[0])
            lines = [f"user {user_id}: top {len(result.ranked)} of {len(item_ids)} candidates "
                     f"(served by Triton, gRPC); * = the held-out positive"]
            lines += [f"{rank:>4}. {score:.4f}  {titles.get(item, '')}{' *' if item == positive else ''}"
                      for rank, (item, score) in enumerate(result.ranked, 1)]
            lines.append(f"max |served - in-process| over the {len(item_ids)} scores: {diff:.2e}")
            self.query_lines = lines
            typer.echo("\n".join(lines))
            return f"served, queried and shut down the Triton server (max score diff vs evaluate {diff:.1e})"

        self.stage("triton", lambda: False, run, run)

    def write_report(self) -> Path:
        """``report.md``: the metrics table, a plot and the stage timings."""
        path = write_quickstart_report(self.settings.out / "report.md", self.results, self.stages,
                                       getattr(self, "query_lines", []), self.settings)
        typer.echo(f"[report] {path}")
        return path

    def run(self) -> List[StageResult]:
        self.settings.out.mkdir(parents=True, exist_ok=True)
        self.prepare_data()
        self.summarize_items()
        self.summarize_users()
        self.train()
        self.evaluate()
        self.export()
        self.serve_and_query()
        self.write_report()
        return self.stages
