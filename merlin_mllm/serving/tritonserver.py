"""Finding and preparing the Triton Inference Server binary shipped in the ``nvidia-pytriton`` wheel.

The wheel carries ``tritonserver`` 2.51 with only the python backend (ensembles are built in).
It runs directly, provided that:

* ``LD_LIBRARY_PATH`` holds the wheel's ``nvidia_pytriton.libs`` (without it the python stub
  hangs the server) and this Python's own lib dir (without it the stub picks up the system
  libpython against another stdlib);
* the backend directory's ``python/`` holds ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and a *copy* of the stub for this Python version.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
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
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            link = python_dir / name
            if not link.exists():
                link.symlink_to(source / name)
        stub = python_dir / "triton_python_backend_stub"
        if not stub.exists():
            # A copy, not a link: the backend resolves its own folder from the stub's real path.
            tmp = stub.with_suffix(".tmp")
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
