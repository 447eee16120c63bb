"""Markdown reports of measured results: the metrics table, bootstrap intervals and a comparison plot.

The quickstart writes ``report.md`` with :func:`write_quickstart_report`; :func:`metrics_table`
is the table part alone, for any set of metrics JSON files written by
:func:`merlin_mllm.pipelines.evaluation.evaluate_ranker` or
:func:`merlin_mllm.baselines.evaluate_popularity` (same layout, same test groups).
:func:`auc_intervals` and :func:`difference_intervals` resample test users (groups) with
:func:`merlin_mllm.metrics.auc_difference_interval`, from the scores file each JSON names.

Usage::

    from merlin_mllm.reporting import auc_intervals, metrics_table
    results = {"hybrid": "runs/quickstart/eval/hybrid.json",
               "popularity": "runs/quickstart/eval/popularity.json"}
    print(metrics_table(results, intervals=auc_intervals(results)))
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from merlin_mllm.metrics import auc_difference_interval, paired_scores

PathLike = Union[str, os.PathLike]

#: Columns of the metrics table, in order.
TABLE_METRICS = ("auc", "hr@5", "mrr@5", "ndcg@5", "hr@10", "ndcg@10")
#: Resamples of the bootstrap intervals (over test users) in the report.
RESAMPLES = 2000


def _load(results: Mapping[str, PathLike]) -> dict:
    return {name: json.loads(Path(path).read_text()) for name, path in results.items()}


def scores_of(metrics_json: PathLike) -> pd.DataFrame:
    """The per-row scores a metrics JSON was computed from (the parquet its ``run.scores`` names).

    Raises
    ------
    FileNotFoundError
        The JSON names no scores file, or the file is gone.
    """
    record = json.loads(Path(metrics_json).read_text())
    path = (record.get("run") or {}).get("scores")
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"{metrics_json}: its scores file ({path}) is missing; re-run that evaluation")
    return pd.read_parquet(path)


def auc_interval(scores: pd.DataFrame, *, resamples: int = RESAMPLES, level: float = 0.95, seed: int = 0) -> dict:
    """The AUC of a scores table with a percentile bootstrap interval over its groups (test users).

    It is :func:`merlin_mllm.metrics.auc_difference_interval` against a constant scorer: a
    constant's AUC is exactly 0.5 on every resample (every pair tied, a tie counting one half),
    so the resampled differences are the resampled AUCs minus 0.5.

    Parameters
    ----------
    scores : DataFrame
        ``group_id``, ``label``, ``score`` per row.
    resamples, level, seed
        As in :func:`~merlin_mllm.metrics.auc_difference_interval`.

    Returns
    -------
    dict
        ``auc``, ``low``, ``high``, ``groups``, ``resamples``.
    """
    out = auc_difference_interval(scores["label"].to_numpy(), scores["score"].to_numpy(np.float64),
                                  np.zeros(len(scores)), scores["group_id"].to_numpy(),
                                  resamples=resamples, level=level, seed=seed)
    return {"auc": out["difference"] + 0.5, "low": out["low"] + 0.5, "high": out["high"] + 0.5,
            "groups": out["groups"], "resamples": out["resamples"]}


def auc_intervals(results: Mapping[str, PathLike], **options) -> Dict[str, dict]:
    """:func:`auc_interval` of each metrics JSON's scores (row name -> interval)."""
    return {name: auc_interval(scores_of(path), **options) for name, path in results.items()}


def difference_intervals(results: Mapping[str, PathLike], reference: str, **options) -> Dict[str, dict]:
    """AUC(``reference``) - AUC(row) for every other row, paired over the same test users.

    Rows are matched on (group_id, item_id) (:func:`merlin_mllm.metrics.paired_scores`, which
    refuses rows that scored different candidates); groups are resampled with both scores.

    Returns
    -------
    dict
        Row name -> ``difference``, ``low``, ``high``, ``groups``, ``resamples``.
    """
    if reference not in results:
        raise KeyError(f"no row {reference!r} among {list(results)}")
    ours = scores_of(results[reference])
    out = {}
    for name, path in results.items():
        if name == reference:
            continue
        paired = paired_scores(ours, scores_of(path), ("a", "b"), where=f"{reference} vs {name}")
        out[name] = auc_difference_interval(paired["label"].to_numpy(), paired["score_a"].to_numpy(),
                                            paired["score_b"].to_numpy(), paired["group_id"].to_numpy(), **{
                                                "resamples": RESAMPLES, **options})
    return out


