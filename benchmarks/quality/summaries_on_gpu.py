"""Make the LLM summary stores of one prepared folder on a GPU, for ``run_quality.py`` to reuse.

The recurrent user summaries of all 943 ML-100k users take about 95 minutes on this project's
2-core CPU; on one GPU they take a minute or two. This script runs ``run_quality.py``'s own
summary stage (``LLMStages.summaries``: :func:`summarize_items`, then :func:`summarize_users` in
``recurrent`` and ``direct`` mode, same settings, same store layout and ``stages.json`` timings)
with a larger generation batch. Copy the ``--work`` folder to the CPU machine and
``run_quality.py`` trains and scores on it without generating anything: the store is keyed by
model, prompt version, output-relevant settings and inputs, and the batch size is not among them.

The model is the embedded SmolLM2-135M-Instruct, in bf16 on CUDA (``models.loading.load``'s
default on a GPU), so its greedy texts can differ from a CPU fp32 run's in places. Nothing here
needs the Merlin stack.

Usage::

    python -m benchmarks.quality.summaries_on_gpu --data benchmarks/results/quality_v2/paper_all/data \\
        --work benchmarks/results/quality_v2/paper_all --batch 256

Prints the stage times and writes ``<work>/summaries_on_gpu.json`` (device and batch).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.quality.run_quality import LLMStages  # the CPU run's stage: same keys, same layout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepare_dataset output folder")
    parser.add_argument("--work", type=Path, required=True, help="run_quality's LLM work folder for this data")
    parser.add_argument("--batch", type=int, default=256, help="prompts per generate() call")
    parser.add_argument("--modes", nargs="+", default=["recurrent", "direct"], choices=["recurrent", "direct"])
    args = parser.parse_args(argv)

    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    stages = LLMStages(args.data, args.work, seed=0, max_groups=None, seed_stores=[], generation_batch=args.batch)
    for mode in args.modes:
        stages.summaries([], mode)
    out = args.work / "summaries_on_gpu.json"
    out.write_text(json.dumps({"device": device, "batch": args.batch}, indent=2) + "\n")
    print(f"device: {device}, batch {args.batch}; stage times in {stages.stages_file}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
