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

import typer


@dataclass
class QuickstartSettings:
    out: Path = Path("runs/quickstart")
    max_users: int = 120
    max_history: int = 12
    seed: int = 42
    # Summaries are short on this CPU default: the ranker reads them, nobody has to.
    max_new_tokens: int = 48
    batch_size: int = 16
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
    results: List[StageResult] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.settings.out / "data"

    def stage(self, name: str, done: Callable[[], bool], run: Callable[[], str], describe: Callable[[], str]) -> None:
        start = time.perf_counter()
        cached = done()
        summary = describe() if cached else run()
        result = StageResult(name, time.perf_counter() - start, summary, cached)
        self.results.append(result)
        typer.echo(f"[{name}] {'(cached) ' if cached else ''}{summary}  ({result.seconds:.1f} s)")

    # -- stages ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        from merlin_mllm.data.prepare import prepare_dataset

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
    def store_dir(self) -> Path:
        return self.settings.out / "summaries"

    def _generation(self):
        from merlin_mllm.generation import GenerationSettings

        return GenerationSettings(max_new_tokens=self.settings.max_new_tokens, batch_size=self.settings.batch_size)

    def summarize_items(self) -> None:
        from merlin_mllm.summaries.item import summarize_items

        # The store makes this stage idempotent: a re-run finds every summary and generates none.
        def run() -> str:
            report = summarize_items(self.data_dir, self.store_dir, settings=self._generation(), progress=True)
            return f"item summaries (EfficientNet textualizer + SmolLM2): {report}"

        self.stage("item summaries", lambda: False, run, run)

    def summarize_users(self) -> None:
        from merlin_mllm.summaries.user import summarize_users

        def run() -> str:
            report = summarize_users(self.data_dir, self.store_dir, settings=self._generation(), progress=True)
            return f"recurrent user summaries (blocks of 3): {report}"

        self.stage("user summaries", lambda: False, run, run)

    @property
    def run_dir(self) -> Path:
        return self.settings.out / "ranker"

    def train(self) -> None:
        from merlin_mllm.ranker.training import train_ranker

        model_dir = self.run_dir / "model"

        def describe() -> str:
            return f"ranker at {model_dir}"

        def run() -> str:
            # A small run has few steps, so the quickstart trains LoRA faster than the paper's 2e-5.
            train_ranker(self.data_dir, self.store_dir, self.run_dir, lr=1e-4, epochs=self.settings.epochs,
                         grad_accum=4, seed=self.settings.seed, progress=True)
            log = json.loads((self.run_dir / "training.json").read_text())
            epochs = log["epoch_mean_loss"]
            trend = " -> ".join(f"{float(v):.3f}" for _, v in sorted(epochs.items(), key=lambda kv: int(kv[0])))
            trend = f"; mean loss per epoch {trend}"
            return f"LoRA SFT of SmolLM2 (+EfficientNet projector){trend}; {describe()}"

        self.stage("train", lambda: (model_dir / "ranker_config.json").is_file(), run, describe)

    def evaluate(self) -> None:
        from merlin_mllm.ranker.evaluate import evaluate_ranker

        results = {"MLLM-MSR (SFT)": self.settings.out / "eval" / "sft.json",
                   "zero-shot": self.settings.out / "eval" / "zero_shot.json"}

        def describe() -> str:
            rows = []
            for name, path in results.items():
                r = json.loads(path.read_text())
                rows.append(f"{name}: AUC {r['auc']:.3f} HR@5 {r['hr@5']:.3f} MRR@5 {r['mrr@5']:.3f} NDCG@5 {r['ndcg@5']:.3f}")
            return " | ".join(rows)

        def run() -> str:
            evaluate_ranker(self.data_dir, self.store_dir, self.run_dir / "model", results["MLLM-MSR (SFT)"], progress=True)
            evaluate_ranker(self.data_dir, self.store_dir, None, results["zero-shot"], zero_shot=True, progress=True)
            return describe()

        self.stage("evaluate", lambda: all(p.is_file() for p in results.values()), run, describe)

    def run(self) -> List[StageResult]:
        self.settings.out.mkdir(parents=True, exist_ok=True)
        self.prepare_data()
        self.summarize_items()
        self.summarize_users()
        self.train()
        self.evaluate()
        return self.results
