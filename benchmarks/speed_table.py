"""Collect the speed benchmarks into one table in ``benchmarks/README.md``.

Each row is a ratio measured inside one run of one benchmark (both sides on the same machine,
minutes apart), read from its JSON in ``benchmarks/speed/`` (committed, so every figure of the
table can be traced to the run that made it). Absolute times on a shared 2-core CPU are noisy;
the ratios are what the table reports.

Regenerate everything (about 15 minutes on a quiet 2-core CPU; nothing else may run meanwhile)::

    .venv/bin/python -m benchmarks.speed_table --run

or only re-render the table from the committed JSON files::

    .venv/bin/python -m benchmarks.speed_table

The table is written between the ``speed-table`` markers of ``benchmarks/README.md`` and printed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, SPEED_RESULTS

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
BEGIN, END = "<!-- speed-table:begin -->", "<!-- speed-table:end -->"

#: (script, JSON it writes, arguments) in run order: the settings of the committed JSON, the
#: smallest that still give every row of the table (batch sizes 1 and 32 only; no
#: forward-per-candidate timing, which the table does not show).
BENCHMARKS = (
    ("bench_batched_summaries.py", "batched_summaries.json", ["--items", "32", "--batch-sizes", "1,32"]),
    ("bench_incremental.py", "incremental.json", []),
    ("bench_scoring.py", "scoring.json", ["--skip-forward-per-candidate"]),
    ("bench_serving.py", "serving.json", []),
)


def _load(name: str):
    path = SPEED_RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def rows() -> list:
    """(benchmark, measurement, ratio or value, target, source) rows from the JSON files present."""
    out = []
    batched = _load("batched_summaries.json")
    if batched:
        by_size = {r["batch_size"]: r for r in batched["results"]}
        base = by_size[1]
        best = max(batched["results"], key=lambda r: r["speedup"])
        out.append(("item summaries", f"items/s at batch {best['batch_size']} vs batch 1 "
                    f"({base['items_per_s']:.3f} -> {best['items_per_s']:.3f} items/s)",
                    f"{best['speedup']:.2f}x", ">= 4x", "batched_summaries.json"))
    incremental = _load("incremental.json")
    if incremental:
        inc, full = incremental["incremental"], incremental["full_recompute"]
        out.append(("user summaries", f"LLM calls, full recompute vs incremental update "
                    f"({full['llm_calls']} vs {inc['llm_calls']}; expected {incremental['expected_incremental_calls']})",
                    f"{incremental['calls_ratio']:.2f}x", "= history/new blocks", "incremental.json"))
        out.append(("user summaries", f"generated tokens, full vs incremental ({full['new_tokens']} vs {inc['new_tokens']})",
                    f"{incremental['tokens_ratio']:.2f}x", "", "incremental.json"))
    scoring = _load("scoring.json")
    if scoring:
        ways, roof, setup = scoring["ways"], scoring["roofline"], scoring["setup"]
        dp = ways["shared"]["max_abs_dp_vs_generate"]
        out.append(("ranker scoring", f"shared-prefix single pass vs generate() per candidate, 1+{setup['candidates'] - 1} "
                    f"candidates ({scoring['machine']['device']} {scoring['machine']['dtype']}; max abs. Δp {dp:.1e})",
                    f"{ways['shared']['speedup_vs_generate']:.2f}x", ">= 5x", "scoring.json"))
        out.append(("ranker scoring", f"forward throughput / measured matmul roofline "
                    f"({roof['forward_gflops']:.1f} / {roof['matmul_gflops']:.1f} GFLOP/s)",
                    f"{roof['forward_fraction']:.0%}", ">= 60%", "scoring.json"))
    serving = _load("serving.json")
    if serving:
        triton = serving["triton"]
        batching, plain = triton["dynamic_batching"]["throughput"], triton["no_batching"]["throughput"]
        load = triton["dynamic_batching"]["load"]
        out.append(("serving", "Triton p50 / in-process p50, 1 user x "
                    f"{serving['requests']['candidates']} candidates", f"{serving['triton_over_in_process_p50']:.2f}x",
                    "<= 1.15x", "serving.json"))
        if plain.get("requests_per_s"):
            out.append(("serving", f"throughput with / without dynamic batching, {batching['clients']} clients "
                        f"({batching['requests_per_s']:.2f} vs {plain['requests_per_s']:.2f} req/s)",
                        f"{batching['requests_per_s'] / plain['requests_per_s']:.2f}x", "", "serving.json"))
        out.append(("serving", f"load run {load['seconds']:.0f} s, {load['clients']} clients: "
                    f"{load['completed']} requests, p99 {load['p99_ms']:.0f} ms", f"{load['failed']} failed", "0 failed",
                    "serving.json"))
    out.extend(precision_rows(_load("precision.json")))
    return out


def precision_rows(precision) -> list:
    """bf16 against fp32 (``bench_precision.py``), labelled emulated when the host lacked native bf16."""
    if not precision:
        return []
    host = precision["host"]
    where = (f"{precision['setup']['test_groups']} groups of 1+{precision['setup']['candidates_per_test_group'] - 1}, "
             f"{host['device']}, {'native' if host['native_bf16'] else 'EMULATED (no avx512_bf16/amx: not the issue measurement)'} bf16")
    scoring, training = precision["scoring"], precision["training"]
    return [
        ("ranker precision", f"scoring candidates/s, bf16 vs fp32 ({where}; AUC {precision['scoring_auc_delta']:+.4f}, "
         f"max abs. Δp {precision['scoring_max_abs_dp']:.1e})", f"{precision['scoring_bf16_vs_fp32']:.2f}x",
         ">= 2.5x, AUC ±0.005", "precision.json"),
        ("ranker precision", f"training rows/s, bf16 vs fp32 ({precision['setup']['train_groups']} groups, one epoch; "
         f"held-out AUC {precision['training_auc_delta']:+.4f})", f"{precision['training_bf16_vs_fp32']:.2f}x",
         ">= 1.8x, AUC ±0.01", "precision.json"),
        ("ranker precision", "share of own matmul roofline, scoring fp32 / bf16, training fp32 / bf16",
         f"{scoring['float32']['roofline_share']:.0%} / {scoring['bfloat16']['roofline_share']:.0%}, "
         f"{training['float32']['roofline_share']:.0%} / {training['bfloat16']['roofline_share']:.0%}", "",
         "precision.json"),
    ]


def render(table_rows: list) -> str:
    lines = ["| stage | measurement (one run) | result | target | JSON |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | **{c}** | {d} | [`speed/{e}`](speed/{e}) |" for a, b, c, d, e in table_rows]
    return "\n".join(lines)


def write_readme(table: str) -> None:
    text = README.read_text() if README.is_file() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README} lacks the {BEGIN} / {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run every benchmark first (sequentially)")
    args = parser.parse_args(argv)
    if args.run:
        for script, _, arguments in BENCHMARKS:
            print(f"== {script} {' '.join(arguments)}", flush=True)
            subprocess.run([sys.executable, "-m", f"benchmarks.{Path(script).stem}", *arguments], cwd=REPO, check=True)
    table = render(rows())
    write_readme(table)
    print(table)


if __name__ == "__main__":
    main()
