"""What the LLM reads (issue 24): candidate text x user context x collaborative tokens, on the
timeline protocol, all MovieLens-100k users.

Every arm is the recipe of ``train_llm_rows.py`` (``TrainConfig.small_budget(epochs=1,
use_images=False)``, groups / listwise / prompt v2) on ``run_hybrid.py``'s timeline folder, with
one input changed (:data:`ARMS`), trained twice: as the **LLM only** and as the **hybrid** (the
same ranker trained jointly with the ``HybridHead`` over ``HEAD_FEATURES``). The titles arm is the
hybrid table's own LLM rows (``timeline_all/llm_only_s<S>``, ``hybrid_tabular_s<S>``): same
recipe, same folder, same seeds, so its runs are reused where they exist on the machine; where
they don't, the arm is run again into those folders (the paired differences need its score
files), and until then the report shows the hybrid table's recorded numbers.

The protocol, nothing tuned on test groups:

1. every arm x kind is trained with seed 42 and scored on **valid** (stage ``valid``);
2. the two arms with the best valid AUC as hybrids, and the titles arm, are scored on **test**
   with seeds 42, 43 and 44 (``--report`` names them under ``chosen_for_test``), and so is the
   better summary arm on valid when neither summary arm is among the two (``summary_minus_titles``
   is the paper's claim);
3. the tested arms are also scored on valid with the other two seeds; the best arm (and the best
   hybrid) is the one with the best hybrid valid AUC averaged over the three seeds, and it becomes
   the default (``default_arm``) only if its test interval against titles is above 0;
4. the report's differences are paired bootstraps over test users with the seeds as strata
   (``run_hybrid.paired_difference``); ``each_arm_minus_titles`` gives every tested arm's, as a
   table rather than a selection.

Each stage is skipped when its output exists; training and scoring resume from their own
checkpoints. Runs land in ``<work>/timeline_all/inputs/<arm>_<kind>_s<seed>/`` (git-ignored,
machine-local). Each finished stage's small outputs (``valid.json``/``test.json``, the stage
costs, the score columns of ``<split>.scores.parquet``) are also kept in ``llm_inputs_runs/``
here, committed, so a fresh machine continues the ablation instead of losing it: the report reads
a run's folder where it exists, else its kept record. ``--report`` writes ``llm_inputs.json`` and
``llm_inputs.md`` here from whatever exists, with every missing stage listed as pending.

The summary arms read a summary pass first (:data:`PASSES`, stages ``user_summaries`` and
``item_summaries``), whose stores are committed here too, so a pass resumes where the last
machine left it.

Usage::

    python -m benchmarks.quality.llm_inputs --stages attributes:hybrid:42:train attributes:hybrid:42:valid
    python -m benchmarks.quality.llm_inputs --stages user_summaries user_summary:llm_only:42:train
    python -m benchmarks.quality.llm_inputs --report
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from benchmarks.common import log, markdown_table, write_json
from benchmarks.quality.hybrid_table import METRICS
from benchmarks.quality.run_hybrid import SCORE_COLUMNS, metrics_of, paired_difference, summarise
from benchmarks.quality.train_llm_rows import WORK, run_row_stage

HERE = Path(__file__).resolve().parent
PROTOCOL = "timeline"
KINDS = ("llm_only", "hybrid")
SELECTION_SEED = 42
TEST_SEEDS = (42, 43, 44)
#: Arms sent to test besides the titles arm, chosen by valid AUC.
ARMS_TO_TEST = 2
#: Each run's kept record (committed): the outputs the report reads, without the model.
RECORDS = HERE / "llm_inputs_runs"
RECORDED_JSON = ("stages.json", "valid.json", "test.json")
RECORDED_SCORES = ("valid.scores.parquet", "test.scores.parquet")


@dataclass(frozen=True)
class SummaryPass:
    """A summary pass that some arms read: its store and its cost record, both committed (JSONL
    segments are small, so a pass that a session's end cuts short goes on from them on the next
    machine instead of starting over). Each pass has a store of its own: a user step's key
    covers the item summaries its history lines show, so item summaries written into the user
    store would change which user summaries it holds."""

    what: str
    #: The summary store (``SummaryStore``) the pass writes.
    store: Path
    #: One entry per run of the pass, finished or cut short (summed by the report).
    costs: Path


#: Stage name -> pass. ``user_summaries``: ratings-aware recurrent summaries of every row's history
#: on the timeline folder (k = TIMELINE_BLOCK_SIZE, depth TIMELINE_MAX_HISTORY); ``item_summaries``:
#: the first stage's summary of every catalogue item (the textualizer backend, SmolLM2-135M).
PASSES = {
    "user_summaries": SummaryPass("the timeline folder's ratings-aware user summaries",
                                  RECORDS / "user_summaries", RECORDS / "user_summary_pass.json"),
    "item_summaries": SummaryPass("the catalogue's item summaries", RECORDS / "item_summaries",
                                  RECORDS / "item_summary_pass.json"),
}


# The titles context is asked for by name where an input rides on it (ratings, history soft tokens);
# the LLM-only rows otherwise read the same titles from recent_titles_summaries (no test or valid row
# has an empty history, where the two texts would differ).
@dataclass(frozen=True)
class Arm:
    what: str
    #: TrainConfig settings that make this arm (recorded in the run's train_config.json).
    config: Dict[str, object] = field(default_factory=dict)
    #: The summary pass (a key of :data:`PASSES`) it reads, when it needs more than the prepared folder.
    needs: Optional[str] = None

ARMS = {
    "titles": Arm("candidate title; the user's last 5 titles (the hybrid table's LLM rows)"),
    "attributes": Arm("candidate title + genres and year; the user's last 5 titles",
                      {"candidate_text": "title+attributes"}),
    "ratings": Arm("candidate title; the user's last 5 titles, each with its rating",
                   {"user_context": "titles", "context_ratings": True}),
    "attributes_ratings": Arm("candidate title + genres and year; the last 5 titles with their ratings",
                              {"candidate_text": "title+attributes", "user_context": "titles", "context_ratings": True}),
    "collab": Arm("candidate title; the last 5 titles; one SASRec soft token after every title (LLaRA-style)",
                  {"user_context": "titles", "collab_tokens": True}),
    "user_summary": Arm("candidate title; the ratings-aware recurrent summary of the whole history before the row",
                        {"user_context": "summary"}, needs="user_summaries"),
    "user_summary_and_titles": Arm("candidate title; the recurrent summary, then the last 5 titles",
                                   {"user_context": "both"}, needs="user_summaries"),
    "item_summary": Arm("candidate title + its stage-1 item summary; the last 5 titles",
                        {"candidate_text": "title+summary"}, needs="item_summaries"),
}
#: The arms that read the recurrent user summaries (the paper's claim is summary versus titles).
SUMMARY_ARMS = ("user_summary", "user_summary_and_titles")


def root(work: Path) -> Path:
    return work / f"{PROTOCOL}_all"


def run_dir(work: Path, arm: str, kind: str, seed: int) -> Path:
    """Where an arm's run lives; the titles arm is the hybrid table's own LLM rows."""
    if arm == "titles":
        return root(work) / f"{'llm_only' if kind == 'llm_only' else 'hybrid_tabular'}_s{seed}"
    return root(work) / "inputs" / f"{arm}_{kind}_s{seed}"


def run_stage(work: Path, arm: str, kind: str, seed: int, stage: str) -> None:
    if arm not in ARMS or kind not in KINDS or stage not in ("train", "valid", "test"):
        raise ValueError(f"unknown stage {arm}:{kind}:{seed}:{stage} (arms {sorted(ARMS)}, kinds {KINDS}, "
                         "stages train/valid/test)")
    spec = ARMS[arm]
    # The rows' summaries are read from the pass's store (row_summaries, CandidateText): a row or
    # candidate without one is an error naming it, so an unfinished pass cannot train or score an arm.
    store = {spec.needs: PASSES[spec.needs].store} if spec.needs else {}
    run_row_stage(root(work) / "data", run_dir(work, arm, kind, seed), stage, seed=seed, hybrid=kind == "hybrid",
                  features_dir=root(work) / "hybrid_inputs", config=dict(spec.config),
                  summaries=store.get("user_summaries"), item_summaries=store.get("item_summaries"))
    keep_record(work, arm, kind, seed)


def cpu_model() -> str:
    """This machine's CPU model name (its hosts differ: AVX2-only AMD, AVX-512/AMX Intel)."""
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.is_file() else []
    return names[0] if names else platform.machine()


