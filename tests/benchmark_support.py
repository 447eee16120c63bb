"""Run a benchmark script the way its README does, as a program, for the tests of that script.

Tests import project code, never benchmark scripts: a script is run as
``python -m benchmarks.<name>`` from the repository root, in its own process. When it fails, the
error it ended with is raised again here with the same type and message, so a test states what
the script refuses with ``pytest.raises`` as it would for a library call.
"""
from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(module: str, argv: Sequence[str]) -> int:
    """Run ``python -m module *argv`` from the repository root; return its exit status (0).

    Raises
    ------
    Exception
        The script's own exception (same builtin type and message) when it ended with a
        traceback; ``SystemExit`` with its last line when it exited non-zero without one.
    """
    done = subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=REPO, capture_output=True, text=True)
    if done.returncode == 0:
        return 0
    lines = done.stderr.strip().splitlines() or [f"{module} exited with {done.returncode}"]
    if "Traceback (most recent call last):" in done.stderr:
        kind, _, message = lines[-1].partition(": ")
        error = getattr(builtins, kind.rpartition(".")[2], None)
        if isinstance(error, type) and issubclass(error, BaseException):
            raise error(message)
        raise RuntimeError(f"{module} failed:\n{done.stderr}")
    raise SystemExit(lines[-1])
