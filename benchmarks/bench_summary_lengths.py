"""Item summaries on a catalogue with a realistic length spread: batched by length or not, long
items against normal ones, peak memory, and 1 against 2 Dask workers.

The catalogue is MovieLens-100k's items (title; description = genres and year) with about 5% of
them given long text, as scraped catalogues have: descriptions of 2 KB to 64 KB, one of 3 MB,
and a few titles of 1 KB to 3 KB. Every text goes through the token budgets
(``TokenBudgets()``: title 64, description 256 tokens), so a long item costs at most what an item
at the budget costs; what batching adds is whether short items are padded to long ones.

Rows of the table:

- ``sorted`` / ``unsorted``: the whole catalogue, no store (every item generated), batched by
  prompt length (``GenerationSettings.sort_by_length=True``, the default) or in catalogue order;
- ``long only`` / ``normal only``: one batch-sized group of long items, and one of normal ones,
  each on its own: seconds per item, at the small ``--max-new-tokens`` and at 96 (the CLI's);
- ``workers 1`` / ``workers 2``: ``summarize_items_on_cluster`` (what ``summarize items
  --workers N`` runs) on the first ``--worker-items`` normal items, on a LocalCluster whose
  workers split the machine's cores for torch; models are loaded on every worker before timing.

The embedded SmolLM2-135M (textualizer backend; ML-100k has no images), greedy decoding.
Prints a table and writes JSON (default ``benchmarks/speed/summary_lengths.json``, committed)::

    .venv/bin/python -m benchmarks.bench_summary_lengths                     # about 6 minutes
    .venv/bin/python -m benchmarks.bench_summary_lengths --items 40 --worker-items 8 \\
        --out /tmp/smoke.json                                                # smoke test

Run it on a quiet machine: other processes sharing the cores distort every number.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import SPEED_RESULTS, write_json

RESULTS = SPEED_RESULTS / "summary_lengths.json"

_SENTENCES = (
    "This edition comes with a restored print, a booklet of production notes and an interview with the director.",
    "Critics at the time praised the score, the cinematography and the unusually patient editing.",
    "The story follows a family over three generations, moving between the city and the coast.",
    "Shipping weight 0.4 kg; region-free; subtitles in English, French, German, Spanish and Portuguese.",
    "Customers who bought this item also bought the soundtrack, the novel and the deluxe poster set.",
    "Warning: contains scenes some viewers may find disturbing; recommended for ages 15 and up.",
    "Remastered in 4K from the original negative, with the theatrical and the extended cut on two discs.",
)


def long_text(rng: np.random.Generator, chars: int) -> str:
    """About ``chars`` characters of catalogue prose (seeded)."""
    parts, size = [], 0
    while size < chars:
        sentence = _SENTENCES[int(rng.integers(len(_SENTENCES)))]
        parts.append(sentence)
        size += len(sentence) + 1
    return " ".join(parts)[:chars]


def catalogue(n: int, long_share: float, seed: int, work: Path) -> pd.DataFrame:
    """The first ``n`` ML-100k items; ``long_share`` of them get long descriptions or titles."""
    from merlin_mllm.data.prepare import prepare_dataset
    from merlin_mllm.data.tables import read_table

    data = work / "ml100k"
    if not (data / "items").is_dir():
        prepare_dataset("ml-100k", "paper", data, max_users=0, seed=seed)
    items = read_table(data / "items").sort_values("item_id").head(n).reset_index(drop=True)
    items = items[["item_id", "title", "description"]].assign(image_path=None, long=False)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=max(1, round(n * long_share)), replace=False)
    description_sizes = [2_000, 4_000, 8_000, 16_000, 64_000]
    for rank, row in enumerate(chosen):
        if rank == 0:
            items.loc[row, "description"] = long_text(rng, 3_000_000)  # one of 3 MB
        elif rank % 4 == 3:
            items.loc[row, "title"] = f"{items.loc[row, 'title']} " + long_text(rng, int(rng.integers(1_000, 3_000)))
        else:
            items.loc[row, "description"] = long_text(rng, description_sizes[int(rng.integers(len(description_sizes)))])
        items.loc[row, "long"] = True
    return items


class PromptCounter:
    """Counts generate() calls and the prompt tokens they compute, padding included."""

    def __init__(self, model):
        self.model, self.inner = model, model.generate
        self.calls = self.padded_tokens = self.real_tokens = self.decode_steps = 0
        model.generate = self

    def __call__(self, *args, **kwargs):
        mask = kwargs["attention_mask"]
        self.calls += 1
        self.padded_tokens += int(mask.numel())
        self.real_tokens += int(mask.sum())
        out = self.inner(*args, **kwargs)
        self.decode_steps += int(out.shape[1] - mask.shape[1])  # new positions: the batch's longest answer
        return out

    def close(self):
        del self.model.generate


def timed_summaries(lm, frame: pd.DataFrame, settings) -> dict:
    from merlin_mllm.summaries.item import ItemSummarizer

    counter = PromptCounter(lm.model)
    try:
        start = time.perf_counter()
        texts, report = ItemSummarizer(model=lm, settings=settings).summarize(frame)
        seconds = time.perf_counter() - start
    finally:
        counter.close()
    assert report.generated == len(frame) and all(texts), report
    return {"items": len(frame), "seconds": round(seconds, 2), "items_per_s": round(len(frame) / seconds, 3),
            "seconds_per_item": round(seconds / len(frame), 4), "generate_calls": counter.calls,
            "prompt_tokens": counter.real_tokens, "padded_prompt_tokens": counter.padded_tokens,
            "new_tokens": report.new_tokens, "decode_steps": counter.decode_steps, "truncated": report.truncated}


def worker_rows(items: pd.DataFrame, n: int, settings, work: Path) -> list:
    """items/s of summarize_items_on_cluster with 1 and 2 workers on ``n`` normal items."""
    from merlin_mllm.pipelines.summaries import dask_client, summarize_items_on_cluster
    from merlin_mllm.summaries.item_backends import get_backend

    data = work / "workers_data"
    (data / "items").mkdir(parents=True, exist_ok=True)
    items[~items["long"]].head(n).drop(columns="long").to_parquet(data / "items" / "part_0.parquet", index=False)
    rows = []
    for workers in (1, 2):
        with dask_client(workers=workers) as client:
            client.run(lambda: get_backend("textualizer") and None)  # load the models on every worker
            store = work / f"workers_store_{workers}"
            start = time.perf_counter()
            report = summarize_items_on_cluster(data, store, client, settings=settings, rows_per_partition=16)
            seconds = time.perf_counter() - start
        assert report.generated == n, report
        rows.append({"workers": workers, "items": n, "seconds": round(seconds, 2), "items_per_s": round(n / seconds, 3),
                     "torch_threads_per_worker": max(1, (os.cpu_count() or 1) // workers)})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=240, help="Catalogue size (the first N ML-100k items)")
    parser.add_argument("--long-share", type=float, default=0.05, help="Share of items given long text")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--worker-items", type=int, default=64, help="Items of the 1-vs-2-workers rows (0: skip them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import torch

    from merlin_mllm.generation import GenerationSettings
    from merlin_mllm.models import load
    from merlin_mllm.text import TokenBudgets

    work = Path(tempfile.mkdtemp(prefix="bench_summary_lengths_"))
    items = catalogue(args.items, args.long_share, args.seed, work)
    lm = load()
    small = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    timed_summaries(lm, items.head(4), small)  # warm-up: models loaded, kernels ready

    rows = {}
    for name, sort in (("sorted", True), ("unsorted", False)):
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, sort_by_length=sort)
        rows[name] = timed_summaries(lm, items.drop(columns="long"), settings)
        print(f"{name}: {rows[name]}", flush=True)

    long_items = items[items["long"]].drop(columns="long")
    normal = items[~items["long"]].drop(columns="long").head(len(long_items))
    per_item = {}
    for tokens in sorted({args.max_new_tokens, 96}):
        settings = GenerationSettings(max_new_tokens=tokens, batch_size=args.batch_size)
        long_row, normal_row = timed_summaries(lm, long_items, settings), timed_summaries(lm, normal, settings)
        per_item[str(tokens)] = {"long": long_row, "normal": normal_row,
                                 "long_over_normal": round(long_row["seconds_per_item"] / normal_row["seconds_per_item"], 2)}
        print(f"max_new_tokens {tokens}: {per_item[str(tokens)]}", flush=True)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    workers = worker_rows(items, args.worker_items, small, work) if args.worker_items else []

    result = {
        "what": "item summaries (textualizer, embedded SmolLM2-135M, greedy, no store) on ML-100k items with "
                f"{args.long_share:.0%} long texts; token budgets {TokenBudgets().to_dict()}",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__},
        "settings": {"items": args.items, "long_items": int(items["long"].sum()), "long_share": args.long_share,
                     "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "seed": args.seed,
                     "longest_description_chars": int(items["description"].str.len().max()),
                     "longest_title_chars": int(items["title"].str.len().max())},
        "rows": rows,
        "sorted_over_unsorted": round(rows["sorted"]["items_per_s"] / rows["unsorted"]["items_per_s"], 2),
        "long_vs_normal_per_item": per_item,
        "peak_rss_mb": round(peak_rss_mb),
        "workers": workers,
    }
    print()
    print(f"{'row':<22} {'items':>6} {'s':>8} {'items/s':>8} {'padded prompt tokens':>21}")
    for name, row in rows.items():
        print(f"{name:<22} {row['items']:>6} {row['seconds']:>8.1f} {row['items_per_s']:>8.2f} {row['padded_prompt_tokens']:>21}")
    for tokens, pair in per_item.items():
        for kind in ("long", "normal"):
            row = pair[kind]
            print(f"{kind + ' only, ' + tokens + ' tok':<22} {row['items']:>6} {row['seconds']:>8.1f} {row['items_per_s']:>8.2f} "
                  f"{row['padded_prompt_tokens']:>21}")
        print(f"  long / normal seconds per item at {tokens} new tokens: {pair['long_over_normal']}")
    for row in workers:
        print(f"{'workers ' + str(row['workers']):<22} {row['items']:>6} {row['seconds']:>8.1f} {row['items_per_s']:>8.2f}")
    print(f"sorted / unsorted items/s: {result['sorted_over_unsorted']}; peak RSS {result['peak_rss_mb']} MB")
    return write_json(args.out, result)


if __name__ == "__main__":
    main()