def run_pass(work: Path, name: str) -> dict:
    """Run the summary pass ``name`` (:data:`PASSES`) into its store. Summaries already stored are
    not generated again; the pass's wall and CPU time are appended to its cost record whether it
    finishes or is interrupted."""
    import time

    from merlin_mllm.generation import GenerationSettings
    from merlin_mllm.summaries.item import summarize_items
    from merlin_mllm.summaries.user import summarize_users
    from merlin_mllm.summaries.user_summarizer import TIMELINE_BLOCK_SIZE, TIMELINE_MAX_HISTORY

    from benchmarks.quality.run_hybrid import prepare_folder

    data, summary_pass = root(work) / "data", PASSES[name]
    prepare_folder(data, PROTOCOL)
    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": cpu_model(), "cores": os.cpu_count()}
    if name == "user_summaries":
        entry.update(block_size=TIMELINE_BLOCK_SIZE, max_history=TIMELINE_MAX_HISTORY)
    entry["finished"] = False
    started, cpu = time.time(), time.process_time()
    try:
        settings = GenerationSettings(max_new_tokens=96)
        if name == "item_summaries":
            report = summarize_items(data, summary_pass.store, settings=settings)
        else:
            # The train and valid rows first (1,747 of the 2,045 steps): the arms are chosen on
            # valid, so they can train and be scored before the test rows' summaries exist.
            for splits in (("train", "valid"), ("train", "valid", "test")):
                report = summarize_users(data, summary_pass.store, splits=splits, ratings=True,
                                         block_size=TIMELINE_BLOCK_SIZE, max_history=TIMELINE_MAX_HISTORY,
                                         settings=settings)
                log(f"user summaries of the {', '.join(splits)} rows are stored: {report}")
        entry.update(finished=True, report=report.to_dict())
    finally:
        entry.update(wall_seconds=round(time.time() - started, 1), cpu_seconds=round(time.process_time() - cpu, 1))
        runs = json.loads(summary_pass.costs.read_text()) if summary_pass.costs.is_file() else []
        write_json(summary_pass.costs, runs + [entry])
    return entry


