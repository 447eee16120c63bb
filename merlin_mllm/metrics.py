"""Ranking metrics for the MLLM-MSR evaluation protocol: AUC, HR@K, MRR@K, NDCG@K.

Each test group (``group_id``) holds one positive and N negatives, all scored by the ranker.

* **AUC** is over all scored (label, score) pairs, pooled across groups: the probability that a
  random positive outscores a random negative, a tie counting one half (the Mann-Whitney
  statistic; equal to ``sklearn.metrics.roc_auc_score``).
* **HR@K, MRR@K, NDCG@K** come from the rank of the positive inside its group, averaged over
  groups. With one relevant item the ideal DCG is 1, so NDCG@K = 1/log2(rank + 1) when
  rank <= K, else 0.

Ties: by default (``ties="expected"``) a positive tied with ``t`` negatives is placed uniformly
at random among the ``t + 1`` tied positions, and each metric is its *expectation* over that
placement (no random draw, so results are deterministic). This is what sklearn's ``ndcg_score``
does (tie-averaged DCG) and how AUC counts ties. ``ties="pessimistic"`` ranks the positive
below every tied negative instead (a constant scorer then gets HR@K = 0 for K <= N).

Usage::

    from merlin_mllm.metrics import ranking_metrics
    result = ranking_metrics(labels, scores, group_ids, ks=(3, 5, 10))
    result["auc"], result["hr@10"], result["ndcg@5"]
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = ["auc", "auc_difference_interval", "paired_scores", "positive_rank_bounds", "ranking_metrics", "hit_rate_curve", "DEFAULT_KS"]

DEFAULT_KS = (3, 5, 10)
_TIE_MODES = ("expected", "pessimistic")


def _as_arrays(labels, scores, group_ids=None):
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"labels and scores must be 1-d and of equal length, got {labels.shape} and {scores.shape}")
    if labels.size == 0:
        raise ValueError("no scored rows")
    bad_labels = ~np.isin(labels, (0, 1))
    if bad_labels.any():
        row = int(np.flatnonzero(bad_labels)[0])
        raise ValueError(f"labels must be 0 or 1; row {row} has {labels[row]!r}")
    not_finite = ~np.isfinite(scores)
    if not_finite.any():
        row = int(np.flatnonzero(not_finite)[0])
        raise ValueError(f"{int(not_finite.sum())} scores are not finite; first at row {row}: {scores[row]!r}")
    labels = labels.astype(np.int8)
    if group_ids is None:
        return labels, scores
    group_ids = np.asarray(group_ids)
    if group_ids.shape != labels.shape:
        raise ValueError(f"group_ids must have the length of labels ({labels.size}), got {group_ids.shape}")
    return labels, scores, group_ids


def auc(labels, scores) -> float:
    """Area under the ROC curve over all pairs (a tie counts one half).

    Parameters
    ----------
    labels : array-like of {0, 1}
    scores : array-like of float
        Higher means more likely positive.
    """
    labels, scores = _as_arrays(labels, scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    # Mann-Whitney U from average ranks: ties share the mean rank, i.e. count one half.
    ranks = rankdata(scores, method="average")
    u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auc_difference_interval(labels, scores_a, scores_b, group_ids, *, strata=None, resamples: int = 2000,
                            level: float = 0.95, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) on the same rows, with a paired bootstrap interval over groups (users).

    Both rankers scored the same rows, so groups are resampled with replacement and both AUCs
    are recomputed on each resample; the interval is the percentile interval of the
    differences. An interval above 0 says ``a`` ranks better than ``b`` beyond the noise of
    which users were tested.

    ``strata`` pools independent replicates (for example two runs with different seeds, each
    with its own trained models). Scores of different models need not share a scale, so each
    stratum's AUCs are computed within it and the difference is the mean over strata of
    ``AUC(a) - AUC(b)``; each resample draws groups with replacement within their own stratum.

    Parameters
    ----------
    labels : array-like of {0, 1}
    scores_a, scores_b : array-like of float
        Two rankers' scores of the same rows.
    group_ids : array-like
        The group (user) of each row: the unit that is resampled.
    strata : array-like, optional
        The replicate of each row; groups are resampled within it (a group id may repeat
        across strata). ``None``: one stratum.
    resamples : int
    level : float
        Coverage of the interval (0.95: the 2.5th to 97.5th percentiles).
    seed : int

    Returns
    -------
    dict
        ``difference`` (on all rows), ``low``, ``high``, ``resamples``, ``groups`` (summed over
        strata), and with several strata also ``strata`` (how many) and ``per_stratum`` (each
        stratum's difference, in sorted stratum order).

    Examples
    --------
    >>> labels = [1, 0, 0, 1, 0, 0]
    >>> out = auc_difference_interval(labels, [3, 2, 1, 3, 2, 1], [1, 2, 3, 1, 2, 3], [0, 0, 0, 1, 1, 1])
    >>> out["difference"], out["low"], out["high"]
    (1.0, 1.0, 1.0)
    """
    labels, scores_a, group_ids = _as_arrays(labels, scores_a, group_ids)
    _, scores_b = _as_arrays(labels, scores_b)
    if strata is None:
        strata = np.zeros(labels.size, dtype=np.int8)
    else:
        strata = np.asarray(strata)
        if strata.shape != labels.shape:
            raise ValueError(f"strata must have the length of labels ({labels.size}), got {strata.shape}")
    # Per stratum: the row indices of each of its groups.
    strata_rows = []
    for stratum in np.unique(strata):
        in_stratum = np.flatnonzero(strata == stratum)
        _, inverse = np.unique(group_ids[in_stratum], return_inverse=True)
        strata_rows.append([in_stratum[inverse == g] for g in range(inverse.max() + 1)])

    def difference(rows_per_stratum) -> float:
        return float(np.mean([auc(labels[rows], scores_a[rows]) - auc(labels[rows], scores_b[rows])
                              for rows in rows_per_stratum]))

    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(int(resamples)):
        drawn = [np.concatenate([rows_of[g] for g in rng.integers(0, len(rows_of), len(rows_of))])
                 for rows_of in strata_rows]
        if any(labels[rows].min() == labels[rows].max() for rows in drawn):
            continue  # a resample with one class has no AUC
        differences.append(difference(drawn))
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(differences, [tail, 100.0 - tail])
    whole = [np.concatenate(rows_of) for rows_of in strata_rows]
    out = {"difference": difference(whole), "low": float(low), "high": float(high),
           "resamples": len(differences), "groups": int(sum(len(rows_of) for rows_of in strata_rows))}
    if len(strata_rows) > 1:
        out["strata"] = len(strata_rows)
        out["per_stratum"] = [difference([rows]) for rows in whole]
    return out


