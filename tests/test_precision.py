"""The precision setting's names, and what ``auto`` picks: detected from the machine, said once.

``auto`` is checked on this host against the host's own /proc/cpuinfo (read here independently),
and on a host of the other kind by giving the detection that host's capability record (the CPU
flags and torch's reports are the only input of the decision).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from merlin_mllm.doctor import check_precision
from merlin_mllm.models import precision
from merlin_mllm.models.precision import PRECISIONS, check_precision as check_name, resolve_precision
from merlin_mllm.models.threads import available_cpus, set_torch_threads, threads_per_process


def _host_bf16_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags & {"avx512_bf16", "amx_bf16", "bf16"}


def test_names_and_explicit_precisions():
    assert PRECISIONS == ("float32", "bfloat16", "auto")
    assert resolve_precision("float32", "cpu").dtype == torch.float32
    assert resolve_precision("bfloat16", "cpu").dtype == torch.bfloat16
    assert resolve_precision(None, "cpu").name == "float32"  # the default: what the reference scores pin
    with pytest.raises(ValueError, match="precision must be one of .*'fp16'"):
        check_name("fp16")


def test_auto_on_this_host_follows_its_cpu_flags(monkeypatch):
    flags = _host_bf16_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo on this host")
    monkeypatch.setattr(precision, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = resolve_precision("auto", "cpu")
        second = resolve_precision("auto", "cpu")
    native = bool(flags) and precision.cpu_capability()["mkldnn_bf16"] is not False
    assert first.name == second.name == ("bfloat16" if native else "float32")
    fallbacks = [w for w in caught if "precision 'auto' runs float32" in str(w.message)]
    # The fall-back says why, once per process.
    assert len(fallbacks) == (0 if native else 1)
    if not native:
        assert "no native bf16" in str(fallbacks[0].message) or "oneDNN" in str(fallbacks[0].message)
    assert f"auto -> {first.name}" in check_precision()


@pytest.mark.parametrize("flags, mkldnn, expected", [
    (["avx2", "avx512f", "avx512_bf16"], True, "bfloat16"),
    (["avx2", "amx_bf16"], True, "bfloat16"),
    (["avx2", "avx512f"], True, "float32"),       # AVX-512 without BF16: oneDNN would emulate
    (["avx2"], False, "float32"),
    (["avx512_bf16"], False, "float32"),          # flag present, but this torch has no bf16 kernels
])
def test_auto_decides_from_the_detected_capability(monkeypatch, flags, mkldnn, expected):
    record = (("cpu_flags", flags), ("torch_capability", "AVX512"), ("mkldnn_bf16", mkldnn))
    monkeypatch.setattr(precision, "_cpu_capability", lambda: record)
    monkeypatch.setattr(precision, "_warned_fallback", True)  # keep this test's output quiet
    choice = resolve_precision("auto", "cpu")
    assert (choice.name, choice.dtype) == (expected, getattr(torch, expected))
    assert choice.requested == "auto" and choice.reason


def test_threads_are_a_share_of_this_process_cpus():
    before = torch.get_num_threads()
    try:
        assert threads_per_process(1) == available_cpus()
        assert threads_per_process(available_cpus() * 4) == 1
        assert set_torch_threads(processes=available_cpus() * 4) == 1 == torch.get_num_threads()
        assert set_torch_threads(2) == 2 == torch.get_num_threads()
        with pytest.raises(ValueError, match="processes must be at least 1"):
            threads_per_process(0)
    finally:
        torch.set_num_threads(before)
