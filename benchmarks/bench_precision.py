"""Benchmark: the ranker in bfloat16 against float32, scoring and training, measured in one run (issue 22).

The embedded SmolLM2-135M ranker (LoRA r=8, text-only prompts whose user part is the last five
history titles, so no summary store is needed) on a prepared MovieLens-100k folder:

* **training**: one epoch of groupwise training (``forward_groups``, listwise loss, AdamW lr
  5e-4, one group of 1 + K candidates per step) over the same ``--train-groups`` training groups
  in the same order, once in float32 and once in bfloat16 (frozen base in bf16 under bf16
  autocast, LoRA in fp32); candidate rows/s, the two loss curves side by side (per step), and
  each trained ranker's held-out AUC on the scoring groups, scored in its own precision;
* **scoring**: the fp32-trained ranker scores the same ``--groups`` test groups of 1 + 20 in
  float32 and in bfloat16 (``RankerModel.score``, the shared-prefix path evaluation uses):
  candidates/s, max |P_bf16 - P_fp32|, and the AUC of each;
* **roofline share**: each path's FLOP/s (2 x non-embedding parameters x tokens for scoring,
  4 x for LoRA training: the frozen weights need no weight gradients) over a
  ``--roofline-size``^3 matmul's FLOP/s in that path's own dtype, measured here;
* the host's capability: /proc/cpuinfo bf16 flags, torch's CPU capability, oneDNN bf16, and what
  ``auto`` picks (``merlin_mllm.models.precision``).

Keys the issue checks: ``scoring_bf16_vs_fp32`` (candidates/s ratio, target >= 2.5),
``scoring_auc_delta`` (bf16 minus fp32, same groups, within +-0.005), ``training_bf16_vs_fp32``
(rows/s ratio, >= 1.8) and ``training_auc_delta`` (held-out AUC after one epoch, within +-0.01).

**The issue's figures need a host with native bf16** (``avx512_bf16`` or AMX in
/proc/cpuinfo, e.g. the AMD EPYC hosts of this project's kind, or a GPU: ``--device cuda``). On
a CPU without it (AVX2 only) bf16 runs emulated and is several times *slower* than fp32; the
script still runs there (a smoke run), and then writes ``"native_bf16": false`` and a
``note`` saying that its ratios are not the issue's measurement.

Usage::

    python -m benchmarks.bench_precision --data data/ml100k            # 200 groups (hours on 2 cores)
    python -m benchmarks.bench_precision --users 20 --groups 3 --train-groups 4 --roofline-size 256 \\
        --out /tmp/precision_smoke.json                                 # smoke run

Writes ``benchmarks/speed/precision.json`` (``--out``); ``speed_table.py`` renders its rows.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_scoring import language_model_params, matmul_flops
from benchmarks.bench_training import user_groups
from benchmarks.common import SPEED_RESULTS, write_json
from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.metrics import auc
from merlin_mllm.models.precision import auto_precision, cpu_capability, cpu_bf16_support
from merlin_mllm.models.threads import set_torch_threads
from merlin_mllm.ranker import RankerModel

OUT = SPEED_RESULTS / "precision.json"
PRECISIONS = ("float32", "bfloat16")
LR = 5e-4
TRAIN_NEGATIVES = 7


def build(precision: str, device: torch.device, seed: int = 0) -> RankerModel:
    return RankerModel.build("embedded", use_images=False, lora_r=8, seed=seed, loss="listwise",
                             prompt_version="2", precision=precision, device=device)


def copy_trainables(source: RankerModel, target: RankerModel) -> None:
    """LoRA weights of ``source`` into ``target`` (both fp32 tensors; the base weights differ in dtype)."""
    own = dict(target.named_parameters())
    with torch.no_grad():
        for name, parameter in source.named_parameters():
            if parameter.requires_grad:
                own[name].copy_(parameter)


def group_tokens(ranker: RankerModel, summary: str, candidates) -> int:
    """Tokens one packed/shared-prefix pass over a group computes (the prefix once, every candidate part)."""
    group = ranker.make_group(summary, candidates)
    return group.prefix_len + sum(len(ids) for ids in group.candidate_ids)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(ranker: RankerModel, groups, device) -> dict:
    """One epoch, one group per optimizer step; loss per step, rows/s and training FLOP/s."""
    ranker.train()
    optimizer = torch.optim.AdamW(ranker.parameter_groups(LR), lr=LR)
    inputs = [ranker.make_group(*group) for group in groups]
    losses, seconds, rows, tokens = [], 0.0, 0, 0
    for index, group in enumerate(inputs):
        sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = ranker.forward_groups([group]).loss
        loss.backward()
        optimizer.step()
        sync(device)
        if index > 0:  # the first step warms up (allocations, the autocast weight cache)
            seconds += time.perf_counter() - start
            rows += group.size
            tokens += group.prefix_len + sum(len(ids) for ids in group.candidate_ids)
        losses.append(float(loss.detach()))
    ranker.eval()
    flops = 4 * language_model_params(ranker) * tokens
    return {"losses": losses, "timed_steps": len(inputs) - 1, "seconds": seconds,
            "rows_per_s": rows / seconds if seconds else None, "gflops": flops / seconds / 1e9 if seconds else None}


def score_groups(ranker: RankerModel, groups, device) -> dict:
    """P(yes) of every candidate of ``groups`` (timed after one warm-up group), AUC and FLOP/s."""
    ranker.eval()
    ranker.score(groups[0][0], groups[0][1][:2])  # warm-up (and the merged LoRA copy)
    scores, labels, seconds, tokens = [], [], 0.0, 0
    for summary, candidates, group_labels in groups:
        sync(device)
        start = time.perf_counter()
        scores.append(ranker.score(summary, candidates))
        sync(device)
        seconds += time.perf_counter() - start
        labels.extend(group_labels)
        tokens += group_tokens(ranker, summary, candidates)
    flat = np.concatenate(scores)
    flops = 2 * language_model_params(ranker) * tokens
    return {"scores": flat, "auc": auc(labels, flat), "seconds": seconds, "candidates": int(flat.size),
            "candidates_per_s": flat.size / seconds, "gflops": flops / seconds / 1e9}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="prepared ML-100k folder (test groups of 1 + 20, training "
                        "groups of 1 + K); default: prepared here, leave-last-out, K = 7")
    parser.add_argument("--users", type=int, default=0, help="without --data: prepare this many users (0: all 943)")
    parser.add_argument("--groups", type=int, default=200, help="test groups scored (the same for every path)")
    parser.add_argument("--train-groups", type=int, default=200, help="training groups of the epoch")
    parser.add_argument("--roofline-size", type=int, default=2048, help="matmul size of the roofline")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: this process's share)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    threads = set_torch_threads(args.threads or None)
    device = torch.device(args.device)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "ml100k"
            prepare_dataset("ml-100k", "leave-last-out", data, max_users=args.users, seed=42,
                            train_negatives=TRAIN_NEGATIVES)
        test = user_groups(data, "test")[: args.groups]
        train = user_groups(data, "train")[: args.train_groups]
    if len(train) < 2 or not test:
        raise SystemExit(f"{len(train)} training and {len(test)} test groups: need at least 2 and 1")

    native, why = cpu_bf16_support()
    host = {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": threads, "device": str(device), **cpu_capability(), "native_bf16": native,
            "native_bf16_reason": why, "auto_picks": auto_precision(device).name}
    rooflines = {name: matmul_flops(device, getattr(torch, name), size=args.roofline_size) / 1e9 for name in PRECISIONS}

    # Training: the same rows in the same order, from the same seeded initial adapter.
    trained, training = {}, {}
    for name in PRECISIONS:
        ranker = build(name, device)
        training[name] = train_one_epoch(ranker, train, device)
        training[name]["roofline_share"] = training[name]["gflops"] / rooflines[name] if training[name]["gflops"] else None
        trained[name] = ranker

    # Scoring: the fp32-trained adapter in both precisions; the bf16-trained one in bf16.
    fp32_weights_in_bf16 = build("bfloat16", device)
    copy_trainables(trained["float32"], fp32_weights_in_bf16)
    scoring = {"float32": score_groups(trained["float32"], test, device),
               "bfloat16": score_groups(fp32_weights_in_bf16, test, device)}
    held_out_bf16 = score_groups(trained["bfloat16"], test, device)
    for name in PRECISIONS:
        scoring[name]["roofline_share"] = scoring[name]["gflops"] / rooflines[name]
    dp = np.abs(scoring["bfloat16"]["scores"] - scoring["float32"]["scores"])

    result = {
        "issue": 22,
        "host": host,
        "note": None if native else (
            "this host has no native bf16 (no avx512_bf16/amx_bf16 in /proc/cpuinfo): bf16 ran emulated, so the "
            "bf16/fp32 ratios below are NOT the issue's measurement; run on a host with native bf16 or a GPU"),
        "setup": {"data": str(args.data) if args.data else "ml-100k leave-last-out, prepared in the run",
                  "test_groups": len(test), "candidates_per_test_group": len(test[0][1]),
                  "train_groups": len(train), "candidates_per_train_group": len(train[0][1]), "lr": LR,
                  "lora_r": 8, "loss": "listwise", "prompt_version": "2", "user_context": "last 5 titles",
                  "roofline_size": args.roofline_size},
        "rooflines_gflops": rooflines,
        "scoring": {name: {k: v for k, v in part.items() if k != "scores"} for name, part in scoring.items()},
        "scoring_max_abs_dp": float(dp.max()),
        "scoring_mean_abs_dp": float(dp.mean()),
        "scoring_bf16_vs_fp32": scoring["bfloat16"]["candidates_per_s"] / scoring["float32"]["candidates_per_s"],
        "scoring_auc_delta": scoring["bfloat16"]["auc"] - scoring["float32"]["auc"],
        "training": {name: {k: v for k, v in part.items() if k != "losses"} for name, part in training.items()},
        "training_loss_curves": {"step": list(range(len(train))),
                                 **{name: training[name]["losses"] for name in PRECISIONS}},
        "training_bf16_vs_fp32": training["bfloat16"]["rows_per_s"] / training["float32"]["rows_per_s"],
        "training_held_out_auc": {"float32": scoring["float32"]["auc"], "bfloat16": held_out_bf16["auc"]},
        "training_auc_delta": held_out_bf16["auc"] - scoring["float32"]["auc"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    result["targets_met"] = {
        "scoring_bf16_vs_fp32>=2.5": result["scoring_bf16_vs_fp32"] >= 2.5,
        "abs(scoring_auc_delta)<=0.005": abs(result["scoring_auc_delta"]) <= 0.005,
        "training_bf16_vs_fp32>=1.8": result["training_bf16_vs_fp32"] >= 1.8,
        "abs(training_auc_delta)<=0.01": abs(result["training_auc_delta"]) <= 0.01,
    }
    write_json(args.out, result)

    print(f"\n{host['processor'] or platform.machine()}, torch {torch.__version__}, {threads} threads; "
          f"native bf16: {native} ({why})")
    if result["note"]:
        print(f"NOTE: {result['note']}")
    print(f"{'path':<10} {'score cand/s':>12} {'AUC':>7} {'roofline':>9} {'train rows/s':>13} {'roofline':>9}")
    for name in PRECISIONS:
        s, t = scoring[name], training[name]
        print(f"{name:<10} {s['candidates_per_s']:>12.2f} {s['auc']:>7.4f} {s['roofline_share']:>9.0%} "
              f"{t['rows_per_s']:>13.2f} {t['roofline_share']:>9.0%}")
    print(f"bf16/fp32: scoring {result['scoring_bf16_vs_fp32']:.2f}x (AUC {result['scoring_auc_delta']:+.4f}, "
          f"max |dp| {result['scoring_max_abs_dp']:.2e}); training {result['training_bf16_vs_fp32']:.2f}x "
          f"(held-out AUC {result['training_auc_delta']:+.4f})")
    print("loss per step (fp32 | bf16):", " ".join(f"{a:.3f}|{b:.3f}" for a, b in
                                                    zip(training["float32"]["losses"], training["bfloat16"]["losses"])))
    return result


if __name__ == "__main__":
    main()
