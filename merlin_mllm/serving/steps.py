"""The serving steps' contract (model, tensor and folder names, request errors and limits) and the feature step.

The Triton export (:mod:`merlin_mllm.serving.export`) writes one folder per step into the
version folder of its python-backend model, and the merlin.systems operator
(:mod:`merlin_mllm.serving.systems`) saves the same two folders as its artefacts. Both then run
exactly this code, so Triton and in-process serving give the same scores.

Feature step (``mllm_features``), folder layout::

    users.parquet     user_id int64, user_summary str   (one summary per known user)
    items.parquet     item_id int64 (sorted), title str, has_image bool (``title``: the ranker's
                      candidate text, made at export as training made it; the title by default)
    workflow/         the fitted NVTabular workflow (Workflow.save):
                      [user_summary, title, has_image] >> TokenizePrompt, plus item_id
    features.json     limits (max_candidates, top_k_default), the cold-start summary and the
                      unknown-user policy (``unknown_users``)
    head_features/    only for a hybrid ranker (:class:`HeadFeatures`): head_features.json (the
                      head's input columns, in its order, and the serving time ``as_of``) and
                      collaborative/, the fitted ``CollaborativeFeatures`` workflow
                      (``CollaborativeFeatures.save``, with its AsOfCount statistics) when the
                      head reads a collaborative column

Request -> per user: the user's summary, each candidate's title and has-image flag, then the
workflow turns those rows into the token ids of the ranker's prompts. An unknown user (no
exported summary: a cold start) gets the generic empty-history summary, or, with
``unknown_users="error"``, the request is rejected with an error naming the user id. Either way
the step says which rows were known (``known_user``) and counts the cold starts.

For a hybrid ranker the step also computes the head's tabular features of every (user,
candidate): ``item_log_count``, ``item_log_recent_count``, ``user_log_count`` by the fitted
:class:`merlin_mllm.data.collaborative.CollaborativeFeatures` workflow (the events logged before
serving), counted as of the serving time ``as_of`` (by default the first second after the latest
logged event: every logged event counts, and the recent window ends at the latest one), and
``retrieval_score`` from the request's ``retrieval_scores`` (the upstream retrieval stage's score
of each candidate). A hybrid whose head reads ``retrieval_score`` rejects
a request without ``retrieval_scores``, naming the input.

The ranker step (``mllm_ranker``, :class:`merlin_mllm.serving.ranker_step.RankerStep`) takes
the feature step's tensors to scores.

Usage::

    from merlin_mllm.serving.ranker_step import RankerStep
    from merlin_mllm.serving.steps import FeatureStep, rank_scores

    features = FeatureStep.load("triton_repo/mllm_features/1/artifacts")
    ranker = RankerStep.load("triton_repo/mllm_ranker/1/artifacts")
    batch = features.prepare(np.array([[7]]), np.array([[12, 40, 3]]))   # hybrid: retrieval_scores=...
    scores = ranker.score_rows(batch["prompt_ids"], batch["prompt_lengths"], np.array([[12, 40, 3]]),
                               batch.get("head_features"))
    ranked_ids, ranked_scores = rank_scores([12, 40, 3], scores[0], top_k=2)
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from merlin_mllm.choices import UNKNOWN_USER_POLICIES

# torch, nvtabular and the ranker are imported inside the functions that use them: the feature
# model's Triton process and the client (which imports this module for ENSEMBLE_MODEL) then
# never load torch or the model code.

__all__ = [
    "ENSEMBLE_MODEL",
    "FEATURES_MODEL",
    "RANKER_MODEL",
    "ARTIFACTS_DIR",
    "RETRIEVAL_INPUT",
    "HEAD_FEATURES_INPUT",
    "RequestError",
    "UnknownUserError",
    "ServingLimits",
    "FeatureStep",
    "HeadFeatures",
    "rank_scores",
]

#: Triton model names of the export.
ENSEMBLE_MODEL = "mllm_rerank"
FEATURES_MODEL = "mllm_features"
RANKER_MODEL = "mllm_ranker"
#: Folder inside each python model's version folder that holds its artefacts.
ARTIFACTS_DIR = "artifacts"

USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
WORKFLOW_DIR = "workflow"
FEATURES_CONFIG = "features.json"
HEAD_FEATURES_DIR = "head_features"
HEAD_FEATURES_CONFIG = "head_features.json"
COLLABORATIVE_DIR = "collaborative"

#: The ensemble's optional input carrying the retrieval stage's score of each candidate.
RETRIEVAL_INPUT = "retrieval_scores"
#: The tensor from the feature step to the ranker step of a hybrid: (candidates, head features).
HEAD_FEATURES_INPUT = "head_features"

#: Column names of the rows the workflow tokenizes (TITLE_COLUMN holds each item's candidate text:
#: the title unless the ranker's ``candidate_text`` adds attributes or a summary).
SUMMARY_COLUMN, TITLE_COLUMN, IMAGE_COLUMN, ITEM_COLUMN = "user_summary", "title", "has_image", "item_id"
PROMPT_COLUMN = "prompt_ids"


class RequestError(ValueError):
    """A request the server rejects (bad ids, shapes or limits); the message goes to the client."""


class UnknownUserError(RequestError):
    """A request naming users without a summary, refused by an export with ``unknown_users="error"``.

    Attributes
    ----------
    user_ids : list of int
        The unknown ids, in request order.
    """

    def __init__(self, message: str, user_ids: Sequence[int]):
        super().__init__(message)
        self.user_ids = [int(u) for u in user_ids]


@dataclass(frozen=True)
class ServingLimits:
    """Request limits of a served ranker.

    Parameters
    ----------
    max_candidates : int
        The most candidates one user may send in one request (scoring time grows linearly).
    top_k_default : int
        Ranked items returned when a request has no ``top_k``.
    """

    max_candidates: int = 100
    top_k_default: int = 10

    def __post_init__(self):
        if int(self.max_candidates) < 1:
            raise ValueError(f"max_candidates must be at least 1, not {self.max_candidates}")
        if int(self.top_k_default) < 1:
            raise ValueError(f"top_k_default must be at least 1, not {self.top_k_default}")


def rank_scores(item_ids: Sequence[int], scores: Sequence[float], top_k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` best candidates by score, highest first; equal scores keep input order.

    Returns
    -------
    (ranked_item_ids int64, ranked_scores float32), each of length ``min(top_k, len(item_ids))``.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    # A stable sort of the negated scores: ties keep the order the client sent.
    order = np.argsort(-scores, kind="stable")[: max(0, int(top_k))]
    return item_ids[order], scores[order].astype(np.float32)


# ---------------------------------------------------------------------------- head features
class HeadFeatures:
    """Request -> a hybrid head's input columns for every (user, candidate).

    The columns are those the head was trained on (``HybridHead.feature_names``, in its
    order). Each is one of :data:`merlin_mllm.data.collaborative.HEAD_FEATURES`:

    * ``item_log_count``, ``item_log_recent_count``, ``user_log_count``: computed by
      ``collaborative`` (:class:`merlin_mllm.data.collaborative.CollaborativeFeatures`), the
      NVTabular workflow fitted on the events logged before serving: its own ``transform``, on
      its own fitted statistics, every request as of one moment, ``as_of`` (offline evaluation
      counts each row as of its own time instead; given that moment, the two agree).
    * ``retrieval_score`` (``RETRIEVAL_COLUMN``): the request's ``retrieval_scores``, the
      upstream retrieval stage's score of each candidate.

    Parameters
    ----------
    feature_names : sequence of str
        The head's input columns.
    collaborative : CollaborativeFeatures, optional
        Fitted. Needed when ``feature_names`` holds a collaborative column.
    as_of : int, optional
        The serving time the counts are as of (events strictly before it; the recent window
        ends at it). Default: ``collaborative.logged_until``, the first second after the latest
        fitted event.

    Raises
    ------
    ValueError
        A column the step cannot compute at request time (naming it), or a collaborative column
        without a fitted ``collaborative``.
    """

    def __init__(self, feature_names: Sequence[str], collaborative=None, as_of: Optional[int] = None):
        self.feature_names = tuple(str(name) for name in feature_names)
        self.collaborative_names = self.collaborative_columns(self.feature_names)
        if self.collaborative_names and (collaborative is None or getattr(collaborative, "workflow", None) is None):
            raise ValueError(f"the hybrid head reads {list(self.collaborative_names)}: give a fitted CollaborativeFeatures")
        self.collaborative = collaborative if self.collaborative_names else None
        self.as_of = None
        if self.collaborative is not None:
            self.as_of = int(self.collaborative.logged_until if as_of is None else as_of)

    @staticmethod
    def collaborative_columns(feature_names: Sequence[str]) -> Tuple[str, ...]:
        """The collaborative columns among a head's ``feature_names``; a column that cannot be served raises."""
        from merlin_mllm.data.collaborative import FEATURE_COLUMNS, HEAD_FEATURES, RETRIEVAL_COLUMN

        if not len(feature_names):
            raise ValueError("a hybrid head reads at least one feature column")
        unknown = [name for name in feature_names if name not in HEAD_FEATURES]
        if unknown:
            raise ValueError(f"the hybrid head reads column(s) {unknown}, which the served features model cannot "
                             f"compute at request time: it computes {list(FEATURE_COLUMNS)} from the events logged "
                             f"before serving and {RETRIEVAL_COLUMN!r} from the request's {RETRIEVAL_INPUT!r}")
        return tuple(name for name in feature_names if name in FEATURE_COLUMNS)

    @property
    def needs_retrieval(self) -> bool:
        """Whether the head reads ``retrieval_score`` (then every request must send ``retrieval_scores``)."""
        from merlin_mllm.data.collaborative import RETRIEVAL_COLUMN

        return RETRIEVAL_COLUMN in self.feature_names

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        """Write ``head_features.json`` and, with collaborative columns, the fitted workflow (``collaborative/``)."""
        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        config = {"feature_names": list(self.feature_names), "retrieval_input": RETRIEVAL_INPUT}
        if self.collaborative is not None:
            self.collaborative.save(folder / COLLABORATIVE_DIR)
            config["collaborative"] = {"as_of": self.as_of, **self.collaborative.settings()}
        (folder / HEAD_FEATURES_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: Union[str, os.PathLike]) -> "HeadFeatures":
        """Read a folder written by :meth:`save`."""
        folder = Path(folder)
        if not (folder / HEAD_FEATURES_CONFIG).is_file():
            raise FileNotFoundError(f"{folder / HEAD_FEATURES_CONFIG} not found: {folder} is not a saved HeadFeatures")
        config = json.loads((folder / HEAD_FEATURES_CONFIG).read_text(encoding="utf-8"))
        collaborative, as_of = None, None
        if "collaborative" in config:
            from merlin_mllm.data.collaborative import CollaborativeFeatures

            settings = config["collaborative"]
            if "as_of" not in settings:
                raise ValueError(f"{folder / HEAD_FEATURES_CONFIG} was written before the features were counted "
                                 "as of a time (no 'as_of'): export the hybrid again")
            collaborative = CollaborativeFeatures.load(folder / COLLABORATIVE_DIR, settings)
            as_of = settings["as_of"]
        return cls(config["feature_names"], collaborative, as_of)

    def compute(self, user_ids: Sequence[int], item_ids: Sequence[int],
                retrieval_scores: Optional[Sequence[float]] = None) -> np.ndarray:
        """The head's features of candidate rows, float32 (rows, len(feature_names)).

        Parameters
        ----------
        user_ids, item_ids : sequence of int
            One entry per candidate row (a user's id repeated over their candidates).
        retrieval_scores : sequence of float, optional
            The retrieval stage's score of each row; required when the head reads
            ``retrieval_score`` (:attr:`needs_retrieval`).

        Raises
        ------
        RequestError
            ``retrieval_scores`` missing while the head needs it (naming the input), of another
            length than the rows, or not finite (naming the item).
        """
        from merlin_mllm.data.collaborative import RETRIEVAL_COLUMN

        user_ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if user_ids.shape != item_ids.shape:
            raise ValueError(f"{user_ids.size} user ids for {item_ids.size} candidate rows")
        columns: Dict[str, np.ndarray] = {}
        if self.needs_retrieval:
            if retrieval_scores is None:
                raise RequestError(
                    f"this export's ranker is a hybrid whose head reads {RETRIEVAL_COLUMN!r}: send the input "
                    f"{RETRIEVAL_INPUT!r} (FP32, the retrieval stage's score of each entry of item_ids)")
            scores = np.asarray(retrieval_scores, dtype=np.float64).reshape(-1)
            if scores.size != item_ids.size:
                raise RequestError(f"{RETRIEVAL_INPUT} has {scores.size} scores for {item_ids.size} candidate "
                                   "item ids: send one score per entry of item_ids")
            bad = ~np.isfinite(scores)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise RequestError(f"{RETRIEVAL_INPUT}: the score of item {int(item_ids[row])} (user "
                                   f"{int(user_ids[row])}) is {scores[row]!r}, not a finite number")
            columns[RETRIEVAL_COLUMN] = scores.astype(np.float32)
        if self.collaborative is not None:
            rows = pd.DataFrame({self.collaborative.user_column: user_ids, self.collaborative.item_column: item_ids})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                counted = self.collaborative.transform(rows, as_of=self.as_of)
            for name in self.collaborative_names:
                columns[name] = counted[name].to_numpy(np.float32)
        matrix = np.zeros((item_ids.size, len(self.feature_names)), dtype=np.float32)
        for position, name in enumerate(self.feature_names):
            matrix[:, position] = columns[name]
        return matrix


