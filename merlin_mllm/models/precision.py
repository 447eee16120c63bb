"""The ranker's numeric precision: the names, what ``"auto"`` picks on this machine, and why.

The one home for bf16 detection. A precision is a name (:data:`PRECISIONS`):

``"float32"``
    The default: the precision the reference scores were written in, exact to about 1e-6.
``"bfloat16"``
    Weights in bfloat16 for scoring; training keeps LoRA, the image projector and a hybrid's
    head in float32 and runs the forward under ``torch.autocast(dtype=torch.bfloat16)``. On a
    CPU without native bf16 instructions it still runs, emulated and slower than float32.
``"auto"``
    bfloat16 where the hardware runs it natively, else float32, decided on the machine that
    runs the model (:func:`auto_precision`): CUDA with bf16 support; a CPU whose
    ``/proc/cpuinfo`` flags name ``avx512_bf16`` or ``amx_bf16`` (``bf16`` on Arm) and whose
    oneDNN has bf16 kernels (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``). Nothing is
    assumed from the CPU's model name. When ``auto`` falls back to float32 it says why, once per
    process (:func:`resolve_precision` warns).

int8 (``torch.ao.quantization.quantize_dynamic``) is not offered: it quantizes ``nn.Linear``
modules only, while peft's LoRA layers wrap their base ``Linear`` (the quantized copy would
drop the adapter unless LoRA is merged first, and the merged-weights cache swaps weight
tensors that a quantized module no longer has); and its kernels need fbgemm/VNNI to pay.

Usage::

    from merlin_mllm.models.precision import resolve_precision
    choice = resolve_precision("auto", "cpu")
    choice.dtype, choice.name, choice.reason     # torch.float32, 'float32', 'this CPU has no ...'
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

if TYPE_CHECKING:  # torch is imported where it is used: TrainConfig and the CLI read the names without it
    import torch

__all__ = ["PRECISIONS", "DEFAULT_PRECISION", "PrecisionChoice", "check_precision", "cpu_capability",
           "cpu_bf16_support", "auto_precision", "resolve_precision", "precision_of_dtype"]

log = logging.getLogger(__name__)

#: The precision names a ranker, ``TrainConfig``, the CLI and the export accept.
PRECISIONS = ("float32", "bfloat16", "auto")
#: What a ranker runs in unless told otherwise (and what rankers saved before the setting hold):
#: float32, whose scores the reference fixtures pin on any host.
DEFAULT_PRECISION = "float32"
#: ``/proc/cpuinfo`` flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX-BF16, Arm BF16.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved precision.

    Attributes
    ----------
    name : {"float32", "bfloat16"}
    dtype : torch.dtype
    requested : str
        The name asked for (``"auto"`` or the same as ``name``).
    reason : str
        Why this precision (for ``"auto"``: what was detected).
    """

    name: str
    dtype: "torch.dtype"
    requested: str
    reason: str


def check_precision(name: str) -> str:
    """``name`` when it is one of :data:`PRECISIONS`; a ValueError naming the choices otherwise."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {name!r}")
    return name


def precision_of_dtype(dtype: "torch.dtype") -> str:
    """The precision name of a torch dtype ("float32", "bfloat16"; other dtypes by their torch name)."""
    return str(dtype).replace("torch.", "")


def cpu_capability() -> Dict[str, object]:
    """What this CPU offers for bf16, read from the machine (never from its model name).

    Returns
    -------
    dict
        ``cpu_flags``: the bf16-related flags of ``/proc/cpuinfo`` (None where it cannot be read),
        ``torch_capability``: ``torch.backends.cpu.get_cpu_capability()``,
        ``mkldnn_bf16``: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` (None where missing).
    """
    return dict(_cpu_capability())


@functools.lru_cache(maxsize=1)
def _cpu_capability() -> Tuple[Tuple[str, object], ...]:
    import torch

    flags: Optional[list] = None
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = None
    if text is not None:
        found = set()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                found.update(value.split())
        flags = sorted(f for f in found if f in BF16_CPU_FLAGS or f.startswith(("avx512", "amx")))
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = None
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = None
    return (("cpu_flags", flags), ("torch_capability", capability), ("mkldnn_bf16", mkldnn_bf16))


def cpu_bf16_support() -> Tuple[bool, str]:
    """Whether this CPU runs bf16 natively, and the evidence, as (native, reason)."""
    found = cpu_capability()
    flags, capability, mkldnn_bf16 = found["cpu_flags"], found["torch_capability"], found["mkldnn_bf16"]
    native_flags = [f for f in (flags or []) if f in BF16_CPU_FLAGS]
    evidence = f"cpuinfo bf16 flags {native_flags or 'none'}, torch CPU capability {capability}, " \
               f"oneDNN bf16 {mkldnn_bf16}"
    if flags is None:
        # No /proc/cpuinfo (not Linux): only torch's own report is left.
        native = bool(capability) and ("BF16" in str(capability).upper() or "AMX" in str(capability).upper())
        return native, f"/proc/cpuinfo unreadable; {evidence}"
    if not native_flags:
        return False, f"this CPU has no native bf16 instructions ({evidence}): bf16 would be emulated, slower than fp32"
    if mkldnn_bf16 is False:
        return False, f"this torch's oneDNN has no bf16 kernels for this CPU ({evidence})"
    return True, f"native bf16 on this CPU ({evidence})"


def auto_precision(device: Union[str, "torch.device", None] = None) -> PrecisionChoice:
    """What ``"auto"`` picks on ``device`` (default: CUDA when available, else CPU), and why."""
    import torch

    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bfloat16", torch.bfloat16, "auto",
                                   f"CUDA device {torch.cuda.get_device_name(device)} supports bf16")
        return PrecisionChoice("float32", torch.float32, "auto", "this CUDA device does not support bf16")
    if device.type != "cpu":
        return PrecisionChoice("float32", torch.float32, "auto", f"no bf16 detection for device type {device.type!r}")
    native, reason = cpu_bf16_support()
    return PrecisionChoice("bfloat16" if native else "float32", torch.bfloat16 if native else torch.float32,
                           "auto", reason)


_warned_fallback = False


def resolve_precision(name: Optional[str], device: Union[str, "torch.device", None] = None) -> PrecisionChoice:
    """The dtype of precision ``name`` (None: :data:`DEFAULT_PRECISION`) on ``device``.

    ``"auto"`` that falls back to float32 warns once per process, with the reason.
    """
    import torch

    global _warned_fallback
    name = DEFAULT_PRECISION if name is None else check_precision(name)
    if name != "auto":
        return PrecisionChoice(name, getattr(torch, name), name, "asked for")
    choice = auto_precision(device)
    if choice.name == "float32" and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"precision 'auto' runs float32: {choice.reason}", stacklevel=2)
    else:
        log.info("precision 'auto' runs %s: %s", choice.name, choice.reason)
    return choice
