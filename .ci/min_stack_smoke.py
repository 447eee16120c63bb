"""The minimum-versions smoke job: the installed wheel, on the oldest supported stack, end to end.

Run by ``.ci/min_stack.sh`` with the Python of a fresh venv that holds the wheel installed with
``-c constraints/min.txt``, from a temporary folder outside the checkout. Each step asserts results,
not only exit codes:

0. ``merlin_mllm`` is imported from that venv's site-packages (not the checkout), and every pin
   of ``constraints/min.txt`` is the version installed.
1. The CLI on a tiny prepared folder: ``data prepare`` (4 MovieLens-100k users) ->
   ``summarize items`` and ``summarize users`` (a tiny random LLaVA-NeXT, 4 new tokens) ->
   ``train`` (LoRA, 2 optimizer steps, text only) -> ``evaluate`` (3 test groups): the metrics
   are in [0, 1] and the scores finite probabilities.
2. The merlin.models.torch ranker Block (``RankerBlock`` + ``YesNoOutput`` in an ``mm.Model``) on
   the trained ranker scores a Merlin Loader batch; its P(yes) equals ``evaluate``'s scores.
3. The offline default ranker (embedded SmolLM2 with EfficientNet-Lite0 image tokens) scores one
   user's candidates with the shared-prefix KV cache as full forwards do, to 1e-4.
4. ``export`` -> ``merlin-mllm serve`` (the bundled Triton, CPU) -> one gRPC request: the served
   scores equal ``evaluate``'s in-process scores to 1e-5.

Usage: ``<venv>/bin/python .ci/min_stack_smoke.py <work folder> constraints/min.txt``
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

STARTED = time.monotonic()
#: Scores of the same rows, in process and served, agree to this (DEVELOPERS.md: fp32 across paths).
SERVED_TOLERANCE = 1e-5


def step(message: str) -> None:
    print(f"[min-stack smoke {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def cli(*args) -> str:
    """Run the installed ``merlin-mllm`` console script; fail with its output if it fails."""
    command = [str(Path(sys.executable).parent / "merlin-mllm"), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_installed_wheel(constraints: Path) -> None:
    """The wheel's merlin_mllm is the one imported, and every pin of ``constraints`` is what is installed."""
    from importlib.metadata import version

    import merlin_mllm

    where = Path(merlin_mllm.__file__).resolve()
    site = Path(sys.prefix).resolve()
    assert site in where.parents and "site-packages" in where.parts, f"merlin_mllm imported from {where}"
    step(f"merlin_mllm from {where.parent}")
    pins = [line.split("#")[0].strip() for line in constraints.read_text().splitlines()]
    pins = [pin.split("==") for pin in pins if "==" in pin]
    wrong = {name: (wanted, version(name)) for name, wanted in pins if version(name).split("+")[0] != wanted}
    assert pins and not wrong, f"installed versions differ from {constraints.name} (wanted, installed): {wrong}"
    step(f"{len(pins)} pins of {constraints.name} installed as pinned")


def run_cli(work: Path, tiny: Path) -> pd.DataFrame:
    data, store, run = work / "data", work / "summaries", work / "run"
    # leave-last-out: every user has a test group (the paper protocol's user split can leave one).
    cli("data", "prepare", "--dataset", "ml-100k", "--protocol", "leave-last-out", "--out", data,
        "--max-users", 4, "--seed", 7)
    step("data prepare done")
    generation = ("--model", tiny, "--max-new-tokens", 4, "--batch-size", 32)
    cli("summarize", "items", "--data", data, "--summaries", store, *generation)
    cli("summarize", "users", "--data", data, "--summaries", store, *generation)
    step("summarize items + users done")
    cli("train", "--data", data, "--summaries", store, "--out", run, "--model", tiny, "--no-images",
        "--max-steps", 2, "--batch-size", 4, "--max-length", 256, "--seed", 1)
    assert (run / "model").is_dir(), f"train wrote no model folder in {run}"
    step("train done")
    out = work / "eval" / "test.json"
    cli("evaluate", "--data", data, "--summaries", store, "--model", run, "--out", out, "--max-groups", 3)
    metrics = json.loads(out.read_text())
    scores = pd.read_parquet(out.with_name("test.scores.parquet"))
    numbers = {key: value for key, value in metrics.items() if isinstance(value, float)}
    assert "auc" in numbers, metrics
    assert all(0.0 <= value <= 1.0 for value in numbers.values()), numbers
    assert scores["group_id"].nunique() == 3, scores["group_id"].unique()
    values = scores["score"].to_numpy(np.float64)
    assert np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all(), values
    assert values.std() > 0, "every row got the same score"
    step(f"evaluate done: auc={numbers['auc']:.3f} over {len(scores)} rows")
    return scores


