"""What the served ranker runs: the feature step and the ranker step, each loaded from a folder.

The Triton export (:mod:`merlin_mllm.serving.export`) writes one folder per step into the
version folder of its python-backend model, and the merlin.systems operator
(:mod:`merlin_mllm.serving.systems`) saves the same two folders as its artefacts. Both then run
exactly this code, so Triton and in-process serving give the same scores.

Feature step (``mllm_features``), folder layout::

    users.parquet     user_id int64, user_summary str   (one summary per known user)
    items.parquet     item_id int64 (sorted), title str, has_image bool
    workflow/         the fitted NVTabular workflow (Workflow.save):
                      [user_summary, title, has_image] >> TokenizePrompt, plus item_id
    features.json     limits (max_candidates, top_k_default), the cold-start summary and the
                      unknown-user policy (``unknown_users``)

Request -> per user: the user's summary, each candidate's title and has-image flag, then the
workflow turns those rows into the token ids of the ranker's prompts. An unknown user (no
exported summary: a cold start) gets the generic empty-history summary, or, with
``unknown_users="error"``, the request is rejected with an error naming the user id. Either way
the step says which rows were known (``known_user``) and counts the cold starts.

Ranker step (``mllm_ranker``), folder layout::

    ranker/                    RankerModel.save_pretrained (config, LoRA adapter, projector)
    item_images.safetensors    ItemImageFeatures, looked up by item id (embedded model with images)
    ranker.json                scoring settings (candidates per forward pass)

Per user it calls :meth:`RankerModel.score_token_ids`, which runs the shared user prefix once
and reuses its KV cache for every candidate.

Usage::

    from merlin_mllm.serving.artifacts import FeatureStep, RankerStep, rank_scores

    features = FeatureStep.load("triton_repo/mllm_features/1/artifacts")
    ranker = RankerStep.load("triton_repo/mllm_ranker/1/artifacts")
    batch = features.prepare(np.array([[7]]), np.array([[12, 40, 3]]))
    scores = ranker.score_rows(batch["prompt_ids"], batch["prompt_lengths"], np.array([[12, 40, 3]]))
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

# torch, nvtabular and the ranker are imported inside the functions that use them: the feature
# model's Triton process and the client (which imports this module for ENSEMBLE_MODEL) then
# never load torch or the model code.

__all__ = [
    "ENSEMBLE_MODEL",
    "FEATURES_MODEL",
    "RANKER_MODEL",
    "ARTIFACTS_DIR",
    "RequestError",
    "UnknownUserError",
    "ServingLimits",
    "UNKNOWN_USER_POLICIES",
    "FeatureStep",
    "RankerStep",
    "rank_scores",
    "resolve_dtype",
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
RANKER_DIR = "ranker"
RANKER_CONFIG = "ranker.json"

#: Column names of the rows the workflow tokenizes.
SUMMARY_COLUMN, TITLE_COLUMN, IMAGE_COLUMN, ITEM_COLUMN = "user_summary", "title", "has_image", "item_id"
PROMPT_COLUMN = "prompt_ids"
#: What the feature step does with a user it has no summary for (see :class:`FeatureStep`).
UNKNOWN_USER_POLICIES = ("empty_summary", "error")


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


def resolve_dtype(name: Optional[str], device):
    """A torch dtype from a name ("auto", "float32", "bfloat16", "float16")."""
    import torch

    from merlin_mllm.models.loading import default_dtype

    if name in (None, "", "auto"):
        return default_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; not {name!r}")
    return table[name]


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

    Attributes
    ----------
    cold_start_rows, cold_start_requests, requests : int
        Running counts since this step was built: request rows whose user was unknown (served
        with ``empty_summary`` or rejected), requests with at least one such row, all requests.
    """

    def __init__(self, users: pd.DataFrame, items: pd.DataFrame, workflow, limits: ServingLimits,
                 empty_summary: str, unknown_users: str = "empty_summary"):
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
                  "items_with_image": int(self._has_image.sum())}
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
        # Exports made before the policy existed served unknown users the empty summary.
        return cls(pd.read_parquet(folder / USERS_FILE), pd.read_parquet(folder / ITEMS_FILE), workflow,
                   ServingLimits(**config["limits"]), config["empty_summary"],
                   config.get("unknown_users", "empty_summary"))

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

    def prepare(self, user_ids, item_ids, top_k=None) -> Dict[str, np.ndarray]:
        """Tensors for the ranker step from one request.

        Parameters
        ----------
        user_ids : array (batch, 1) or (batch,) of int64
        item_ids : array (batch, candidates) of int64
        top_k : array (batch, 1) of int, optional

        Returns
        -------
        dict
            ``prompt_ids`` int64 (batch, candidates, longest prompt), right-padded with 0;
            ``prompt_lengths`` int64 (batch, candidates); ``top_k`` int32 (batch, 1) with the
            default filled in and capped at the number of candidates; ``known_user`` bool
            (batch, 1): False for a cold start (the user got ``empty_summary``).

        Raises
        ------
        RequestError
            A bad request (see :meth:`check_request`); :class:`UnknownUserError` with
            ``unknown_users="error"`` and a user without a summary (the message names the ids).
        """
        user_ids = np.asarray(user_ids).reshape(-1)
        item_ids = np.asarray(item_ids)
        resolved = self.check_request(user_ids, item_ids, top_k)
        known = self.admit_users(user_ids)
        rows = [self.prompts(int(user), item_ids[row]) for row, user in enumerate(user_ids)]
        batch, count = item_ids.shape
        lengths = np.array([[len(p) for p in prompts] for prompts in rows], dtype=np.int64)
        padded = np.zeros((batch, count, int(lengths.max())), dtype=np.int64)
        for row, prompts in enumerate(rows):
            for column, ids in enumerate(prompts):
                padded[row, column, : len(ids)] = ids
        resolved = np.minimum(resolved, count).astype(np.int32).reshape(batch, 1)
        return {"prompt_ids": padded, "prompt_lengths": lengths, "top_k": resolved,
                "known_user": known.reshape(batch, 1)}


