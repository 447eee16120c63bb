"""Triton python-backend model ``mllm_ranker``: tokenized prompts -> P(yes) and the top-k.

Copied by ``merlin-mllm export`` into ``<repo>/mllm_ranker/1/model.py``. Its artefacts (the
ranker with its LoRA adapter and projector, the item image table) sit beside it in
``1/artifacts/``; the logic is :class:`merlin_mllm.serving.ranker_step.RankerStep`. Each user row
is scored with the shared user prefix computed once (``RankerModel.score_token_ids``).

An instance of kind GPU runs on its assigned device; ``parameters { key: "precision" }`` picks
what it runs in there (float32, bfloat16, or auto: decided on this machine by
:mod:`merlin_mllm.models.precision`; empty: the saved ranker's). ``torch_threads`` sets the CPU
threads of this process (0: its share of the CPUs among the model's CPU instances,
:func:`merlin_mllm.models.threads.set_torch_threads`, so instances do not oversubscribe them).

Inputs (batch dimension first): prompt_ids INT64 [-1, -1], prompt_lengths INT64 [-1],
item_ids INT64 [-1], top_k_resolved INT32 [1], and for a hybrid ranker head_features FP32
[-1, F] (its head's features of each candidate, from mllm_features)
Outputs: scores FP32 [-1] (input order; a hybrid's: sigmoid(head logit + LLM logit)),
ranked_item_ids INT64 [-1], ranked_scores FP32 [-1]

The requests of one dynamic batch are scored together (``RankerStep.score_users``): every
user's prefix once, then the candidates of all users in shared forward passes.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# Importing merlin_mllm (before torch) pins MKL's reproducible mode: see merlin_mllm/__init__.py.
from merlin_mllm.models.threads import set_torch_threads
from merlin_mllm.serving.ranker_step import RankerStep
from merlin_mllm.serving.steps import ARTIFACTS_DIR, HEAD_FEATURES_INPUT, RequestError, rank_scores


def _version_dir(args) -> Path:
    repository = Path(args["model_repository"])
    if repository.suffix == ".py":
        return repository.parent
    return repository / str(args["model_version"])


def _parameters(config) -> dict:
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


class TritonPythonModel:
    """Scores one user's candidates per request row (see the module docstring)."""

    def initialize(self, args):
        import torch

        self.logger = pb_utils.Logger
        self.model_name = args["model_name"]
        config = json.loads(args["model_config"])
        parameters = _parameters(config)
        cpu_instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])
                            if group.get("kind") == "KIND_CPU") or 1
        set_torch_threads(int(parameters.get("torch_threads") or 0), processes=cpu_instances)
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        else:
            device = "cpu"
        self.step = RankerStep.load(_version_dir(args) / ARTIFACTS_DIR, device=device,
                                    precision=parameters.get("precision") or None)
        self.step.warm_up()
        hybrid = f", hybrid head over {list(self.step.head.feature_names)}" if self.step.head is not None else ""
        self.logger.log_info(f"{self.model_name}: ranker on {device}, {self.step.ranker.dtype} "
                             f"(precision {self.step.ranker.config.precision}), "
                             f"{torch.get_num_threads()} CPU threads{hybrid}")

    def execute(self, requests):
        # Dynamic batching hands over several requests at once. Their user rows are scored
        # together (RankerStep.score_users: each user's prefix cache computed once, the
        # candidates of all users in shared forward passes), then split back per request.
        parsed, responses = [], [None] * len(requests)
        for index, request in enumerate(requests):
            try:
                rows = RankerStep.unpad(
                    pb_utils.get_input_tensor_by_name(request, "prompt_ids").as_numpy(),
                    pb_utils.get_input_tensor_by_name(request, "prompt_lengths").as_numpy(),
                    pb_utils.get_input_tensor_by_name(request, "item_ids").as_numpy(),
                )
                top_k = int(pb_utils.get_input_tensor_by_name(request, "top_k_resolved").as_numpy().reshape(-1)[0])
                head_features = pb_utils.get_input_tensor_by_name(request, HEAD_FEATURES_INPUT)  # a hybrid's
                features = None if head_features is None else list(head_features.as_numpy())
                parsed.append((index, rows, top_k, features))
            except Exception as err:
                responses[index] = self._error(err)
        try:
            per_request = [features for *_, features in parsed]
            features = ([f for request_features in per_request for f in request_features]
                        if per_request and all(f is not None for f in per_request) else None)
            scores = self.step.score_users([row for _, rows, *_ in parsed for row in rows], features)
        except Exception as err:  # score one request at a time, so only a faulty one fails
            self.logger.log_warn(f"{self.model_name}: batched scoring failed ({type(err).__name__}: {err}); "
                                 "scoring requests one by one")
            scores = None
        offset = 0
        for index, rows, top_k, features in parsed:
            try:
                if scores is not None:
                    mine = scores[offset:offset + len(rows)]
                else:
                    mine = self.step.score_users(rows, features)
                offset += len(rows)
                responses[index] = self._response(rows, np.stack(mine), top_k)
            except Exception as err:
                responses[index] = self._error(err)
        return responses

    @staticmethod
    def _response(rows, scores, top_k):
        ranked = [rank_scores(items, row_scores, top_k) for (_, items), row_scores in zip(rows, scores)]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("scores", scores.astype(np.float32)),
            pb_utils.Tensor("ranked_item_ids", np.stack([r[0] for r in ranked]).astype(np.int64)),
            pb_utils.Tensor("ranked_scores", np.stack([r[1] for r in ranked]).astype(np.float32)),
        ])

    def _error(self, err):
        if isinstance(err, RequestError):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG))
        # A bug must fail this request only, never the server.
        self.logger.log_error(f"{self.model_name}: {type(err).__name__}: {err}")
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.model_name} failed: {type(err).__name__}: {err}"))

    def finalize(self):
        self.step = None