# ----------------------------------------------------------------------------- kept records
def record_dir(arm: str, kind: str, seed: int) -> Path:
    return RECORDS / f"{arm}_{kind}_s{seed}"


def keep_record(work: Path, arm: str, kind: str, seed: int) -> None:
    """Copy a run's small outputs into its committed record (score files: the score columns only)."""
    source, kept = run_dir(work, arm, kind, seed), record_dir(arm, kind, seed)
    for name in RECORDED_JSON + RECORDED_SCORES:
        if not (source / name).is_file():
            continue
        kept.mkdir(parents=True, exist_ok=True)
        if name in RECORDED_SCORES:
            pd.read_parquet(source / name)[SCORE_COLUMNS].to_parquet(kept / name, index=False)
        elif name == "stages.json":
            # Merged: a run folder on a new machine holds only the stages it ran there.
            (kept / name).write_text(json.dumps(merged_stages(kept / name, source / name), indent=2) + "\n")
        else:
            shutil.copyfile(source / name, kept / name)


def run_output(work: Path, arm: str, kind: str, seed: int, name: str) -> Optional[Path]:
    """A run's output file: in its folder on this machine, else in its kept record, else None."""
    for folder in (run_dir(work, arm, kind, seed), record_dir(arm, kind, seed)):
        if (folder / name).is_file():
            return folder / name
    return None


