"""The walkthrough notebooks in ``notebooks/`` run from top to bottom and show what they claim.

All four execute in order in one temporary working folder (notebooks 3 and 4 serve the ranker
that notebook 2 trains), on a kernel that is this test's own Python (a kernel spec written to a
temporary JUPYTER_PATH; nothing is installed globally). After each notebook a cell appended by
the test prints the notebook's key variables as JSON, and the assertions check those values:
summary columns, training losses, served-vs-in-process scores, reranked orders.
The committed notebooks must carry no outputs.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = (
    "01_data_and_summaries.ipynb",
    "02_train_scorer.ipynb",
    "03_export_triton_and_query.ipynb",
    "04_rerank_in_merlin_pipeline.ipynb",
)
KERNEL_NAME = "merlin-mllm-test"
#: Seconds one cell may run (the slowest is the Triton start, ~50 s on a busy 2-core machine).
CELL_TIMEOUT = 300
MARKER = "__NOTEBOOK_RESULTS__"

#: What each notebook reports back: an expression over its variables, printed as JSON.
RESULTS = {
    "01_data_and_summaries.ipynb": """{
        "n_test_rows": len(rows), "n_out_rows": len(out),
        "item_summary_lengths": out["item_summary"].str.len().tolist(),
        "user_summary_lengths": out["user_summary"].str.len().tolist(),
        "users": int(out["user_id"].nunique()),
        "user_summaries_per_user": out.groupby("user_id")["user_summary"].nunique().tolist(),
        "distinct_item_summaries": int(out["item_summary"].nunique()), "distinct_items": int(out["item_id"].nunique()),
        "text_tags": text_tags,
        "dtypes": {n: schema[n].dtype.element_type.value for n in ("item_summary", "user_summary")},
        "n_catalogue": len(catalogue), "n_item_summaries": len(item_summaries),
        "catalogue_summary_lengths": item_summaries["item_summary"].str.len().tolist(),
        "generated_first": int(generated_before), "generated_on_rerun": int(generated_on_rerun),
        "records_before": records_before, "records_after": records_after, "same_output": bool(same_output),
        "items_without_summary": user_op.report.items_without_summary,
    }""",
    "02_train_scorer.ipynb": """{
        "losses": losses, "global_step": trainer.global_step, "max_steps": MAX_STEPS,
        "metrics": {k: metrics[k] for k in keys}, "zero_shot": {k: zero_shot[k] for k in keys},
        "n_groups": metrics["n_groups"], "n_rows": metrics["n_rows"],
        "lora_b_trained": any(float(v.abs().sum()) > 0 for k, v in ranker.trainable_state_dict().items() if "lora_B" in k),
        "saved": sorted(p.name for p in model_dir.iterdir()),
    }""",
    "03_export_triton_and_query.ipynb": """{
        "max_abs_diff": max_abs_diff, "candidates": candidates, "positive": positive,
        "ranked_items": ranked_table["item_id"].tolist(), "ranked_scores": ranked_table["P(yes)"].tolist(),
        "ranked_titles": ranked_table["title"].tolist(),
        "expected_titles": [str(titles[i]) for i in ranked_table["item_id"]],
        "scores": [float(s) for s in result.scores], "exit_code": exit_code,
        "server_running": server.process.poll() is None,
    }""",
    "04_rerank_in_merlin_pipeline.ipynb": """{
        "comparisons": comparisons, "top_k": TOP_K, "n_candidates": N_CANDIDATES, "n_users": N_USERS,
        "max_abs_diff": max_abs_diff,
        "seen_in_candidates": sum(len(set(map(int, retrieved[u])) & set(map(int, histories[u]))) for u in retrieved),
    }""",
}


def _kernel_spec(root: Path) -> Path:
    """A kernel spec that starts this interpreter (the project venv), under a private JUPYTER_PATH."""
    folder = root / "kernels" / KERNEL_NAME
    folder.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "merlin-mllm (test)", "language": "python"}
    (folder / "kernel.json").write_text(json.dumps(spec))
    return root


def _execute(name: str, workdir: Path):
    notebook = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    probe = f"import json as _json\nprint({MARKER!r} + _json.dumps({RESULTS[name]}, default=str))"
    notebook.cells.append(nbformat.v4.new_code_cell(probe))
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(workdir)}})
    started = time.perf_counter()
    try:
        client.execute()
    finally:
        nbformat.write(notebook, workdir / f"executed_{name}")  # kept for inspection on failure
    seconds = time.perf_counter() - started
    text = "".join(o.get("text", "") for o in notebook.cells[-1].outputs if o.output_type == "stream")
    line = next(line for line in text.splitlines() if line.startswith(MARKER))
    return notebook, json.loads(line[len(MARKER):]), seconds


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every notebook, executed in order in one working folder: name -> (notebook, results, seconds)."""
    root = tmp_path_factory.mktemp("notebooks")
    workdir = root / "work"
    workdir.mkdir()
    done = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(_kernel_spec(root / "jupyter")))
        for name in NOTEBOOKS:
            done[name] = _execute(name, workdir)
            print(f"{name}: {done[name][2]:.1f} s")
    return done


