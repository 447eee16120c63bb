"""doctor's optional parts: cudf, the GPU and a Dask cluster address, each reported as present or not."""
from __future__ import annotations

import importlib.util

import dask.config
import pytest

from merlin_mllm.doctor import Check, dask_scheduler_address, optional_checks
from merlin_mllm.serving.tritonserver import free_port


def _by_name(checks) -> dict:
    return {check.name: check for check in checks}


@pytest.fixture
def no_address(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with dask.config.set({"scheduler-address": None}):
        yield


@pytest.fixture(scope="module")
def scheduler():
    """A real one-worker cluster, in this process: a scheduler listening on 127.0.0.1."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_absent_optional_parts_are_reported_not_failed(no_address):
    import torch

    checks = _by_name(optional_checks())
    assert list(checks) == ["cudf", "gpu", "dask cluster"]
    assert all(isinstance(check, Check) and check.ok for check in checks.values()), checks
    if importlib.util.find_spec("cudf") is None:
        assert checks["cudf"].detail.startswith("not installed (optional")
    else:
        assert checks["cudf"].detail.startswith("cudf ")
    if not torch.cuda.is_available():
        assert checks["gpu"].detail.startswith("no GPU")
    else:
        assert checks["gpu"].detail.startswith("CUDA ")
    assert checks["dask cluster"].detail.startswith("no cluster address set")
    assert "DASK_SCHEDULER_ADDRESS" in checks["dask cluster"].detail
    assert dask_scheduler_address() == (None, "")


def test_a_cluster_address_from_the_environment_is_reached(no_address, scheduler, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", scheduler)
    check = _by_name(optional_checks())["dask cluster"]
    assert check.ok, check.detail
    assert check.detail.startswith(f"{scheduler} (from DASK_SCHEDULER_ADDRESS): 1 worker(s), 1 thread(s)")


def test_a_cluster_address_from_the_dask_config_is_reached(no_address, scheduler):
    with dask.config.set({"scheduler-address": scheduler}):
        assert dask_scheduler_address() == (scheduler, "dask config scheduler-address")
        check = _by_name(optional_checks())["dask cluster"]
    assert check.ok and "1 worker(s)" in check.detail, check.detail


def test_an_unreachable_cluster_address_fails_the_check(no_address, monkeypatch):
    from merlin_mllm.doctor import check_dask_cluster

    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", address)
    with pytest.raises(ConnectionError, match=f"cannot reach the Dask scheduler at {address} "
                                              r"\(from DASK_SCHEDULER_ADDRESS\)"):
        check_dask_cluster(timeout=2)
    # In the report it is a failed line that names the address, not a crash of doctor.
    check = _by_name(optional_checks(dask_timeout=2))["dask cluster"]
    assert not check.ok and check.detail.startswith(f"ConnectionError: cannot reach the Dask scheduler at {address}")