# ----------------------------------------------------------------------------- the report
def merged_stages(*paths: Path) -> dict:
    """The stage costs of ``stages.json`` files, a later file's entry replacing an earlier one's."""
    merged = {}
    for path in paths:
        if path.is_file():
            merged.update(json.loads(path.read_text()))
    return merged


def stage_costs(work: Path, arm: str, kind: str, seed: int) -> Optional[dict]:
    return merged_stages(record_dir(arm, kind, seed) / "stages.json",
                         run_dir(work, arm, kind, seed) / "stages.json") or None


def valid_auc(work: Path, arm: str, kind: str, seed: int) -> Optional[float]:
    path = run_output(work, arm, kind, seed, "valid.json")
    return round(json.loads(path.read_text())["auc"], 4) if path else None


def test_scores(work: Path, arm: str, kind: str) -> Dict[int, pd.DataFrame]:
    out = {}
    for seed in TEST_SEEDS:
        path = run_output(work, arm, kind, seed, "test.scores.parquet")
        if path:
            out[seed] = pd.read_parquet(path)[SCORE_COLUMNS]
    return out


def hybrid_table_summary() -> dict:
    """The timeline hybrid table's committed summary (run_hybrid's hybrid_summary.json)."""
    return json.loads((HERE / "hybrid_summary.json").read_text())["protocols"][PROTOCOL]