def paired_scores(scores_a, scores_b, names: Sequence[str] = ("a", "b"), where: str = ""):
    """Two rankers' scores of the same rows, side by side, for :func:`auc_difference_interval`.

    Rows are matched on ``group_id`` and ``item_id``. The result has ``group_id``, ``item_id``,
    ``label`` (``scores_a``'s) and ``score_<name>`` for each of ``names``. Raises ``ValueError``
    (prefixed with ``where``) when the two did not score exactly the same rows, or when both
    carry labels that disagree: a difference of AUCs over different rows means nothing.

    Parameters
    ----------
    scores_a, scores_b : pandas.DataFrame
        ``group_id``, ``item_id``, ``score``; ``scores_a`` also ``label``.
    names : pair of str
        Suffixes of the two score columns.
    where : str
        Names the comparison in error messages.

    Examples
    --------
    >>> import pandas as pd
    >>> a = pd.DataFrame({"group_id": [0, 0], "item_id": [1, 2], "label": [1, 0], "score": [0.9, 0.1]})
    >>> b = a.assign(score=[0.2, 0.8])
    >>> paired_scores(a, b, ("model", "popularity")).columns.tolist()
    ['group_id', 'item_id', 'label', 'score_model', 'score_popularity']
    """
    first, second = names
    prefix = f"{where}: " if where else ""
    keys = ["group_id", "item_id"]
    left = scores_a[keys + ["label", "score"]].rename(columns={"score": f"score_{first}"})
    right_columns = keys + ["score"] + (["label"] if "label" in scores_b.columns else [])
    right = scores_b[right_columns].rename(columns={"score": f"score_{second}", "label": f"label_{second}"})
    for name, frame in ((first, left), (second, right)):
        if frame.duplicated(keys).any():
            raise ValueError(f"{prefix}{name} scored some (group_id, item_id) rows more than once")
    paired = left.merge(right, on=keys, how="inner")
    if len(paired) != len(left) or len(paired) != len(right):
        raise ValueError(f"{prefix}{first} and {second} scored different rows "
                         f"({len(left)} and {len(right)} rows, {len(paired)} in common)")
    if f"label_{second}" in paired.columns:
        disagree = paired["label"] != paired[f"label_{second}"]
        if disagree.any():
            row = paired[disagree].iloc[0]
            raise ValueError(f"{prefix}{first} and {second} disagree on labels in {int(disagree.sum())} rows "
                             f"(e.g. group {row['group_id']}, item {row['item_id']})")
        paired = paired.drop(columns=f"label_{second}")
    return paired