def check_block(work: Path, scores: pd.DataFrame) -> None:
    import torch

    import merlin.models.torch as mm
    from merlin.dataloader.torch import Loader

    from merlin_mllm.pipelines.training import load_rows, tokenize_rows
    from merlin_mllm.ranker import RankerModel
    from merlin_mllm.ranker.block import RankerBlock, YesNoOutput

    ranker = RankerModel.from_pretrained(work / "run" / "model", device="cpu")
    rows = load_rows(work / "data", "test", work / "summaries")
    rows = rows[rows["group_id"].isin(scores["group_id"].unique())].reset_index(drop=True)
    dataset = tokenize_rows(rows, ranker, max_length=256)
    block = RankerBlock(ranker)
    model = mm.Model(block, YesNoOutput(dataset.schema["label"], block))
    model.eval()
    features, _ = next(iter(Loader(dataset, batch_size=len(rows))))
    with torch.no_grad():
        probabilities = model(features).reshape(-1).double().numpy()
    assert probabilities.shape == (len(rows),), probabilities.shape
    assert np.isfinite(probabilities).all() and ((probabilities >= 0) & (probabilities <= 1)).all()
    expected = rows[["group_id", "item_id"]].merge(scores, on=["group_id", "item_id"], how="left")["score"]
    np.testing.assert_allclose(probabilities, expected.to_numpy(), rtol=0, atol=1e-4,
                               err_msg="the Merlin Block and `evaluate` disagree")
    step(f"Block scored a batch of {len(rows)} rows, equal to evaluate's scores")


def check_embedded_ranker() -> None:
    """The offline default (SmolLM2 + EfficientNet-Lite0 image tokens, a gaussian LoRA): the
    shared-prefix KV-cache scorer equals one full forward per candidate."""
    from PIL import Image

    from merlin_mllm.ranker import ItemImageFeatures, RankerModel

    pixels = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    table = ItemImageFeatures.from_images([1, 2, 3], [Image.fromarray(pixels), None, Image.fromarray(pixels[::-1])],
                                          progress=False)
    ranker = RankerModel.build("embedded", lora_init="gaussian", seed=1, item_features=table)
    candidates = [{"title": title, "item_id": item} for item, title in
                  ((1, "Toy Story (1995)"), (2, "Heat (1995)"), (3, "Fargo (1996)"))]
    summary = "Enjoys animated family films and witty crime stories."
    shared = ranker.score(summary, candidates)
    independent = ranker.score_independent(summary, candidates)
    assert np.isfinite(shared).all() and ((shared >= 0) & (shared <= 1)).all(), shared
    np.testing.assert_allclose(shared, independent, rtol=0, atol=1e-4,
                               err_msg="the shared-prefix scorer differs from full forwards")
    step(f"embedded ranker: shared-prefix scores {np.round(shared, 4).tolist()} equal full forwards")


def check_served(work: Path, scores: pd.DataFrame) -> None:
    from merlin_mllm.serving.client import RerankClient

    repo = work / "repo"
    cli("export", "--model", work / "run", "--summaries", work / "summaries", "--data", work / "data",
        "--out", repo)
    step("export done")
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = open(work / "serve.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "merlin-mllm"), "serve", "--model-repository", str(repo),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with RerankClient(f"127.0.0.1:{grpc}") as client:
            deadline = time.monotonic() + 300
            while not _ready(client):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"merlin-mllm serve never became ready:\n{(work / 'serve.log').read_text()}")
                time.sleep(1)
            step("serve ready")
            group_id, group = next(iter(scores.groupby("group_id")))
            items = group["item_id"].astype(int).tolist()
            result = client.rank(int(group["user_id"].iloc[0]), items, top_k=len(items))
        served = np.asarray(result.scores, dtype=np.float64)
        np.testing.assert_allclose(served, group["score"].to_numpy(), rtol=0, atol=SERVED_TOLERANCE,
                                   err_msg="served scores differ from evaluate's")
        assert sorted(item for item, _ in result.ranked) == sorted(items)
        step(f"served group {group_id}: {len(items)} scores equal evaluate's "
             f"(max diff {np.abs(served - group['score'].to_numpy()).max():.1e})")
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _ready(client) -> bool:
    try:
        return client.is_ready()
    except Exception:  # not listening yet
        return False


def main(work: Path, constraints: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    check_installed_wheel(constraints)
    from merlin_mllm.models.tiny import tiny_mllm_path

    tiny = tiny_mllm_path("llava_next")
    step(f"tiny LLaVA-NeXT at {tiny}")
    scores = run_cli(work, tiny)
    check_block(work, scores)
    check_embedded_ranker()
    check_served(work, scores)
    step("passed")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
