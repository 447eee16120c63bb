"""The bundled tritonserver: start, serve a real python-backend model, shut down cleanly."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from merlin_mllm.serving.tritonserver import (
    SHM_GLOB, SHM_PREFIX, TritonInstall, TritonServer, free_port, process_shm_prefix,
)

MODEL_PY = textwrap.dedent(
    '''
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", (x * 2).astype(np.float32))]))
            return out
    '''
)
CONFIG = textwrap.dedent(
    '''
    name: "double"
    backend: "python"
    max_batch_size: 8
    input [{ name: "X", data_type: TYPE_FP32, dims: [ -1 ] }]
    output [{ name: "Y", data_type: TYPE_FP32, dims: [ -1 ] }]
    instance_group [{ kind: KIND_CPU, count: 1 }]
    '''
)


@pytest.fixture
def repo(tmp_path) -> Path:
    model = tmp_path / "repo" / "double"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(MODEL_PY)
    (model / "config.pbtxt").write_text(CONFIG)
    return tmp_path / "repo"


def shm_regions():
    return set(Path("/dev/shm").glob(SHM_GLOB))


def test_install_is_found_and_runnable():
    install = TritonInstall.find()
    assert install.binary.is_file()
    assert "Usage" in install.check_runnable()
    backend = install.backend_directory()
    stub = backend / "python" / "triton_python_backend_stub"
    assert stub.is_file() and not stub.is_symlink()  # a copy: the backend resolves its folder from it


def test_serves_a_python_model_and_stops_cleanly(repo, tmp_path):
    import tritonclient.grpc as grpcclient

    # This server's own regions (its prefix), not every region: other tests' servers may run beside it.
    server = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=tmp_path / "triton.log")
    with server:
        assert server.address == "127.0.0.1"
        client = grpcclient.InferenceServerClient(server.grpc_url)
        x = np.arange(6, dtype=np.float32).reshape(1, 6)
        inp = grpcclient.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("double", [inp])
        np.testing.assert_array_equal(result.as_numpy("Y"), x * 2)
        own = server.shm_regions()
        assert own and set(own) <= shm_regions()  # the python backend is really running
    assert server.process.returncode == 0
    assert server.shm_regions() == [] and not any(path.exists() for path in own)


def _infer(server) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    x = np.ones((1, 3), dtype=np.float32)
    inp = httpclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("double", [inp]).as_numpy("Y"), x * 2)
    client.close()


def test_a_killed_server_cleans_up_only_its_own_shm_regions(repo, tmp_path):
    first = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=tmp_path / "first.log")
    second = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=tmp_path / "second.log")
    assert first.shm_prefix != second.shm_prefix and first.shm_prefix.startswith(SHM_PREFIX)
    # A region named the python backend's default way, as a server started by someone else makes.
    foreign = Path("/dev/shm") / f"{SHM_PREFIX}{uuid.uuid4()}"
    try:
        first.start()
        second.start()  # started later: the old "created since start" rule took its regions too
        foreign.write_bytes(b"another server's region")
        _infer(first), _infer(second)
        mine, theirs = first.shm_regions(), second.shm_regions()
        assert mine and theirs and not set(mine) & set(theirs)
        assert all(p.name.startswith(first.shm_prefix) for p in mine)
        assert set(mine) | set(theirs) | {foreign} <= shm_regions()  # all match the backend's glob

        first.send_signal(signal.SIGKILL)  # a hard kill: Triton cannot remove its regions itself
        first.process.wait(30)
        assert all(p.exists() for p in mine)
        assert first.stop() == -signal.SIGKILL
        assert not any(p.exists() for p in mine)
        assert all(p.exists() for p in theirs) and foreign.exists()  # the others' regions survive
        _infer(second)
        assert second.stop() == 0
        assert second.shm_regions() == [] and foreign.exists()
    finally:
        first.stop(), second.stop()
        foreign.unlink(missing_ok=True)


def test_a_prefix_given_in_extra_args_is_used(repo):
    prefix = f"{SHM_PREFIX}custom-{uuid.uuid4().hex[:8]}_"
    server = TritonServer(repo, extra_args=[f"--backend-config=python,shm-region-prefix-name={prefix}"])
    assert server.shm_prefix == prefix
    assert sum("shm-region-prefix-name" in arg for arg in server.command()) == 1
    default = TritonServer(repo)
    assert f"--backend-config=python,shm-region-prefix-name={default.shm_prefix}" in default.command()


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TritonServer(tmp_path / "nope")


def test_serve_cli_forwards_sigint_and_leaves_no_shm(repo, tmp_path):
    import tritonclient.http as httpclient

    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "merlin_mllm.cli", "serve", "--model-repository", str(repo),
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    try:
        # Wait for the CLI's own "ready" line: it is printed once /v2/health/ready answers.
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready: HTTP 127.0.0.1:") or time.monotonic() > deadline:
                break
        assert lines and lines[-1].startswith("ready:"), "".join(lines)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        assert client.is_model_ready("double")
        client.close()  # an open keep-alive connection would hold the shutdown for its timeout
        # Only the CLI's own regions count: servers of tests on other xdist workers come and go meanwhile.
        own_prefix = process_shm_prefix(proc.pid)
        assert any(p.name.startswith(own_prefix) for p in shm_regions())  # the model is loaded: it has regions
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "Signal (15) received" in out  # the CLI forwarded SIGINT as SIGTERM
    assert not any(p.name.startswith(own_prefix) for p in shm_regions())
