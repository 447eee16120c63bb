"""The hybrid's head and score (merlin_mllm.ranker.hybrid_head) and the head's trainer
(merlin_mllm.pipelines.hybrid): shapes, training on a separable toy set, the LLM part optional."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import merlin.models.torch as mm
from merlin_mllm.metrics import auc
from merlin_mllm.pipelines.hybrid import HeadSettings, head_scores, train_head
from merlin_mllm.ranker.hybrid_head import HybridHead, HybridScore

NAMES = ("item_log_count", "retrieval_score", "user_log_count")


def toy_rows(n: int, seed: int) -> pd.DataFrame:
    """Two classes separated along item_log_count + retrieval_score; user_log_count is noise."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    shift = np.where(label == 1, 1.5, -1.5)
    return pd.DataFrame({"item_log_count": 3.0 + shift + rng.normal(0, 0.5, n),
                         "retrieval_score": 10.0 * (shift + rng.normal(0, 0.5, n)),
                         "user_log_count": rng.normal(2.0, 1.0, n), "label": label})


def features_of(rows: pd.DataFrame) -> dict:
    return {name: torch.as_tensor(rows[name].to_numpy(np.float32)) for name in NAMES}


def test_head_is_a_merlin_block_of_the_right_shape():
    head = HybridHead(NAMES, hidden=(8, 4))
    assert isinstance(head, mm.Block) and isinstance(head.mlp, mm.MLPBlock)
    # The LazyLinear layers are materialised: an optimizer made now sees every parameter.
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in head.parameters())
    assert sum(p.numel() for p in head.parameters()) == 3 * 8 + 8 + 8 * 4 + 4 + 4 + 1
    rows = toy_rows(5, 0)
    by_name = head(features_of(rows))
    assert by_name.shape == (5,)
    columns = {name: value.reshape(-1, 1) for name, value in features_of(rows).items()}  # (B, 1) columns
    torch.testing.assert_close(head(columns), by_name)
    matrix = torch.as_tensor(rows[list(NAMES)].to_numpy(np.float32))
    torch.testing.assert_close(head(matrix), by_name)
    # The columns are stacked in feature_names order, not MLPBlock's sorted-key order.
    reordered = HybridHead(tuple(reversed(NAMES)), hidden=(8, 4))
    reordered.load_state_dict(head.state_dict())
    assert not torch.allclose(reordered(features_of(rows)), by_name)
    linear = HybridHead(NAMES, hidden=())
    assert linear.mlp is None and linear(matrix).shape == (5,)
    with pytest.raises(KeyError, match="retrieval_score"):
        head({"item_log_count": torch.zeros(2), "user_log_count": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        head(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="non-empty"):
        HybridHead([])


def test_fit_scaling_standardises_and_keeps_constant_columns_finite():
    rows = toy_rows(200, 1).assign(user_log_count=2.5)
    head = HybridHead(NAMES).fit_scaling(rows)
    np.testing.assert_allclose(head.feature_mean.numpy(), rows[list(NAMES)].mean().to_numpy(), rtol=1e-5)
    assert head.feature_std[2].item() == 1.0  # constant column: centred only
    assert torch.isfinite(head(features_of(rows))).all()


def test_inputs_are_clipped_to_the_training_range_in_memory_and_saved(tmp_path):
    """A value beyond anything seen in training (a retrieval score of 1e30) is scored as the
    training maximum, instead of letting the MLP extrapolate to an arbitrary logit."""
    train = toy_rows(200, 7)
    head = HybridHead(NAMES, hidden=(8,)).fit_scaling(train)
    np.testing.assert_allclose(head.feature_min.numpy(), train[list(NAMES)].min().to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(head.feature_max.numpy(), train[list(NAMES)].max().to_numpy(), rtol=1e-6)
    rows = toy_rows(4, 8)
    inside = head(features_of(rows))
    far = rows.assign(retrieval_score=[1e30, -1e30, 1e30, 0.0])
    clipped = rows.assign(retrieval_score=[train["retrieval_score"].max(), train["retrieval_score"].min(),
                                           train["retrieval_score"].max(), 0.0])
    torch.testing.assert_close(head(features_of(far)), head(features_of(clipped)))
    assert torch.isfinite(head(features_of(far))).all()
    # inside the range nothing changes: the same logits as without any bounds
    unbounded = HybridHead(NAMES, hidden=(8,))
    unbounded.load_state_dict({**head.state_dict(), "feature_min": torch.full((3,), float("-inf")),
                               "feature_max": torch.full((3,), float("inf"))})
    torch.testing.assert_close(unbounded(features_of(train)), head(features_of(train)))
    assert not torch.allclose(unbounded(features_of(far)), head(features_of(far)))
    # the range travels with the saved head; a head saved without one stays unbounded
    loaded = HybridHead.load(head.save(tmp_path / "head.safetensors"))
    torch.testing.assert_close(loaded(features_of(far)), head(features_of(far)))
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(str(tmp_path / "head.safetensors")).items() if k not in ("feature_min", "feature_max")}
    save_file(state, str(tmp_path / "old.safetensors"), metadata={"feature_names": '["item_log_count", '
              '"retrieval_score", "user_log_count"]', "hidden": "[8]"})
    old = HybridHead.load(tmp_path / "old.safetensors")
    assert torch.isinf(old.feature_max).all() and torch.isinf(old.feature_min).all()
    with pytest.raises(ValueError, match="training row 1 holds a non-finite"):
        HybridHead(NAMES).fit_scaling(train.iloc[:3].assign(retrieval_score=[0.0, np.inf, 1.0]))


def test_trains_on_a_separable_toy_set():
    train, valid, test = toy_rows(400, 2), toy_rows(200, 3), toy_rows(300, 4)
    fit = train_head(train, valid, NAMES, seed=0, settings=HeadSettings(epochs=150, patience=40))
    assert fit.best_valid_auc > 0.98 and 1 <= fit.best_epoch <= len(fit.train_loss) <= 150
    assert fit.train_loss[-1] < fit.train_loss[0]
    scored = head_scores(fit.head, test)
    assert auc(scored["label"], scored["score"]) > 0.98
    assert set(fit.summary()) >= {"best_epoch", "best_valid_auc", "settings", "seconds"}
    # Same seed, same head.
    again = train_head(train, valid, NAMES, seed=0, settings=HeadSettings(epochs=150, patience=40))
    np.testing.assert_allclose(head_scores(again.head, test)["score"], scored["score"])
    with pytest.raises(ValueError, match="lack column"):
        train_head(train.drop(columns="retrieval_score"), valid, NAMES)


def test_hybrid_without_llm_equals_the_head_alone():
    head = HybridHead(NAMES)
    inputs = features_of(toy_rows(6, 5))
    hybrid = HybridScore(head)
    assert not hybrid.has_llm and hybrid.llm_logit(inputs) is None
    torch.testing.assert_close(hybrid(inputs), head(inputs))
    # Extra columns (an LLM logit nobody asked for) change nothing.
    torch.testing.assert_close(hybrid({**inputs, "llm_logit": torch.ones(6)}), head(inputs))


def test_hybrid_adds_the_llm_logit():
    head = HybridHead(NAMES)
    inputs = features_of(toy_rows(6, 6))
    llm_logit = torch.linspace(-2, 2, 6)
    from_column = HybridScore(head, llm_column="llm_logit")
    torch.testing.assert_close(from_column({**inputs, "llm_logit": llm_logit}), head(inputs) + llm_logit)
    torch.testing.assert_close(from_column.head_logit(inputs), head(inputs))
    with pytest.raises(KeyError, match="llm_logit"):
        from_column(inputs)

    class FakeRankerBlock(mm.Block):
        """Stands in for RankerBlock: a (B,) yes-minus-no logit from the batch's features."""

        def forward(self, inputs, batch=None):
            return 2.0 * inputs["item_log_count"]

    from_module = HybridScore(head, FakeRankerBlock(), learn_llm_scale=True)
    out = from_module(inputs)
    torch.testing.assert_close(out, head(inputs) + 2.0 * inputs["item_log_count"])
    out.sum().backward()
    assert from_module.llm_scale.grad is not None  # the scale trains with the head
    assert head.output_layer.weight.grad is not None
    with pytest.raises(ValueError, match="not both"):
        HybridScore(head, FakeRankerBlock(), llm_column="llm_logit")


def test_the_saved_head_records_its_recent_window_and_old_folders_still_load(tmp_path):
    from merlin_mllm.data.collaborative import DEFAULT_RECENT_DAYS
    from merlin_mllm.ranker.ranker_config import HEAD_FILE, LEGACY_HEAD_FILE
    from merlin_mllm.ranker.hybrid_head import saved_head, saved_head_path

    rows = pd.DataFrame(np.arange(12, dtype=np.float64).reshape(4, 3), columns=list(NAMES))
    head = HybridHead(NAMES, hidden=(), recent_days=7.5).fit_scaling(rows)
    assert HybridHead.load(head.save(tmp_path / "h.safetensors")).recent_days == 7.5
    with pytest.raises(ValueError, match="recent_days must be positive"):
        HybridHead(NAMES, recent_days=0)
    # A folder saved before the hybrid had one name: the head under its old file name, no window.
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    folder.mkdir()
    save_file(load_file(str(tmp_path / "h.safetensors")), str(folder / LEGACY_HEAD_FILE),
              metadata={"feature_names": json.dumps(list(NAMES)), "hidden": "[]"})
    assert saved_head_path(folder) == folder / LEGACY_HEAD_FILE
    old = saved_head(folder)
    assert old.feature_names == tuple(NAMES) and old.recent_days == DEFAULT_RECENT_DAYS
    torch.testing.assert_close(old(torch.as_tensor(rows.to_numpy(np.float32))),
                               head(torch.as_tensor(rows.to_numpy(np.float32))))
    head.save(folder / HEAD_FILE)  # the current name wins
    assert saved_head_path(folder) == folder / HEAD_FILE and saved_head(folder).recent_days == 7.5
    assert saved_head(tmp_path / "nothing here") is None
