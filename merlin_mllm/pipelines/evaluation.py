"""``evaluate_ranker``: score every test group with the shared-prefix scorer, report ranking metrics.

Each group (one user, 1 positive + N negatives) is scored by
:meth:`RankerModel.score`: the user's prompt prefix runs once, its KV cache is shared by the
group's candidates, and P(yes) comes from one forward pass (no ``generate()``). Metrics are
:func:`merlin_mllm.metrics.ranking_metrics` (AUC over all rows; HR/MRR/NDCG@3/5/10 per group,
ties at their expected value).

Outputs, next to ``out_json``::

    <out>.json            metrics at the top level (auc, hr@3, mrr@3, ndcg@3, ...) + "run" details
    <out>.scores.parquet  per row: group_id, user_id, item_id, label, score
    <out>.png             score histograms by label, and HR@K for K = 1..20 against chance
    <out>.partial.parquet scores so far while running; a re-run with the same model resumes
                          from it (deleted when done)

Prompts are cut as training cut them: a prompt longer than the training run's ``max_length``
(read from ``train_config.json`` beside the model folder; 512 without one) gets a shorter user
summary, through the same ``TokenizePrompt.encode_row`` that training and the served workflow
use, so evaluation, training and serving see the same tokens. (HF models that read pixels
through their processor cannot be tokenized that way; their prompts are never cut.)

Zero-shot (the paper's "without SFT" row): ``zero_shot=True`` scores the base model of
``model_dir`` (a saved ranker) or ``model_dir`` itself (a base model id/folder; ``None`` or
``"embedded"`` for SmolLM2) with no adapter. The embedded model then runs text-only, because
its image projector only exists after training.

Usage::

    from merlin_mllm.pipelines import evaluate_ranker
    result = evaluate_ranker("data/ml100k", "data/summaries", "runs/ranker/model", "runs/eval.json")
    result["auc"], result["hr@10"]
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from merlin_mllm.data.image_files import dataset_image_root
from merlin_mllm.data.splits import prepared_tables
from merlin_mllm.image_loading import ImageLoadError
from merlin_mllm.metrics import DEFAULT_KS, hit_rate_curve, ranking_metrics
from merlin_mllm.operators.tokenize_prompt import TokenizePrompt
from merlin_mllm.pipelines.hybrid import attach_features
from merlin_mllm.pipelines.training import load_rows
from merlin_mllm.ranker.ranker_config import EMBEDDED, HEAD_FILE
from merlin_mllm.ranker.hybrid_head import HybridHead, hybrid_probability, saved_head
from merlin_mllm.ranker.model import RankerModel
from merlin_mllm.ranker.saved import load_ranker, trained_max_length, trained_model_dir
from merlin_mllm.summaries.candidates import CandidateText, ItemSummarySource, candidate_summaries
from merlin_mllm.summaries.rows import SummarySource

log = logging.getLogger(__name__)

__all__ = ["evaluate_ranker", "plot_evaluation"]

CURVE_MAX_K = 20
_FLUSH_EVERY_GROUPS = 25


def _fingerprint(ranker: RankerModel, model_dir, data_dir, split: str, zero_shot: bool, max_groups,
                 max_length: int) -> str:
    """Identifies (model weights, data, settings), so partial scores are reused only for the same run."""
    digest = hashlib.sha256()
    digest.update(json.dumps([str(model_dir), str(Path(data_dir).resolve()), split, zero_shot, max_groups,
                              max_length, ranker.config.to_dict(), str(ranker.dtype)], sort_keys=True,
                             default=str).encode())
    for name, tensor in sorted(ranker.trainable_state_dict().items()) if not zero_shot else []:
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _candidates(group: pd.DataFrame, ranker: RankerModel) -> List[Dict[str, Any]]:
    with_pixels = ranker.config.use_images and ranker.config.backend != EMBEDDED
    out = []
    for row in group.itertuples(index=False):
        candidate: Dict[str, Any] = {"title": row.candidate_text, "item_id": int(row.item_id)}
        if with_pixels:
            candidate["image"] = row.image_path
        out.append(candidate)
    return out


def _confined_image_paths(paths: pd.Series, data_dir) -> List[Optional[str]]:
    """``image_path`` values resolved inside the dataset's image root; a path that leaves it
    becomes None (no image), counted and named in one warning."""
    root = dataset_image_root(data_dir)
    resolved, refused = {}, []
    for raw in paths.dropna().unique():
        try:
            resolved[raw] = str(root.resolve(raw))
        except ImageLoadError as exc:
            resolved[raw] = None
            refused.append(str(exc))
    if refused:
        log.warning("%d image paths leave the image root %s and are scored without their image, e.g. %s",
                    len(refused), root.path, refused[0])
    return [resolved.get(p) if isinstance(p, str) else None for p in paths]


def plot_evaluation(scores: pd.DataFrame, path: Union[str, os.PathLike], title: str = "") -> Path:
    """Write a PNG: P(yes) histograms of positives vs negatives, and HR@K (K=1..20) vs chance."""
    # The object API (Figure, not pyplot) draws off-screen without touching pyplot's global
    # backend (which would switch a notebook's inline plotting off).
    labels = scores["label"].to_numpy()
    values = scores["score"].to_numpy()
    curve = hit_rate_curve(labels, values, scores["group_id"].to_numpy(), max_k=CURVE_MAX_K)
    group_size = scores.groupby("group_id").size().to_numpy()
    ks = np.arange(1, CURVE_MAX_K + 1)
    chance = np.minimum(ks[:, None] / group_size[None, :], 1.0).mean(axis=1)

    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2)
    # Bins over the observed range: an untrained model's scores can sit within 0.01 of each other.
    low, high = float(values.min()), float(values.max())
    spread = max(high - low, 1e-6)
    bins = np.linspace(low - 0.02 * spread, high + 0.02 * spread, 31)
    left.hist(values[labels == 0], bins=bins, alpha=0.6, density=True, label=f"negatives ({int((labels == 0).sum())})")
    left.hist(values[labels == 1], bins=bins, alpha=0.6, density=True, label=f"positives ({int((labels == 1).sum())})")
    left.set_xlabel("P(yes)")
    left.set_ylabel("density")
    left.set_title("Scores by label")
    left.legend()
    right.plot(ks, curve, marker="o", label="ranker")
    right.plot(ks, chance, linestyle="--", color="grey", label="random order")
    right.set_xlabel("K")
    right.set_ylabel("HR@K")
    right.set_ylim(0, 1.02)
    right.set_xticks(ks[::2])
    right.set_title("Hit rate at K")
    right.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def evaluate_ranker(
    data_dir: Union[str, os.PathLike],
    summaries: Optional[SummarySource],
    model_dir: Union[str, os.PathLike, None],
    out_json: Union[str, os.PathLike],
    *,
    zero_shot: bool = False,
    split: str = "test",
    max_groups: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 32,
    ks=DEFAULT_KS,
    resume: bool = True,
    max_length: Optional[int] = None,
    features=None,
    precision: Optional[str] = None,
    item_summaries: Optional[ItemSummarySource] = None,
    progress: bool = True,
) -> dict:
    """Score ``split`` with the ranker and write metrics, per-row scores and a plot.

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset``.
    summaries : path, DataFrame or callable
        User summaries (see :func:`merlin_mllm.summaries.rows.row_summaries`); None for a ranker
        trained with ``user_context="titles"``, which reads none.
    model_dir : path or str or None
        A trained ranker folder, or the run folder ``train --out`` wrote (its ``model/`` is
        used); with ``zero_shot=True`` also a base model id/folder or None.
    out_json : path
        The metrics file; the scores parquet and the PNG are written beside it.
    zero_shot : bool
        Score the base model without LoRA (the "without SFT" baseline).
    split : str
        Default ``"test"``.
    max_groups : int, optional
        Evaluate a seeded random subset of this many groups.
    seed : int
        Seeds that subset.
    batch_size : int
        Candidates per forward pass.
    ks : tuple of int
        Metric cut-offs (default 3, 5, 10).
    resume : bool
        Reuse the scores of an interrupted run of the same model on the same data.
    max_length : int, optional
        The longest prompt in tokens (longer ones get a shorter user summary, as in training).
        Default: the training run's (:func:`~merlin_mllm.ranker.saved.trained_max_length`).
    features : path or DataFrame, optional
        For a hybrid ranker (its folder holds ``hybrid_head.safetensors``): ``split``'s rows with
        the head's feature columns, matched on (group_id, item_id). The score is then
        sigmoid(head logit + LLM logit), and the scores file also keeps ``llm_logit`` and
        ``head_logit``, so each part's share can be measured.
    precision : {"float32", "bfloat16", "auto"}, optional
        Score in this precision (default: the one the ranker was saved with; zero-shot: float32).
        The result's ``run`` records the dtype that ran; partial scores of another dtype are not
        resumed.
    item_summaries : store folder or item id -> text, optional
        For a ranker whose ``candidate_text`` shows item summaries: where they are. Default:
        ``summaries`` when it is a summary store folder.
    progress : bool
        Show a progress bar over groups.

    Returns
    -------
    dict
        The JSON written: ``auc``, ``hr@K``, ``mrr@K``, ``ndcg@K``, counts, and ``run``.
    """
    started = time.time()
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    stem = out_json.with_suffix("")
    scores_path = Path(f"{stem}.scores.parquet")
    partial_path = Path(f"{stem}.partial.parquet")
    plot_path = Path(f"{stem}.png")
    data = prepared_tables(data_dir)  # each table read once, then passed down

    if model_dir is not None and trained_model_dir(model_dir) != Path(model_dir):
        model_dir = trained_model_dir(model_dir)  # the run folder `train --out` wrote
    if max_length is None:
        max_length, max_length_source = trained_max_length(model_dir)
    else:
        max_length, max_length_source = int(max_length), "argument"
    ranker = load_ranker(model_dir, data, zero_shot=zero_shot, cache_dir=out_json.parent, progress=progress,
                         precision=precision)
    rows = load_rows(data, split, summaries, max_groups=max_groups, seed=seed,
                     user_context=ranker.config.user_context, context_titles=ranker.config.context_titles,
                     item_slots=ranker.config.collab_tokens, context_ratings=ranker.config.context_ratings,
                     context_attributes=ranker.config.context_attributes,
                     candidate_text=CandidateText.for_ranker(ranker, candidate_summaries(summaries, item_summaries)))
    head = saved_head(model_dir) if not zero_shot and model_dir is not None else None
    if head is not None:
        if features is None:
            raise ValueError(f"{model_dir} is a hybrid ranker (it has {HEAD_FILE}): pass features=<{split} rows "
                             f"with {list(head.feature_names)}>")
        # Checked before any scoring: a missing feature fails now, not after the LLM pass.
        rows = attach_features(rows, features, head.feature_names, what=f"{split} rows")
    elif features is not None:
        raise ValueError(f"features were given, but {model_dir} has no hybrid head ({HEAD_FILE}): it is not a hybrid")
    fingerprint = _fingerprint(ranker, model_dir, data_dir, split, zero_shot, max_groups, max_length)
    done = _resumed_scores(partial_path, fingerprint, out_json) if resume else {}

    rows = _numbered_rows(rows, ranker, data)
    counts = _score_groups(rows, ranker, max_length, batch_size, done, fingerprint, partial_path, split, progress)
    table = _scores_table(rows, done, head, partial_path)
    table.to_parquet(scores_path, index=False)

    metrics = ranking_metrics(table["label"].to_numpy(), table["score"].to_numpy(), table["group_id"].to_numpy(), ks=ks)
    name = "zero-shot " + str(ranker.config.base_model) if zero_shot else str(model_dir)
    plot_evaluation(table, plot_path, title=f"{name} on {split} (AUC {metrics['auc']:.3f})")
    scoring_seconds, scored_now = counts["scoring_seconds"], counts["scored_now"]
    result = {
        **metrics,
        "run": {
            "model": str(model_dir) if model_dir is not None else EMBEDDED,
            "base_model": ranker.config.base_model,
            "zero_shot": bool(zero_shot),
            "use_images": bool(ranker.config.use_images),
            "candidate_text": ranker.config.candidate_text,
            "head_features": list(head.feature_names) if head is not None else None,
            "split": split,
            "data_dir": str(Path(data_dir).resolve()),
            "max_groups": max_groups,
            "max_length": max_length,
            "max_length_source": max_length_source,
            "prompts_cut_now": counts["prompts_cut"],
            "device": str(ranker.device),
            "dtype": str(ranker.dtype).replace("torch.", ""),
            "precision": ranker.config.precision,
            "groups_scored_now": scored_now,
            "groups_resumed": counts["groups"] - scored_now,
            "scoring_seconds": round(scoring_seconds, 2),
            "seconds_per_group": round(scoring_seconds / scored_now, 4) if scored_now else None,
            "seconds": round(time.time() - started, 1),
            "scores": str(scores_path),
            "plot": str(plot_path),
        },
    }
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    if partial_path.exists():
        partial_path.unlink()
    return result


def _resumed_scores(partial_path: Path, fingerprint: str, out_json: Path) -> Dict[int, np.ndarray]:
    """Group id -> scores already in ``partial_path`` from the same run (``fingerprint``); a
    partial file of another run is deleted."""
    if not partial_path.exists():
        return {}
    partial = pd.read_parquet(partial_path)
    if len(partial) and (partial["fingerprint"] == fingerprint).all():
        done = {int(g): part.sort_values("position")["score"].to_numpy() for g, part in partial.groupby("group_id")}
        log.info("resuming %s: %d groups already scored", out_json, len(done))
        return done
    partial_path.unlink()
    return {}


def _numbered_rows(rows: pd.DataFrame, ranker: RankerModel, data) -> pd.DataFrame:
    """``rows`` with a fresh index and ``position`` (the row's place in its group), their image
    paths confined to the dataset's image root where the prompt opens the files itself."""
    rows = rows.reset_index(drop=True)
    if ranker.config.use_images and ranker.config.backend != EMBEDDED:  # the prompt opens the files itself
        rows["image_path"] = _confined_image_paths(rows["image_path"], data)
    rows["position"] = rows.groupby("group_id").cumcount()
    return rows


def _score_groups(rows: pd.DataFrame, ranker: RankerModel, max_length: int, batch_size: int,
                  done: Dict[int, np.ndarray], fingerprint: str, partial_path: Path, split: str,
                  progress: bool) -> Dict[str, Any]:
    """Score every group of ``rows`` that ``done`` lacks, into ``done``, appending them to
    ``partial_path`` as it goes; and the counts: ``groups``, ``scored_now``, ``prompts_cut``,
    ``scoring_seconds``."""
    # Training's cut (TokenizePrompt.encode_row), built when a prompt first needs it; prompts with
    # processor-expanded images cannot be made from text, so they are never cut.
    cutter = (functools.cache(lambda: TokenizePrompt.for_ranker(ranker, max_length=max_length))
              if ranker.prompt.image_mode != "processor" else None)
    groups = list(rows.groupby("group_id", sort=True))
    pending: List[pd.DataFrame] = []
    counts = {"groups": len(groups), "scored_now": 0, "prompts_cut": 0, "scoring_seconds": 0.0}
    for group_id, group in tqdm(groups, desc=f"scoring {split}", unit="group", disable=not progress):
        if int(group_id) in done:
            continue
        texts = group["user_summary"].unique()
        if len(texts) != 1:
            raise ValueError(f"group {group_id} has {len(texts)} different user summaries; a group is one user")
        tick = time.perf_counter()
        candidates = _candidates(group, ranker)
        scores, cut = _score_group(ranker, cutter, max_length, str(texts[0]), candidates, batch_size, group_id)
        counts["prompts_cut"] += cut
        counts["scoring_seconds"] += time.perf_counter() - tick
        counts["scored_now"] += 1
        done[int(group_id)] = scores
        pending.append(pd.DataFrame({"group_id": int(group_id), "position": group["position"].to_numpy(),
                                     "score": scores, "fingerprint": fingerprint}))
        if len(pending) >= _FLUSH_EVERY_GROUPS:
            _append_partial(partial_path, pending)
            pending = []
    if pending:
        _append_partial(partial_path, pending)
    return counts


def _scores_table(rows: pd.DataFrame, done: Dict[int, np.ndarray], head: Optional[HybridHead],
                  partial_path: Path) -> pd.DataFrame:
    """The scores file's table: each row's ids, label and score (the hybrid's, with its parts,
    for a hybrid ranker)."""
    scored = pd.concat(
        [pd.DataFrame({"group_id": g, "position": np.arange(len(s)), "score": s}) for g, s in done.items()],
        ignore_index=True,
    )
    table = rows.merge(scored, on=["group_id", "position"], how="left", validate="one_to_one")
    if table["score"].isna().any():  # a partial file from another row set would leave holes
        raise RuntimeError(f"{int(table['score'].isna().sum())} rows were not scored; delete {partial_path} and re-run")
    columns = ["group_id", "user_id", "item_id", "label", "score"]
    if head is not None:
        table = _hybrid_scores(table, head)
        columns += ["llm_logit", "head_logit"]
    return table[columns]


def _score_group(ranker: RankerModel, cutter: Optional[Callable[[], TokenizePrompt]], max_length: int, summary: str,
                 candidates: List[Dict[str, Any]], batch_size: int, group_id) -> Tuple[np.ndarray, int]:
    """P(yes) of one group's candidates, with prompts cut as training cut them; and how many were cut.

    A group whose prompts all fit ``max_length`` is scored from text, as always; a group with a
    longer prompt is scored from the token ids of ``cutter().encode_row`` (the function training
    and the served workflow use), so its scores equal the served ones.
    """
    if cutter is not None:
        prompts, _, _ = ranker.encode([summary] * len(candidates), candidates)
        cut = sum(len(p.input_ids) > max_length for p in prompts)
        if cut:
            operator = cutter()
            ids = [operator.encode_row(summary, c["title"], p.has_image, row=f"group {group_id}, item {c['item_id']}",
                                       item_id=c["item_id"]).input_ids
                   for c, p in zip(candidates, prompts)]
            return ranker.score_token_ids(ids, [c["item_id"] for c in candidates], batch_size=batch_size), cut
    return ranker.score(summary, candidates, batch_size=batch_size), 0


def _hybrid_scores(table: pd.DataFrame, head: HybridHead) -> pd.DataFrame:
    """``table`` with the LLM's P(yes) turned into the hybrid's: ``llm_logit`` = logit(P(yes)),
    ``head_logit`` = the head's, ``score`` = sigmoid(their sum)."""
    with torch.no_grad():
        head_logit = head(torch.as_tensor(table[list(head.feature_names)].to_numpy(np.float32))).double().numpy()
    llm_logit, score = hybrid_probability(table["score"].to_numpy(np.float64), head_logit)
    return table.assign(llm_logit=llm_logit, head_logit=head_logit, score=score)


def _append_partial(path: Path, frames: List[pd.DataFrame]) -> None:
    """Rewrite the partial-scores file with the new groups added (atomically: temp file + rename)."""
    new = pd.concat(frames, ignore_index=True)
    if path.exists():
        new = pd.concat([pd.read_parquet(path), new], ignore_index=True)
    tmp = path.with_name(path.name + ".tmp")
    new.to_parquet(tmp, index=False)
    os.replace(tmp, path)