# ---------------------------------------------------------------------------- ranker step
class RankerStep:
    """Token-id prompts -> P(yes) per candidate, with the shared user prefix computed once.

    Parameters
    ----------
    ranker : RankerModel
        With its item image table attached (embedded model with images).
    batch_size : int
        Candidates per forward pass.
    """

    def __init__(self, ranker, batch_size: int = 32):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.ranker = ranker
        self.batch_size = int(batch_size)

    @staticmethod
    def write(folder: Union[str, os.PathLike], model_dir: Union[str, os.PathLike], item_features=None,
              batch_size: int = 32) -> Path:
        """Copy a saved ranker (and its item image table) into a step folder."""
        from merlin_mllm.ranker.config import ADAPTER_DIR, CONFIG_FILE, ITEM_IMAGES_FILE, PROJECTOR_FILE

        folder, model_dir = Path(folder), Path(model_dir)
        target = folder / RANKER_DIR
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for name in (CONFIG_FILE, ADAPTER_DIR, PROJECTOR_FILE):
            source = model_dir / name
            if source.is_dir():
                shutil.copytree(source, target / name)
            elif source.is_file():
                shutil.copy2(source, target / name)
        if item_features is not None:
            item_features.save(folder / ITEM_IMAGES_FILE)
        elif (folder / ITEM_IMAGES_FILE).exists():
            (folder / ITEM_IMAGES_FILE).unlink()
        (folder / RANKER_CONFIG).write_text(json.dumps({"batch_size": int(batch_size)}, indent=2) + "\n",
                                            encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: Union[str, os.PathLike], *, device=None, dtype: Optional[str] = None,
             batch_size: Optional[int] = None) -> "RankerStep":
        """Load the ranker of a step folder onto ``device`` (default: CUDA when available)."""
        import torch

        from merlin_mllm.models.loading import default_device
        from merlin_mllm.ranker.config import ITEM_IMAGES_FILE
        from merlin_mllm.ranker.features import ItemImageFeatures
        from merlin_mllm.ranker.model import RankerModel

        folder = Path(folder)
        if not (folder / RANKER_DIR).is_dir():
            raise FileNotFoundError(f"{folder / RANKER_DIR} not found: {folder} is not an exported ranker step")
        device = torch.device(device) if device is not None else default_device()
        table = ItemImageFeatures.load(folder / ITEM_IMAGES_FILE) if (folder / ITEM_IMAGES_FILE).exists() else None
        ranker = RankerModel.from_pretrained(folder / RANKER_DIR, item_features=table, device=device,
                                             dtype=resolve_dtype(dtype, device))
        settings = json.loads((folder / RANKER_CONFIG).read_text()) if (folder / RANKER_CONFIG).exists() else {}
        return cls(ranker, batch_size=batch_size or settings.get("batch_size", 32))

    def warm_up(self) -> None:
        """Score two probe prompts, so the first client does not pay for first-call set-up."""
        probe = self.ranker.prompt.encode("A user.", "An item", has_image=False).input_ids
        self.ranker.score_token_ids([probe, probe[:-1] + probe[-1:]], None, batch_size=self.batch_size)

    def score(self, prompts: Sequence[Sequence[int]], item_ids: Sequence[int]) -> np.ndarray:
        """P(yes) (float64) of one user's candidates, in input order."""
        return self.ranker.score_token_ids([list(map(int, p)) for p in prompts],
                                           [int(i) for i in item_ids], batch_size=self.batch_size)

    def score_users(self, users: Sequence[Tuple[Sequence[Sequence[int]], Sequence[int]]]) -> List[np.ndarray]:
        """P(yes) for several users' candidates at once (what a dynamic batch of requests holds).

        Each user's prompt prefix is computed once, as in :meth:`score`; then the candidates of
        *all* users go through the model together, ``batch_size`` rows per forward pass. A row
        attends to its own user's cached prefix: the prefixes are right-padded to the longest
        one in the pass and the padding is masked out, and each row's positions continue from
        its own prefix length. So the scores equal per-user scoring (up to float rounding), but
        the matrix products are larger, which is what a GPU needs to be busy.

        Parameters
        ----------
        users : list of (prompts, item_ids)
            Per user: the candidates' full prompt token ids and their item ids.

        Returns
        -------
        list of np.ndarray (float64), one per user, in input order.
        """
        return self.ranker.score_users_token_ids(users, batch_size=self.batch_size)

    @staticmethod
    def unpad(prompt_ids: np.ndarray, prompt_lengths: np.ndarray, item_ids: np.ndarray) -> List[Tuple[list, np.ndarray]]:
        """(prompts, item_ids) per user row from the feature step's padded tensors."""
        prompt_ids = np.asarray(prompt_ids)
        prompt_lengths = np.asarray(prompt_lengths).reshape(prompt_ids.shape[:2])
        item_ids = np.asarray(item_ids).reshape(prompt_ids.shape[:2])
        return [([prompt_ids[row, c, : int(prompt_lengths[row, c])] for c in range(prompt_ids.shape[1])], item_ids[row])
                for row in range(prompt_ids.shape[0])]

    def score_rows(self, prompt_ids: np.ndarray, prompt_lengths: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Scores (batch, candidates) from the feature step's padded tensors, one user per row."""
        return np.stack(self.score_users(self.unpad(prompt_ids, prompt_lengths, item_ids)))
