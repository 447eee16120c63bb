"""The hybrid table's rows and how it is printed: what ``run_hybrid`` measures, by key, and the
markdown of ``hybrid_rows.md`` (written from ``hybrid_rows.json``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from benchmarks.common import markdown_table

METRICS = ("auc", "hr@1", "hr@5", "ndcg@5")
SLICES = ("all", "cold_users", "cold_items")


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    kind: str  # "non_llm", "llm" or "hybrid"
    what: str


ROWS = (
    RowSpec("popularity", "Popularity (as of the row)", "non_llm",
            "the candidate's events strictly before the row's timestamp"),
    RowSpec("recent_popularity", "Recent popularity (as of the row)", "non_llm",
            "the candidate's events in the 30 days before the row's timestamp"),
    RowSpec("sasrec", "SASRec (compact)", "non_llm",
            "merlin_mllm.baselines compact SASRec, trained on the test split's training-time events"),
    RowSpec("gru4rec", "GRU4Rec (compact)", "non_llm", "the compact GRU4Rec, same events"),
    RowSpec("fusion", "Non-LLM fusion", "non_llm",
            "HybridHead(hidden=(16,)) over item_log_count, item_log_recent_count, user_log_count and "
            "the SASRec score; trained on the training split's groups with each split's own training-time "
            "features and SASRec, the epoch chosen by valid AUC"),
    RowSpec("late_fusion", "Late fusion [log(1+pop), SASRec]", "non_llm",
            "logistic regression over [log(1 + popularity), SASRec score], fitted on the valid split"),
    RowSpec("llm_only", "LLM only", "llm", "the ranker's P(yes) (its yes-minus-no logit), read from --llm-scores"),
    RowSpec("late_fusion_llm", "Late fusion [log(1+pop), SASRec, LLM]", "llm",
            "logistic regression over [log(1 + popularity), SASRec score, LLM logit], fitted on valid"),
    RowSpec("hybrid_tabular", "Hybrid, tabular fusion", "hybrid",
            "HybridScore: the LLM logit plus the tabular head, trained jointly; read from --llm-scores"),
    RowSpec("hybrid_tokens", "Hybrid, collaborative tokens", "hybrid",
            "LLaRA-style SASRec embedding tokens in the prompt; read from --llm-scores"),
)
ROW_BY_KEY = {row.key: row for row in ROWS}
#: Rows whose scores come from files (``--llm-scores``); late_fusion_llm is computed from llm_only's.
EXTERNAL_ROWS = ("llm_only", "hybrid_tabular", "hybrid_tokens")
#: Paired intervals reported whenever both rows exist: (a, b) means AUC(a) - AUC(b).
INTERVALS = (
    ("fusion", "popularity"), ("fusion", "sasrec"), ("fusion", "late_fusion"), ("late_fusion", "popularity"),
    ("llm_only", "popularity"), ("late_fusion_llm", "late_fusion"),
    ("hybrid_tabular", "fusion"), ("hybrid_tokens", "fusion"), ("hybrid_tabular", "late_fusion_llm"),
    ("hybrid_tabular", "llm_only"), ("hybrid_tabular", "popularity"),
)
#: A hybrid's score file also holds its parts (evaluate_ranker with features): each ranked alone.
HYBRID_PARTS = {"llm_logit": "its LLM logit alone", "head_logit": "its tabular head alone"}


def cell(part: Optional[dict], metric: str) -> str:
    """``mean ± std`` of a metric, or "-" (a pending row, an empty slice, a metric a slice lacks)."""
    if part is None or metric not in part:
        return "-"
    std = part.get(metric + "_std")
    return f"{part[metric]:.4f}" + (f" ± {std:.4f}" if std is not None else "")


COLUMNS = [("all", m) for m in METRICS] + [("cold_users", "auc"), ("cold_items", "auc")]


def markdown(results: dict) -> str:
    features = results["features"]
    lines = [
        "<!-- written by benchmarks/quality/run_hybrid.py from hybrid_rows.json; edit the script, not this file -->",
        "# Hybrid ranker: the rows on MovieLens-100k, every feature as of the row's time", "",
        f"Made by `{results['command'].strip()}`. Every stage is cached under `benchmarks/results/hybrid/` "
        "(git-ignored); a re-run reuses it. The LLM rows are read from score files: "
        "`--llm-scores PROTOCOL ROW TEST_SCORES [VALID_SCORES]`, once per training seed (ROW: "
        + ", ".join(EXTERNAL_ROWS) + "; the LLM-only row's valid scores add the late fusion with the LLM logit).", "",
        "- Data: `prepare_dataset(\"ml-100k\", protocol, "
        f"seed={results['data_seed']}, n_negatives_test={results['n_negatives_test']})`, max_history "
        + ", ".join(f"{p} {h}" for p, h in results["max_history"].items()) + " (0: every event).",
        f"- Features of the non-LLM fusion: {', '.join(f'`{c}`' for c in features['columns'])}. {features['counted']}. "
        f"Recent window: {features['recent_window']} ({features['recent_days']:g} days).",
        f"- Seeds {', '.join(map(str, results['seeds']))}: each trains its own SASRec (per split), GRU4Rec and fusion "
        "head; popularity has none; an LLM row's seeds are its training runs. ± is the sample std over seeds.",
        "- Slices, chosen without the label: cold users (the user's events before the target) and cold items "
        "(the candidate's events before the row, positive and negative alike).",
        f"- {results['metrics']}.", "",
    ]
    for protocol, block in results["protocols"].items():
        data, slices = block["data"], block["slices"]
        users = f"all {data['users']}" if results["users"] == "all" else f"{data['users']} random"
        cuts = data.get("cuts")
        lines += [f"### {protocol} protocol, {users} users: {data['groups_per_split']['test']} test groups of "
                  f"1 + {data['test_candidates_per_group'] - 1}", ""]
        if cuts:
            lines.append(f"Cuts: {json.dumps(cuts)}.")
        lines += [f"Cold users: {slices['cold_users']['groups']} test groups ({slices['cold_users']['definition']}). "
                  f"Cold items: {slices['cold_items']['rows']} rows in {slices['cold_items']['groups']} groups "
                  f"({slices['cold_items']['definition']}).",
                  "Each fusion feature alone on the valid rows (AUC, SASRec seed "
                  f"{block['feature_valid_auc']['seed']}): "
                  + ", ".join(f"`{k}` {v:.3f}" for k, v in block["feature_valid_auc"].items() if k != "seed") + ".",
                  f"All stages of this protocol took {block['stage_seconds_total']['wall_seconds']:.0f} s wall, "
                  f"{block['stage_seconds_total']['cpu_seconds']:.0f} s CPU.", "",
                  *markdown_table(["row", "AUC", "HR@1", "HR@5", "NDCG@5", "cold users AUC", "cold items AUC", "seeds",
                                   "AUC per seed", "wall s / seed"])]
        for row in block["rows"]:
            if row["status"] != "measured":
                lines.append(f"| {row['label']} | pending | | | | | | | | |")
                continue
            seeds = ", ".join("-" if s is None else str(s) for s in row["seeds"])
            per_seed = ", ".join(f"{s['all']['auc']:.4f}" for s in row["per_seed"]) if len(row["per_seed"]) > 1 else ""
            wall = "-" if row.get("wall_seconds_per_seed") is None else f"{row['wall_seconds_per_seed']:.0f}"
            lines.append(f"| {row['label']} | " + " | ".join(cell(row.get(part), m) for part, m in COLUMNS)
                         + f" | {seeds} | {per_seed} | {wall} |")
            for column, label in HYBRID_PARTS.items() if row.get("parts") else ():
                part = row["parts"][column]
                lines.append(f"| &nbsp;&nbsp;↳ {label} | " + " | ".join(cell(part.get(p), m) for p, m in COLUMNS)
                             + " | | | |")
        if block["intervals"]:
            lines += ["", *markdown_table(["paired AUC difference (95% bootstrap over test users, seeds as strata)",
                                           "all groups", "cold users", "cold items"])]
            for name, parts in block["intervals"].items():
                texts = [f"{parts[p]['diff']:+.4f} [{parts[p]['low']:+.4f}, {parts[p]['high']:+.4f}]" if p in parts
                         else "-" for p in SLICES]
                lines.append(f"| {name.replace('_minus_', ' − ')} | " + " | ".join(texts) + " |")
        lines.append("")
    return "\n".join(lines)
