"""Training on groups (issue 15): the data module's micro-batches of whole groups, TrainConfig's
group settings, and a short end-to-end run on a real prepared ML-100k folder with the embedded
model, whose recorded per-step ``listwise`` loss equals the loss computed by hand from each
candidate's own full-prompt logits, across a checkpoint and a resume."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from merlin_mllm.models.tiny import tiny_mllm_path
from merlin_mllm.pipelines.train_config import BATCHINGS, TrainConfig
from merlin_mllm.pipelines.training import RankerDataModule, group_size, shuffle_groups
from tests.ranker_support import own_prompt_margins

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import merlin.io

pytestmark = pytest.mark.filterwarnings("ignore")


def _frame(sizes, first_group=100):
    rows = []
    for g, size in enumerate(sizes):
        rows += [{"group_id": first_group + g, "user_id": g + 1, "item_id": 10 * g + i + 1, "label": int(i == 0)}
                 for i in range(size)]
    return pd.DataFrame(rows).astype(np.int64)


def test_batching_names():
    assert set(BATCHINGS) == {"groups", "rows"}


@pytest.mark.parametrize("changes, message", [
    ({"batching": "users"}, "^batching must be one of"),
    ({"loss": "listwise", "batching": "rows"}, "^loss='listwise' compares the candidates of one group"),
    ({"prompt_version": "3"}, "^prompt_version must be one of"),
])
def test_group_settings_are_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_group_settings_are_saved_and_must_match_on_resume():
    assert {"batching", "loss", "prompt_version"} <= set(TrainConfig.resume_fields())
    assert {"batching", "loss", "prompt_version"} <= set(TrainConfig().saved_fields())


def test_group_size_and_its_errors():
    assert group_size(_frame([4, 4, 4])) == 4
    with pytest.raises(ValueError, match=r"groups of one size .* got sizes \{2: 1, 4: 2\}"):
        group_size(_frame([4, 2, 4]), "train")
    scattered = _frame([2, 2]).iloc[[0, 2, 1, 3]]
    with pytest.raises(ValueError, match="not contiguous"):
        group_size(scattered)


def test_shuffle_groups_moves_whole_groups_and_is_seeded():
    frame = _frame([3] * 6)
    once, again, other = shuffle_groups(frame, 1), shuffle_groups(frame, 1), shuffle_groups(frame, 2)
    pd.testing.assert_frame_equal(once, again)
    assert once["group_id"].tolist() != other["group_id"].tolist()
    for shuffled in (once, other):
        assert group_size(shuffled) == 3  # still contiguous
        for _, group in shuffled.groupby("group_id", sort=False):
            pd.testing.assert_frame_equal(group.reset_index(drop=True),
                                          frame[frame["group_id"] == group["group_id"].iloc[0]].reset_index(drop=True))


def _batches(module, epoch=0):
    class _FitLoop:
        restarting = False  # not resuming a checkpoint

    class _Trainer:  # what the data module reads of Lightning's trainer
        world_size, global_rank, current_epoch, fit_loop = 1, 0, epoch, _FitLoop()

    module.trainer = _Trainer()
    out = []
    for features, _ in module.train_dataloader():
        labels = features["label"]  # untagged here, so a feature
        out.append((features["group_id"].reshape(-1).tolist(), labels.reshape(-1).tolist()))
    return out


@pytest.mark.parametrize("batch_size, groups_per_batch", [(8, 2), (5, 1), (2, 1), (13, 3)])
def test_group_batches_hold_whole_groups(batch_size, groups_per_batch):
    frame = _frame([4] * 7)
    data = merlin.io.Dataset(frame, cpu=True)
    module = RankerDataModule(data, batch_size=batch_size, seed=3, groups=True)
    assert module.rows_per_batch("train") == 4 * groups_per_batch
    batches = _batches(module)
    seen = [g for ids, _ in batches for g in ids]
    assert sorted(seen) == sorted(frame["group_id"].tolist())
    for ids, labels in batches:
        counts = pd.Series(ids).value_counts()
        assert (counts == 4).all() and len(counts) <= groups_per_batch
        assert sum(labels) == len(counts)  # one positive per group
    # Another epoch, another order of the groups; the same epoch, the same order.
    first = [ids for ids, _ in batches]
    assert first == [ids for ids, _ in _batches(module, epoch=0)]
    assert first != [ids for ids, _ in _batches(module, epoch=1)]


def test_row_batches_are_unchanged():
    frame = _frame([4] * 7)
    module = RankerDataModule(merlin.io.Dataset(frame, cpu=True), batch_size=5, seed=3)
    assert module.rows_per_batch("train") == 5
    batches = _batches(module)
    assert sorted(g for ids, _ in batches for g in ids) == sorted(frame["group_id"].tolist())
    # Seeded by the epoch, like the groups, so a resumed epoch can be rebuilt in its order.
    assert batches == _batches(module, epoch=0) and batches != _batches(module, epoch=1)


# --------------------------------------------------------------------------- end to end, embedded model
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A real ML-100k folder with training groups of 1 + 3 and title summaries (no LLM)."""
    from merlin_mllm.data.prepare import prepare_dataset
    from merlin_mllm.summaries.rows import recent_titles_summaries

    data = tmp_path_factory.mktemp("groups") / "data"
    prepare_dataset("ml-100k", "leave-last-out", data, max_users=6, max_history=9, seed=1, train_negatives=3)
    return data, recent_titles_summaries(data, last=3)


