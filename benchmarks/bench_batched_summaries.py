"""Items per second of batched item summarisation versus one item at a time.

The textualizer backend (EfficientNet-Lite0 words + the embedded SmolLM2-135M) summarises the same
items at several batch sizes, greedy, with no summary store (so every item is generated). The
time covers the whole summarisation (image decoding, vision encoder, prompt building and
``generate``); loading the models is done once, before any timing, with a short warm-up run.

Batch size 1 runs on the first ``--single-items`` items only (its per-item time is steady, and a
full batch-1 run is the slowest part); the other sizes run on all ``--items``.

Prints a table and writes JSON (default ``benchmarks/speed/batched_summaries.json``, committed)::

    .venv/bin/python -m benchmarks.bench_batched_summaries                  # full run, ~5 min
    .venv/bin/python -m benchmarks.bench_batched_summaries --items 8 --single-items 2 \\
        --batch-sizes 1,4 --max-new-tokens 8 --out /tmp/smoke.json          # smoke test

Run it on a quiet machine: other processes sharing the cores distort every number.

Items come from ``--data`` (a ``merlin-mllm data prepare`` folder; its first ``--items`` items)
or, by default, are built here: photos bundled with scikit-image (cropped and flipped to make
distinct images, saved as JPEG files) with product-like titles and descriptions.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import SPEED_RESULTS, write_json

RESULTS = SPEED_RESULTS / "batched_summaries.json"

_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "colorwheel")
_NOUNS = ("mug", "poster", "lamp", "backpack", "notebook", "kettle", "cushion", "puzzle", "scarf", "clock")
_ADJECTIVES = ("vintage", "handmade", "compact", "bright", "classic", "minimalist", "sturdy", "colourful")
_DETAILS = (
    "Made from recycled materials and finished by hand.",
    "Fits in a small flat and is easy to clean.",
    "A popular gift, shipped in a plain cardboard box.",
    "Comes in three sizes; this listing is for the medium one.",
    "Designed in Lisbon and produced in small batches by a family workshop since 1987.",
    "",
)


def synthetic_items(n: int, folder: Path) -> pd.DataFrame:
    """``n`` items with distinct photos (files in ``folder``) and varied texts; seeded."""
    from PIL import Image, ImageOps
    from skimage import data as skimage_data

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in _PHOTOS]
    rows = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        # A random crop of 60-100% of each side, sometimes mirrored: a new image each time.
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        path = folder / f"item_{i}.jpg"
        image.save(path, quality=90)
        noun = _NOUNS[int(rng.integers(len(_NOUNS)))]
        adjective = _ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))]
        details = " ".join(rng.choice(_DETAILS, size=int(rng.integers(1, 4)), replace=False))
        rows.append({"item_id": i + 1, "title": f"{adjective.title()} {noun} no. {i + 1}",
                     "description": details.strip(), "image_path": str(path)})
    return pd.DataFrame(rows)


def prepared_items(data_dir: Path, n: int) -> pd.DataFrame:
    from merlin_mllm.data.image_files import dataset_image_root
    from merlin_mllm.data.tables import read_table

    items = read_table(data_dir / "items").head(n).copy()
    root = dataset_image_root(data_dir)  # image_path is relative to the root report.json records
    items["image_path"] = [str(root.resolve(p)) if isinstance(p, str) and p else p for p in items["image_path"]]
    return items


def run_once(summarizer_cls, lm, items, settings):
    summarizer = summarizer_cls(model=lm, settings=settings, store=None)
    start = time.perf_counter()
    texts, report = summarizer.summarize(items)
    return time.perf_counter() - start, texts, report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=64, help="items for the batched runs (default 64)")
    parser.add_argument("--single-items", type=int, default=16, help="items for the batch-1 run (default 16)")
    parser.add_argument("--batch-sizes", default="1,4,8,16,32", help="comma-separated; 1 is the baseline")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--data", type=Path, help="a prepared data folder to take items from")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)

    import torch

    from merlin_mllm.generation import GenerationSettings
    from merlin_mllm.models import load
    from merlin_mllm.summaries.item import ItemSummarizer

    sizes = sorted({int(s) for s in args.batch_sizes.split(",") if s.strip()})
    if 1 not in sizes:
        sizes = [1] + sizes
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-items-") as tmp:
        if args.data is not None:
            items = prepared_items(args.data, args.items)
        else:
            items = synthetic_items(args.items, Path(tmp))
        lm = load(device="cpu")
        # Warm-up: loads the vision encoder and runs every code path once.
        run_once(ItemSummarizer, lm, items.head(2), GenerationSettings(max_new_tokens=4, batch_size=2))

        results, outputs = [], {}
        for size in sizes:
            subset = items.head(args.single_items) if size == 1 else items
            settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=size)
            seconds, texts, report = run_once(ItemSummarizer, lm, subset, settings)
            outputs[size] = texts
            results.append({
                "batch_size": size,
                "items": len(subset),
                "seconds": round(seconds, 3),
                "items_per_s": round(len(subset) / seconds, 4),
                "new_tokens": report.new_tokens,
                "tokens_per_s": round(report.new_tokens / seconds, 2),
                "llm_calls": report.llm_calls,
            })
            print(f"batch {size:>3}: {len(subset)} items in {seconds:.1f} s", file=sys.stderr, flush=True)

    base = results[0]["items_per_s"]
    n_single = min(args.single_items, len(items))
    for row in results:
        row["speedup"] = round(row["items_per_s"] / base, 2)
        # Greedy decoding: batching should not change the words (left padding, same prompts).
        row["same_text_as_batch_1"] = sum(a == b for a, b in zip(outputs[row["batch_size"]][:n_single], outputs[1]))
    best = max(results, key=lambda r: r["speedup"])
    summary = {
        "benchmark": "batched item summaries (textualizer backend, greedy, no store)",
        "model": lm.model_id,
        "max_new_tokens": args.max_new_tokens,
        "items_source": str(args.data) if args.data else "synthetic (scikit-image photos)",
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
        "results": results,
        "best": {"batch_size": best["batch_size"], "speedup": best["speedup"]},
    }

    header = f"{'batch':>5} {'items':>5} {'seconds':>8} {'items/s':>8} {'tokens/s':>9} {'speedup':>8} {'same text':>9}"
    print(header)
    print("-" * len(header))
    for row in results:
        print(f"{row['batch_size']:>5} {row['items']:>5} {row['seconds']:>8.1f} {row['items_per_s']:>8.3f} "
              f"{row['tokens_per_s']:>9.1f} {row['speedup']:>7.2f}x {row['same_text_as_batch_1']:>4}/{n_single}")
    return write_json(args.out, summary)


if __name__ == "__main__":
    main()
