"""What a ratings-aware recurrent user-summary pass over every user of a timeline folder costs,
per block size and history depth, with SmolLM2-135M on this CPU.

For each configuration (block size k, history depth D; ``UserSummaryConfig``):

1. **count**: plan every step the full pass needs (``UserSummaryRun``: each row history of
   train/valid/test and each user's chain, without generating) and group them into the waves
   and batches the summarizer would generate (one wave per chain level, batches of
   ``GenerationSettings.batch_size``);
2. **measure** (``--measure``): on a sample of ``--users`` users (copied into a small folder
   under ``benchmarks/results/``; the source folder is only read) with at least ``2 D`` events,
   generate the first two waves of their pass (one full batch each: first steps, then second
   steps, which also show the previous summary) in a fresh store, torch on one thread (the CPU is
   shared), and take the CPU seconds per step of the dearer wave;
3. **extrapolate**: the full pass's steps x those CPU seconds per step on one thread (the full
   pass's last waves hold fewer steps than a batch, whose steps cost more; its tail steps over
   partial blocks cost less), for one thread and for the CPU's two cores.

Usage (from the repository root; never the full pass)::

    .venv/bin/python -m benchmarks.bench_user_summary_pass --configs 3:0,6:0,6:60,12:120   # counts only
    .venv/bin/python -m benchmarks.bench_user_summary_pass --configs 6:60 --measure --users 16

Writes ``benchmarks/speed/user_summary_pass.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import math
import platform
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from merlin_mllm.data.tables import read_table
from merlin_mllm.generation import GenerationSettings
from merlin_mllm.models.loading import model_id_of
from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.summaries.user import UserSummaryRun

from benchmarks.common import SPEED_RESULTS, WORK, log, markdown_table, write_json

DEFAULT_DATA = WORK / "hybrid" / "timeline_all" / "data"
FOLDER = WORK / "user_summary_pass"
TABLES = ("items", "events", "train", "valid", "test")


def parse_configs(text: str):
    """``"6:0,12:120"`` -> [(6, 0), (12, 120)] (block size : history depth, 0 = whole history)."""
    return [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part]


def count_pass(data: Path, block_size: int, depth: int, batch_size: int) -> dict:
    """The steps, waves and batches of the full pass (nothing generated, no model loaded)."""
    store = FOLDER / f"count_store_k{block_size}_d{depth}"
    shutil.rmtree(store, ignore_errors=True)
    run = UserSummaryRun(data, store, block_size=block_size, ratings=True, max_history=depth, progress=False,
                         settings=GenerationSettings(batch_size=batch_size))
    summarizer = run.summarizer
    levels = {}
    for history, ratings in zip(run.histories, run.ratings):
        for step in summarizer.plan(history, None, ratings):
            levels[step.key] = step.level
    per_wave = Counter(levels.values())
    shutil.rmtree(store, ignore_errors=True)
    return {"histories": len(set(zip(run.users, run.histories))), "steps": len(levels), "waves": len(per_wave),
            "batches": sum(math.ceil(n / batch_size) for n in per_wave.values()),
            "users": len(run.full), "events": int(sum(len(h) for h in run.full.values()))}


def sample_folder(data: Path, users: int, min_events: int, seed: int) -> tuple:
    """A copy of ``data`` restricted to ``users`` random users with at least ``min_events`` events."""
    events = read_table(data / "events")
    counts = events.groupby("user_id").size()
    pool = np.sort(counts[counts >= max(1, min_events)].index.to_numpy())
    chosen = np.sort(np.random.default_rng(seed).choice(pool, size=min(users, len(pool)), replace=False))
    out = FOLDER / f"sample_u{users}_min{min_events}_s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    for name in TABLES:
        table = read_table(data / name)
        if name != "items":
            table = table[table["user_id"].isin(chosen).to_numpy()]
        (out / name).mkdir(parents=True)
        table.reset_index(drop=True).to_parquet(out / name / "part_0.parquet", index=False)
    return out, [int(u) for u in chosen], int(counts.loc[chosen].sum())


def measure(data: Path, block_size: int, depth: int, users: int, seed: int, settings: GenerationSettings) -> dict:
    """Time the first two waves of the pass over ``users`` sampled users, in a fresh store: one
    full batch of first steps (no previous summary), then one of second steps (each continuing
    the first: the typical step, whose prompt also holds the previous summary)."""
    sample, chosen, events = sample_folder(data, users, max(2 * depth, 2 * block_size), seed)
    store = FOLDER / f"store_k{block_size}_d{depth}"
    shutil.rmtree(store, ignore_errors=True)
    run = UserSummaryRun(sample, store, block_size=block_size, ratings=True, max_history=depth, settings=settings,
                         progress=False)
    chains = [run.summarizer.plan(h, None, r) for u, h, r in zip(run.users, run.histories, run.ratings)
              if len(h) >= 2 * block_size and u in run.full and h == run.full[u][: len(h)]]
    waves = {}
    for level in (1, 2):
        steps = {c[level - 1].key: c[level - 1] for c in chains if len(c) >= level}
        report = SummaryReport()
        start, cpu_start = time.perf_counter(), time.process_time()
        run.summarizer.run_steps(steps, report)
        # CPU seconds of this one-thread process: what a step costs a core, whatever else shares
        # the machine (wall seconds are kept too; on a shared CPU they run longer).
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        generated = max(1, report.generated)
        waves[f"wave_{level}"] = {"steps_generated": report.generated, "new_tokens": report.new_tokens,
                                  "truncated": report.truncated, "wall_seconds": round(seconds, 1),
                                  "cpu_seconds": round(cpu, 1), "cpu_seconds_per_step": round(cpu / generated, 3),
                                  "wall_seconds_per_step": round(seconds / generated, 3)}
        log(f"wave {level}: {waves[f'wave_{level}']}")
    run.store.close()
    return {"users": chosen, "events": events, **waves,
            "cpu_seconds_per_step": max(w["cpu_seconds_per_step"] for w in waves.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a prepared timeline folder (only read)")
    parser.add_argument("--configs", default="3:0,6:0,12:0,6:60,12:120",
                        help="block_size:max_history pairs to count (0 = whole history)")
    parser.add_argument("--measure", action="store_true", help="also time each configuration on a user sample")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-hours", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=SPEED_RESULTS / "user_summary_pass.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the 2-core CPU is shared: one thread, as the note in the JSON says
    settings = GenerationSettings()  # the defaults summarize_users runs with (greedy, 96 new tokens, batch 16)
    results = []
    for block_size, depth in parse_configs(args.configs):
        log(f"counting k={block_size} depth={depth} on {args.data}")
        entry = {"block_size": block_size, "max_history": depth, "full_pass": count_pass(args.data, block_size, depth,
                                                                                          settings.batch_size)}
        if args.measure:
            log(f"measuring k={block_size} depth={depth} on {args.users} users")
            entry["sample"] = sample = measure(args.data, block_size, depth, args.users, args.seed, settings)
            hours = entry["full_pass"]["steps"] * sample["cpu_seconds_per_step"] / 3600
            entry["extrapolated_hours_one_thread"] = round(hours, 2)
            # Two cores: two processes (or torch threads) over disjoint users, about half the time.
            entry["extrapolated_hours_two_cores"] = round(hours / 2, 2)
            entry["fits_budget_on_two_cores"] = hours / 2 <= args.budget_hours
        log(str(entry))
        results.append(entry)
    header = ["k", "depth", "steps", "waves", "batches", "CPU s/step (sample)", "hours, 1 thread", "hours, 2 cores"]
    rows = [[r["block_size"], r["max_history"] or "whole", r["full_pass"]["steps"], r["full_pass"]["waves"],
             r["full_pass"]["batches"], r.get("sample", {}).get("cpu_seconds_per_step", "-"),
             r.get("extrapolated_hours_one_thread", "-"), r.get("extrapolated_hours_two_cores", "-")] for r in results]
    print("\n".join(markdown_table(header, rows)))
    previous = {}
    if args.out.exists():  # counts-only runs keep the measured entries of earlier runs
        import json
        previous = {(r["block_size"], r["max_history"]): r for r in json.loads(args.out.read_text()).get("configs", [])}
    for r in results:
        if "sample" in r or (r["block_size"], r["max_history"]) not in previous:
            previous[(r["block_size"], r["max_history"])] = r
        else:
            previous[(r["block_size"], r["max_history"])]["full_pass"] = r["full_pass"]
    write_json(args.out, {
        "what": "ratings-aware recurrent user summaries over every user of a timeline folder (ML-100k, all users)",
        "data": str(args.data.relative_to(Path.cwd())) if args.data.is_absolute() and Path.cwd() in args.data.parents
        else str(args.data),
        "model": model_id_of(None), "settings": {"max_new_tokens": settings.max_new_tokens,
                                                 "batch_size": settings.batch_size, "greedy": not settings.do_sample},
        "threads": "torch.set_num_threads(1); OMP_NUM_THREADS=1; the 2-core CPU was shared with other sessions' jobs",
        "cpu": platform.processor() or platform.machine(),
        "budget_hours": args.budget_hours,
        "configs": sorted(previous.values(), key=lambda r: (r["block_size"], r["max_history"])),
    })


if __name__ == "__main__":
    main()
