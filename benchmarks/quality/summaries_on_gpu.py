"""Make the LLM summary stores of one prepared folder on a GPU, for ``run_quality.py`` to reuse.

The recurrent user summaries of all 943 ML-100k users take about 95 minutes on this project's
2-core CPU; on one GPU they take a minute or two. This script runs the normal stages
(:func:`summarize_items`, then :func:`summarize_users` in ``recurrent`` and ``direct`` mode) with
``run_quality.py``'s generation settings, and lays the stores out as ``run_quality.py``'s
``LLMStages`` does (``summaries_items``, ``summaries_recurrent``, ``summaries_direct`` plus the
``.done`` markers) under ``--work``. Copy that folder to the CPU machine and ``run_quality.py``
trains and scores on it without generating anything: the store is keyed by model, prompt
version, output-relevant settings and inputs, and the batch size is not among them.

The model is the embedded SmolLM2-135M-Instruct, in bf16 on CUDA (``models.loading.load``'s
default on a GPU), so its greedy texts can differ from a CPU fp32 run's in places.

Usage::

    python benchmarks/quality/summaries_on_gpu.py --data benchmarks/results/quality_v2/paper_all/data \\
        --work benchmarks/results/quality_v2/paper_all/llm_s0 --batch 256

Prints a table and writes ``<work>/summaries_on_gpu.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_quality import MAX_NEW_TOKENS  # noqa: E402  (the CPU run's settings: same keys)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepare_dataset output folder")
    parser.add_argument("--work", type=Path, required=True, help="run_quality's LLM work folder for this data")
    parser.add_argument("--batch", type=int, default=256, help="prompts per generate() call")
    parser.add_argument("--modes", nargs="+", default=["recurrent", "direct"], choices=["recurrent", "direct"])
    args = parser.parse_args(argv)

    import torch

    from merlin_mllm.generation import GenerationSettings
    from merlin_mllm.summaries.item import summarize_items
    from merlin_mllm.summaries.user import summarize_users

    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=args.batch)
    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows, started = [], time.time()
    items = args.work / "summaries_items"
    report = summarize_items(args.data, items, settings=settings, progress=True)
    (args.work / "summaries_items.done").write_text("ok\n")
    rows.append({"stage": "item summaries", "seconds": round(time.time() - started, 1), "report": str(report)})
    for mode in args.modes:
        started = time.time()
        store = args.work / f"summaries_{mode}"
        if not store.exists():
            shutil.copytree(items, store)
        # The splits run_quality trains and scores (validate=False never reads valid rows).
        report = summarize_users(args.data, store, splits=("train", "test"), mode=mode, settings=settings,
                                 progress=True)
        (args.work / f"summaries_{mode}.done").write_text("ok\n")
        rows.append({"stage": f"user summaries ({mode})", "seconds": round(time.time() - started, 1),
                     "report": str(report)})

    print(f"\ndevice: {device}; max_new_tokens {MAX_NEW_TOKENS}, batch {args.batch}")
    print(f"| stage | seconds |\n|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['seconds']} |")
    out = args.work / "summaries_on_gpu.json"
    out.write_text(json.dumps({"device": device, "batch": args.batch, "max_new_tokens": MAX_NEW_TOKENS,
                               "stages": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
