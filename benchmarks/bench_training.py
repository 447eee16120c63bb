"""Benchmark: groupwise training (one user's prefix + 1 + K candidates per pass) against independent rows.

Same model (SmolLM2-135M, LoRA r=8, text-only prompts as in the quickstart), same data
(MovieLens-100k, 40 users, the paper protocol with 7 training negatives per positive, each
row's summary the titles of its last five history items), measured in one run:

* **training**, forward + backward + AdamW step, in candidate rows per second:

  - ``rows_v1``: today's training: independent rows, batch 8 (one user's 1 + 7 rows per batch,
    so every way sees the same rows), prompt version 1;
  - ``packed_v2``: one packed row per group (1 + 7 candidates), prompt version 2 (question in
    the shared part), the training path;
  - ``expanded_v2``: the alternative: the prefix once with gradients, its KV cache repeated
    over the 8 candidates, the candidates in one batch;
  - ``rows_v2`` and ``packed_v1``: to tell the layout's gain from packing's.

  timed as the median of interleaved steps (each round runs one step of every way, so a busy
  moment of the shared CPU hits them all), with each way's memory: the peak resident memory of
  its first step above the process's before it (sampled every 10 ms) and the activations
  autograd saves for backward;
* **agreement**: packed against independent P(yes) (max |dp|), on held-out groups, after
  training, text-only and with 49 image tokens per candidate (seeded grids);
* **scoring** 1 + 20 candidates of one user: packed vs today's shared-prefix KV path vs
  ``generate()``, with both prompt versions;
* the **roofline share** of training: FLOPs per step = 4 x non-embedding parameters x real
  tokens (with LoRA the frozen weights need no weight gradients, so backward is one matmul per
  weight instead of two: 2 forward + 2 backward; attention scores are not counted), over a
  2048^3 fp32 matmul's FLOP/s measured in the same run.

Target (issue 15): ``packed_vs_rows_speedup`` >= 3 and ``max_abs_dp`` <= 1e-4. Absolute times
on a shared CPU are noisy; the ratios are measured within one run.

Usage::

    python -m benchmarks.bench_training --threads 1      # about 10 minutes on a busy 2-core CPU
    python -m benchmarks.bench_training --steps 2 --skip-generate   # smoke run

Writes ``benchmarks/speed/training.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from benchmarks.bench_scoring import language_model_params, matmul_flops
from benchmarks.common import SPEED_RESULTS, write_json
from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.tables import read_table
from merlin_mllm.models.vision import TOKEN_DIM
from merlin_mllm.ranker import Candidate, ItemImageFeatures, RankerModel
from merlin_mllm.summaries.rows import recent_titles_summaries

OUT = SPEED_RESULTS / "training.json"
NEGATIVES = 7
LR = 5e-4


class PeakRSS:
    """Peak resident memory of this process while the block runs, above what it held before.

    Freed heap memory is handed back to the system first (glibc ``malloc_trim``), so the block's
    own peak shows instead of the allocator's cache from earlier blocks.
    """

    def __init__(self, every: float = 0.01):
        self.every, self.process = every, psutil.Process()
        self.peak = self.start = 0

    def __enter__(self):
        gc.collect()
        libc = ctypes.util.find_library("c")
        if libc:
            ctypes.CDLL(libc).malloc_trim(0)
        self.start = self.peak = self.process.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def user_groups(data_dir: Path, split: str):
    """(summary, candidates, labels) per (user, target) of a split, the positive first."""
    rows = read_table(data_dir / split)
    titles = read_table(data_dir / "items").set_index("item_id")["title"]
    summaries = recent_titles_summaries(data_dir).set_index(["user_id", "target_position"])["user_summary"]
    groups = []
    for (user, target), frame in rows.groupby(["user_id", "target_position"], sort=True):
        frame = frame.sort_values("label", ascending=False, kind="stable")
        candidates = [Candidate(str(titles[int(i)]), item_id=int(i)) for i in frame["item_id"]]
        groups.append((str(summaries[(user, target)]), candidates, frame["label"].astype(int).tolist()))
    return groups


def build(prompt_version: str, item_features=None) -> RankerModel:
    ranker = RankerModel.build("embedded", use_images=item_features is not None, lora_r=8, seed=0,
                               prompt_version=prompt_version, item_features=item_features, device="cpu")
    ranker.train()
    return ranker


def saved_activation_mib(loss_of) -> float:
    """MiB of tensors autograd saves for backward while ``loss_of()`` runs (each storage once)."""
    storages = {}

    def pack(tensor):
        if tensor.device.type == "cpu" and not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of()
    loss.backward()
    return sum(storages.values()) / 2**20


class Trainer:
    """One way of training (``"rows"``, ``"packed"`` or ``"expanded"``) with its own AdamW."""

    def __init__(self, ranker: RankerModel, way: str, step_inputs):
        self.ranker, self.way, self.step_inputs = ranker, way, step_inputs
        self.optimizer = torch.optim.AdamW(ranker.parameter_groups(LR), lr=LR)

    def loss(self, index: int) -> torch.Tensor:
        inputs = self.step_inputs[index]
        if self.way == "rows":
            return self.ranker(**inputs).loss
        return self.ranker.forward_groups(inputs, path=self.way).loss

    def step(self, index: int) -> float:
        """Seconds of one optimizer step on the inputs ``index``."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(index).backward()
        self.optimizer.step()
        return time.perf_counter() - start

    def saved_activations_mib(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        mib = saved_activation_mib(lambda: self.loss(0))
        self.optimizer.zero_grad(set_to_none=True)
        return mib


def row_batch(ranker: RankerModel, group) -> dict:
    summary, candidates, labels = group
    return ranker.make_batch([summary] * len(candidates), candidates, labels=labels)


def group_tokens(ranker: RankerModel, group) -> dict:
    """Prefix and candidate-part lengths of a group, and its tokens as rows and as one packed row."""
    packed = ranker.make_group(*group)
    parts = [len(ids) for ids in packed.candidate_ids]
    return {"prefix": packed.prefix_len, "candidate_mean": float(np.mean(parts)),
            "rows": sum(packed.prefix_len + p for p in parts), "packed": packed.prefix_len + sum(parts)}


def max_abs_dp(ranker: RankerModel, groups) -> float:
    """Packed (several groups in one batch) against independent P(yes), largest difference."""
    ranker.eval()
    with torch.inference_mode():
        packed = ranker.forward_groups([ranker.make_group(s, c) for s, c, _ in groups], path="packed").probs
    independent = np.concatenate([ranker.score_independent(s, c) for s, c, _ in groups])
    ranker.train()
    return float(np.abs(packed.double().numpy() - independent).max())


def best_of(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def scoring(ranker: RankerModel, summary: str, candidates, repeats: int, max_new_tokens: int, skip_generate: bool):
    ranker.eval()
    ranker.score(summary, candidates[:2])  # warm-up (and the merged LoRA copy)
    ranker.score_packed(summary, candidates[:2])
    shared_s = packed_s = float("inf")
    for _ in range(repeats):  # interleaved, as the training steps
        seconds, shared = best_of(lambda: ranker.score(summary, candidates), 1)
        shared_s = min(shared_s, seconds)
        seconds, packed = best_of(lambda: ranker.score_packed(summary, candidates), 1)
        packed_s = min(packed_s, seconds)
    result = {"candidates": len(candidates), "shared_kv_seconds": shared_s, "packed_seconds": packed_s,
              "packed_vs_shared_kv": shared_s / packed_s,
              "max_abs_dp_packed_vs_shared_kv": float(np.abs(packed - shared).max())}
    if not skip_generate:
        generate_s, (generated, _) = best_of(
            lambda: ranker.score_generate(summary, candidates, max_new_tokens=max_new_tokens), 1)
        result.update(generate_seconds=generate_s, packed_vs_generate=generate_s / packed_s,
                      shared_kv_vs_generate=generate_s / shared_s,
                      max_abs_dp_packed_vs_generate=float(np.abs(packed - generated).max()))
    ranker.train()
    return result


def seeded_image_table(item_ids) -> ItemImageFeatures:
    item_ids = np.asarray(sorted(set(item_ids)), dtype=np.int64)
    grids = torch.randn(len(item_ids), 49, TOKEN_DIM, generator=torch.Generator().manual_seed(0)).half()
    return ItemImageFeatures(item_ids, np.ones(len(item_ids), dtype=bool), grids)


def copy_lora(source: RankerModel, target: RankerModel) -> None:
    """The trained LoRA weights of ``source`` into ``target`` (its projector stays as built)."""
    own = dict(target.named_parameters())
    with torch.no_grad():
        for name, parameter in source.named_parameters():
            if "lora_" in name:
                own[name].copy_(parameter)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=40, help="MovieLens-100k users to prepare")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per way (after one warm-up)")
    parser.add_argument("--check-groups", type=int, default=4, help="held-out groups for max |dp|")
    parser.add_argument("--repeats", type=int, default=2, help="timed scoring runs (best is kept)")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="generate() length (authors: 30)")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ml100k"
        prepare_dataset("ml-100k", "paper", data, max_users=args.users, seed=0, n_negatives_train=NEGATIVES)
        train, test = user_groups(data, "train"), user_groups(data, "test")
    if len(train) < args.steps + 1:
        raise SystemExit(f"{len(train)} training groups for {args.steps} + 1 steps: use more --users")

    roofline = matmul_flops(torch.device("cpu"), torch.float32)
    rankers = {"1": build("1"), "2": build("2")}
    ways = {"rows_v1": ("1", "rows"), "packed_v2": ("2", "packed"), "expanded_v2": ("2", "expanded"),
            "rows_v2": ("2", "rows"), "packed_v1": ("1", "packed")}
    groups = train[:args.steps + 1]
    trainers = {}
    for name, (version, way) in ways.items():
        ranker = rankers[version]
        inputs = [row_batch(ranker, g) if way == "rows" else [ranker.make_group(*g)] for g in groups]
        trainers[name] = Trainer(ranker, way, inputs)
    # The first step of each way, alone: warm-up, and its peak memory.
    memory = {}
    for name, trainer in trainers.items():
        with PeakRSS() as peak:
            trainer.step(0)
        memory[name] = peak.mib
    # Timed steps interleaved across the ways, so a busy moment of a shared CPU hits them all.
    seconds = {name: [] for name in trainers}
    for index in range(1, args.steps + 1):
        for name, trainer in trainers.items():
            seconds[name].append(trainer.step(index))
    training = {}
    for name, trainer in trainers.items():
        version, way = ways[name]
        tokens = [group_tokens(trainer.ranker, g) for g in groups[1:]]
        step_seconds = float(np.median(seconds[name]))
        training[name] = {
            "seconds_per_step": step_seconds, "candidate_rows_per_s": (NEGATIVES + 1) / step_seconds,
            "tokens_per_step": float(np.mean([t["rows" if way == "rows" else "packed"] for t in tokens])),
            "peak_rss_mib": memory[name], "saved_activations_mib": trainer.saved_activations_mib(),
            "prompt_version": version,
            "prefix_tokens_mean": float(np.mean([t["prefix"] for t in tokens])),
            "candidate_tokens_mean": float(np.mean([t["candidate_mean"] for t in tokens])),
        }
    del trainers

    check = test[:args.check_groups]
    table = seeded_image_table([c.item_id for _, cands, _ in test for c in cands])
    dp_text = max_abs_dp(rankers["2"], [(s, c[:NEGATIVES + 1], l) for s, c, l in check])
    image_ranker = build("2", item_features=table)
    copy_lora(rankers["2"], image_ranker)
    dp_images = max_abs_dp(image_ranker, [(s, c[:NEGATIVES + 1], l) for s, c, l in check])
    del image_ranker

    summary, candidates, _ = test[0]
    score_v1 = scoring(rankers["1"], summary, candidates, args.repeats, args.max_new_tokens, args.skip_generate)
    score_v2 = scoring(rankers["2"], summary, candidates, args.repeats, args.max_new_tokens, True)
    image_ranker = build("1", item_features=table)
    copy_lora(rankers["1"], image_ranker)
    score_v1_images = scoring(image_ranker, summary, candidates, args.repeats, args.max_new_tokens, True)
    del image_ranker

    params = language_model_params(rankers["2"])
    # The best of two measurements, before and after the rest, in case the CPU was busy at one.
    roofline = max(roofline, matmul_flops(torch.device("cpu"), torch.float32))
    for row in training.values():
        row["roofline_share"] = 4 * params * row["tokens_per_step"] / row["seconds_per_step"] / roofline

    rows = training["rows_v1"]["candidate_rows_per_s"]
    fastest = max(("packed_v2", "expanded_v2"), key=lambda k: training[k]["candidate_rows_per_s"])
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "setup": {"model": "embedded (SmolLM2-135M-Instruct, fp32)", "lora_r": 8, "optimizer": f"AdamW lr {LR}",
                  "data": f"ml-100k paper protocol, {args.users} users, {NEGATIVES} training negatives",
                  "summaries": "recent_titles_summaries (last 5 titles)", "images": "none (text-only prompts)",
                  "group": f"1 positive + {NEGATIVES} negatives", "rows_batch_size": NEGATIVES + 1,
                  "timed_steps": args.steps, "timing": "median of interleaved steps after one warm-up each",
                  "language_model_params": params,
                  "flops_per_token": "4 x non-embedding params (LoRA: frozen weights get no weight gradients)"},
        "training": training,
        "packed_vs_rows_speedup": training["packed_v2"]["candidate_rows_per_s"] / rows,
        "expanded_vs_rows_speedup": training["expanded_v2"]["candidate_rows_per_s"] / rows,
        "packed_vs_expanded": training["packed_v2"]["candidate_rows_per_s"]
        / training["expanded_v2"]["candidate_rows_per_s"],
        "layout_only_speedup": training["rows_v2"]["candidate_rows_per_s"] / rows,
        "packing_only_speedup": training["packed_v1"]["candidate_rows_per_s"] / rows,
        "training_path": fastest.split("_")[0],
        "training_path_why": (
            f"{fastest} trained {training[fastest]['candidate_rows_per_s']:.2f} candidate rows/s against "
            f"{min(training['packed_v2']['candidate_rows_per_s'], training['expanded_v2']['candidate_rows_per_s']):.2f}"
            " for the other; both compute the same tokens, packing in one forward with one "
            "(prefix+candidates)^2 masked attention, the KV expansion in two forwards (the prefix, then the "
            "candidates as a batch over the repeated cache, whose backward sums the copies)"),
        "max_abs_dp": max(dp_text, dp_images),
        "max_abs_dp_text": dp_text,
        "max_abs_dp_images": dp_images,
        "scoring_1_plus_20": {"prompt_v1": score_v1, "prompt_v2": score_v2,
                              "prompt_v1_49_image_tokens": score_v1_images},
        "roofline_flops": roofline,
        "roofline_share_packed": training["packed_v2"]["roofline_share"],
        "seconds": time.perf_counter() - started,
    }
    print_table(result)
    return write_json(args.out, result)


