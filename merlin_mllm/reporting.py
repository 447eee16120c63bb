"""Markdown reports of measured results: the metrics table and a comparison plot.

The quickstart writes ``report.md`` with :func:`write_quickstart_report`; :func:`metrics_table`
is the table part alone, for any set of metrics JSON files written by
:func:`merlin_mllm.pipelines.evaluation.evaluate_ranker` or
:func:`merlin_mllm.baselines.evaluate_popularity` (same layout, same test groups).

Usage::

    from merlin_mllm.reporting import metrics_table
    print(metrics_table({"SFT": "runs/quickstart/eval/sft.json",
                         "popularity": "runs/quickstart/eval/popularity.json"}))
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from matplotlib.figure import Figure

PathLike = Union[str, os.PathLike]

#: Columns of the metrics table, in order.
TABLE_METRICS = ("auc", "hr@5", "mrr@5", "ndcg@5", "hr@10", "ndcg@10")


def _load(results: Mapping[str, PathLike]) -> dict:
    return {name: json.loads(Path(path).read_text()) for name, path in results.items()}


def metrics_table(results: Mapping[str, PathLike], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """A markdown table with one row per metrics JSON file.

    Parameters
    ----------
    results : mapping of str to path
        Row name -> metrics JSON (``auc``, ``hr@k``, ... and ``n_groups``).
    metrics : sequence of str
        The columns.
    """
    loaded = _load(results)
    header = "| model | " + " | ".join(m.upper() if m == "auc" else m for m in metrics) + " | test groups |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for name, values in loaded.items():
        cells = " | ".join(f"{float(values[m]):.3f}" for m in metrics)
        lines.append(f"| {name} | {cells} | {values.get('n_groups', '')} |")
    return "\n".join(lines)


def plot_metrics(results: Mapping[str, PathLike], path: PathLike, ks: Iterable[int] = (3, 5, 10)) -> Path:
    """Two panels: AUC per model, and HR@K against K per model. Written as PNG to ``path``."""
    # The object API (Figure, not pyplot) draws off-screen without changing pyplot's global backend.
    loaded = _load(results)
    ks = list(ks)
    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    names = list(loaded)
    left.barh(names, [float(loaded[n]["auc"]) for n in names], color="tab:blue")
    left.axvline(0.5, color="grey", linestyle=":", label="random")
    left.set_xlim(0, 1)
    left.set_xlabel("AUC (all test pairs)")
    left.legend(loc="lower right")
    for name in names:
        right.plot(ks, [float(loaded[name][f"hr@{k}"]) for k in ks], marker="o", label=name)
    right.set_xlabel("K")
    right.set_ylabel("HR@K")
    right.set_xticks(ks)
    right.set_ylim(0, 1)
    right.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _settings_lines(settings: Any) -> list:
    if settings is None:
        return []
    values = asdict(settings) if is_dataclass(settings) else dict(settings)
    return [", ".join(f"`{k}={v}`" for k, v in values.items())]


def write_quickstart_report(path: PathLike, results: Mapping[str, PathLike], stages: Sequence[Any],
                            query_lines: Sequence[str] = (), settings: Any = None) -> Path:
    """Write the quickstart's ``report.md`` (and ``report_metrics.png`` beside it).

    Parameters
    ----------
    path : path
        The markdown file to write.
    results : mapping of str to path
        Row name -> metrics JSON; every row scored the same test groups.
    stages : sequence of StageResult
        ``name``, ``seconds``, ``summary``, ``cached`` per stage, in run order.
    query_lines : sequence of str
        The ranked list the live Triton server returned.
    settings : dataclass or mapping, optional
        The run's settings, listed at the end.
    """
    path = Path(path)
    plot = plot_metrics(results, path.with_name("report_metrics.png"))
    lines = ["# merlin-mllm quickstart report", "",
             "MovieLens-100k (paper protocol), each test user ranks 1 held-out positive against 20 "
             "negatives. All rows score the same test groups.", "",
             metrics_table(results), "", f"![metrics]({plot.name})", ""]
    if query_lines:
        lines += ["## Live Triton query", "", "```", *query_lines, "```", ""]
    lines += ["## Stages", "", "| stage | seconds | cached | summary |", "|---|---|---|---|"]
    for stage in stages:
        summary = str(stage.summary).replace("|", "/").replace("\n", " ")
        lines.append(f"| {stage.name} | {stage.seconds:.1f} | {'yes' if stage.cached else 'no'} | {summary} |")
    settings_lines = _settings_lines(settings)
    if settings_lines:
        lines += ["", "Settings: " + settings_lines[0]]
    path.write_text("\n".join(lines) + "\n")
    return path
