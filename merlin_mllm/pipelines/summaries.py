"""Summaries on a Dask cluster: what ``merlin-mllm summarize items|users --workers N`` runs.

The item and user stages run as NVTabular workflows (``ItemSummary``, ``UserPreferenceSummary``)
whose partitions the workers of a ``dask.distributed`` cluster share. The summary store stays
the single source of truth: each worker process appends to its own segment file, a summary in
the store is never generated again, and the run's report is the sum of what each worker did.

- ``workers=N``: a ``distributed.LocalCluster`` of N worker processes on this machine, one
  thread each for Dask, with the machine's cores split between them for torch.
- ``scheduler="tcp://host:8786"``: an existing cluster (one machine or many). Every worker must
  see the data folder and the summary store at the same paths (a shared filesystem), and have
  merlin-mllm and the model installed.

Partitions hold ``rows_per_partition`` rows whatever the number of workers, and each partition
is summarised as one unit (batched by prompt length inside it), so 1 and N workers write the
same summaries.

Usage::

    from merlin_mllm.pipelines.summaries import dask_client, summarize_items_on_cluster
    with dask_client(workers=2) as client:
        report = summarize_items_on_cluster("data/ml100k", "data/summaries", client)
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Union

import pandas as pd

# Only this module's users pay for Dask and NVTabular: the pipelines package imports lazily.
import nvtabular as nvt
from distributed import Client, LocalCluster

from merlin_mllm.generation import GenerationSettings
from merlin_mllm.models.threads import set_torch_threads
from merlin_mllm.operators import item_summary, user_summary
from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.summaries.user import UserSummaryRun
from merlin_mllm.summaries.user_summarizer import DEFAULT_BLOCK_SIZE
from merlin_mllm.text import TokenBudgets

__all__ = ["ROWS_PER_PARTITION", "dask_client", "summarize_items_on_cluster", "summarize_users_on_cluster"]

#: Rows (items, or distinct user histories) per partition: the unit of work a worker takes.
ROWS_PER_PARTITION = 128
#: Counts that add up across workers. ``rows`` and ``empty_histories`` of the user stage are
#: counted once, over the splits' rows, by :class:`UserSummaryRun`.
_WORK_COUNTS = ("generated", "reused_from_store", "failed", "skipped", "llm_calls", "new_tokens",
                "items_without_summary", "missing_images", "bad_images", "truncated")


@contextlib.contextmanager
def dask_client(workers: int = 0, scheduler: Optional[str] = None) -> Iterator[Client]:
    """A client of a new LocalCluster with ``workers`` processes, or of the cluster at ``scheduler``.

    While the client is open NVTabular runs workflows on its cluster. A LocalCluster's workers
    split this machine's cores for torch (Dask's nanny starts them with ``OMP_NUM_THREADS=1``).
    """
    if scheduler:
        if workers:
            raise ValueError("give either workers (a new local cluster) or scheduler (an existing one), not both")
        with Client(scheduler) as client:
            yield client
        return
    if workers < 1:
        raise ValueError(f"workers must be at least 1 for a local cluster, not {workers}")
    with LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        # Each worker process takes its share of the cores (merlin_mllm.models.threads).
        client.run(set_torch_threads, processes=int(workers))
        yield client


def _item_report() -> dict:
    return item_summary.process_report().to_dict()


def _user_report() -> dict:
    return user_summary.process_report().to_dict()


def _snapshot(client: Optional[Client], report) -> Dict[str, dict]:
    """Each worker's process report (this process's own without a client)."""
    return client.run(report) if client is not None else {"this process": report()}


def _worker_reports(before: Dict[str, dict], after: Dict[str, dict]) -> SummaryReport:
    """What the workers did between two snapshots of their process reports, summed."""
    total = SummaryReport()
    for worker, now in after.items():
        then = before.get(worker, {})
        for name in _WORK_COUNTS + ("rows",):
            setattr(total, name, getattr(total, name) + now.get(name, 0) - then.get(name, 0))
        total.errors.extend(now.get("errors", [])[len(then.get("errors", [])):])
    return total


def _partitions(rows: int, rows_per_partition: int) -> int:
    if rows_per_partition < 1:
        raise ValueError(f"rows_per_partition must be at least 1, not {rows_per_partition}")
    return max(1, math.ceil(rows / rows_per_partition))


def summarize_items_on_cluster(
    data_dir: Union[str, os.PathLike],
    summaries: Union[str, os.PathLike],
    client: Optional[Client],
    *,
    backend: str = "textualizer",
    model: Optional[str] = None,
    mode: str = "image_and_text",
    settings: GenerationSettings = GenerationSettings(),
    budgets: TokenBudgets = TokenBudgets(),
    on_empty: str = "skip",
    output: Optional[Union[str, os.PathLike]] = None,
    rows_per_partition: int = ROWS_PER_PARTITION,
) -> SummaryReport:
    """:func:`~merlin_mllm.summaries.item.summarize_items` as an NVTabular workflow on ``client``'s cluster.

    Parameters are those of ``summarize_items``; ``client`` comes from :func:`dask_client`
    (``None``: Dask's current scheduler in this process, the single-process reference).
    ``model`` must be an id or folder the workers can load. ``rows_per_partition`` items form
    one partition, whatever the number of workers.
    """
    # Lazy: merlin.io (under data.tables) is heavy, as in summarize_items.
    from merlin_mllm.data.tables import Tags, write_table

    data_dir = Path(data_dir).resolve()
    items_dir = data_dir / "items"
    if not items_dir.is_dir():
        raise FileNotFoundError(f"{items_dir} not found: run `merlin-mllm data prepare` first")
    ddf = nvt.Dataset(str(items_dir), engine="parquet").to_ddf()
    if "item_id" not in ddf.columns:
        raise ValueError(f"{items_dir} has no item_id column (columns: {list(ddf.columns)})")
    columns = [c for c in ("item_id", "title", "description", "image_path") if c in ddf.columns]
    ddf = ddf[columns]
    ddf = ddf.repartition(npartitions=_partitions(len(ddf), rows_per_partition))
    op = item_summary.ItemSummary(
        str(Path(summaries).resolve()), backend=backend, model=model, mode=mode, settings=settings,
        budgets=budgets, on_empty=on_empty, image_root=str(data_dir),
    )
    workflow = nvt.Workflow(["item_id"] + (columns >> op))
    before = _snapshot(client, _item_report)
    table = workflow.transform(nvt.Dataset(ddf)).to_ddf().compute()
    report = _worker_reports(before, _snapshot(client, _item_report))
    if output is not None:
        frame = pd.DataFrame({"item_id": table["item_id"].to_numpy(), "item_summary": table[op.output_column].to_numpy()})
        write_table(frame, output, {"item_id": [Tags.ITEM_ID, Tags.CATEGORICAL], "item_summary": [Tags.TEXT]})
    return report


def summarize_users_on_cluster(
    data_dir: Union[str, os.PathLike],
    summaries: Union[str, os.PathLike],
    client: Optional[Client],
    *,
    splits: Sequence[str] = ("train", "valid", "test"),
    model: Optional[str] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    mode: str = "recurrent",
    settings: GenerationSettings = GenerationSettings(),
    budgets: TokenBudgets = TokenBudgets(),
    on_unknown_item: str = "error",
    rows_per_partition: int = ROWS_PER_PARTITION,
) -> SummaryReport:
    """:func:`~merlin_mllm.summaries.user.summarize_users` with its generation on ``client``'s cluster.

    This process lists the distinct histories (:class:`UserSummaryRun`); the workers summarise
    them with ``UserPreferenceSummary``; then this process records the users' states and the
    run's configuration, finding every step in the store (it loads no model). ``client``:
    as in :func:`summarize_items_on_cluster`.
    """
    data_dir = Path(data_dir).resolve()
    summaries = Path(summaries).resolve()
    run = UserSummaryRun(data_dir, summaries, splits=splits, model=model, block_size=block_size, mode=mode,
                         settings=settings, progress=False, on_unknown_item=on_unknown_item, budgets=budgets)
    frame = pd.DataFrame({"user_id": pd.Series(run.users, dtype="int64"),
                          "history_item_ids": [list(h) for h in run.histories]})
    op = user_summary.UserPreferenceSummary(
        data_dir / "items", summaries, model=model, block_size=block_size, mode=mode, settings=settings,
        budgets=budgets, on_unknown_item=on_unknown_item,
    )
    workflow = nvt.Workflow(["user_id", "history_item_ids"] >> op)
    before = _snapshot(client, _user_report)
    workflow.transform(nvt.Dataset(frame, npartitions=_partitions(len(frame), rows_per_partition))).to_ddf().compute()
    work = _worker_reports(before, _snapshot(client, _user_report))
    work.rows = 0  # the rows served are the splits' rows, counted by the run
    run.report.merge(work)
    return run.finish()