def metrics_table(results: Mapping[str, PathLike], metrics: Sequence[str] = TABLE_METRICS, *,
                  intervals: Optional[Mapping[str, dict]] = None) -> str:
    """A markdown table with one row per metrics JSON file.

    Parameters
    ----------
    results : mapping of str to path
        Row name -> metrics JSON (``auc``, ``hr@k``, ... and ``n_groups``).
    metrics : sequence of str
        The columns.
    intervals : mapping of str to dict, optional
        Row name -> :func:`auc_interval`: adds a "95% interval" column after the AUC.
    """
    loaded = _load(results)
    names = [m.upper() if m == "auc" else m for m in metrics]
    if intervals is not None and "auc" in metrics:
        names.insert(list(metrics).index("auc") + 1, "AUC 95% interval")
    header = "| model | " + " | ".join(names) + " | test groups |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    for name, values in loaded.items():
        cells = [f"{float(values[m]):.3f}" for m in metrics]
        if intervals is not None and "auc" in metrics:
            interval = intervals[name]
            cells.insert(list(metrics).index("auc") + 1, f"[{interval['low']:.3f}, {interval['high']:.3f}]")
        lines.append(f"| {name} | {' | '.join(cells)} | {values.get('n_groups', '')} |")
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


def protocol_summary(data_report: Mapping[str, Any]) -> str:
    """A prepared folder's protocol in words, with the timeline's cut times (from its ``report.json``).

    Example (ML-100k's default cuts): ``timeline protocol, cut at T_valid 1998-02-09 01:57 UTC
    (70% quantile of the event times) and T_test 1998-03-06 19:57 UTC (80% quantile of the event
    times)``; ``leave-last-out protocol`` for a folder without cuts.
    """
    protocol = f"{data_report.get('protocol')} protocol"
    cuts = data_report.get("cuts")
    if not cuts:
        return protocol
    parts = []
    for name, label in (("valid", "T_valid"), ("test", "T_test")):
        cut = cuts[name]
        when = f"{str(cut['date'])[:16].replace('T', ' ')} UTC"
        quantile = cut.get("quantile")
        where = "set as a timestamp" if quantile is None else f"{quantile:.0%} quantile of the event times"
        parts.append(f"{label} {when} ({where})")
    return f"{protocol}, cut at {' and '.join(parts)}"


def _settings_lines(settings: Any) -> list:
    if settings is None:
        return []
    values = asdict(settings) if is_dataclass(settings) else dict(settings)
    return [", ".join(f"`{k}={v}`" for k, v in values.items())]


def write_quickstart_report(path: PathLike, results: Mapping[str, PathLike], stages: Sequence[Any],
                            query_lines: Sequence[str] = (), settings: Any = None, *,
                            description: str = "", reference: Optional[str] = None,
                            notes: Sequence[str] = (), data_report: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the quickstart's ``report.md`` (and ``report_metrics.png`` beside it).

    Every AUC gets a 95% bootstrap interval over test users (:func:`auc_interval`); with
    ``reference``, a second table gives AUC(reference) - AUC(row) with a paired interval.

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
    description : str
        The paragraph above the table (the data and protocol).
    reference : str, optional
        A row of ``results`` to compare every other row with.
    notes : sequence of str
        Lines below the tables (what each row is).
    data_report : mapping, optional
        The prepared folder's ``report.json``: adds a line naming the protocol and, on the
        timeline, its cut times (:func:`protocol_summary`).
    """
    path = Path(path)
    plot = plot_metrics(results, path.with_name("report_metrics.png"))
    intervals = auc_intervals(results)
    groups = {interval["groups"] for interval in intervals.values()}
    lines = ["# merlin-mllm quickstart report", "",
             description or "Each test user ranks 1 held-out positive against the negatives. All rows score "
                            "the same test groups.", "",
             *([f"Protocol: {protocol_summary(data_report)}.", ""] if data_report is not None else []),
             metrics_table(results, intervals=intervals), "",
             f"95% intervals: percentile bootstrap over the {', '.join(map(str, sorted(groups)))} test users "
             f"({RESAMPLES} resamples of users, `merlin_mllm.metrics.auc_difference_interval`).", ""]
    if reference is not None:
        lines += [f"AUC of {reference} minus each other row, paired over the same users:", "",
                  "| compared with | AUC difference | 95% interval |", "|---|---|---|"]
        for name, diff in difference_intervals(results, reference).items():
            lines.append(f"| {name} | {diff['difference']:+.3f} | [{diff['low']:+.3f}, {diff['high']:+.3f}] |")
        lines.append("")
    lines += [*notes, *([""] if notes else []), f"![metrics]({plot.name})", ""]
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
