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

    def run(self) -> List[StageResult]:
        self.settings.out.mkdir(parents=True, exist_ok=True)
        self.prepare_data()
        return self.results