def _hand_listwise_loss(ranker, data, summaries, group_id) -> float:
    """-log softmax(yes - no)[positive] over the group, each candidate from its own full prompt,
    one unpacked forward per candidate (no packing, no shared prefix)."""
    from merlin_mllm.pipelines.training import load_rows

    rows = load_rows(data, "train", summaries)
    group = rows[rows["group_id"] == group_id]
    assert len(group) == 4 and group["label"].sum() == 1
    margins = own_prompt_margins(ranker, group)
    top = margins.max()
    return float(np.log(np.exp(margins - top).sum()) + top - margins[group["label"].to_numpy() == 1][0])


def test_listwise_group_training_losses_equal_the_hand_computed_ones_across_a_resume(prepared, tmp_path):
    import shutil

    from merlin_mllm.pipelines.training import train_ranker
    from merlin_mllm.ranker.model import RankerModel

    data, summaries = prepared
    run = tmp_path / "run"
    config = dict(batching="groups", loss="listwise", prompt_version="2", use_images=False, lora_dropout=0.0,
                  batch_size=4, checkpoint_every_n_steps=1, validate=False)
    train_ranker(data, summaries, run, TrainConfig.small_budget(max_steps=1, **config), progress=False)
    after_one = tmp_path / "after_one"
    shutil.copytree(run / "model", after_one)
    first = json.loads((run / "training.json").read_text())
    assert first["settings"]["batching"] == "groups" and first["settings"]["loss"] == "listwise"
    [step] = first["micro_batch_losses"]
    assert len(step["group_ids"]) == 1 and step["rows"] == 4 and first["rows_seen"] == 4

    # Step 1 ran the initial adapter (LoRA B = 0): the base model's logits.
    base = RankerModel.build("embedded", use_images=False, lora_dropout=0.0, seed=42, prompt_version="2")
    base.eval()
    assert step["loss"] == pytest.approx(_hand_listwise_loss(base, data, summaries, step["group_ids"][0]), abs=1e-4)

    # Resumed from the step-1 checkpoint, step 2 ran the weights saved after step 1.
    train_ranker(data, summaries, run, TrainConfig.small_budget(max_steps=2, **config), progress=False)
    second = json.loads((run / "training.json").read_text())
    assert second["resumed_from"] and second["global_step"] == 2
    steps = second["micro_batch_losses"]
    assert [s["optimizer_step"] for s in steps] == [0, 1] and steps[0] == step
    trained = RankerModel.from_pretrained(after_one)
    trained.eval()
    expected = _hand_listwise_loss(trained, data, summaries, steps[1]["group_ids"][0])
    assert steps[1]["loss"] == pytest.approx(expected, abs=1e-4)
    assert abs(expected - _hand_listwise_loss(base, data, summaries, steps[1]["group_ids"][0])) > 1e-3  # it trained

    # A resume with other batching is refused, naming the field.
    with pytest.raises(ValueError, match="batching"):
        train_ranker(data, summaries, run, TrainConfig.small_budget(**{**config, "batching": "rows", "loss": "lm"}),
                     progress=False)


