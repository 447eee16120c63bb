"""Ranking metrics against sklearn and against hand-computed cases, ties included."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import ndcg_score, roc_auc_score

from merlin_mllm.metrics import auc, auc_difference_interval, hit_rate_curve, paired_scores, positive_rank_bounds, ranking_metrics


def _random_groups(rng, n_groups, n_negatives, quantise=None):
    labels = np.tile(np.r_[1, np.zeros(n_negatives, dtype=int)], n_groups)
    scores = rng.normal(size=labels.size) + 0.8 * labels
    if quantise:  # coarse scores give many ties
        scores = np.round(scores * quantise) / quantise
    groups = np.repeat(np.arange(n_groups) * 10 + 3, n_negatives + 1)
    order = rng.permutation(labels.size)  # rows of a group need not be contiguous
    return labels[order], scores[order], groups[order]


@pytest.mark.parametrize("quantise", [None, 2])
def test_auc_matches_sklearn(quantise):
    labels, scores, groups = _random_groups(np.random.default_rng(0), 50, 20, quantise)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ranking_metrics(labels, scores, groups)["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("quantise", [None, 2, 0.5])
@pytest.mark.parametrize("k", [1, 3, 5, 10, 21])
def test_ndcg_matches_sklearn_tie_averaged(quantise, k):
    rng = np.random.default_rng(1)
    labels, scores, groups = _random_groups(rng, 40, 20, quantise)
    ours = ranking_metrics(labels, scores, groups, ks=(k,))[f"ndcg@{k}"]
    y_true = np.stack([labels[groups == g] for g in np.unique(groups)])
    y_score = np.stack([scores[groups == g] for g in np.unique(groups)])
    assert ours == pytest.approx(ndcg_score(y_true, y_score, k=k), abs=1e-12)


def test_hand_computed_without_ties():
    # group 7: positive first; group 8: two negatives above the positive (rank 3); group 9: rank 6.
    labels = [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    scores = [0.9, 0.1, 0.2, 0.7, 0.5, 0.8, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    groups = [7, 7, 7, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9]
    _, best, worst = positive_rank_bounds(labels, scores, groups)
    assert best.tolist() == worst.tolist() == [1, 3, 6]
    result = ranking_metrics(labels, scores, groups, ks=(3, 5))
    assert result["hr@3"] == pytest.approx(2 / 3)
    assert result["hr@5"] == pytest.approx(2 / 3)
    assert result["mrr@3"] == pytest.approx((1 + 1 / 3) / 3)
    assert result["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert result["n_groups"] == 3 and result["n_rows"] == 14 and result["n_positives"] == 3


def test_hand_computed_ties_expected_and_pessimistic():
    # One group: 1 negative above, the positive tied with 2 negatives, 1 below -> ranks 2..4.
    labels = [0, 1, 0, 0, 0]
    scores = [0.9, 0.5, 0.5, 0.5, 0.1]
    groups = [1] * 5
    expected = ranking_metrics(labels, scores, groups, ks=(1, 2, 3, 5))
    assert expected["hr@1"] == 0.0
    assert expected["hr@2"] == pytest.approx(1 / 3)  # only rank 2 of {2, 3, 4} is a hit
    assert expected["hr@3"] == pytest.approx(2 / 3)
    assert expected["hr@5"] == pytest.approx(1.0)
    assert expected["mrr@3"] == pytest.approx((1 / 2 + 1 / 3) / 3)
    assert expected["mrr@5"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert expected["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)) / 3)
    # AUC: positive beats 1 of 4 negatives, ties with 2 (one half each).
    assert expected["auc"] == pytest.approx((1 + 2 * 0.5) / 4)

    pessimistic = ranking_metrics(labels, scores, groups, ks=(3, 5), ties="pessimistic")
    assert pessimistic["hr@3"] == 0.0
    assert pessimistic["hr@5"] == 1.0
    assert pessimistic["mrr@5"] == pytest.approx(1 / 4)
    assert pessimistic["ndcg@5"] == pytest.approx(1 / math.log2(5))


def test_constant_scorer_is_chance_in_expectation_and_zero_when_pessimistic():
    labels = np.tile([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], 4)
    groups = np.repeat(np.arange(4), 10)
    scores = np.full(labels.size, 0.5)
    expected = ranking_metrics(labels, scores, groups, ks=(3, 10))
    assert expected["auc"] == 0.5
    assert expected["hr@3"] == pytest.approx(0.3)
    assert expected["hr@10"] == pytest.approx(1.0)
    assert expected["mrr@10"] == pytest.approx(sum(1 / r for r in range(1, 11)) / 10)
    pessimistic = ranking_metrics(labels, scores, groups, ks=(3,), ties="pessimistic")
    assert pessimistic["hr@3"] == 0.0


def test_hit_rate_curve_is_monotone_and_matches_metrics():
    labels, scores, groups = _random_groups(np.random.default_rng(2), 30, 20, quantise=3)
    curve = hit_rate_curve(labels, scores, groups, max_k=21)
    assert np.all(np.diff(curve) >= -1e-12)
    assert curve[-1] == pytest.approx(1.0)
    result = ranking_metrics(labels, scores, groups, ks=(3, 5, 10))
    for k in (3, 5, 10):
        assert curve[k - 1] == pytest.approx(result[f"hr@{k}"])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"group \(positives\): 8 \(2\)"):
        ranking_metrics([1, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], [7, 7, 8, 8])
    with pytest.raises(ValueError, match="row 2"):
        ranking_metrics([1, 0, 0], [0.1, 0.2, float("nan")], [1, 1, 1])
    with pytest.raises(ValueError, match="row 1 has 2"):
        auc([1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="ties must be"):
        ranking_metrics([1, 0], [0.1, 0.2], [1, 1], ties="optimistic")


def test_auc_difference_interval_is_paired_over_groups():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(40), 21)
    labels = np.tile(np.r_[1, np.zeros(20, dtype=int)], 40)
    noise = rng.normal(size=labels.size)
    good = noise + 1.5 * labels          # a ranker that sees the label
    bad = rng.normal(size=labels.size)   # one that does not
    out = auc_difference_interval(labels, good, bad, groups, resamples=500)
    assert out["difference"] == pytest.approx(auc(labels, good) - auc(labels, bad))
    assert 0 < out["low"] < out["difference"] < out["high"]
    assert out["groups"] == 40 and out["resamples"] == 500
    # The same ranker twice: every resample differs by exactly 0.
    same = auc_difference_interval(labels, good, good, groups, resamples=200)
    assert same["difference"] == same["low"] == same["high"] == 0.0
    # Swapping the rankers flips the interval.
    flipped = auc_difference_interval(labels, bad, good, groups, resamples=500)
    assert flipped["high"] == pytest.approx(-out["low"]) and flipped["low"] == pytest.approx(-out["high"])
    with pytest.raises(ValueError, match="not finite"):
        auc_difference_interval(labels, good, np.full(labels.size, np.nan), groups)


def test_auc_difference_interval_pools_replicates_within_strata():
    rng = np.random.default_rng(2)

    def replicate(strength):
        labels = np.tile(np.r_[1, np.zeros(20, dtype=int)], 40)
        return labels, rng.normal(size=labels.size) + strength * labels, rng.normal(size=labels.size)

    labels_1, good_1, bad_1 = replicate(1.0)
    labels_2, good_2, bad_2 = replicate(1.0)
    groups = np.tile(np.repeat(np.arange(40), 21), 2)  # the same group ids in both replicates
    strata = np.repeat([0, 1], labels_1.size)
    labels = np.r_[labels_1, labels_2]
    # Replicate 1's model "a" scores on another scale: pooling rows across strata would be wrong.
    good, bad = np.r_[good_1, good_2 + 100.0], np.r_[bad_1, bad_2]
    pooled = auc_difference_interval(labels, good, bad, groups, strata=strata, resamples=400)
    one = auc_difference_interval(labels_1, good_1, bad_1, groups[: labels_1.size], resamples=400)
    two = auc_difference_interval(labels_2, good_2, bad_2, groups[: labels_2.size], resamples=400)
    assert pooled["per_stratum"] == pytest.approx([one["difference"], two["difference"]])
    assert pooled["difference"] == pytest.approx((one["difference"] + two["difference"]) / 2)
    assert pooled["groups"] == 80 and pooled["strata"] == 2
    assert pooled["low"] < pooled["difference"] < pooled["high"]
    # Twice the users: a narrower interval than either replicate alone.
    width = pooled["high"] - pooled["low"]
    assert width < one["high"] - one["low"] and width < two["high"] - two["low"]
    # One stratum given explicitly is the unstratified interval, draw for draw.
    assert auc_difference_interval(labels_1, good_1, bad_1, groups[:840], strata=np.zeros(840), resamples=400) == one
    with pytest.raises(ValueError, match="strata must have"):
        auc_difference_interval(labels_1, good_1, bad_1, groups[:840], strata=[0, 1])


def test_paired_scores_pairs_rows_and_refuses_different_ones():
    a = pd.DataFrame({"group_id": [0, 0, 1, 1], "item_id": [5, 6, 5, 7], "label": [1, 0, 1, 0], "score": [0.9, 0.2, 0.4, 0.6]})
    b = a.sample(frac=1.0, random_state=0).assign(score=lambda f: f["item_id"] * 1.0)  # other row order
    paired = paired_scores(a, b, ("model", "popularity"))
    assert paired.columns.tolist() == ["group_id", "item_id", "label", "score_model", "score_popularity"]
    assert (paired["score_popularity"] == paired["item_id"]).all() and len(paired) == 4
    assert paired_scores(a, b.drop(columns="label")).shape == (4, 5)  # b without labels is fine
    with pytest.raises(ValueError, match=r"quality: model and popularity scored different rows \(4 and 3 rows, 3 in common\)"):
        paired_scores(a, b.iloc[:3], ("model", "popularity"), where="quality")
    with pytest.raises(ValueError, match="disagree on labels in 1 rows"):
        paired_scores(a, b.assign(label=[1, 0, 1, 1]))
    with pytest.raises(ValueError, match="b scored some .* more than once"):
        paired_scores(a, pd.concat([b, b.iloc[:1]]))