def positive_rank_bounds(labels, scores, group_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group, the best and worst 1-based rank the positive can take, given ties.

    Returns
    -------
    groups : numpy.ndarray
        The sorted unique group ids.
    best, worst : numpy.ndarray of int64
        ``1 + #negatives scored higher``, and that plus ``#negatives tied with the positive``.

    Raises
    ------
    ValueError
        If a group does not hold exactly one positive (the group ids are named).
    """
    labels, scores, group_ids = _as_arrays(labels, scores, group_ids)
    groups, group_index = np.unique(group_ids, return_inverse=True)
    positives_per_group = np.bincount(group_index, weights=labels, minlength=groups.size).astype(np.int64)
    wrong = positives_per_group != 1
    if wrong.any():
        examples = ", ".join(f"{groups[i]!r} ({positives_per_group[i]})" for i in np.flatnonzero(wrong)[:5])
        raise ValueError(
            f"{int(wrong.sum())} groups do not have exactly one positive; group (positives): {examples}"
        )
    positive_score = np.empty(groups.size, dtype=np.float64)
    positive_rows = labels == 1
    positive_score[group_index[positive_rows]] = scores[positive_rows]
    reference = positive_score[group_index]
    negative = ~positive_rows
    higher = np.bincount(group_index, weights=negative & (scores > reference), minlength=groups.size)
    tied = np.bincount(group_index, weights=negative & (scores == reference), minlength=groups.size)
    best = 1 + higher.astype(np.int64)
    return groups, best, best + tied.astype(np.int64)


def _expected_over_ranks(cumulative: np.ndarray, best: np.ndarray, worst: np.ndarray, k: int) -> np.ndarray:
    """Mean of ``f(r)`` (0 beyond ``k``) for r uniform on [best, worst]; cumulative[r] = sum f(1..r)."""
    top = np.minimum(worst, k)
    total = np.where(top >= best, cumulative[top] - cumulative[np.minimum(best - 1, top)], 0.0)
    return total / (worst - best + 1)


def _per_group(best, worst, ks: Sequence[int], ties: str) -> dict[str, np.ndarray]:
    if ties not in _TIE_MODES:
        raise ValueError(f"ties must be one of {_TIE_MODES}, got {ties!r}")
    if ties == "pessimistic":
        best = worst
    size = int(worst.max())
    positions = np.arange(1, size + 1, dtype=np.float64)
    # cumulative[r] = sum over ranks 1..r; index 0 holds the empty sum.
    hits = np.concatenate([[0.0], np.cumsum(np.ones_like(positions))])
    reciprocal = np.concatenate([[0.0], np.cumsum(1.0 / positions)])
    discounted = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(positions + 1.0))])
    out = {}
    for k in ks:
        if int(k) != k or k < 1:
            raise ValueError(f"K must be a positive integer, got {k!r}")
        k = int(k)
        out[f"hr@{k}"] = _expected_over_ranks(hits, best, worst, k)
        out[f"mrr@{k}"] = _expected_over_ranks(reciprocal, best, worst, k)
        out[f"ndcg@{k}"] = _expected_over_ranks(discounted, best, worst, k)
    return out


def ranking_metrics(
    labels, scores, group_ids, ks: Iterable[int] = DEFAULT_KS, ties: str = "expected"
) -> dict:
    """AUC over all rows and the mean per-group HR@K, MRR@K and NDCG@K.

    Parameters
    ----------
    labels : array-like of {0, 1}
        One positive per group.
    scores : array-like of float
        The ranker's scores (e.g. P(yes)); higher ranks first.
    group_ids : array-like
        The group of each row (1 positive + N negatives).
    ks : iterable of int
        Cut-offs; default (3, 5, 10).
    ties : str
        ``"expected"`` (default, the expectation under random tie-breaking) or ``"pessimistic"``.

    Returns
    -------
    dict
        ``auc``, ``hr@K``, ``mrr@K``, ``ndcg@K`` for each K, plus ``n_rows``, ``n_groups``,
        ``n_positives``, ``ties``.

    Examples
    --------
    >>> ranking_metrics([1, 0, 0, 0, 1, 0], [0.9, 0.1, 0.2, 0.3, 0.4, 0.8], [7, 7, 7, 8, 8, 8], ks=(1,))["hr@1"]
    0.5
    """
    labels, scores, group_ids = _as_arrays(labels, scores, group_ids)
    groups, best, worst = positive_rank_bounds(labels, scores, group_ids)
    result: dict = {"auc": auc(labels, scores)}
    for name, values in _per_group(best, worst, tuple(ks), ties).items():
        result[name] = float(values.mean())
    result.update(n_rows=int(labels.size), n_groups=int(groups.size), n_positives=int(labels.sum()), ties=ties)
    return result


def hit_rate_curve(labels, scores, group_ids, max_k: int = 20, ties: str = "expected") -> np.ndarray:
    """HR@K for K = 1..max_k (index 0 is K=1), for plotting."""
    _, best, worst = positive_rank_bounds(labels, scores, group_ids)
    ks = range(1, max_k + 1)
    per_group = _per_group(best, worst, ks, ties)
    return np.array([per_group[f"hr@{k}"].mean() for k in ks])
