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

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from merlin_mllm.metrics import DEFAULT_KS, hit_rate_curve, ranking_metrics
from merlin_mllm.pipelines.training import load_rows
from merlin_mllm.ranker.config import EMBEDDED
from merlin_mllm.ranker.model import RankerModel
from merlin_mllm.ranker.saved import load_ranker
from merlin_mllm.summaries.rows import SummarySource

log = logging.getLogger(__name__)

__all__ = ["evaluate_ranker", "plot_evaluation"]

CURVE_MAX_K = 20
_FLUSH_EVERY_GROUPS = 25


def _fingerprint(ranker: RankerModel, model_dir, data_dir, split: str, zero_shot: bool, max_groups) -> str:
    """Identifies (model weights, data, settings), so partial scores are reused only for the same run."""
    digest = hashlib.sha256()
    digest.update(json.dumps([str(model_dir), str(Path(data_dir).resolve()), split, zero_shot, max_groups,
                              ranker.config.to_dict()], sort_keys=True, default=str).encode())
    for name, tensor in sorted(ranker.trainable_state_dict().items()) if not zero_shot else []:
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _candidates(group: pd.DataFrame, ranker: RankerModel) -> List[Dict[str, Any]]:
    with_pixels = ranker.config.use_images and ranker.config.backend != EMBEDDED
    out = []
    for row in group.itertuples(index=False):
        candidate: Dict[str, Any] = {"title": row.title, "item_id": int(row.item_id)}
        if with_pixels:
            candidate["image"] = row.image_path
        out.append(candidate)
    return out


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
    summaries: SummarySource,
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
    progress: bool = True,
) -> dict:
    """Score ``split`` with the ranker and write metrics, per-row scores and a plot.

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset``.
    summaries : path, DataFrame or callable
        User summaries (see :func:`merlin_mllm.summaries.rows.row_summaries`).
    model_dir : path or str or None
        A trained ranker folder; with ``zero_shot=True`` also a base model id/folder or None.
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

    ranker = load_ranker(model_dir, data_dir, zero_shot=zero_shot, cache_dir=out_json.parent, progress=progress)
    rows = load_rows(data_dir, split, summaries, max_groups=max_groups, seed=seed)
    fingerprint = _fingerprint(ranker, model_dir, data_dir, split, zero_shot, max_groups)

    done: Dict[int, np.ndarray] = {}
    if resume and partial_path.exists():
        partial = pd.read_parquet(partial_path)
        if len(partial) and (partial["fingerprint"] == fingerprint).all():
            done = {int(g): part.sort_values("position")["score"].to_numpy() for g, part in partial.groupby("group_id")}
            log.info("resuming %s: %d groups already scored", out_json, len(done))
        else:
            partial_path.unlink()

    rows = rows.reset_index(drop=True)
    rows["position"] = rows.groupby("group_id").cumcount()
    groups = list(rows.groupby("group_id", sort=True))
    pending: List[pd.DataFrame] = []
    scoring_seconds = 0.0
    scored_now = 0
    for group_id, group in tqdm(groups, desc=f"scoring {split}", unit="group", disable=not progress):
        if int(group_id) in done:
            continue
        texts = group["user_summary"].unique()
        if len(texts) != 1:
            raise ValueError(f"group {group_id} has {len(texts)} different user summaries; a group is one user")
        tick = time.perf_counter()
        scores = ranker.score(str(texts[0]), _candidates(group, ranker), batch_size=batch_size)
        scoring_seconds += time.perf_counter() - tick
        scored_now += 1
        done[int(group_id)] = scores
        pending.append(pd.DataFrame({"group_id": int(group_id), "position": group["position"].to_numpy(),
                                     "score": scores, "fingerprint": fingerprint}))
        if len(pending) >= _FLUSH_EVERY_GROUPS:
            _append_partial(partial_path, pending)
            pending = []
    if pending:
        _append_partial(partial_path, pending)

    scored = pd.concat(
        [pd.DataFrame({"group_id": g, "position": np.arange(len(s)), "score": s}) for g, s in done.items()],
        ignore_index=True,
    )
    table = rows.merge(scored, on=["group_id", "position"], how="left", validate="one_to_one")
    if table["score"].isna().any():  # a partial file from another row set would leave holes
        raise RuntimeError(f"{int(table['score'].isna().sum())} rows were not scored; delete {partial_path} and re-run")
    table = table[["group_id", "user_id", "item_id", "label", "score"]]
    table.to_parquet(scores_path, index=False)

    metrics = ranking_metrics(table["label"].to_numpy(), table["score"].to_numpy(), table["group_id"].to_numpy(), ks=ks)
    name = "zero-shot " + str(ranker.config.base_model) if zero_shot else str(model_dir)
    plot_evaluation(table, plot_path, title=f"{name} on {split} (AUC {metrics['auc']:.3f})")
    result = {
        **metrics,
        "run": {
            "model": str(model_dir) if model_dir is not None else EMBEDDED,
            "base_model": ranker.config.base_model,
            "zero_shot": bool(zero_shot),
            "use_images": bool(ranker.config.use_images),
            "split": split,
            "data_dir": str(Path(data_dir).resolve()),
            "max_groups": max_groups,
            "device": str(ranker.device),
            "dtype": str(ranker.dtype).replace("torch.", ""),
            "groups_scored_now": scored_now,
            "groups_resumed": len(groups) - scored_now,
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


def _append_partial(path: Path, frames: List[pd.DataFrame]) -> None:
    """Rewrite the partial-scores file with the new groups added (atomically: temp file + rename)."""
    new = pd.concat(frames, ignore_index=True)
    if path.exists():
        new = pd.concat([pd.read_parquet(path), new], ignore_index=True)
    tmp = path.with_name(path.name + ".tmp")
    new.to_parquet(tmp, index=False)
    os.replace(tmp, path)