def _outputs(notebook, output_type=None):
    for cell in notebook.cells:
        if cell.cell_type == "code":
            for output in cell.outputs:
                if output_type is None or output.output_type == output_type:
                    yield output


# ----------------------------------------------------------------------------- committed files
def test_committed_notebooks_have_no_outputs_and_a_parameters_cell():
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        notebook = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
        nbformat.validate(notebook)
        code_cells = [c for c in notebook.cells if c.cell_type == "code"]
        assert code_cells, name
        for cell in code_cells:
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before committing"
        assert "parameters" in code_cells[0].metadata.get("tags", []), f"{name}: first code cell must be tagged 'parameters'"
        assert notebook.cells[0].cell_type == "markdown", name


# ----------------------------------------------------------------------------- executed
@pytest.mark.slow
def test_01_summaries_workflow(executed):
    notebook, r, _ = executed["01_data_and_summaries.ipynb"]
    assert r["n_out_rows"] == r["n_test_rows"] >= 4
    assert min(r["item_summary_lengths"]) > 0 and min(r["user_summary_lengths"]) > 0
    assert min(r["catalogue_summary_lengths"]) > 0 and r["n_item_summaries"] == r["n_catalogue"]
    # One user summary per test user (all rows of a group share the user and the history).
    assert r["users"] >= 2 and set(r["user_summaries_per_user"]) == {1}
    assert r["distinct_items"] > 1 and r["distinct_item_summaries"] > 1  # not one text for every item
    for column in ("item_summary", "user_summary"):
        assert r["text_tags"][column] == ["text"]
        assert r["dtypes"][column] == "string"
    # The user stage read the item stage's summaries from the store, for every history item.
    assert r["items_without_summary"] == 0
    assert r["generated_first"] > 0  # the first run did call the LLM (user summaries)
    assert r["generated_on_rerun"] == 0 and r["records_after"] == r["records_before"] > 0
    assert r["same_output"]
    assert any("text/html" in o.get("data", {}) for o in _outputs(notebook, "execute_result"))  # rows shown


@pytest.mark.slow
def test_02_scorer_trains_and_evaluates(executed):
    notebook, r, _ = executed["02_train_scorer.ipynb"]
    assert r["global_step"] == r["max_steps"] and len(r["losses"]) == r["max_steps"]
    assert all(math.isfinite(loss) and loss > 0 for loss in r["losses"])
    assert r["lora_b_trained"]  # LoRA B starts at zero: non-zero means the optimizer stepped
    assert "adapter" in r["saved"] and "ranker_config.json" in r["saved"]
    assert r["n_groups"] >= 2 and r["n_rows"] > r["n_groups"]
    for table in (r["metrics"], r["zero_shot"]):
        assert set(table) >= {"auc", "hr@3", "mrr@5", "ndcg@10"}
        assert all(0.0 <= value <= 1.0 for value in table.values())
        assert table["hr@10"] == 1.0  # groups are smaller than 10: the positive is always in the top 10
    pngs = [o for o in _outputs(notebook, "display_data") if "image/png" in o.get("data", {})]
    assert len(pngs) == 1 and len(pngs[0]["data"]["image/png"]) > 10_000  # the evaluation plot, inline


@pytest.mark.slow
def test_03_served_scores_equal_in_process_scores(executed):
    _, r, _ = executed["03_export_triton_and_query.ipynb"]
    assert r["max_abs_diff"] <= 1e-5
    assert sorted(r["ranked_items"]) == sorted(r["candidates"]) and r["positive"] in r["candidates"]
    assert r["ranked_scores"] == sorted(r["ranked_scores"], reverse=True)
    by_item = dict(zip(r["candidates"], r["scores"]))
    np.testing.assert_allclose([by_item[i] for i in r["ranked_items"]], r["ranked_scores"], atol=1e-7)
    assert r["ranked_titles"] == r["expected_titles"] and all(r["ranked_titles"])
    assert r["exit_code"] == 0 and not r["server_running"]


@pytest.mark.slow
def test_04_rerank_stage_orders_by_its_scores(executed):
    _, r, _ = executed["04_rerank_in_merlin_pipeline.ipynb"]
    assert r["max_abs_diff"] <= 1e-5
    assert r["seen_in_candidates"] == 0  # retrieval never proposes an item the user already saw
    assert len(r["comparisons"]) == r["n_users"]
    for row in r["comparisons"]:
        retrieved, scores, reranked = row["retrieved"], np.asarray(row["scores"]), row["reranked"]
        assert len(retrieved) == r["n_candidates"] == len(scores)
        order = np.argsort(-scores, kind="stable")[: r["top_k"]]
        assert reranked == [retrieved[j] for j in order], row["user_id"]
    # The rerank stage changes the retrieval order for at least one user.
    assert any(row["reranked"] != row["retrieved"][: r["top_k"]] for row in r["comparisons"])
