"""The one place where merlin.models.torch 23.12 is patched to run here (Python 3.11, HF models).

Three problems, each fixed once, by :func:`apply` (idempotent; the ranker package calls it on
import):

1. ``mm.Model.setup``/``teardown`` build the loop's attribute name as ``f"{stage}_loop"``. Lightning
   passes ``stage`` as ``TrainerFn``, a ``(str, Enum)``; from Python 3.11 formatting such an enum
   gives ``"TrainerFn.FITTING"`` rather than ``"fit"``, so ``trainer.fit_loop`` is never found.
   The patch hands the original methods ``stage.value``.
2. ``mm.schema.trace`` (run by ``Model.initialize``, i.e. at ``trainer.fit`` start) puts a forward
   hook on *every* submodule and reads ``inputs[0]``. Hugging Face submodules are called with
   keyword arguments only (empty positional ``inputs``: ``IndexError``) and return objects that
   Merlin's schema dispatch does not know (``ModelOutput``, caches: ``NotImplementedError``).
   The patched ``trace`` skips such modules; they carry no Merlin schema anyway. Everything
   else is traced exactly as before.
3. merlin.models.torch imports ``pytorch_lightning`` without declaring it as a dependency;
   :func:`apply` fails early with an install hint instead of a bare ``ModuleNotFoundError`` deep
   inside merlin.

Also here: :func:`quiet_known_warnings`, which hides the third-party warnings that this stack
raises on every training or scoring run and that ask nothing of the user (listed, with the
reason each is harmless, in :data:`KNOWN_WARNINGS`).

Usage::

    from merlin_mllm import merlin_compat
    merlin_compat.apply()          # safe to call many times
    import merlin.models.torch as mm
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Dict, Tuple, Union

import torch
from torch import nn

__all__ = ["apply", "is_applied", "quiet_known_warnings", "KNOWN_WARNINGS"]

#: Message patterns (regular expressions matched at the start) of warnings that come with this
#: stack on every run and say nothing about the user's data or settings.
KNOWN_WARNINGS = (
    # merlin.io.Dataset(cpu=True) is this project's supported CPU (pandas) path.
    r"Initializing an NVTabular Dataset in CPU mode",
    # merlin.models.torch's schema checks call torch.jit.isinstance in eager mode.
    r"The inner type of a container is lost",
    # Lightning 2.6's own use of a torch 2.13 deprecation.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # LoRA keeps the frozen base model in eval mode on purpose.
    r"Found \d+ module\(s\) in eval mode",
    # peft calls transformers' old name for gradient checkpointing.
    r"`is_gradient_checkpointing` is deprecated",
    # A mid-epoch resume: training's RestOfEpoch rebuilds the epoch and skips what was trained.
    r"You're resuming from a checkpoint that ended before the epoch ended",
    # Lightning's per-batch metrics on a batch of one class; evaluation computes its own.
    r"No (positive|negative) samples in targets",
    r"Trying to infer the `batch_size` from an ambiguous collection",
    # Lightning suggests DataLoader workers and sync_dist logging; Merlin's loader has its own threads.
    r".*(num_workers|sync_dist|does not have many workers)",
)

_PATCH_MARK = "_merlin_mllm_patched"


def _require_lightning() -> None:
    try:
        import pytorch_lightning  # noqa: F401
    except ModuleNotFoundError as error:  # pragma: no cover - the project pins it
        raise ModuleNotFoundError(
            "merlin.models.torch needs pytorch_lightning but does not declare it; "
            "install it with `pip install pytorch-lightning==2.6.6`"
        ) from error


def _stage_value(stage):
    return getattr(stage, "value", stage)


def _patch_stage_hooks(model_cls) -> None:
    for name in ("setup", "teardown"):
        original = getattr(model_cls, name)
        if getattr(original, _PATCH_MARK, False):
            continue

        @functools.wraps(original)
        def patched(self, stage, _original=original):
            return _original(self, _stage_value(stage))

        patched.original = original
        setattr(patched, _PATCH_MARK, True)
        setattr(model_cls, name, patched)


def _make_trace(schema_module):
    """``merlin.models.torch.schema.trace`` with a hook that skips modules it cannot describe."""
    input_schema = schema_module.input_schema
    output_schema = schema_module.output_schema
    initialize_from_schema = schema_module.initialize_from_schema
    check_batch_arg = schema_module.check_batch_arg

    def describable(value) -> bool:
        try:
            input_schema.get_schema(value)
        except NotImplementedError:
            return False
        return True

    def trace(module: nn.Module, inputs: Union[torch.Tensor, Dict[str, torch.Tensor]], **kwargs):
        hooks = []
        batch = kwargs.get("batch")

        def _hook(mod: nn.Module, args: Tuple, outputs):
            # The fix: keyword-only calls (args == ()) and non-tensor inputs/outputs are HF
            # internals, not Merlin blocks; the original hook crashed on them.
            if not args or not describable(args[0]) or not describable(outputs):
                return
            if not hasattr(mod, "__input_schemas"):
                mod.__input_schemas = ()
                mod.__output_schemas = ()
                mod.__feature_schema = None

            _input_schema = input_schema.trace(mod, args[0])
            initialize_from_schema(mod, _input_schema)

            if _input_schema not in mod.__input_schemas:
                mod.__input_schemas += (_input_schema,)
                mod.__output_schemas += (output_schema.trace(mod, _input_schema, outputs),)

            if not isinstance(mod, torch.jit.TracedModule):
                accepts_batch, requires_batch = check_batch_arg(mod)
                if requires_batch and batch is None:
                    raise ValueError(
                        f"Found module {mod} that requires a batch; `trace` was called without one."
                    )
                if accepts_batch and hasattr(mod, "compute_feature_schema"):
                    feature_schema = input_schema.tensors(batch.features)
                    mod.__feature_schema = mod.compute_feature_schema(feature_schema)
                elif requires_batch:
                    mod.__feature_schema = input_schema.tensors(batch.features)

        def add_hook(m):
            custom_modules = list(output_schema.dispatcher.registry.keys())
            if m and isinstance(m, tuple(custom_modules[1:])):
                return
            hooks.append(m.register_forward_hook(_hook))

        module.apply(add_hook)
        try:
            return module(inputs, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    trace.__doc__ = schema_module.trace.__doc__
    trace.original = schema_module.trace  # kept for tests and debugging
    setattr(trace, _PATCH_MARK, True)
    return trace


def is_applied() -> bool:
    """Whether :func:`apply` has patched merlin.models.torch in this process."""
    import merlin.models.torch.schema as schema_module

    return bool(getattr(schema_module.trace, _PATCH_MARK, False))


@contextlib.contextmanager
def quiet_known_warnings():
    """Hide the warnings in :data:`KNOWN_WARNINGS` inside the block; every other warning shows."""
    with warnings.catch_warnings():
        for pattern in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def apply() -> None:
    """Patch merlin.models.torch 23.12 in place (see the module docstring). Idempotent."""
    _require_lightning()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merlin warns about absent TensorFlow / GPU libraries
        import merlin.models.torch as mm
        import merlin.models.torch.schema as schema_module

    _patch_stage_hooks(mm.Model)
    if not getattr(schema_module.trace, _PATCH_MARK, False):
        # Model.initialize looks the function up on the module at call time
        # (`from merlin.models.torch import schema; schema.trace(...)`), so rebinding it is enough.
        patched = _make_trace(schema_module)
        schema_module.trace = patched
