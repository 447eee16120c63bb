"""``TrainConfig``: the training settings, checked when made (no model, no Merlin: fast)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from merlin_mllm.pipelines.train_config import TrainConfig


def test_defaults_are_the_papers_recipe():
    config = TrainConfig()
    assert (config.base_model, config.use_images, config.lora_r, config.lora_alpha, config.lora_dropout) == (None, True, 8, 16, 0.05)
    assert (config.lr, config.projector_lr, config.epochs, config.max_steps) == (2e-5, None, 1, -1)
    assert (config.grad_accum, config.max_length, config.batch_size, config.seed) == (8, 512, 4, 42)
    # Groups by default (benchmarks/quality/group_training_quality.json), with their resolved loss and prompt.
    assert (config.batching, config.loss, config.prompt_version) == ("groups", "listwise", "2")
    assert (TrainConfig(batching="rows").loss, TrainConfig(batching="rows").prompt_version) == ("lm", "1")
    assert (config.devices, config.strategy, config.accelerator, config.max_groups) == (1, "auto", None, None)
    assert (config.resume, config.validate, config.checkpoint_every_n_steps) == (True, True, 50)
    assert all(f.metadata["help"] for f in dataclasses.fields(TrainConfig))


def test_small_budget():
    config = TrainConfig.small_budget(epochs=2, seed=3)
    assert (config.lr, config.batch_size, config.grad_accum, config.epochs, config.seed) == (5e-4, 8, 1, 2, 3)
    assert TrainConfig.small_budget(lr=1e-3).lr == 1e-3


def test_resume_and_saved_fields():
    assert TrainConfig.resume_fields() == ("base_model", "use_images", "lora_r", "lora_alpha", "lora_dropout", "max_length",
                                           "seed", "loss", "batching", "prompt_version", "user_context",
                                           "context_titles", "context_ratings", "context_attributes", "candidate_text",
                                           "collab_tokens", "head_features", "head_hidden", "head_recent_days",
                                           "head_warm_start")
    saved = TrainConfig().saved_fields()
    assert list(saved) == ["base_model", "use_images", "lora_r", "lora_alpha", "lora_dropout", "lr", "projector_lr", "epochs",
                           "max_steps", "grad_accum", "max_length", "batch_size", "seed", "loss", "batching",
                           "prompt_version", "user_context", "context_titles", "context_ratings", "context_attributes",
                           "candidate_text", "collab_tokens", "head_features",
                           "head_hidden",
                           "head_lr", "head_recent_days",
                           "head_warm_start",
                           "precision", "devices", "strategy", "max_groups"]


@pytest.mark.parametrize("changes, field", [
    ({"lora_r": 0}, "lora_r"),
    ({"lora_r": 2.5}, "lora_r"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lr": 0}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"projector_lr": -1e-3}, "projector_lr"),
    ({"epochs": 0}, "epochs"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_steps": -2}, "max_steps"),
    ({"precision": "fp16"}, "precision"),
    ({"grad_accum": 0}, "grad_accum"),
    ({"max_length": 0}, "max_length"),
    ({"batch_size": 0}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"loss": "focal"}, "loss"),
    ({"devices": 0}, "devices"),
    ({"max_groups": 0}, "max_groups"),
    ({"base_model": ""}, "base_model"),
    ({"use_images": "yes"}, "use_images"),
    ({"checkpoint_every_n_steps": 0}, "checkpoint_every_n_steps"),
])
def test_bad_values_are_refused_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field} must"):
        TrainConfig(**changes)


def test_a_changed_copy_is_checked_too():
    with pytest.raises(ValueError, match="^batch_size must"):
        dataclasses.replace(TrainConfig(), batch_size=0)


def test_a_run_saved_under_older_names_reads_with_todays(tmp_path):
    """train_config.json of a run saved before TrainConfig took RankerConfig's names (model, image)
    and before the hybrid had one name (fusion_*) reads with today's keys, so the run still resumes."""
    from merlin_mllm.ranker.saved import TRAIN_CONFIG_FILE, read_train_config

    (tmp_path / TRAIN_CONFIG_FILE).write_text(json.dumps({"model": "embedded", "image": False, "fusion_hidden": [16],
                                                          "lr": 1e-3}))
    assert read_train_config(tmp_path) == {"base_model": "embedded", "use_images": False, "head_hidden": [16], "lr": 1e-3}
    assert read_train_config(tmp_path / "no_run") is None
    saved = TrainConfig(use_images=False).saved_fields()
    assert {"base_model", "use_images"} <= set(saved) and not {"model", "image"} & set(saved)
    assert {"base_model", "use_images"} <= set(TrainConfig.resume_fields())