# ---------------------------------------------------------------------------- feature step
class FeatureStep:
    """Request -> token-id prompts: user summary, item titles and image flags, NVTabular workflow.

    Parameters
    ----------
    users : DataFrame
        ``user_id`` (int), ``user_summary`` (str): the summary served for each known user.
    items : DataFrame
        ``item_id`` (int), ``title`` (str), ``has_image`` (bool): the catalogue that may be ranked.
    workflow : nvtabular.Workflow
        Fitted; input columns ``user_summary``, ``title``, ``has_image``, ``item_id``; output
        ``prompt_ids`` (ragged int64 list) among others.
    limits : ServingLimits
    empty_summary : str
        The summary of an unknown user (cold start).
    unknown_users : {"empty_summary", "error"}
        ``"empty_summary"`` (default): an unknown user is scored with ``empty_summary``.
        ``"error"``: a request with an unknown user is rejected (:class:`RequestError` naming
        the user ids), for deployments where an unknown id is a bug upstream.
    head_features : HeadFeatures, optional
        For a hybrid ranker: the head's tabular features, added to each request's tensors as
        ``head_features``.

    Attributes
    ----------
    cold_start_rows, cold_start_requests, requests : int
        Running counts since this step was built: request rows whose user was unknown (served
        with ``empty_summary`` or rejected), requests with at least one such row, all requests.
    """

    def __init__(self, users: pd.DataFrame, items: pd.DataFrame, workflow, limits: ServingLimits,
                 empty_summary: str, unknown_users: str = "empty_summary", head_features: Optional[HeadFeatures] = None):
        if unknown_users not in UNKNOWN_USER_POLICIES:
            raise ValueError(f"unknown_users must be one of {UNKNOWN_USER_POLICIES}, not {unknown_users!r}")
        for frame, needed, what in ((users, ("user_id", SUMMARY_COLUMN), "users"),
                                    (items, (ITEM_COLUMN, TITLE_COLUMN, IMAGE_COLUMN), "items")):
            missing = [c for c in needed if c not in frame.columns]
            if missing:
                raise ValueError(f"the {what} table lacks column(s) {missing}")
        duplicated = items[ITEM_COLUMN][items[ITEM_COLUMN].duplicated()]
        if len(duplicated):
            raise ValueError(f"item id {int(duplicated.iloc[0])} appears twice in the items table")
        items = items.sort_values(ITEM_COLUMN, kind="stable").reset_index(drop=True)
        self.users = users[["user_id", SUMMARY_COLUMN]].reset_index(drop=True)
        self.items = items[[ITEM_COLUMN, TITLE_COLUMN, IMAGE_COLUMN]]
        self._summaries: Dict[int, str] = dict(zip(self.users["user_id"].astype(np.int64).tolist(),
                                                   self.users[SUMMARY_COLUMN].astype(str).tolist()))
        self._item_ids = items[ITEM_COLUMN].to_numpy(np.int64)
        self._titles = items[TITLE_COLUMN].fillna("").astype(str).to_numpy(object)
        self._has_image = items[IMAGE_COLUMN].fillna(False).astype(bool).to_numpy()
        self.workflow = workflow
        self.limits = limits
        self.empty_summary = str(empty_summary)
        self.unknown_users = unknown_users
        self.head_features = head_features
        self.cold_start_rows = self.cold_start_requests = self.requests = 0

    # -- files
    def save(self, folder: Union[str, os.PathLike]) -> Path:
        """Write the step's folder (see the module docstring)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.users.to_parquet(folder / USERS_FILE, index=False)
        self.items.to_parquet(folder / ITEMS_FILE, index=False)
        if (folder / WORKFLOW_DIR).exists():
            shutil.rmtree(folder / WORKFLOW_DIR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.workflow.save(str(folder / WORKFLOW_DIR))
        config = {"limits": asdict(self.limits), "empty_summary": self.empty_summary,
                  "unknown_users": self.unknown_users, "users": len(self.users), "items": len(self.items),
                  "items_with_image": int(self._has_image.sum()),
                  "head_features": list(self.head_features.feature_names) if self.head_features else None}
        if self.head_features is not None:
            self.head_features.save(folder / HEAD_FEATURES_DIR)
        elif (folder / HEAD_FEATURES_DIR).exists():
            shutil.rmtree(folder / HEAD_FEATURES_DIR)
        (folder / FEATURES_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: Union[str, os.PathLike]) -> "FeatureStep":
        """Read a folder written by :meth:`save`."""
        folder = Path(folder)
        for name in (USERS_FILE, ITEMS_FILE, WORKFLOW_DIR, FEATURES_CONFIG):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder / name} not found: {folder} is not an exported feature step")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import nvtabular as nvt

            workflow = nvt.Workflow.load(str(folder / WORKFLOW_DIR))
        config = json.loads((folder / FEATURES_CONFIG).read_text(encoding="utf-8"))
        head_features = HeadFeatures.load(folder / HEAD_FEATURES_DIR) if (folder / HEAD_FEATURES_DIR).is_dir() else None
        # Exports made before the policy existed served unknown users the empty summary.
        return cls(pd.read_parquet(folder / USERS_FILE), pd.read_parquet(folder / ITEMS_FILE), workflow,
                   ServingLimits(**config["limits"]), config["empty_summary"],
                   config.get("unknown_users", "empty_summary"), head_features)

    # -- lookups
    def summary_for(self, user_id: int) -> Tuple[str, bool]:
        """(summary, known): an unknown user gets the generic empty-history summary."""
        text = self._summaries.get(int(user_id))
        return (text, True) if text is not None else (self.empty_summary, False)

    def known_users(self, user_ids: Sequence[int]) -> np.ndarray:
        """Whether each user id has an exported summary (bool array, input order)."""
        return np.array([int(u) in self._summaries for u in np.asarray(user_ids).reshape(-1)], dtype=bool)

    def admit_users(self, user_ids: Sequence[int]) -> np.ndarray:
        """The users of one request: their known flags, with the cold starts counted.

        Raises :class:`UnknownUserError` (naming the ids) for unknown users when the policy
        is ``unknown_users="error"``.
        """
        user_ids = np.asarray(user_ids).reshape(-1)
        known = self.known_users(user_ids)
        self.requests += 1
        if not known.all():
            self.cold_start_rows += int((~known).sum())
            self.cold_start_requests += 1
            if self.unknown_users == "error":
                unknown = list(dict.fromkeys(int(u) for u in user_ids[~known]))
                raise UnknownUserError(
                    f"unknown user id(s) {', '.join(map(str, unknown))}: no summary for them among the "
                    f"{len(self._summaries)} users of this export, and it was made with unknown_users='error'",
                    unknown,
                )
        return known

    def item_positions(self, item_ids: Sequence[int]) -> np.ndarray:
        """Rows of ``item_ids`` in the catalogue; :class:`RequestError` names unknown ids."""
        item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        positions = np.searchsorted(self._item_ids, item_ids).clip(max=max(len(self._item_ids) - 1, 0))
        known = (self._item_ids[positions] == item_ids) if len(self._item_ids) else np.zeros(len(item_ids), bool)
        if not known.all():
            unknown = list(dict.fromkeys(int(i) for i in item_ids[~known]))
            shown = ", ".join(map(str, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            raise RequestError(f"unknown item id(s) {shown}: not in the exported catalogue of {len(self._item_ids)} items")
        return positions

    def candidate_rows(self, user_id: int, item_ids: Sequence[int]) -> pd.DataFrame:
        """The rows the workflow tokenizes: one per candidate."""
        positions = self.item_positions(item_ids)
        summary, _ = self.summary_for(user_id)
        return pd.DataFrame({
            SUMMARY_COLUMN: [summary] * len(positions),
            TITLE_COLUMN: self._titles[positions].tolist(),
            IMAGE_COLUMN: self._has_image[positions],
            ITEM_COLUMN: np.asarray(item_ids, dtype=np.int64).reshape(-1),
        })

    def prompts(self, user_id: int, item_ids: Sequence[int]) -> List[np.ndarray]:
        """Token ids of the ranker prompt of each candidate, through the NVTabular workflow."""
        frame = self.candidate_rows(user_id, item_ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.workflow.transform(frame)
        return [np.asarray(ids, dtype=np.int64) for ids in out[PROMPT_COLUMN]]

    def warm_up(self) -> None:
        """Tokenize one probe request, so the first client does not pay for loading the tokenizer."""
        if len(self._item_ids):
            self.prompts(-1, self._item_ids[:2])
            if self.head_features is not None:
                probe = self._item_ids[:2]
                self.head_features.compute(np.full(len(probe), -1), probe, np.zeros(len(probe)))

    def head_inputs(self, user_ids: Sequence[int], item_lists: Sequence[Sequence[int]],
                    retrieval_lists: Optional[Sequence[Sequence[float]]] = None) -> Optional[List[np.ndarray]]:
        """Per user row, the hybrid head's features of its candidates, float32 (candidates, features).

        None when the ranker is not a hybrid (``retrieval_lists`` is then not needed). The
        rows are computed together, in one workflow pass.

        Raises
        ------
        RequestError
            From :meth:`HeadFeatures.compute`: ``retrieval_scores`` missing while the head reads
            ``retrieval_score``, misaligned with ``item_ids``, or not finite.
        """
        if self.head_features is None:
            return None
        lengths = [len(np.asarray(items).reshape(-1)) for items in item_lists]
        if retrieval_lists is not None:
            for row, (scores, count) in enumerate(zip(retrieval_lists, lengths)):
                if np.asarray(scores).size != count:
                    raise RequestError(f"{RETRIEVAL_INPUT} row {row} has {np.asarray(scores).size} scores for "
                                       f"{count} candidate item ids: send one score per entry of item_ids")
            retrieval = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for s in retrieval_lists])
        else:
            retrieval = None
        users = np.repeat(np.asarray(user_ids, dtype=np.int64).reshape(-1), lengths)
        items = np.concatenate([np.asarray(i, dtype=np.int64).reshape(-1) for i in item_lists])
        matrix = self.head_features.compute(users, items, retrieval)
        return np.split(matrix, np.cumsum(lengths)[:-1])

    # -- one request
    def check_request(self, user_ids: np.ndarray, item_ids: np.ndarray, top_k: Optional[np.ndarray]) -> np.ndarray:
        """Validate shapes and limits; returns the resolved top_k per row (int32)."""
        if item_ids.ndim != 2:
            raise RequestError(f"item_ids must have shape [batch, candidates], got {list(item_ids.shape)}")
        batch, count = item_ids.shape
        if user_ids.size != batch:
            raise RequestError(f"user_id has {user_ids.size} values for a batch of {batch}: send one user id per row")
        if count == 0:
            raise RequestError("item_ids is empty: send at least one candidate item id")
        if count > self.limits.max_candidates:
            raise RequestError(
                f"{count} candidates is more than this export's limit of {self.limits.max_candidates} "
                "(max_candidates); split the list or re-export with a higher limit"
            )
        if top_k is None:
            return np.full(batch, self.limits.top_k_default, dtype=np.int32)
        top_k = np.asarray(top_k).reshape(-1)
        if top_k.size != batch:
            raise RequestError(f"top_k has {top_k.size} values for a batch of {batch}")
        if (top_k < 1).any():
            raise RequestError(f"top_k must be at least 1, got {int(top_k.min())}")
        if (top_k != top_k[0]).any():
            raise RequestError("every row of one request must ask for the same top_k")
        return top_k.astype(np.int32)

    def prepare(self, user_ids, item_ids, top_k=None, retrieval_scores=None) -> Dict[str, np.ndarray]:
        """Tensors for the ranker step from one request.

        Parameters
        ----------
        user_ids : array (batch, 1) or (batch,) of int64
        item_ids : array (batch, candidates) of int64
        top_k : array (batch, 1) of int, optional
        retrieval_scores : array (batch, candidates) of float, optional
            The retrieval stage's score of each candidate: the ``retrieval_score`` feature of a
            hybrid whose head reads it (required then); otherwise unused (but checked).

        Returns
        -------
        dict
            ``prompt_ids`` int64 (batch, candidates, longest prompt), right-padded with 0;
            ``prompt_lengths`` int64 (batch, candidates); ``top_k`` int32 (batch, 1) with the
            default filled in and capped at the number of candidates; ``known_user`` bool
            (batch, 1): False for a cold start (the user got ``empty_summary``); for a hybrid
            also ``head_features`` float32 (batch, candidates, head features).

        Raises
        ------
        RequestError
            A bad request (see :meth:`check_request`); :class:`UnknownUserError` with
            ``unknown_users="error"`` and a user without a summary (the message names the ids);
            a hybrid that reads ``retrieval_score`` asked without ``retrieval_scores``, or
            ``retrieval_scores`` not shaped like ``item_ids`` (the messages name the input).
        """
        user_ids = np.asarray(user_ids).reshape(-1)
        item_ids = np.asarray(item_ids)
        resolved = self.check_request(user_ids, item_ids, top_k)
        if retrieval_scores is not None:
            retrieval_scores = np.asarray(retrieval_scores)
            if retrieval_scores.shape != item_ids.shape:
                raise RequestError(f"{RETRIEVAL_INPUT} has shape {list(retrieval_scores.shape)} but item_ids "
                                   f"{list(item_ids.shape)}: send one score per candidate item id")
        # Checked before the users are counted: a request refused for its features is no cold start.
        head_inputs = self.head_inputs(user_ids, list(item_ids),
                                       None if retrieval_scores is None else list(retrieval_scores))
        known = self.admit_users(user_ids)
        rows = [self.prompts(int(user), item_ids[row]) for row, user in enumerate(user_ids)]
        batch, count = item_ids.shape
        lengths = np.array([[len(p) for p in prompts] for prompts in rows], dtype=np.int64)
        padded = np.zeros((batch, count, int(lengths.max())), dtype=np.int64)
        for row, prompts in enumerate(rows):
            for column, ids in enumerate(prompts):
                padded[row, column, : len(ids)] = ids
        resolved = np.minimum(resolved, count).astype(np.int32).reshape(batch, 1)
        out = {"prompt_ids": padded, "prompt_lengths": lengths, "top_k": resolved, "known_user": known.reshape(batch, 1)}
        if head_inputs is not None:
            out[HEAD_FEATURES_INPUT] = np.stack(head_inputs).astype(np.float32)
        return out
