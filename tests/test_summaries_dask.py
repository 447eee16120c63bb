"""UserPreferenceSummary on a 2-process Dask LocalCluster equals the single-process run."""
from __future__ import annotations

import pandas as pd
import pytest

from merlin_mllm.summaries.store import SummaryStore
from merlin_mllm.summaries.user import add_history_item_ids, read_parquet

from test_user_summary import SETTINGS, write_dataset


def _model_loads():
    from merlin_mllm.summaries.user import MODEL_LOADS

    return dict(MODEL_LOADS)


@pytest.mark.slow
def test_dask_two_workers_match_single_process(tmp_path, smollm2):
    import nvtabular as nvt
    from distributed import Client, LocalCluster

    from merlin_mllm.operators.user_summary import UserPreferenceSummary, process_report

    data = write_dataset(tmp_path / "data", lengths=(7, 5, 6, 4))
    events = read_parquet(data / "events")
    rows = pd.concat([add_history_item_ids(read_parquet(data / s), events) for s in ("test", "valid")], ignore_index=True)
    rows.to_parquet(tmp_path / "rows.parquet", index=False)

    def run(store, client=None):
        op = UserPreferenceSummary(data / "items", store, model=None if client else smollm2, settings=SETTINGS)
        # With a Client open, merlin runs the transform on its cluster (the global client).
        workflow = nvt.Workflow((["user_id", "history_item_ids"] >> op) + ["item_id"])
        # 4 partitions over 2 workers: each worker handles several partitions.
        dataset = nvt.Dataset(pd.read_parquet(tmp_path / "rows.parquet"), npartitions=4)
        return workflow.transform(dataset).to_ddf().compute().reset_index(drop=True)

    single = run(tmp_path / "single")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        distributed = run(tmp_path / "dask", client)
        loads = client.run(_model_loads)
        reports = client.run(lambda: process_report().to_dict())
        assert client.run(lambda: __import__("os").getpid()).keys() == loads.keys()

    assert distributed.user_summary.tolist() == single.user_summary.tolist()
    assert distributed.item_id.tolist() == single.item_id.tolist()
    # Both workers did work, each loaded the model exactly once, and each wrote its own segment.
    assert len(loads) == 2 and all(v == {"smollm2-135m-instruct": 1} for v in loads.values()), loads
    assert all(r["rows"] > 0 for r in reports.values()), reports
    assert sum(r["rows"] for r in reports.values()) == len(rows)
    assert len(list((tmp_path / "dask" / "segments").glob("seg-*.jsonl"))) == 2
    # The worker-written store holds the same summaries as the single-process one.
    dask_store, single_store = SummaryStore(tmp_path / "dask"), SummaryStore(tmp_path / "single")
    assert {r.key: r.text for r in dask_store} == {r.key: r.text for r in single_store}
