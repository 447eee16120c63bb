"""``MLLMRerank``: the MLLM ranker as a merlin.systems operator (e.g. retrieval >> MLLM rerank).

The operator runs the same feature and ranker steps as the Triton ensemble
(:mod:`merlin_mllm.serving.steps`, :mod:`merlin_mllm.serving.ranker_step`): each input row is one user with a list of candidate item
ids; the output has, per row, P(yes) for every candidate in input order and the top-k.

==========================  ============================  ==========================================
column                      dtype                         meaning
==========================  ============================  ==========================================
``user_id``  (in)           int64                         the user (unknown: see ``unknown_users``)
``item_ids`` (in)           int64 list (ragged or fixed)  candidate item ids (1 .. max_candidates)
``retrieval_scores`` (in)   float32 list, optional        the retrieval stage's score of each
                                                          candidate (aligned with ``item_ids``): a
                                                          hybrid's ``retrieval_score`` feature
``scores``                  float32 list, ragged          P(yes) per candidate, input order (a
                                                          hybrid: sigmoid(head + LLM logit))
``ranked_item_ids``         int64 list, ragged            the best ``top_k``, highest first
``ranked_scores``           float32 list, ragged          their scores
``known_user``              bool                          False: a cold start (empty-history summary)
==========================  ============================  ==========================================

A hybrid ranker (``hybrid_head.safetensors`` beside it) is served as the Triton export serves
it: the head's collaborative features come from the ``CollaborativeFeatures`` workflow fitted on
the events logged before serving, its ``retrieval_score`` from the retrieval column, which a
head that reads it requires (the error names the column). Put the retrieval stage's scores in
the selector: ``["user_id", "item_ids", "retrieval_scores"] >> MLLMRerank(...)``.

In a Triton request to the exported executor model, ragged lists travel as
``<name>__values`` + ``<name>__offsets`` (merlin.systems' convention).

Export for Triton with :func:`export_python_only` (or ``ensemble.export(path,
runtime=PythonOnlyRuntime())``): merlin.systems' default runtime would give PyTorch operators a
``pytorch_libtorch`` model; this runtime's operator table is empty, so every operator stays
inside the python-backend executor model. The operator class is pickled by reference, so the
server's Python must import ``merlin_mllm`` (``merlin-mllm serve`` takes care of it).

Usage::

    from merlin.schema import ColumnSchema, Schema
    from merlin.systems.dag import Ensemble
    from merlin_mllm.serving.systems import MLLMRerank, export_python_only

    schema = Schema([ColumnSchema("user_id", dtype="int64"),
                     ColumnSchema("item_ids", dtype="int64", is_list=True, is_ragged=True)])
    rerank = ["user_id", "item_ids"] >> MLLMRerank("runs/ranker/model", "data/summaries", "data/ml100k")
    # a hybrid ranker: ["user_id", "item_ids", "retrieval_scores"] >> MLLMRerank(...)
    ensemble = Ensemble(rerank, schema)
    out = ensemble.transform(pandas_frame)        # in-process
    export_python_only(ensemble, "triton_repo")   # Triton: executor_model (python backend)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import merlin.dtypes as md
    from merlin.dag import BaseOperator, ColumnSelector, DataFormats
    from merlin.schema import ColumnSchema, Schema, Tags
    from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime
    from merlin.table import TensorColumn

from merlin_mllm.models.loading import default_device
from merlin_mllm.ranker.hybrid_head import saved_head
from merlin_mllm.ranker.saved import trained_model_dir
from merlin_mllm.serving.steps import (
    ARTIFACTS_DIR,
    ENSEMBLE_MODEL,
    RETRIEVAL_INPUT,
    FEATURES_CONFIG,
    FEATURES_MODEL,
    RANKER_MODEL,
    FeatureStep,
    RequestError,
    ServingLimits,
    rank_scores,
)
from merlin_mllm.serving.export import (
    fit_prompt_workflow,
    head_features_for,
    item_table,
    load_export_ranker,
    prompt_token_limit,
    user_summary_table,
)
from merlin_mllm.serving.ranker_step import RankerStep
from merlin_mllm.summaries.candidates import candidate_summaries
from merlin_mllm.summaries.user_prompts import EMPTY_HISTORY_SUMMARY

__all__ = ["MLLMRerank", "PythonOnlyRuntime", "export_python_only"]

OUTPUT_COLUMNS = ("scores", "ranked_item_ids", "ranked_scores", "known_user")


class PythonOnlyRuntime(TritonExecutorRuntime):
    """merlin.systems' Triton runtime with an empty operator table: one python-backend model.

    The default table turns ``PredictPyTorch`` into a ``pytorch_libtorch`` model and
    ``TransformWorkflow`` into a separate model; with no table, every operator runs inside the
    ``executor_model`` (python backend), which is all the bundled Triton server has.
    """

    def __init__(self):
        super().__init__()
        self.op_table = {}


def export_python_only(ensemble, path: Union[str, os.PathLike], name: str = "executor_model"):
    """Export a merlin.systems ``Ensemble`` as one python-backend Triton model (``name``)."""
    return ensemble.export(str(path), runtime=PythonOnlyRuntime(), name=name)


class MLLMRerank(BaseOperator):
    """Rerank each row's candidate items for its user with the MLLM ranker (see the module docstring).

    Build it from a trained ranker, or from a Triton export (:meth:`from_export`).

    Parameters
    ----------
    model_dir : path
        A trained ranker folder (as ``merlin-mllm export`` takes).
    summaries : path or DataFrame
        The summary store (or user-summary table).
    data_dir : path
        The prepared dataset (catalogue, titles, users).
    user_column, items_column : str
        Input column names.
    retrieval_column : str
        The optional input column of retrieval-stage scores, a list aligned with
        ``items_column`` (default ``"retrieval_scores"``): a hybrid's ``retrieval_score``
        feature, used when the operator's selector includes it.
    top_k : int
        Ranked items per row.
    max_candidates : int
        The most candidates per row; more raise an error naming the row.
    user_summaries : {"last_row", "store_latest"}
        See :func:`merlin_mllm.serving.export.user_summary_table`.
    unknown_users : {"empty_summary", "error"}
        A user without a summary is scored with the empty-history summary (``known_user``
        False), or (``"error"``) the transform raises a ValueError naming the row and user.
    max_prompt_tokens : int, optional
        The prompt cut; default the training run's (see
        :func:`merlin_mllm.serving.export.prompt_token_limit`).
    events : DataFrame or path, optional
        A hybrid only: the events logged before serving, to fit its collaborative features on
        (default: :func:`merlin_mllm.serving.export.events_before_serving` of ``data_dir``).
    recent_days : float, optional
        A hybrid only: the collaborative features' recent window (default 30, the pipelines').
    device : optional
        Where the ranker runs (default: CUDA when available).
    precision : {"float32", "bfloat16", "auto"}, optional
        What the ranker runs in (default: the saved ranker's, or the export's).
    name : str
        Folder name of this operator's artefacts (distinct per operator in one graph).

    Examples
    --------
    >>> rerank = ["user_id", "item_ids"] >> MLLMRerank("runs/ranker/model", "data/summaries", "data/ml100k")  # doctest: +SKIP
    """

    def __init__(
        self,
        model_dir: Union[str, os.PathLike, None] = None,
        summaries=None,
        data_dir: Union[str, os.PathLike, None] = None,
        *,
        user_column: str = "user_id",
        items_column: str = "item_ids",
        retrieval_column: str = RETRIEVAL_INPUT,
        top_k: int = 10,
        max_candidates: int = 100,
        user_summaries: str = "last_row",
        unknown_users: str = "empty_summary",
        max_prompt_tokens: Optional[int] = None,
        events=None,
        recent_days: Optional[float] = None,
        device: Optional[str] = None,
        precision: Optional[str] = None,
        scoring_batch_size: int = 32,
        name: str = ENSEMBLE_MODEL,
        _steps=None,
    ):
        super().__init__()
        if int(top_k) < 1:
            raise ValueError(f"top_k must be at least 1, not {top_k}")
        self.user_column = user_column
        self.items_column = items_column
        self.retrieval_column = retrieval_column
        self.top_k = int(top_k)
        self.device = device
        self.precision = precision
        self.name = name
        self._model_dir = None
        # Folders holding saved steps (an export, or loaded artefacts): loaded on first use.
        self._folders: Optional[tuple] = None
        if _steps is not None:
            self._features, self._ranker, self._model_dir, self._folders = _steps
            return
        if model_dir is None or summaries is None or data_dir is None:
            raise ValueError("MLLMRerank needs model_dir, summaries and data_dir (or use MLLMRerank.from_export)")
        head = saved_head(model_dir)
        head_features = head_features_for(head, data_dir, events, recent_days)
        target = torch.device(device) if device is not None else default_device()
        with tempfile.TemporaryDirectory() as cache:
            ranker = load_export_ranker(model_dir, data_dir, cache_dir=Path(cache), device=target,
                                        precision=precision)
        items = item_table(data_dir, ranker, candidate_summaries(summaries))
        users = user_summary_table(summaries, data_dir, user_summaries, context=ranker.config.user_context,
                                   titles=ranker.config.context_titles, item_slots=ranker.config.collab_tokens,
                                   ratings=ranker.config.context_ratings, attributes=ranker.config.context_attributes)
        limits = ServingLimits(max_candidates=int(max_candidates), top_k_default=self.top_k)
        workflow = fit_prompt_workflow(ranker, items, prompt_token_limit(model_dir, max_prompt_tokens)[0])
        self._features = FeatureStep(users, items, workflow, limits, EMPTY_HISTORY_SUMMARY, unknown_users, head_features)
        self._ranker = RankerStep(ranker, batch_size=scoring_batch_size, head=head)
        self._model_dir = trained_model_dir(model_dir).resolve()

    @classmethod
    def from_export(cls, repository: Union[str, os.PathLike], *, device=None, precision=None,
                    **options) -> "MLLMRerank":
        """The operator over the artefacts of a ``merlin-mllm export`` repository (same scores).

        Nothing is loaded until the first ``transform``: building and exporting a graph does
        not need the model in memory.
        """
        repository = Path(repository)
        features = repository / FEATURES_MODEL / "1" / ARTIFACTS_DIR
        ranker = repository / RANKER_MODEL / "1" / ARTIFACTS_DIR
        if not (features / FEATURES_CONFIG).is_file() or not (ranker / "ranker").is_dir():
            raise FileNotFoundError(f"{repository} is not a `merlin-mllm export` repository (no {features / FEATURES_CONFIG})")
        limits = json.loads((features / FEATURES_CONFIG).read_text(encoding="utf-8"))["limits"]
        options.setdefault("top_k", limits["top_k_default"])
        return cls(device=device, precision=precision, _steps=(None, None, ranker / "ranker", (features, ranker)),
                   **options)

    def renamed(self, *, user_column: Optional[str] = None, items_column: Optional[str] = None,
                retrieval_column: Optional[str] = None, top_k: Optional[int] = None) -> "MLLMRerank":
        """Another operator over the same loaded ranker, reading other columns (no second model in memory)."""
        self._require_loaded()
        return MLLMRerank(
            user_column=user_column or self.user_column, items_column=items_column or self.items_column,
            retrieval_column=retrieval_column or self.retrieval_column,
            top_k=top_k or self.top_k, device=self.device, precision=self.precision, name=self.name,
            _steps=(self._features, self._ranker, self._model_dir, self._folders),
        )

    # -- pickling: the model and tables travel as artefacts, not in the pickle
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_features"] = None
        state["_ranker"] = None
        return state

    def _folder(self, artifact_path) -> Path:
        return Path(artifact_path) / self.name

    def save_artifacts(self, artifact_path: Optional[os.PathLike] = None) -> None:
        """Write the feature step and the ranker (adapter, projector, image table) under ``artifact_path/name``."""
        if not artifact_path:
            return
        folder = self._folder(artifact_path)
        if self._features is None and self._folders is not None:
            # Not loaded (from_export): the saved steps are copied as they are.
            for source, name in zip(self._folders, ("features", "ranker")):
                if (folder / name).exists():
                    shutil.rmtree(folder / name)
                shutil.copytree(source, folder / name)
            return
        self._require_loaded()
        self._features.save(folder / "features")
        ranker = self._ranker.ranker
        table = ranker.item_features if ranker.config.use_images else None
        RankerStep.write(folder / "ranker", self._model_dir, table, batch_size=self._ranker.batch_size,
                         precision=self.precision)

    def load_artifacts(self, artifact_path: Optional[os.PathLike] = None) -> None:
        """Load what :meth:`save_artifacts` wrote (in the Triton executor model)."""
        if not artifact_path:  # merlin.dag's Graph calls load_artifacts("") on construction
            return
        folder = self._folder(artifact_path)
        self._folders = (folder / "features", folder / "ranker")
        self._features = self._ranker = None
        self._require_loaded()  # now, at model load, rather than in the first request
        self._model_dir = folder / "ranker" / "ranker"

    def _require_loaded(self):
        if (self._features is None or self._ranker is None) and self._folders is not None:
            self._features = FeatureStep.load(self._folders[0])
            self._ranker = RankerStep.load(self._folders[1], device=self.device, precision=self.precision)
        if self._features is None or self._ranker is None:
            raise RuntimeError("MLLMRerank has no model loaded: call load_artifacts(path) first")

    # -- schema
    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema=None) -> Schema:
        names = col_selector.names if col_selector else input_schema.column_names
        missing = [c for c in (self.user_column, self.items_column) if c not in names]
        if missing:
            raise ValueError(
                f"MLLMRerank needs the columns {missing} (user_column={self.user_column!r}, "
                f"items_column={self.items_column!r}); got {list(names)}"
            )
        return Schema([
            ColumnSchema("scores", dtype=md.float32, is_list=True, is_ragged=True, tags=[Tags.CONTINUOUS]),
            ColumnSchema("ranked_item_ids", dtype=md.int64, is_list=True, is_ragged=True, tags=[Tags.ITEM_ID]),
            ColumnSchema("ranked_scores", dtype=md.float32, is_list=True, is_ragged=True, tags=[Tags.CONTINUOUS]),
            ColumnSchema("known_user", dtype=md.boolean),
        ])

    def column_mapping(self, col_selector):
        inputs = [self.user_column, self.items_column]
        if col_selector and self.retrieval_column in col_selector.names:
            inputs.append(self.retrieval_column)
        return {name: inputs for name in OUTPUT_COLUMNS}

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_TENSOR_TABLE

    # -- transform
    def _candidate_lists(self, column, name: Optional[str] = None):
        values = np.asarray(column.values)
        offsets = column.offsets
        if offsets is not None:
            offsets = np.asarray(offsets).reshape(-1)
            return [values[offsets[i]:offsets[i + 1]].reshape(-1) for i in range(len(offsets) - 1)]
        if values.ndim == 2:
            return [row for row in values]
        raise ValueError(
            f"MLLMRerank: column {name or self.items_column!r} must be a list per row, aligned with the "
            f"candidate item ids (shape {list(values.shape)} given)"
        )

    def transform(self, col_selector: ColumnSelector, transformable):
        """Score every row's candidates; returns ``scores``, ``ranked_item_ids``, ``ranked_scores``, ``known_user``.

        A hybrid whose head reads ``retrieval_score`` needs the ``retrieval_column`` (the
        ValueError names it); each row's scores must align with its candidates.
        """
        self._require_loaded()
        users_column = np.asarray(transformable[self.user_column].values).reshape(-1)
        lists = self._candidate_lists(transformable[self.items_column])
        if len(lists) != len(users_column):
            raise ValueError(f"MLLMRerank: {len(users_column)} users but {len(lists)} candidate lists")
        retrieval = None
        if self.retrieval_column in transformable.columns:
            retrieval = self._candidate_lists(transformable[self.retrieval_column], self.retrieval_column)
        head = self._features.head_features
        if head is not None and head.needs_retrieval and retrieval is None:
            raise ValueError(
                f"MLLMRerank: this ranker is a hybrid whose head reads 'retrieval_score': give the operator the "
                f"retrieval stage's scores as column {self.retrieval_column!r} (a list per row aligned with "
                f"{self.items_column!r}); it has {list(transformable.columns)}")
        lists = [np.asarray(items, dtype=np.int64).reshape(-1) for items in lists]
        for row, (user, items) in enumerate(zip(users_column, lists)):
            try:
                self._features.check_request(np.array([user]), items.reshape(1, -1), None)
            except RequestError as err:
                raise ValueError(f"MLLMRerank, row {row} (user {int(user)}): {err}") from err
        try:  # a hybrid's head features, all rows in one workflow pass (None otherwise)
            features = self._features.head_inputs(users_column, lists, retrieval)
        except RequestError as err:
            raise ValueError(f"MLLMRerank: {err}") from err
        users, known = [], []
        for row, (user, items) in enumerate(zip(users_column, lists)):
            try:
                known.append(bool(self._features.admit_users([user])[0]))
                users.append((self._features.prompts(int(user), items), items))
            except RequestError as err:
                raise ValueError(f"MLLMRerank, row {row} (user {int(user)}): {err}") from err
        # All rows together: each user's prefix once, candidates of all users in shared passes.
        outputs = {name: [] for name in OUTPUT_COLUMNS if name != "known_user"}
        for (_, items), scores in zip(users, self._ranker.score_users(users, features)):
            ranked_ids, ranked_scores = rank_scores(items, scores, self.top_k)
            outputs["scores"].append(scores.astype(np.float32))
            outputs["ranked_item_ids"].append(ranked_ids)
            outputs["ranked_scores"].append(ranked_scores)
        columns = {}
        for name, rows in outputs.items():
            lengths = [len(r) for r in rows]
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            dtype = np.int64 if name == "ranked_item_ids" else np.float32
            values = np.concatenate(rows).astype(dtype) if rows else np.zeros(0, dtype)
            columns[name] = TensorColumn(values, offsets=offsets)
        columns["known_user"] = TensorColumn(np.array(known, dtype=bool))
        return type(transformable)(columns)
