"""Shared fixtures: real models, loaded once per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted from the wheel's GGUF on first use)."""
    from merlin_mllm.models import load

    return load()