def best_non_llm_scores(work: Path) -> tuple:
    """The best non-LLM row of the timeline hybrid table and its cached test scores (one per seed)."""
    summary = hybrid_table_summary()
    key = summary["best_non_llm"]
    cache = root(work) / "cache"
    paths = sorted(cache.glob(f"{key}_test.parquet")) or sorted(cache.glob(f"{key}_test_s*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no cached test scores of {key} under {cache}: run "
                                "`python -m benchmarks.quality.run_hybrid --protocols timeline` first")
    return key, [pd.read_parquet(p)[SCORE_COLUMNS] for p in paths], summary["rows"][key]["auc"]


def valid_mean(arm: dict) -> Optional[float]:
    """An arm's hybrid valid AUC averaged over the test seeds; None while a seed's valid is missing."""
    per_seed = arm["kinds"]["hybrid"]["valid_auc_per_seed"]
    return round(sum(per_seed.values()) / len(per_seed), 4) if len(per_seed) == len(TEST_SEEDS) else None


def default_arm(best: Optional[str], best_minus_titles: Optional[dict]) -> str:
    """The arm the product trains by default: the valid-chosen arm only where its paired test
    interval against titles lies above 0; titles otherwise."""
    return best if best and best_minus_titles and best_minus_titles["low"] > 0 else "titles"


def difference(a: Dict[int, pd.DataFrame], b: Dict[int, pd.DataFrame] | List[pd.DataFrame], resamples: int, what: str) -> Optional[dict]:
    """AUC(a) - AUC(b), with a's test scores by seed. A seeded ``b`` (a dict by seed) pairs on the
    seeds both sides have, so a run still pending on one side never pairs across seeds; a
    seed-free ``b`` (a list holding one scoring, the non-LLM row) pairs with each of a's seeds."""
    if isinstance(b, dict):
        seeds = sorted(set(a) & set(b))
        a, b = {s: a[s] for s in seeds}, [b[s] for s in seeds]
    if not a or not b:
        return None
    result = paired_difference(list(a.values()), list(b), None, resamples, what)
    return {"diff": result["diff"], "low": result["low"], "high": result["high"], "strata": result["strata"],
            "seeds": sorted(a)}


def choose_for_test(hybrid_valid_auc: Dict[str, Optional[float]]) -> tuple:
    """The arms that go to test, from each arm's hybrid valid AUC (None: not run yet).

    Returns ``(ranked, waiting, chosen)``: the arms other than titles by valid AUC, best first; the
    arms still without a valid number; and titles plus the best :data:`ARMS_TO_TEST`, plus the
    better summary arm when neither summary arm is among them (summary against titles is the
    paper's claim, measured whatever the ranking). No arm goes to test before every arm has its
    valid number: a partial ranking is not a choice, so ``chosen`` is then titles alone."""
    ranked = sorted((a for a, auc in hybrid_valid_auc.items() if a != "titles" and auc is not None),
                    key=lambda a: -hybrid_valid_auc[a])
    waiting = [a for a, auc in hybrid_valid_auc.items() if auc is None]
    if waiting:
        return ranked, waiting, ["titles"]
    chosen = ["titles"] + ranked[:ARMS_TO_TEST]
    if not set(SUMMARY_ARMS) & set(chosen):
        chosen.append(next(a for a in ranked if a in SUMMARY_ARMS))
    return ranked, waiting, chosen


def report(work: Path, resamples: int) -> dict:
    arms = {}
    for name, spec in ARMS.items():
        arms[name] = {"what": spec.what, "config": spec.config, "needs": spec.needs, "kinds": {}}
        for kind in KINDS:
            scored = test_scores(work, name, kind)
            entry = {"valid_auc": valid_auc(work, name, kind, SELECTION_SEED),
                     "valid_auc_per_seed": {s: auc for s in TEST_SEEDS
                                            if (auc := valid_auc(work, name, kind, s)) is not None},
                     "costs_seed_42": stage_costs(work, name, kind, SELECTION_SEED), "test_seeds": sorted(scored)}
            if scored:
                per_seed = [{"seed": s, "all": metrics_of(frame)} for s, frame in scored.items()]
                entry["test"] = summarise(per_seed, "all")
                entry["test"]["auc_per_seed"] = [round(r["all"]["auc"], 4) for r in per_seed]
            elif name == "titles":
                entry.update(hybrid_table_titles(kind))
            arms[name]["kinds"][kind] = entry
    ranked, waiting, chosen = choose_for_test({a: arms[a]["kinds"]["hybrid"]["valid_auc"] for a in arms})
    out = {"what": __doc__.split("\n\n")[0].replace("\n", " "), "protocol": PROTOCOL, "users": "all",
           "selection": f"seed {SELECTION_SEED} on valid; the hybrid's valid AUC ranks the arms",
           "test_seeds": list(TEST_SEEDS), "arms": arms, "valid_ranking": ranked,
           "chosen_for_test": None if waiting else chosen, "selection_waits_for": waiting,
           "pending": [f"{a}:{k}:{s}:{stage}" for a in chosen for k in KINDS for s in TEST_SEEDS
                       for stage in ("train", "test") if run_output(work, a, k, s, "test.json") is None
                       and (stage == "test" or not (run_dir(work, a, k, s) / "model").exists())]}
    out["pending"] += [f"{a}:{k}:{SELECTION_SEED}:valid" for a in ARMS for k in KINDS
                       if arms[a]["kinds"][k]["valid_auc"] is None]
    out["pending"][:0] = [name for name in PASSES if not (pass_cost(name) or {}).get("finished")]
    # The three differences, on test; each null until both sides have test scores.
    titles = {kind: test_scores(work, "titles", kind) for kind in KINDS}
    tested = [a for a in chosen if a != "titles" and len(test_scores(work, a, "hybrid")) >= len(TEST_SEEDS)]
    # The best arm is chosen on valid, as a hybrid, over the test seeds (one seed's valid AUC moves
    # by about 0.035); choosing it by test AUC would tune on the test groups.
    valid_means = {a: valid_mean(arms[a]) for a in ["titles"] + tested}
    out["valid_mean_over_test_seeds"] = valid_means
    out["pending"] += [f"{a}:hybrid:{s}:valid" for a in valid_means if valid_means[a] is None
                       for s in TEST_SEEDS if s not in arms[a]["kinds"]["hybrid"]["valid_auc_per_seed"]]
    chosen_on_valid = None not in valid_means.values()
    best = max(tested, key=valid_means.get, default=None) if chosen_on_valid else None
    # The summary arm that went to test, chosen on valid like the others (seed 42's hybrid valid AUC).
    summary_arm = max((a for a in SUMMARY_ARMS if test_scores(work, a, "hybrid")),
                      key=lambda a: arms[a]["kinds"]["hybrid"]["valid_auc"], default=None)
    against_titles = {a: {kind: difference(test_scores(work, a, kind), titles[kind], resamples, f"{a} {kind} - titles")
                          for kind in KINDS} for a in {*tested, *([summary_arm] if summary_arm else [])}}
    out["summary_minus_titles"] = summary_arm and {"arm": summary_arm, **against_titles[summary_arm]}
    out["best_arm_minus_titles_only"] = best and {"arm": best, **against_titles[best]}
    # Every tested arm against titles, the arms not chosen too: read as a table, not a selection.
    out["each_arm_minus_titles"] = {a: against_titles[a] for a in tested}
    out["default_arm"] = {"arm": default_arm(best, (out["best_arm_minus_titles_only"] or {}).get("hybrid")),
                          "rule": "the arm best on valid (hybrid, mean over the test seeds) replaces titles when "
                                  "its test interval against titles is above 0"}
    best_hybrid = max(["titles"] + tested, key=valid_means.get) if chosen_on_valid else "titles"
    table = hybrid_table_summary()
    out["best_non_llm"] = {"row": table["best_non_llm"], "auc": table["rows"][table["best_non_llm"]]["auc"]}
    measured = None
    if test_scores(work, best_hybrid, "hybrid"):
        non_llm, non_llm_scores, _ = best_non_llm_scores(work)
        measured = difference(test_scores(work, best_hybrid, "hybrid"), non_llm_scores, resamples,
                              f"{best_hybrid} hybrid - {non_llm}")
    elif best_hybrid == "titles":
        # The titles hybrid's score files are gone with the machine that ran them; the hybrid
        # table measured this very difference from them.
        measured = {**table["best_hybrid_minus_best_non_llm"], "from": "hybrid_summary.json"}
    out["best_hybrid_minus_best_non_llm"] = {"arm": best_hybrid, **(measured or {})}
    out["summary_passes"] = {name: pass_cost(name) for name in PASSES}
    return out


def pass_cost(name: str) -> Optional[dict]:
    """Summary pass ``name`` so far: its runs' summed wall and CPU time, and whether it finished."""
    costs = PASSES[name].costs
    if not costs.is_file():
        return None
    runs = json.loads(costs.read_text())
    finished = next((r for r in runs if r["finished"]), None)
    settings = {key: runs[-1][key] for key in ("block_size", "max_history") if key in runs[-1]}
    return {"what": PASSES[name].what, **settings, "runs": len(runs),
            "wall_hours": round(sum(r["wall_seconds"] for r in runs) / 3600, 2),
            "cpu_hours": round(sum(r["cpu_seconds"] for r in runs) / 3600, 2), "finished": finished is not None,
            "report": finished["report"] if finished else None}


def hybrid_table_titles(kind: str) -> dict:
    """The titles arm's test numbers as the hybrid table recorded them (hybrid_summary.json), for
    when its score files are not on this machine: the same runs, seeds and test groups."""
    row = hybrid_table_summary()["rows"]["llm_only" if kind == "llm_only" else "hybrid_tabular"]
    test = {key: row[key] for key in ("n_groups", "auc", "hr@1", "hr@5", "ndcg@5")}
    test["auc_per_seed"] = [round(a, 4) for a in row["auc_per_seed"]]
    return {"test_seeds": row["seeds"], "test": test,
            "test_from": "hybrid_summary.json (the hybrid table's runs; their score files are not kept here)"}


def markdown(result: dict) -> str:
    lines = ["# What the LLM reads (timeline protocol, all users)", "",
             f"Arms chosen on valid with seed {SELECTION_SEED} (the hybrid's valid AUC); the titles arm and the "
             f"best {ARMS_TO_TEST} go to test with seeds {', '.join(map(str, TEST_SEEDS))}, and so does the better "
             "summary arm when neither summary arm is among them. Costs are the hybrid's seed-42 run, wall (CPU) "
             "minutes: wall alone grows when another job shares the 2 cores. "
             "Written by `python -m benchmarks.quality.llm_inputs --report`.", ""]
    header = ["arm", "what", "valid AUC LLM only", "valid AUC hybrid", "test AUC LLM only", "test AUC hybrid",
              "train min", "test scoring min"]
    rows = []
    for name, arm in result["arms"].items():
        kinds = arm["kinds"]
        cells = [name, arm["what"] + (f" (reads pass `{arm['needs']}`)" if arm["needs"] else "")]
        cells += [kinds[k]["valid_auc"] if kinds[k]["valid_auc"] is not None else "pending" for k in KINDS]
        for kind in KINDS:
            test = kinds[kind].get("test")
            cells.append(f"{test['auc']:.4f} ({', '.join(f'{a:.3f}' for a in test['auc_per_seed'])})" if test else "-")
        costs = kinds["hybrid"]["costs_seed_42"] or {}
        cells += [f"{costs[s]['wall_s'] / 60:.1f} ({costs[s]['cpu_s'] / 60:.1f})" if s in costs else "-"
                  for s in ("train", "test")]
        rows.append(cells)
    lines += markdown_table(header, rows) + [""]
    if result["selection_waits_for"]:
        lines.append("No arm is chosen for test yet: the selection waits for the valid runs of "
                     + ", ".join(f"`{a}`" for a in result["selection_waits_for"]) + ".")
    else:
        lines.append("Chosen for test: " + ", ".join(f"`{a}`" for a in result["chosen_for_test"]) + ".")
    lines += ["", "The best arm and the best hybrid are chosen on valid: the hybrid's valid AUC averaged over "
              "the test seeds (" + ", ".join(f"{a} {m}" if m is not None else f"{a} pending"
                                              for a, m in result["valid_mean_over_test_seeds"].items()) + ").", ""]
    for key in ("summary_minus_titles", "best_arm_minus_titles_only", "best_hybrid_minus_best_non_llm",
                "each_arm_minus_titles", "default_arm"):
        lines.append(f"- `{key}`: " + (json.dumps(result[key]) if result[key] else "pending"))
    for name, cost in result["summary_passes"].items():
        if cost:
            settings = f" (k = {cost['block_size']}, depth {cost['max_history']})" if "block_size" in cost else ""
            lines += ["", f"Pass `{name}`, {cost['what']}{settings}: {cost['wall_hours']} h wall, {cost['cpu_hours']} "
                      f"CPU-hours over {cost['runs']} run(s), " + ("finished." if cost["finished"] else "not finished yet.")]
    if result["pending"]:
        lines += ["", "Pending stages: " + ", ".join(f"`{p}`" for p in result["pending"])]
    return "\n".join(lines) + "\n"


def stop_cleanly(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main(argv=None) -> int:
    # A pass or a run is stopped at a session's end: TERM (and INT, which a shell ignores in the
    # background jobs it starts) unwind like Ctrl-C, so the pass's cost entry is still written.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_cleanly)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--stages", nargs="*", default=[],
                        help="arm:kind:seed:stage (stage: train, valid, test), or a summary pass: " + ", ".join(PASSES))
    parser.add_argument("--report", action="store_true", help="write llm_inputs.json and .md from the runs that exist")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    for spec in args.stages:
        log(f"stage {spec}")
        if spec in PASSES:
            run_pass(args.work, spec)
            continue
        arm, kind, seed, stage = spec.split(":")
        run_stage(args.work, arm, kind, int(seed), stage)
    if args.report:
        # Whatever this machine ran is kept before the report reads it.
        for arm in ARMS:
            for kind in KINDS:
                for seed in sorted({SELECTION_SEED, *TEST_SEEDS}):
                    keep_record(args.work, arm, kind, seed)
        result = report(args.work, args.resamples)
        write_json(args.out / "llm_inputs.json", result)
        (args.out / "llm_inputs.md").write_text(markdown(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
