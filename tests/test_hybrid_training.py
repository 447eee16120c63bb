"""The hybrid ranker trained jointly (issue 16): the LLM's yes-minus-no logit plus a tabular head
over NVTabular collaborative features, on a real prepared ML-100k folder. The LLM is the tiny
random LLaVA-NeXT (text only, SmolLM2's tokenizer): what is checked is arithmetic and plumbing,
which a 135M model would make 20x slower without checking more (the quickstart's test trains the
embedded hybrid end to end).

The first step's recorded listwise loss equals the one computed by hand from each candidate's own
full-prompt LLM logit plus the warm-started head's logit; the head is saved beside the ranker
and evaluation adds the same head to the same LLM logits the plain ranker gives."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from merlin_mllm.data.collaborative import FEATURE_COLUMNS
from merlin_mllm.models.tiny import tiny_mllm_path
from merlin_mllm.pipelines.train_config import TrainConfig
from tests.ranker_support import own_prompt_margins

pytestmark = pytest.mark.filterwarnings("ignore")

TINY = str(tiny_mllm_path("llava_next"))
CONFIG = dict(batching="groups", loss="listwise", prompt_version="2", use_images=False, lora_dropout=0.0,
              batch_size=4, validate=False, head_features=FEATURE_COLUMNS, head_hidden=(4,), base_model=TINY)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A real ML-100k folder (training groups of 1 + 3), title summaries, and each split's rows
    with the collaborative features as of each row's time (the NVTabular workflow)."""
    from merlin_mllm.data.prepare import prepare_dataset
    from merlin_mllm.pipelines.hybrid import hybrid_feature_rows
    from merlin_mllm.summaries.rows import recent_titles_summaries

    data = tmp_path_factory.mktemp("hybrid") / "data"
    # 20 users with every event kept (max_history=0): counted as of each training row's time, the
    # candidates of a group still differ in their counts.
    prepare_dataset("ml-100k", "leave-last-out", data, max_users=20, max_history=0, seed=1, train_negatives=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        features = {split: hybrid_feature_rows(data, split, retrieval=False) for split in ("train", "test")}
    return data, recent_titles_summaries(data, last=3), features


def test_hybrid_training_loss_saved_head_and_scores(prepared, tmp_path):
    from merlin_mllm.pipelines.evaluation import evaluate_ranker
    from merlin_mllm.pipelines.hybrid import attach_features
    from merlin_mllm.pipelines.training import initial_head, load_rows, train_ranker
    from merlin_mllm.ranker.ranker_config import HEAD_FILE
    from merlin_mllm.ranker.hybrid_head import HybridHead
    from merlin_mllm.ranker.model import RankerModel
    from merlin_mllm.ranker.saved import load_ranker

    data, summaries, features = prepared
    config = TrainConfig.small_budget(max_steps=1, **CONFIG)
    run = tmp_path / "run"
    train_ranker(data, summaries, run, config, features=features["train"], progress=False)
    record = json.loads((run / "training.json").read_text())
    [step] = record["micro_batch_losses"]
    assert record["settings"]["head_features"] == list(FEATURE_COLUMNS)

    # Step 1: base LLM (LoRA B = 0) plus the warm-started head, listwise over the group.
    rows = attach_features(load_rows(data, "train", summaries), features["train"], FEATURE_COLUMNS)
    head = initial_head(config, rows)
    group = rows[rows["group_id"] == step["group_ids"][0]]
    base = RankerModel.build(TINY, use_images=False, lora_dropout=0.0, seed=42, prompt_version="2").eval()
    with torch.no_grad():
        head_logit = head(torch.as_tensor(group[list(FEATURE_COLUMNS)].to_numpy(np.float32))).double().numpy()
    assert np.ptp(head_logit) > 1e-3  # the head tells this group's candidates apart
    hybrid = own_prompt_margins(base, group) + head_logit
    positive = hybrid[group["label"].to_numpy() == 1][0]
    expected = np.log(np.exp(hybrid - hybrid.max()).sum()) + hybrid.max() - positive
    assert step["loss"] == pytest.approx(expected, abs=1e-4)
    # ... which is not the LLM's loss alone: the head took part.
    llm_only = own_prompt_margins(base, group)
    assert abs(expected - (np.log(np.exp(llm_only).sum()) - llm_only[group["label"].to_numpy() == 1][0])) > 1e-3

    # The head trained with the LoRA weights and was saved beside them.
    saved_head = HybridHead.load(run / "model" / HEAD_FILE)
    assert saved_head.feature_names == tuple(FEATURE_COLUMNS)
    moved = [not torch.allclose(a, b) for a, b in zip(saved_head.state_dict().values(), head.state_dict().values())]
    assert any(moved)
    # It clips its inputs to the training rows' range, recorded in the saved file.
    train_values = rows[list(FEATURE_COLUMNS)].to_numpy(np.float32)
    np.testing.assert_array_equal(saved_head.feature_min.numpy(), train_values.min(axis=0))
    np.testing.assert_array_equal(saved_head.feature_max.numpy(), train_values.max(axis=0))

    # Evaluation: score = sigmoid(LLM logit + head logit), each part kept.
    result = evaluate_ranker(data, summaries, run, tmp_path / "eval" / "test.json", features=features["test"],
                             progress=False)
    assert result["run"]["head_features"] == list(FEATURE_COLUMNS)
    scores = pd.read_parquet(result["run"]["scores"])
    np.testing.assert_allclose(scores["score"], 1 / (1 + np.exp(-(scores["llm_logit"] + scores["head_logit"]))),
                               rtol=0, atol=1e-12)
    test = attach_features(scores[["group_id", "item_id"]], features["test"], FEATURE_COLUMNS)
    with torch.no_grad():
        expected_head = saved_head(torch.as_tensor(test[list(FEATURE_COLUMNS)].to_numpy(np.float32))).double().numpy()
    np.testing.assert_allclose(scores["head_logit"], expected_head, atol=1e-6)
    ranker = load_ranker(run / "model", data)
    # Its "without SFT" baseline asks the trained ranker's question (prompt v2), without adapter.
    zero_shot = load_ranker(run / "model", data, zero_shot=True)
    assert zero_shot.config.prompt_version == ranker.config.prompt_version == "2"
    first = scores[scores["group_id"] == scores["group_id"].iloc[0]]
    test_rows = load_rows(data, "test", summaries)
    group = test_rows[test_rows["group_id"] == first["group_id"].iloc[0]]
    p = ranker.score(group["user_summary"].iloc[0], [{"item_id": int(i), "title": t} for i, t in zip(group["item_id"], group["title"])])
    np.testing.assert_allclose(first["llm_logit"], np.log(p) - np.log1p(-p), atol=1e-5)


def test_hybrid_settings_and_inputs_are_checked(prepared, tmp_path):
    from merlin_mllm.pipelines.evaluation import evaluate_ranker
    from merlin_mllm.pipelines.training import train_ranker

    data, summaries, features = prepared
    with pytest.raises(ValueError, match="'lm' is a loss over the LLM's vocabulary"):
        TrainConfig(batching="rows", head_features=FEATURE_COLUMNS)
    with pytest.raises(ValueError, match="head_hidden must be"):
        TrainConfig(head_hidden=(0,))
    with pytest.raises(ValueError, match=r"need features=<the training rows"):
        train_ranker(data, summaries, tmp_path / "a", TrainConfig.small_budget(max_steps=1, **CONFIG), progress=False)
    short = features["train"].iloc[1:]
    first = features["train"].iloc[0]
    with pytest.raises(ValueError, match=rf"group {int(first['group_id'])}, item {int(first['item_id'])}"):
        train_ranker(data, summaries, tmp_path / "b", TrainConfig.small_budget(max_steps=1, **CONFIG),
                     features=short, progress=False)
    with pytest.raises(ValueError, match="config.head_features is None"):
        train_ranker(data, summaries, tmp_path / "c", TrainConfig.small_budget(
            max_steps=1, **{**CONFIG, "head_features": None}), features=features["train"], progress=False)
    # A hybrid scored without its features is refused before any scoring.
    run = tmp_path / "run"
    train_ranker(data, summaries, run, TrainConfig.small_budget(max_steps=1, **CONFIG), features=features["train"],
                 progress=False)
    with pytest.raises(ValueError, match="is a hybrid ranker"):
        evaluate_ranker(data, summaries, run, tmp_path / "e.json", progress=False)


def test_cli_trains_and_evaluates_a_hybrid(prepared, tmp_path):
    """`merlin-mllm train --hybrid` computes the training rows' features from the prepared folder
    (the NVTabular workflow), and `evaluate` scores the hybrid with the test rows' own."""
    import subprocess
    import sys

    data, summaries, features = prepared
    table = tmp_path / "summaries.parquet"
    summaries.to_parquet(table, index=False)
    columns = ",".join(FEATURE_COLUMNS)
    run = tmp_path / "run"

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "merlin_mllm.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = cli("train", "--data", data, "--summaries", table, "--out", run, "--no-image", "--max-steps", "1",
              "--batch-size", "4", "--hybrid", "--head-features", columns, "--base-model", TINY)
    assert f"hybrid over {', '.join(FEATURE_COLUMNS)}" in out and "listwise loss, prompt v2" in out
    written = pd.read_parquet(run / "features_train.parquet")
    pd.testing.assert_frame_equal(written[["group_id", "item_id", *FEATURE_COLUMNS]].reset_index(drop=True),
                                  features["train"][["group_id", "item_id", *FEATURE_COLUMNS]].reset_index(drop=True),
                                  check_dtype=False)
    cli("evaluate", "--data", data, "--summaries", table, "--model", run, "--out", tmp_path / "eval" / "test.json")
    scores = pd.read_parquet(tmp_path / "eval" / "test.scores.parquet")
    assert {"llm_logit", "head_logit"} <= set(scores.columns) and (tmp_path / "eval" / "features_test.parquet").exists()
    np.testing.assert_allclose(scores["score"], 1 / (1 + np.exp(-(scores["llm_logit"] + scores["head_logit"]))))
