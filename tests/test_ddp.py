"""DDP over two CPU processes (gloo): ``train_ranker`` runs unchanged with ``devices=2``.

Lightning's "ddp" strategy starts the second process by re-running the launching script, so the
training runs in a subprocess of its own (a pytest process must not be re-run).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.tables import read_table
from merlin_mllm.models.tiny import tiny_mllm_path

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

SCRIPT = """
import sys
from merlin_mllm.pipelines import TrainConfig, train_ranker

data_dir, summaries, out_dir, model = sys.argv[1:5]
config = TrainConfig(base_model=model, use_images=False, epochs=2, grad_accum=1, batch_size=2, lr=1e-3, max_groups=12,
                     validate=False, devices=2, strategy="ddp", accelerator="cpu", seed=5)
train_ranker(data_dir, summaries, out_dir, config, progress=False)
"""


def _digest(state: dict) -> str:
    """The same digest as ``TrainingRecord`` writes per rank."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


def test_ddp_two_cpu_processes_keep_one_model(tmp_path):
    data_dir = tmp_path / "data"
    prepare_dataset("ml-100k", "paper", data_dir, max_users=30, seed=11)
    rows = read_table(data_dir / "train")
    summaries = pd.DataFrame({
        "user_id": rows["user_id"], "target_position": rows["target_position"],
        "user_summary": [f"Watched {len(h)} films, most recently item {h[-1]}." for h in rows["history_item_ids"]],
    }).drop_duplicates(["user_id", "target_position"])
    summaries.to_parquet(tmp_path / "summaries.parquet")  # the parquet-table summary source
    model = str(tiny_mllm_path("llava_next"))
    (tmp_path / "train.py").write_text(textwrap.dedent(SCRIPT))
    out_dir = tmp_path / "run"

    run = subprocess.run(
        [sys.executable, str(tmp_path / "train.py"), str(data_dir), str(tmp_path / "summaries.parquet"), str(out_dir), model],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert run.returncode == 0, run.stderr[-4000:]

    records = [json.loads((out_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    # 12 groups x 2 rows = 24 rows -> 12 per rank -> 6 batches of 2 per epoch, 2 epochs.
    assert all(r["global_step"] == 12 and r["rows_seen"] == 24 for r in records)
    # The ranks trained on different rows (groups cut at most once between them) ...
    groups = [set(r["groups_seen"]) for r in records]
    assert len(groups[0] | groups[1]) == 12 and len(groups[0] & groups[1]) <= 1
    # ... yet end with identical weights: DDP averaged their gradients every step. Without the
    # all-reduce, different data would give different weights.
    assert records[0]["trainable_sha256"] == records[1]["trainable_sha256"]

    from merlin_mllm.ranker import RankerModel

    untrained = RankerModel.build(model, use_images=False, seed=5)
    assert _digest(untrained.trainable_state_dict()) != records[0]["trainable_sha256"]
    saved = RankerModel.from_pretrained(out_dir / "model", is_trainable=True)
    assert _digest(saved.trainable_state_dict()) == records[0]["trainable_sha256"]