def print_table(result: dict) -> None:
    print(f"\n{'way':12s} {'rows/s':>8s} {'tokens/step':>12s} {'+RSS MiB':>9s} {'saved MiB':>10s} {'roofline':>9s}")
    for name, row in result["training"].items():
        print(f"{name:12s} {row['candidate_rows_per_s']:8.2f} {row['tokens_per_step']:12.0f} "
              f"{row['peak_rss_mib']:9.0f} {row['saved_activations_mib']:10.0f} {row['roofline_share']:9.0%}")
    print(f"packed_vs_rows_speedup {result['packed_vs_rows_speedup']:.2f}  packed_vs_expanded "
          f"{result['packed_vs_expanded']:.2f}  max_abs_dp {result['max_abs_dp']:.1e}  "
          f"training path: {result['training_path']}")
    for version, row in result["scoring_1_plus_20"].items():
        line = f"scoring 1+20 ({version}): shared-KV {row['shared_kv_seconds']:.2f} s, packed {row['packed_seconds']:.2f} s"
        if "generate_seconds" in row:
            line += f", generate {row['generate_seconds']:.1f} s: packed {row['packed_vs_generate']:.1f}x generate"
        print(line + f"; packed/shared-KV speed {row['packed_vs_shared_kv']:.2f}")


if __name__ == "__main__":
    main()
