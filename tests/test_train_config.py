"""``TrainConfig``: the training settings, checked when made (no model, no Merlin: fast)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from merlin_mllm.pipelines.config import TrainConfig


def test_defaults_are_the_papers_recipe():
    config = TrainConfig()
    assert (config.model, config.image, config.lora_r, config.lora_alpha, config.lora_dropout) == (None, True, 8, 16, 0.05)
    assert (config.lr, config.projector_lr, config.epochs, config.max_steps) == (2e-5, None, 1, -1)
    assert (config.grad_accum, config.max_length, config.batch_size, config.seed, config.loss) == (8, 512, 4, 42, "lm")
    assert (config.devices, config.strategy, config.accelerator, config.max_groups) == (1, "auto", None, None)
    assert (config.resume, config.validate, config.checkpoint_every_n_steps) == (True, True, 50)
    assert all(f.metadata["help"] for f in dataclasses.fields(TrainConfig))


def test_small_budget():
    config = TrainConfig.small_budget(epochs=2, seed=3)
    assert (config.lr, config.batch_size, config.grad_accum, config.epochs, config.seed) == (5e-4, 8, 1, 2, 3)
    assert TrainConfig.small_budget(lr=1e-3).lr == 1e-3


def test_resume_and_saved_fields():
    assert TrainConfig.resume_fields() == ("model", "image", "lora_r", "lora_alpha", "lora_dropout", "max_length",
                                           "seed", "loss")
    saved = TrainConfig().saved_fields()
    assert list(saved) == ["model", "image", "lora_r", "lora_alpha", "lora_dropout", "lr", "projector_lr", "epochs",
                           "max_steps", "grad_accum", "max_length", "batch_size", "seed", "loss", "devices", "strategy",
                           "max_groups"]


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
    ({"grad_accum": 0}, "grad_accum"),
    ({"max_length": 0}, "max_length"),
    ({"batch_size": 0}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"loss": "focal"}, "loss"),
    ({"devices": 0}, "devices"),
    ({"max_groups": 0}, "max_groups"),
    ({"model": ""}, "model"),
    ({"image": "yes"}, "image"),
    ({"checkpoint_every_n_steps": 0}, "checkpoint_every_n_steps"),
])
def test_bad_values_are_refused_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field} must"):
        TrainConfig(**changes)


def test_a_changed_copy_is_checked_too():
    with pytest.raises(ValueError, match="^batch_size must"):
        dataclasses.replace(TrainConfig(), batch_size=0)


def test_importing_it_loads_no_torch():
    code = "import sys, merlin_mllm.pipelines as p; p.TrainConfig(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
