"""The Triton model configs (``config.pbtxt``) of an export: the ensemble and its two python models.

The I/O contract of the ``mllm_rerank`` ensemble (:data:`INPUTS`, :data:`OUTPUTS`) and the
``ModelConfig`` protobufs :func:`merlin_mllm.serving.export.export` writes; the tensor and model
names come from :mod:`merlin_mllm.serving.steps`.
"""
from __future__ import annotations

import warnings

from google.protobuf import text_format

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # tritonclient warns about absent CUDA
    import tritonclient.grpc.model_config_pb2 as mc

from merlin_mllm.serving.steps import ENSEMBLE_MODEL, FEATURES_MODEL, HEAD_FEATURES_INPUT, RANKER_MODEL, RETRIEVAL_INPUT

__all__ = ["INPUTS", "RANKER_OUTPUTS", "OUTPUTS", "config_text", "ensemble_config", "features_config", "ranker_config"]

#: (name, Triton dtype, dims without the batch dimension, optional) of the ensemble's inputs.
INPUTS = (("user_id", "TYPE_INT64", [1], False), ("item_ids", "TYPE_INT64", [-1], False),
          ("top_k", "TYPE_INT32", [1], True), (RETRIEVAL_INPUT, "TYPE_FP32", [-1], True))
#: (name, Triton dtype, dims) of the ranker model's outputs; the ensemble passes them through.
RANKER_OUTPUTS = (("scores", "TYPE_FP32", [-1]), ("ranked_item_ids", "TYPE_INT64", [-1]),
                  ("ranked_scores", "TYPE_FP32", [-1]))
#: The ensemble's outputs: the ranker's, plus the features model's cold-start flag.
OUTPUTS = RANKER_OUTPUTS + (("known_user", "TYPE_BOOL", [1]),)

def config_text(config) -> str:
    """A model config protobuf as the text of a ``config.pbtxt``."""
    return text_format.MessageToString(config)


def ensemble_config(max_batch_size: int, n_head_features: int = 0):
    """The ``mllm_rerank`` ensemble config (a ModelConfig protobuf); a hybrid's with ``n_head_features``."""
    config = mc.ModelConfig(name=ENSEMBLE_MODEL, platform="ensemble", max_batch_size=max_batch_size)
    for name, dtype, dims, optional in INPUTS:
        config.input.add(name=name, data_type=getattr(mc, dtype), dims=dims, optional=optional)
    for name, dtype, dims in OUTPUTS:
        config.output.add(name=name, data_type=getattr(mc, dtype), dims=dims)
    features = config.ensemble_scheduling.step.add(model_name=FEATURES_MODEL, model_version=-1)
    for name, *_ in INPUTS:
        features.input_map[name] = name
    for name in ("prompt_ids", "prompt_lengths", "top_k_resolved"):
        features.output_map[name] = f"_{name}"
    features.output_map["known_user"] = "known_user"  # straight to the ensemble's output
    ranker = config.ensemble_scheduling.step.add(model_name=RANKER_MODEL, model_version=-1)
    ranker.input_map["prompt_ids"] = "_prompt_ids"
    ranker.input_map["prompt_lengths"] = "_prompt_lengths"
    ranker.input_map["top_k_resolved"] = "_top_k_resolved"
    ranker.input_map["item_ids"] = "item_ids"
    if n_head_features:
        features.output_map[HEAD_FEATURES_INPUT] = f"_{HEAD_FEATURES_INPUT}"
        ranker.input_map[HEAD_FEATURES_INPUT] = f"_{HEAD_FEATURES_INPUT}"
    for name, *_ in RANKER_OUTPUTS:
        ranker.output_map[name] = name
    return config


def features_config(max_batch_size: int, instances: int, n_head_features: int = 0):
    """The ``mllm_features`` python-backend config (CPU instances); a hybrid's with ``n_head_features``."""
    config = mc.ModelConfig(name=FEATURES_MODEL, backend="python", max_batch_size=max_batch_size)
    for name, dtype, dims, optional in INPUTS:
        config.input.add(name=name, data_type=getattr(mc, dtype), dims=dims, optional=optional)
    config.output.add(name="prompt_ids", data_type=mc.TYPE_INT64, dims=[-1, -1])
    config.output.add(name="prompt_lengths", data_type=mc.TYPE_INT64, dims=[-1])
    config.output.add(name="top_k_resolved", data_type=mc.TYPE_INT32, dims=[1])
    config.output.add(name="known_user", data_type=mc.TYPE_BOOL, dims=[1])
    if n_head_features:
        config.output.add(name=HEAD_FEATURES_INPUT, data_type=mc.TYPE_FP32, dims=[-1, int(n_head_features)])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    return config


def ranker_config(max_batch_size: int, *, gpu: bool, instances: int, dynamic_batching: bool,
                  max_batch_delay_us: int, precision: str, torch_threads: int, n_head_features: int = 0):
    """The ``mllm_ranker`` python-backend config (GPU or CPU instances, dynamic batching); a hybrid's
    (``n_head_features``) also reads the head's features of every candidate."""
    config = mc.ModelConfig(name=RANKER_MODEL, backend="python", max_batch_size=max_batch_size)
    # Ragged: requests with different candidate counts and prompt lengths may share a batch; the
    # python backend hands them over as separate requests anyway.
    config.input.add(name="prompt_ids", data_type=mc.TYPE_INT64, dims=[-1, -1], allow_ragged_batch=True)
    config.input.add(name="prompt_lengths", data_type=mc.TYPE_INT64, dims=[-1], allow_ragged_batch=True)
    config.input.add(name="item_ids", data_type=mc.TYPE_INT64, dims=[-1], allow_ragged_batch=True)
    config.input.add(name="top_k_resolved", data_type=mc.TYPE_INT32, dims=[1])
    if n_head_features:
        config.input.add(name=HEAD_FEATURES_INPUT, data_type=mc.TYPE_FP32, dims=[-1, int(n_head_features)],
                         allow_ragged_batch=True)
    for name, dtype_name, dims in RANKER_OUTPUTS:
        config.output.add(name=name, data_type=getattr(mc, dtype_name), dims=dims)
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=instances)
    if dynamic_batching:
        config.dynamic_batching.max_queue_delay_microseconds = int(max_batch_delay_us)
    config.parameters["precision"].string_value = precision
    config.parameters["torch_threads"].string_value = str(int(torch_threads))
    return config
