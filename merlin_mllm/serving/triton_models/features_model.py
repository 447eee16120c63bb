"""Triton python-backend model ``mllm_features``: request -> tokenized ranker prompts.

Copied by ``merlin-mllm export`` into ``<repo>/mllm_features/1/model.py``. Its artefacts (user
summaries, item titles and image flags, the fitted NVTabular workflow) sit beside it in
``1/artifacts/``; the logic is :class:`merlin_mllm.serving.steps.FeatureStep`, so the server's
Python must import ``merlin_mllm`` (``merlin-mllm serve`` puts this project's venv first on PATH).

Inputs (batch dimension first):  user_id INT64 [1], item_ids INT64 [-1], top_k INT32 [1] (optional),
retrieval_scores FP32 [-1] (optional: the retrieval stage's score of each candidate)
Outputs: prompt_ids INT64 [-1, -1], prompt_lengths INT64 [-1], top_k_resolved INT32 [1],
known_user BOOL [1] (False: a cold start, scored with the empty-history summary), and for a
hybrid ranker head_features FP32 [-1, F] (the head's F tabular features of each candidate:
the fitted CollaborativeFeatures workflow's counts, and retrieval_score from retrieval_scores)

A bad request (unknown item id, empty or too long candidate list, bad top_k; an unknown user
when the export was made with ``unknown_users="error"``; a hybrid whose head reads
retrieval_score asked without retrieval_scores) gets an error response naming the problem; the
model and the server stay up.

Cold starts are counted: each request with unknown users logs (INFO) their ids and the running
counts, and unloading the model logs the totals.
"""
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from merlin_mllm.serving.steps import (
    ARTIFACTS_DIR,
    HEAD_FEATURES_INPUT,
    RETRIEVAL_INPUT,
    FeatureStep,
    RequestError,
    UnknownUserError,
)


def _version_dir(args) -> Path:
    # args["model_repository"] is this model's folder; some Triton releases passed model.py itself.
    repository = Path(args["model_repository"])
    if repository.suffix == ".py":
        return repository.parent
    return repository / str(args["model_version"])


class TritonPythonModel:
    """Builds the ranker prompts of one request per user row (see the module docstring)."""

    def initialize(self, args):
        self.logger = pb_utils.Logger
        self.step = FeatureStep.load(_version_dir(args) / ARTIFACTS_DIR)
        self.step.warm_up()
        self.model_name = args["model_name"]
        config = json.loads(args["model_config"])
        self.output_dtypes = {
            output["name"]: pb_utils.triton_string_to_numpy(output["data_type"]) for output in config["output"]
        }

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                user_ids = pb_utils.get_input_tensor_by_name(request, "user_id").as_numpy()
                item_ids = pb_utils.get_input_tensor_by_name(request, "item_ids").as_numpy()
                top_k = pb_utils.get_input_tensor_by_name(request, "top_k")
                retrieval = pb_utils.get_input_tensor_by_name(request, RETRIEVAL_INPUT)
                prepared = self.step.prepare(user_ids, item_ids, None if top_k is None else top_k.as_numpy(),
                                             None if retrieval is None else retrieval.as_numpy())
                tensors = [
                    pb_utils.Tensor("prompt_ids", prepared["prompt_ids"].astype(self.output_dtypes["prompt_ids"])),
                    pb_utils.Tensor("prompt_lengths", prepared["prompt_lengths"].astype(self.output_dtypes["prompt_lengths"])),
                    pb_utils.Tensor("top_k_resolved", prepared["top_k"].astype(self.output_dtypes["top_k_resolved"])),
                    pb_utils.Tensor("known_user", prepared["known_user"].astype(bool)),
                ]
                if HEAD_FEATURES_INPUT in prepared:  # a hybrid ranker: its head's features
                    head = prepared[HEAD_FEATURES_INPUT].astype(self.output_dtypes[HEAD_FEATURES_INPUT])
                    tensors.append(pb_utils.Tensor(HEAD_FEATURES_INPUT, head))
                if not prepared["known_user"].all():
                    unknown = user_ids.reshape(-1)[~prepared["known_user"].reshape(-1)]
                    self._log_cold_start(unknown, "served the empty-history summary")
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except RequestError as err:
                if isinstance(err, UnknownUserError):
                    self._log_cold_start(err.user_ids, "rejected (unknown_users='error')")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG)))
            except Exception as err:  # a bug must fail this request only, never the server
                self.logger.log_error(f"{self.model_name}: {type(err).__name__}: {err}")
                message = f"{self.model_name} failed: {type(err).__name__}: {err}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses

    def _log_cold_start(self, unknown, what):
        step = self.step
        unknown = list(dict.fromkeys(int(u) for u in unknown))
        self.logger.log_info(
            f"{self.model_name}: cold start: unknown user id(s) {', '.join(map(str, unknown))} {what}; "
            f"{step.cold_start_rows} cold-start rows in {step.cold_start_requests} of {step.requests} requests so far"
        )

    def finalize(self):
        step = self.step
        if step is not None:
            self.logger.log_info(
                f"{self.model_name}: {step.requests} requests, {step.cold_start_requests} with unknown users "
                f"({step.cold_start_rows} cold-start rows, unknown_users={step.unknown_users!r})"
            )
        self.step = None