@pytest.mark.parametrize("loss", ["lm", "binary"])
def test_group_training_with_the_row_losses_runs_and_validates(prepared, tmp_path, loss):
    from merlin_mllm.pipelines.training import train_ranker

    data, summaries = prepared
    # The tiny random LLaVA-NeXT (text only): this checks the batches, steps and validation, not the
    # numbers (the listwise test above checks those on the embedded model).
    tiny = str(tiny_mllm_path("llava_next"))
    train_ranker(data, summaries, tmp_path / "run", TrainConfig.small_budget(
        batching="groups", loss=loss, prompt_version="2", use_images=False, batch_size=8, epochs=1, base_model=tiny),
        progress=False)
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    # 6 users x 1 training group of 4 rows, 2 groups per micro-batch; validation ran on valid groups.
    assert summary["rows_seen"] == 24 and summary["global_step"] == 3 and summary["val_loss"] is not None
    assert all(len(s["group_ids"]) == 2 and s["rows"] == 8 for s in summary["micro_batch_losses"])
    assert (tmp_path / "run" / "model").is_dir()


def test_the_defaults_are_what_the_committed_measurement_chose():
    from pathlib import Path

    measured = json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "quality" / "group_training_quality.json").read_text())
    decision, runs = measured["decision"], measured["runs"]
    config = TrainConfig()
    assert (config.batching, config.loss) == (decision["default_batching"], decision["default_loss"])
    assert config.prompt_version == runs[decision["best_group_run"]]["prompt_version"]
    # Every run saw the same candidate rows; groups reached the rows' valid AUC.
    assert len({r["rows_seen"] for r in runs.values()}) == 1 and decision["groups_reach_rows_valid_auc"]
    assert max(r["valid"]["auc"] for r in runs.values() if r["batching"] == "groups") >= runs["rows-lm"]["valid"]["auc"]


@pytest.mark.parametrize("batching, stop_at", [("groups", 2), ("groups", 3), ("rows", 4)])
def test_a_run_resumed_mid_epoch_or_at_its_end_trains_the_batches_an_unbroken_run_trains(
        prepared, tmp_path, batching, stop_at):
    """Lightning restarts a loader from its first batch on a resume; the epoch must go on where it stopped.

    6 training groups of 4 rows, 2 groups (or 8 rows) per micro-batch: 3 batches an epoch, 5 steps
    over 2 epochs. Stopped after step 2 (mid-epoch), 3 (the epoch's end) or 4 (mid-epoch 2), as
    by a crash; the resumed run's record keeps the steps before the stop.
    """
    from merlin_mllm.pipelines.training import train_ranker

    data, summaries = prepared
    config = dict(batching=batching, use_images=False, lora_dropout=0.0, batch_size=8, epochs=2, validate=False,
                  checkpoint_every_n_steps=1, base_model=str(tiny_mllm_path("llava_next")))
    train_ranker(data, summaries, tmp_path / "unbroken", TrainConfig.small_budget(max_steps=5, **config),
                 progress=False)
    unbroken = json.loads((tmp_path / "unbroken" / "training.json").read_text())["micro_batch_losses"]

    run = tmp_path / "resumed"
    train_ranker(data, summaries, run, TrainConfig.small_budget(max_steps=stop_at, **config), progress=False)
    # What a crash leaves: the checkpoint, not the records written at the end.
    (run / "training.json").unlink()
    (run / "ranks" / "rank0.json").unlink()
    train_ranker(data, summaries, run, TrainConfig.small_budget(max_steps=5, **config), progress=False)
    resumed = json.loads((run / "training.json").read_text())
    assert resumed["resumed_from"] and resumed["global_step"] == 5 and resumed["rows_seen"] == 5 * 8

    assert [s["group_ids"] for s in resumed["micro_batch_losses"]] == [s["group_ids"] for s in unbroken]
    assert [s["epoch"] for s in unbroken] == [0, 0, 0, 1, 1]
    if batching == "groups":  # the first epoch trains each of the 6 groups once
        first_epoch = sum((s["group_ids"] for s in unbroken[:3]), [])
        assert len(first_epoch) == len(set(first_epoch)) == 6
    # The same weights before every step: the same losses (no dropout).
    assert [s["loss"] for s in resumed["micro_batch_losses"]] == pytest.approx([s["loss"] for s in unbroken], abs=1e-5)
