"""RecBole's SASRec / GRU4Rec on a prepared merlin-mllm folder, scoring its test rows.

Runs inside ``benchmarks/quality/.venv-recbole`` (RecBole 1.2.1 pins its own numpy/torch world;
it must not enter the project venv). ``--make-venv`` builds that virtualenv.

What it does, for one model and seed:

1. Writes RecBole atomic files from the folder's training-time events: every event of
   ``events/`` before the test rows (the same rule as ``merlin_mllm.data.splits.training_events``,
   re-implemented here with pandas because this venv cannot import merlin). The training file
   is pre-augmented the way RecBole augments sequences (one row per prefix, ``item_id_list`` +
   next ``item_id``), and an ``.item`` file lists the whole catalogue so every candidate has an id.
2. Trains RecBole's model with its trainer (CE loss over all items, fixed epochs, no early
   stopping: nothing is tuned on the test rows).
3. Scores every test row: ``model.forward(history)`` · the candidate's item embedding, the
   same score RecBole's ``full_sort_predict`` gives that item.

Usage (from the repository root)::

    benchmarks/quality/.venv-recbole/bin/python benchmarks/quality/recbole_rows.py \
        --data D --model sasrec --seed 0 --work W --out W/sasrec_s0.scores.parquet
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-recbole"
# torch==2.13.0 resolves to the local CPU wheel here; RecBole 1.2.1 needs numpy<2 (np.float etc.
# are gone in 2.x) and ray imports pkg_resources (setuptools<81).
REQUIREMENTS = ["torch==2.13.0", "numpy==1.26.4", "pandas==1.5.3", "scipy<1.14", "setuptools<81", "pyarrow==17.0.0",
                "recbole==1.2.1"]
EPOCHS = 50
MAX_LEN = 50


def make_venv() -> None:
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["pip<26.3"], check=True)
    subprocess.run(pip + REQUIREMENTS, check=True)


def _read(folder: Path):
    import pandas as pd

    # A write_table folder also holds schema files: read only its parquet parts.
    parts = sorted(folder.glob("*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no parquet files in {folder}")
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def training_events(data: Path):
    """The test split's rule of ``merlin_mllm.data.splits.training_events``: on a timeline folder
    (``cuts`` in report.json) every event before ``T_test``; else the events before each user's
    earliest test target's time (paper/leave-last-out alike)."""
    events = _read(data / "events")
    report = data / "report.json"
    cuts = json.loads(report.read_text()).get("cuts") if report.exists() else None
    if cuts is not None:
        keep = events["timestamp"] < int(cuts["test"]["timestamp"])
        return events[keep.to_numpy()].sort_values(["user_id", "position"], kind="stable")
    test = _read(data / "test")
    cutoff = test.groupby("user_id")["target_position"].min()
    limit = events["user_id"].map(cutoff)
    keep = limit.isna() | (events["position"] < limit.fillna(0))
    return events[keep.to_numpy()].sort_values(["user_id", "position"], kind="stable")


def write_atomic(data: Path, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    events = training_events(data)
    lines = ["user_id:token\titem_id_list:token_seq\titem_id:token"]
    for user, group in events.groupby("user_id", sort=True):
        items = group["item_id"].astype(str).tolist()
        for end in range(1, len(items)):
            lines.append(f"{user}\t{' '.join(items[max(0, end - MAX_LEN):end])}\t{items[end]}")
    train = "\n".join(lines) + "\n"
    (folder / f"{name}.train.inter").write_text(train)
    # fit() gets no validation data; RecBole still wants the files to exist and be non-empty.
    (folder / f"{name}.valid.inter").write_text("\n".join(lines[:2]) + "\n")
    (folder / f"{name}.test.inter").write_text("\n".join(lines[:2]) + "\n")
    items = _read(data / "items")["item_id"].astype(str)
    (folder / f"{name}.item").write_text("item_id:token\n" + "\n".join(items) + "\n")


def run(data: Path, model_name: str, seed: int, work: Path, out: Path) -> None:
    import numpy as np
    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import get_model, init_seed

    name = f"rb_{model_name}_s{seed}"
    write_atomic(data, work / name, name)
    model_class = {"sasrec": "SASRec", "gru4rec": "GRU4Rec"}[model_name]
    config = Config(model=model_class, dataset=name, config_dict={
        "data_path": str(work), "benchmark_filename": ["train", "valid", "test"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"], "item": ["item_id"]},
        "alias_of_item_id": ["item_id_list"], "MAX_ITEM_LIST_LENGTH": MAX_LEN,
        "train_neg_sample_args": None, "loss_type": "CE", "epochs": EPOCHS, "seed": seed, "reproducibility": True,
        "device": "cpu", "use_gpu": False, "show_progress": False, "checkpoint_dir": str(work / name / "saved"),
        "log_wandb": False, "eval_step": 0, "train_batch_size": 256,
    })
    init_seed(seed, True)
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    init_seed(seed, True)
    model = get_model(config["model"])(config, train_data._dataset)
    trainer = Trainer(config, model)
    trainer.fit(train_data, valid_data=None, saved=False, show_progress=False)
    model.eval()
    losses = [float(trainer.train_loss_dict[e]) for e in sorted(trainer.train_loss_dict)]

    rows = _read(data / "test")
    to_id = lambda tokens: dataset.token2id("item_id", [str(t) for t in tokens])  # noqa: E731
    histories = [list(h)[-MAX_LEN:] for h in rows["history_item_ids"]]
    sequence = np.zeros((len(rows), MAX_LEN), dtype=np.int64)  # RecBole pads on the right
    for i, history in enumerate(histories):
        sequence[i, :len(history)] = to_id(history)
    lengths = torch.as_tensor([len(h) for h in histories])
    candidates = torch.as_tensor(np.asarray(to_id(rows["item_id"].tolist()), dtype=np.int64))
    with torch.no_grad():
        state = model.forward(torch.as_tensor(sequence), lengths)
        scores = (state * model.item_embedding(candidates)).sum(-1).double().numpy()
    table = rows[["group_id", "user_id", "item_id", "label"]].copy()
    table["score"] = scores
    table.to_parquet(out, index=False)
    out.with_suffix(".train.json").write_text(json.dumps({
        "model": model_class, "recbole": recbole.__version__, "epochs": EPOCHS, "seed": seed,
        "training_sequences": len(train_data._dataset), "epoch_loss": [round(v, 4) for v in losses]}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-venv", action="store_true")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--model", choices=("sasrec", "gru4rec"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.make_venv:
        make_venv()
        return 0
    run(args.data, args.model, args.seed, args.work, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
