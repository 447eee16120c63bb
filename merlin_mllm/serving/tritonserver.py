"""Finding and preparing the Triton Inference Server binary shipped in the ``nvidia-pytriton`` wheel.

The wheel carries ``tritonserver`` 2.51 with only the python backend (ensembles are built in).
It runs directly, provided that:

* ``LD_LIBRARY_PATH`` holds the wheel's ``nvidia_pytriton.libs`` (without it the python stub
  hangs the server) and this Python's own lib dir (without it the stub picks up the system
  libpython against another stdlib);
* the backend directory's ``python/`` holds ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and a *copy* of the stub for this Python version.

Shared memory: the python backend names each ``/dev/shm`` region ``<prefix><uuid>``, with the
prefix set by ``--backend-config=python,shm-region-prefix-name=<prefix>`` (default
``triton_python_backend_shm_region_``, the same for every server on the host). Each
:class:`TritonServer` passes a prefix of its own, so after a hard kill it removes exactly the
regions its server made, never those of another server running beside it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path

from merlin_mllm.models.embedded import AssetNotInstalled, cache_dir, package_dir


@dataclass(frozen=True)
class TritonInstall:
    """Paths of the Triton server inside an installed ``nvidia-pytriton`` wheel."""

    root: Path  # site-packages/pytriton/tritonserver

    @classmethod
    def find(cls) -> "TritonInstall":
        try:
            root = package_dir("pytriton", "nvidia-pytriton==0.7.0") / "tritonserver"
        except AssetNotInstalled as err:
            raise AssetNotInstalled(
                "the Triton server binary comes from the nvidia-pytriton wheel, which is not "
                "installed: `pip install nvidia-pytriton==0.7.0` (or run `make env`)"
            ) from err
        install = cls(root)
        if not install.binary.is_file():
            raise AssetNotInstalled(f"no tritonserver binary at {install.binary}")
        return install

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs_dir(self) -> Path:
        return self.root.parent.parent / "nvidia_pytriton.libs"

    @property
    def cache_directory(self) -> Path:
        return self.root / "caches"

    def stub(self, python_version: str | None = None) -> Path:
        version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        path = self.root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not path.is_file():
            raise AssetNotInstalled(f"nvidia-pytriton has no python backend stub for Python {version}")
        return path

    def environment(self, base: dict | None = None) -> dict:
        """The process environment the server (and its python stubs) need."""
        env = dict(os.environ if base is None else base)
        python_lib = sysconfig.get_config_var("LIBDIR") or ""
        paths = [str(self.libs_dir), python_lib, env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
        # The stub runs `python` from PATH for the models: make it this interpreter's env.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def backend_directory(self, where: Path | None = None) -> Path:
        """A backend dir whose python/ holds the backend library, utils and a copied stub."""
        where = Path(where) if where else cache_dir() / "triton-backends"
        python_dir = where / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        source = self.root / "backends" / "python"
        # Several servers (test workers, CI beside a session) may set this folder up at once, and an
        # older link may point into a venv that is gone: each entry is made under a name of this
        # process's own and renamed into place, so a reader never sees a half-made or stale one.
        unique = f".{uuid.uuid4().hex}.tmp"
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            link = python_dir / name
            if not (link.is_symlink() and os.readlink(link) == str(source / name)):
                tmp = python_dir / (name + unique)
                tmp.symlink_to(source / name)
                os.replace(tmp, link)
        stub = python_dir / "triton_python_backend_stub"
        if not stub.exists():
            # A copy, not a link: the backend resolves its own folder from the stub's real path.
            tmp = python_dir / (stub.name + unique)
            shutil.copy2(self.stub(), tmp)
            os.replace(tmp, stub)
        return where

    def check_runnable(self, timeout: float = 30.0) -> str:
        """Run ``tritonserver --help``; return the first line of its usage text or raise."""
        proc = subprocess.run(
            [str(self.binary), "--help"],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        text = (proc.stdout + proc.stderr).strip()
        if "Usage" not in text and "--model-repository" not in text:
            raise RuntimeError(f"tritonserver --help exited {proc.returncode}: {text[-500:]}")
        return text.splitlines()[0] if text else ""


#: The python backend's default region prefix. Ours extend it, so any region of a python
#: backend still matches SHM_GLOB.
SHM_PREFIX = "triton_python_backend_shm_region_"
SHM_GLOB = SHM_PREFIX + "*"
SHM_DIR = Path("/dev/shm")
_PREFIX_OPTION = "shm-region-prefix-name="


def process_shm_prefix(pid: int) -> str:
    """Start of the region names of every server that process ``pid`` starts with the default prefix."""
    return f"{SHM_PREFIX}merlin-{pid}-"


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``address`` right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _prefix_in(args) -> str | None:
    """The shm prefix set by a ``--backend-config python,shm-region-prefix-name=...`` in ``args``."""
    args = [str(a) for a in args]
    for index, arg in enumerate(args):
        value = None
        if arg.startswith("--backend-config="):
            value = arg.split("=", 1)[1]
        elif arg == "--backend-config" and index + 1 < len(args):
            value = args[index + 1]
        if value and value.startswith("python,") and value[len("python,"):].startswith(_PREFIX_OPTION):
            return value[len("python,") + len(_PREFIX_OPTION):]
    return None


class TritonServer:
    """A ``tritonserver`` process from the nvidia-pytriton wheel, serving a model repository.

    It binds to 127.0.0.1 unless told otherwise, waits until ``/v2/health/ready`` answers, and
    stops with SIGTERM, which lets the python backend remove its ``/dev/shm`` regions. If the
    server must be killed, the regions it created are removed here instead: only those, found
    by this server's own region prefix (:attr:`shm_prefix`), so other Triton servers on the host
    keep theirs.

    Usage::

        with TritonServer("triton_repo") as server:
            print(server.grpc_url)   # e.g. 127.0.0.1:8001

    Parameters
    ----------
    model_repository : path
        A Triton model repository (``merlin-mllm export`` writes one).
    address : str
        Interface for HTTP, gRPC and metrics. Default 127.0.0.1.
    http_port, grpc_port, metrics_port : int
        0 picks a free port.
    log_verbose : int
        Triton's ``--log-verbose`` level.
    log_file : path, optional
        Append the server's output here (default: inherit this process's stdout/stderr).
    extra_args : sequence of str
        More ``tritonserver`` arguments. One that sets
        ``--backend-config=python,shm-region-prefix-name=...`` replaces the unique prefix;
        it should then be unique to this server too.
    """

    def __init__(
        self,
        model_repository,
        *,
        address: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_verbose: int = 0,
        log_file=None,
        extra_args=(),
        install: TritonInstall | None = None,
    ):
        self.model_repository = Path(model_repository).resolve()
        if not (self.model_repository.is_dir()):
            raise FileNotFoundError(f"model repository {self.model_repository} does not exist")
        self.address = address
        self.http_port = http_port or free_port(address)
        self.grpc_port = grpc_port or free_port(address)
        self.metrics_port = metrics_port or free_port(address)
        self.log_verbose = log_verbose
        self.log_file = log_file
        self.extra_args = list(extra_args)
        self.install = install or TritonInstall.find()
        self.process: subprocess.Popen | None = None
        #: Start of the name of every /dev/shm region this server's python backend creates.
        self.shm_prefix = _prefix_in(self.extra_args) or f"{process_shm_prefix(os.getpid())}{uuid.uuid4().hex[:12]}_"
        self._log_handle = None

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    def command(self) -> list:
        return [
            str(self.install.binary),
            "--model-repository", str(self.model_repository),
            "--backend-directory", str(self.install.backend_directory()),
            "--cache-directory", str(self.install.cache_directory),
            "--http-address", self.address, "--http-port", str(self.http_port),
            "--grpc-address", self.address, "--grpc-port", str(self.grpc_port),
            "--metrics-address", self.address, "--metrics-port", str(self.metrics_port),
            "--allow-gpu-metrics", "false",
            "--log-verbose", str(self.log_verbose),
            *([] if _prefix_in(self.extra_args) else [f"--backend-config=python,{_PREFIX_OPTION}{self.shm_prefix}"]),
            *self.extra_args,
        ]

    def start(self, timeout: float = 120.0) -> "TritonServer":
        if self.process is not None:
            raise RuntimeError("server already started")
        if self.log_file is not None:
            self._log_handle = open(self.log_file, "ab")
            out = self._log_handle
        else:
            out = None  # inherit: the user sees Triton's own log
        self.process = subprocess.Popen(
            self.command(), env=self.install.environment(), stdout=out, stderr=subprocess.STDOUT if out else None
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        import tritonclient.http as httpclient

        try:
            client = httpclient.InferenceServerClient(self.http_url, connection_timeout=2.0, network_timeout=2.0)
            return bool(client.is_server_ready())
        except Exception:
            return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s at http://{self.http_url}")

    def send_signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self) -> int:
        """Block until the server exits; returns its exit code."""
        assert self.process is not None
        return self.process.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; kill after ``timeout`` and remove the shm regions it left."""
        import signal

        if self.process is None:
            return None
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
        self.cleanup_shm()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return code

    def shm_regions(self) -> list:
        """This server's python-backend regions now in /dev/shm (by its prefix), sorted."""
        if not SHM_DIR.is_dir():
            return []
        return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(self.shm_prefix))

    def cleanup_shm(self) -> list:
        """Remove this server's python-backend shm regions (left only by a hard kill); return them.

        Regions of other servers, even ones started later, are left alone: they have other prefixes.
        """
        leftover = self.shm_regions()
        for path in leftover:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        return leftover

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