def test_importing_it_loads_no_torch():
    code = "import sys, merlin_mllm.pipelines as p; p.TrainConfig(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# ------------------------------------------------------------------------- recipes and the step warning
def test_recipes_by_name():
    from merlin_mllm.pipelines.train_config import DEFAULT_RECIPE, RECIPES

    assert DEFAULT_RECIPE == "small-budget" and set(RECIPES) == {"small-budget", "paper"}
    small = TrainConfig.recipe("small-budget")
    assert (small.lr, small.batch_size, small.grad_accum, small.epochs) == (5e-4, 8, 1, 2)  # the quickstart's
    assert TrainConfig.recipe("paper") == TrainConfig.paper() == TrainConfig()
    assert TrainConfig.recipe("small-budget", epochs=1, lr=1e-3).epochs == 1
    with pytest.raises(ValueError, match="recipe must be one of"):
        TrainConfig.recipe("fast")


def test_optimizer_steps_count_micro_batches_accumulation_epochs_and_max_steps():
    paper, small = TrainConfig.recipe("paper"), TrainConfig.recipe("small-budget")
    # The 40-user quickstart folder: 64 training rows (32 users x 1 positive + 1 negative).
    assert paper.optimizer_steps(64) == 2  # 16 micro-batches of 4, 8 per step
    assert small.optimizer_steps(64) == 16  # 8 micro-batches of 8, 2 epochs
    assert TrainConfig.paper(grad_accum=8).optimizer_steps(65) == 3  # a last, partial accumulation steps too
    assert small.optimizer_steps(64, world_size=2) == 8
    assert TrainConfig.small_budget(max_steps=5).optimizer_steps(1510) == 5
    assert TrainConfig.small_budget().optimizer_steps(1510) == 189  # sft_vs_zero_shot.json's one epoch


def test_too_few_steps_warns_with_the_numbers():
    from merlin_mllm.pipelines.train_config import MIN_LR_STEPS

    warning = TrainConfig.recipe("paper").too_few_steps(64)
    assert warning is not None
    for number in ("2 optimizer step(s)", "lr 2e-05", "64 training rows", "lr x steps = 4e-05", "0.005", "250 steps"):
        assert number in warning, (number, warning)
    assert TrainConfig.recipe("small-budget").too_few_steps(64) is None  # 16 x 5e-4 = 8e-3
    assert TrainConfig.small_budget().too_few_steps(1510) is None
    # At the threshold: 10 steps at 5e-4 (the smallest measured run that moved the ranker) pass.
    assert TrainConfig.small_budget(max_steps=10).too_few_steps(1510) is None
    assert "max_steps 9" in TrainConfig.small_budget(max_steps=9).too_few_steps(1510)
    assert MIN_LR_STEPS == 5e-3


def test_train_cli_takes_the_recipe_and_its_overrides(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import merlin_mllm.pipelines.training as training
    from merlin_mllm.cli import app

    seen = []
    monkeypatch.setattr(training, "train_ranker", lambda data, summaries, out, config, features, progress: seen.append(config) or out)
    base = ["train", "--data", str(tmp_path), "--summaries", str(tmp_path), "--out", str(tmp_path / "run")]
    runner = CliRunner()
    for extra, expected in (
        ([], TrainConfig.recipe("small-budget")),
        (["--recipe", "paper"], TrainConfig.recipe("paper")),
        (["--recipe", "paper", "--lr", "1e-4", "--epochs", "3"], TrainConfig.recipe("paper", lr=1e-4, epochs=3)),
        (["--batch-size", "4"], TrainConfig.recipe("small-budget", batch_size=4)),
    ):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.output
        got = seen.pop()
        assert (got.lr, got.batch_size, got.grad_accum, got.epochs) == \
            (expected.lr, expected.batch_size, expected.grad_accum, expected.epochs)
        assert f"recipe {extra[1] if extra[:1] == ['--recipe'] else 'small-budget'}:" in result.output
    result = runner.invoke(app, base + ["--recipe", "fast"])
    assert result.exit_code == 2 and "recipe must be one of" in result.output
