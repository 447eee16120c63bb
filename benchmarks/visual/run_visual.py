"""Visual-preference check: MLLM-MSR with images vs MLLM-MSR_I (text only) on simulated emoji users.

Builds the set described in ``benchmarks/visual/README.md`` (emoji pictures from the npm package
``emoji-datasource-google``, a hidden warm/cool colour attribute computed from pixels, users
whose taste is one attribute value), writes it as an Amazon-2023-style category and runs the
project's normal pipeline twice on the same rows:

* **image arm** (MLLM-MSR): items prepared with their pictures -> textualizer item summaries
  (EfficientNet labels + dominant colours + SmolLM2) -> recurrent user summaries -> LoRA ranker
  that sees each candidate's picture (``TrainConfig(use_images=True)``);
* **text arm** (MLLM-MSR_I): the same rows prepared without pictures -> text-only item
  summaries -> recurrent user summaries -> ranker without pictures (``use_images=False``).

Both arms are evaluated with ``evaluate_ranker`` on the same test candidates, next to a
popularity baseline, a zero-shot ranker, and a "visual majority" reference that knows each
item's attribute (score 1 when the candidate has the value most of the user's history has).

Every stage is cached under ``--cache``: the npm package, the raw files, the prepared data, the
summary stores (content-keyed), the ranker checkpoints and the evaluation scores. A re-run with
the same settings redoes nothing; a killed run resumes.

Usage::

    .venv/bin/python -m benchmarks.visual.run_visual --users 12 --items 80 --cache /tmp/visual-tiny \\
        --results-dir /tmp/visual-tiny/results --no-zero-shot         # a quick validation
    # the measured run (README "Run it" shows the same split over two processes with --arms):
    nohup .venv/bin/python -m benchmarks.visual.run_visual --no-zero-shot > benchmarks/results/visual/run.log 2>&1 &

Prints a table and writes ``results.json`` and ``results.md`` (``--results-name``) into
``--results-dir`` (default: ``benchmarks/visual/``, beside the other committed visual results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

from merlin_mllm.data import visual_set

from benchmarks.common import VISUAL_RESULTS, WORK, log

DEFAULT_CACHE = WORK / "visual"


def install_package(cache: Path, version: str) -> Path:
    """``npm install`` the emoji package into ``cache/npm`` (skipped when that version is there)."""
    root = cache / "npm"
    package_dir = root / "node_modules" / visual_set.PACKAGE
    manifest = package_dir / "package.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("version") == version:
        return package_dir
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH; install Node.js/npm, or pass --package-dir to an installed copy")
    root.mkdir(parents=True, exist_ok=True)
    log(f"npm install {visual_set.PACKAGE}@{version} into {root}")
    subprocess.run(
        [npm, "install", "--prefix", str(root), "--no-audit", "--no-fund", f"{visual_set.PACKAGE}@{version}"],
        check=True,
    )
    return package_dir


def _stage_done(marker: Path, config: dict) -> bool:
    return marker.is_file() and json.loads(marker.read_text()).get("config") == config


def _mark_done(marker: Path, config: dict, **extra) -> None:
    marker.write_text(json.dumps({"config": config, **extra}, indent=2, sort_keys=True) + "\n")


def build_set(args, package_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, Path, dict, pd.DataFrame]:
    """Catalogue, simulated events, raw Amazon-style files, set facts and the uncapped balanced catalogue (seconds)."""
    items = visual_set.load_emoji_items(package_dir)
    catalogue = visual_set.build_catalogue(items, seed=args.seed, max_items=args.items)
    events = visual_set.simulate_users(
        catalogue, args.users, history_length=args.history, liked_fraction=args.liked_fraction, seed=args.seed,
        warm_share=args.warm_share,
    )
    balanced = visual_set.build_catalogue(items, seed=args.seed)  # every balanced item, no cap
    raw = args.cache / "raw"
    reviews = visual_set.write_amazon_jsonl(events, catalogue, raw)
    catalogue.to_csv(raw / "catalogue.csv", index=False)
    info = {
        "package": f"{visual_set.PACKAGE}@{args.package_version}",
        "emoji_in_package": int(len(items)),
        "attribute_counts_in_package": {str(k): int(v) for k, v in items["attribute"].value_counts(dropna=False).items()},
        "catalogue_items": int(len(catalogue)),
        "catalogue_attribute_counts": {str(k): int(v) for k, v in catalogue["attribute"].value_counts().items()},
        "catalogue_categories": int(catalogue["category"].nunique()),
        "titles_with_attribute_words": len(visual_set.attribute_words_in(catalogue["title"])),
        "users": int(args.users),
        "user_taste_counts": {str(k): int(v) for k, v in events.drop_duplicates("user_key")["taste"].value_counts().items()},
        "history_length": int(args.history),
        "history_liked_share": visual_set.liked_share(events),
        "events": int(len(events)),
        "title_leak_check": visual_set.title_leak_check(catalogue, seed=args.seed),
        # The same check on every balanced item (a larger, less noisy sample of the same rule).
        "title_leak_check_all_balanced_items": visual_set.title_leak_check(balanced, seed=args.seed),
    }
    return catalogue, events, reviews, info, balanced


def prepare_arms(args, reviews: Path, package_dir: Path) -> dict:
    """The same rows twice: with pictures (image arm) and without (text arm)."""
    from merlin_mllm.data.prepare import prepare_dataset

    folders = {}
    for arm, images in (("image", package_dir / visual_set.IMAGE_FOLDER), ("text", None)):
        out = args.cache / f"data_{arm}"
        config = {"reviews_sha": _file_digest(reviews), "seed": args.seed, "images": images is not None,
                  "protocol": args.protocol, "train_negatives": args.train_negatives}
        marker = out / "stage_prepare.json"
        if not _stage_done(marker, config):
            log(f"prepare {arm} arm -> {out}")
            prepare_dataset(
                "amazon2023", args.protocol, out, input=reviews, images=images, max_history=0, seed=args.seed,
                min_user_interactions=1, min_item_interactions=1, n_negatives_test=20,
                n_negatives_train=args.train_negatives,
            )
            _mark_done(marker, config)
        folders[arm] = out
    # Same rows in both arms, or the comparison is void.
    from merlin_mllm.data.tables import read_table

    for split in ("train", "valid", "test"):
        a = read_table(folders["image"] / split)[["user_id", "item_id", "label", "group_id"]]
        b = read_table(folders["text"] / split)[["user_id", "item_id", "label", "group_id"]]
        if not a.reset_index(drop=True).equals(b.reset_index(drop=True)):
            raise RuntimeError(f"the {split} rows differ between the two arms")
    return folders


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def summarize_arm(args, arm: str, data_dir: Path) -> dict:
    """Item then recurrent user summaries into the arm's own store (content-keyed: re-runs reuse)."""
    from merlin_mllm.generation import GenerationSettings
    from merlin_mllm.summaries.item import summarize_items
    from merlin_mllm.summaries.user import summarize_users

    store = args.cache / f"store_{arm}"
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch)
    started = time.time()
    log(f"{arm} arm: item summaries")
    items_report = summarize_items(data_dir, store, settings=settings, progress=args.progress)
    items_seconds = time.time() - started
    log(f"{arm} arm: {items_report}")
    log(f"{arm} arm: user summaries")
    # No validation split is used (the ranker trains a fixed number of epochs), so its rows
    # need no summaries.
    users_report = summarize_users(data_dir, store, splits=("train", "test"), settings=settings, progress=args.progress)
    log(f"{arm} arm: {users_report}")
    return {
        "store": str(store),
        "item_report": str(items_report),
        "user_report": str(users_report),
        "item_seconds": round(items_seconds, 1),
        "user_seconds": round(time.time() - started - items_seconds, 1),
    }


def train_arm(args, arm: str, data_dir: Path) -> Path:
    from merlin_mllm.pipelines import TrainConfig, train_ranker
    from merlin_mllm.ranker.saved import MODEL_DIR, TRAINING_LOG_FILE

    out = args.cache / f"ranker_{arm}"
    if (out / TRAINING_LOG_FILE).is_file() and (out / MODEL_DIR).is_dir():
        from merlin_mllm.ranker.ranker_config import CONFIG_FILE, RankerConfig

        saved = json.loads((out / TRAINING_LOG_FILE).read_text())
        # A model trained on image tokens of another size (before the colour features) is stale.
        saved_dim = json.loads((out / MODEL_DIR / CONFIG_FILE).read_text()).get("vision_feature_dim")
        if saved["settings"]["epochs"] == args.epochs and saved["settings"]["lr"] == args.lr \
                and saved_dim == RankerConfig.vision_feature_dim:
            return out / MODEL_DIR
    log(f"{arm} arm: train ranker (image={arm == 'image'})")
    stale = args.cache / "eval" / f"MLLM-MSR_{arm}.json"
    if stale.exists():
        stale.unlink()
    return train_ranker(
        data_dir, args.cache / f"store_{arm}", out, TrainConfig(use_images=(arm == "image"), lr=args.lr,
        projector_lr=args.projector_lr, epochs=args.epochs, grad_accum=args.grad_accum,
        batch_size=args.batch_size, seed=args.seed, max_length=args.max_length,
        validate=False, batching="rows"), progress=args.progress,
    )


def evaluate_arm(args, name: str, data_dir: Path, store: Path, model_dir, zero_shot: bool = False) -> dict:
    from merlin_mllm.pipelines.evaluation import evaluate_ranker

    out_json = args.cache / "eval" / f"{name}.json"
    if out_json.is_file():
        # A finished evaluation of the same model on the same data is reused (the trained
        # model folder is only rewritten by a new training run, which removes this file).
        saved = json.loads(out_json.read_text())
        if saved["run"]["model"] == (str(model_dir) if model_dir is not None else saved["run"]["model"]) \
                and Path(saved["run"]["scores"]).is_file() and saved["run"]["zero_shot"] == zero_shot:
            return saved
    log(f"evaluate {name}")
    return evaluate_ranker(data_dir, store, model_dir, out_json, zero_shot=zero_shot, progress=args.progress)


def _test_frame(data_dir: Path, events: pd.DataFrame) -> pd.DataFrame:
    """Test rows with the user's taste, the candidate's attribute and the history's majority value."""
    from merlin_mllm.data.tables import read_table

    rows = read_table(data_dir / "test")
    users = read_table(data_dir / "users")[["user_id", "user_key"]]
    items = read_table(data_dir / "items")[["item_id", "item_key"]]
    taste = events.drop_duplicates("user_key").set_index("user_key")["taste"]
    attribute = events.drop_duplicates("item_key").set_index("item_key")["attribute"]
    rows = rows.merge(users, on="user_id").merge(items, on="item_id")
    rows["taste"] = rows["user_key"].map(taste)
    rows["attribute"] = rows["item_key"].map(attribute)
    item_attribute = dict(zip(items["item_id"], items["item_key"].map(attribute)))
    rows["history_majority"] = [
        pd.Series([item_attribute[int(i)] for i in history]).mode().iloc[0] for history in rows["history_item_ids"]
    ]
    return rows.sort_values(["group_id", "item_id"]).reset_index(drop=True)


def reference_scores(data_dir: Path, events: pd.DataFrame) -> dict:
    """Popularity and visual-majority scores for the test rows.

    Popularity counts every event that comes before its user's test target (so no test target
    is counted); with the ``paper`` protocol, test users' events are left out entirely.
    """
    from merlin_mllm.data.tables import read_table

    rows = _test_frame(data_dir, events)
    users = read_table(data_dir / "users")
    all_events = read_table(data_dir / "events")
    cutoff = rows.drop_duplicates("user_id").set_index("user_id")["target_position"]
    before_target = all_events["position"] < all_events["user_id"].map(cutoff).fillna(np.inf)
    not_test_user = ~all_events["user_id"].isin(set(users.loc[users["split"] == "test", "user_id"]))
    counts = all_events[(before_target & not_test_user) if (users["split"] == "test").any() else before_target]["item_id"].value_counts()
    popularity = rows.assign(score=rows["item_id"].map(counts).fillna(0).astype(float))
    majority = rows.assign(score=(rows["attribute"] == rows["history_majority"]).astype(float))
    return {"popularity": popularity, "visual majority (knows attributes)": majority}


def metrics_of(table: pd.DataFrame) -> dict:
    from merlin_mllm.metrics import ranking_metrics

    return ranking_metrics(table["label"].to_numpy(), table["score"].to_numpy(), table["group_id"].to_numpy(), ks=(3, 5, 10))


def colour_word_share(data_dir: Path, store: Path) -> float:
    """Share of test users whose user summary names a colour word (how much of the picture reached it)."""
    from merlin_mllm.pipelines.training import load_rows

    rows = load_rows(data_dir, "test", store).drop_duplicates("group_id")
    return float(np.mean([visual_set.has_attribute_word(text) for text in rows["user_summary"]]))


def write_results(args, results: dict) -> None:
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.results_name}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    lines = [
        "# Visual-preference check: measured results",
        "",
        f"Set: {results['set']['catalogue_items']} emoji items, {results['set']['users']} users "
        f"(tastes {results['set']['user_taste_counts']}), history {results['set']['history_length']} + 1 target, "
        f"test groups of 1 positive + 20 negatives ({results['test_groups']} test users). "
        f"Machine: {results['machine']}. Stage times (s): {results.get('timings_seconds', {})}.",
        "",
        "| method | sees pictures | AUC | HR@5 | NDCG@5 | AUC warm-taste users | AUC cool-taste users |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["methods"].items():
        m = entry["metrics"]
        by = entry.get("auc_by_taste", {})
        lines.append(
            f"| {name} | {entry['sees_pictures']} | {m['auc']:.3f} | {m['hr@5']:.3f} | {m['ndcg@5']:.3f} | "
            f"{by.get('warm', float('nan')):.3f} | {by.get('cool', float('nan')):.3f} |"
        )
    leak = results["set"]["title_leak_check"]
    gain = results.get("image_minus_text_auc")
    if gain:
        lines += ["", f"AUC gain of the image arm over the text arm: {gain['difference']:+.3f}, 95% paired bootstrap "
                      f"interval over the {gain['groups']} test users [{gain['low']:+.3f}, {gain['high']:+.3f}] "
                      f"({gain['resamples']} resamples)."]
    probe = results["set"].get("image_token_probe_all_balanced_items")
    if probe:
        lines += ["", f"Image-token probe (logistic regression on the mean image token, {probe['folds']}-fold CV, "
                      f"all {probe['items']} balanced items): EfficientNet part {probe['efficientnet']['accuracy']:.3f}, "
                      f"colour part {probe['colour']['accuracy']:.3f}, vs majority rate {probe['majority_rate']:.3f}."]
    lines += [
        "",
        f"Title-only attribute classifier (TF-IDF + logistic regression, {leak['folds']}-fold CV): "
        f"accuracy {leak['accuracy']:.3f} ± {leak['accuracy_std']:.3f} on this catalogue "
        f"({leak['items']} items), vs majority rate {leak['majority_rate']:.3f}"
        + (f"; {results['set']['title_leak_check_all_balanced_items']['accuracy']:.3f} ± "
           f"{results['set']['title_leak_check_all_balanced_items']['accuracy_std']:.3f} on all "
           f"{results['set']['title_leak_check_all_balanced_items']['items']} balanced items."
           if "title_leak_check_all_balanced_items" in results["set"] else "."),
        f"Test user summaries naming a colour word: image arm {results['colour_words_in_user_summaries']['image']:.2f}, "
        f"text arm {results['colour_words_in_user_summaries']['text']:.2f}.",
        "",
    ]
    (args.results_dir / f"{args.results_name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="stage cache (npm package, data, stores, runs)")
    parser.add_argument("--results-dir", type=Path, default=VISUAL_RESULTS, help="where the results files go")
    parser.add_argument("--results-name", default="results",
                        help="their name: NAME.json and NAME.md (the replicates: results_seed1, results_seed2)")
    parser.add_argument("--package-version", default=visual_set.PACKAGE_VERSION)
    parser.add_argument("--package-dir", type=Path, help="an installed emoji-datasource-google folder (skips npm)")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--items", type=int, default=60, help="catalogue size cap (0 = every balanced item)")
    parser.add_argument("--history", type=int, default=9, help="history items before the target")
    parser.add_argument("--liked-fraction", type=float, default=0.8)
    parser.add_argument("--warm-share", type=float, default=1.0, help="share of users whose taste is warm")
    parser.add_argument("--protocol", choices=("leave-last-out", "paper"), default="leave-last-out",
                        help="leave-last-out: every user trains (third-to-last event) and is tested (last event)")
    parser.add_argument("--train-negatives", type=int, default=3, help="negatives per training group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="item and user summary length")
    parser.add_argument("--gen-batch", type=int, default=50, help="generation batch size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--projector-lr", type=float, default=1e-3)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--no-zero-shot", dest="zero_shot", action="store_false", help="skip the zero-shot ranker")
    parser.add_argument("--progress", action="store_true", help="tqdm bars (off by default: logs stay short)")
    parser.add_argument("--arms", nargs="+", choices=("image", "text"), default=["image", "text"],
                        help="run only these arms (two processes can share the work); results need both")
    return parser.parse_args(argv)


def run_arms(args, folders: dict, timings: dict) -> tuple[dict, dict]:
    """Summaries, training and scoring of ``args.arms``; each arm's stage times and summary
    reports come from the run that did its work (``arm_<arm>.json`` in the cache)."""
    summaries, model_dirs = {}, {}
    for arm in ("image", "text"):
        record_file = args.cache / f"arm_{arm}.json"
        if arm not in args.arms:
            continue
        arm_timings = {}
        tick = time.time()
        summaries[arm] = summarize_arm(args, arm, folders[arm])
        arm_timings[f"summaries_{arm}"] = round(time.time() - tick, 1)
        tick = time.time()
        model_dirs[arm] = train_arm(args, arm, folders[arm])
        arm_timings[f"train_{arm}"] = round(time.time() - tick, 1)
        tick = time.time()
        evaluate_arm(args, f"MLLM-MSR_{arm}", folders[arm], args.cache / f"store_{arm}", model_dirs[arm])
        arm_timings[f"eval_{arm}"] = round(time.time() - tick, 1)
        if not record_file.is_file():
            # The first run that completes the arm did the work: its timings and summary
            # reports are the real ones (later runs only reuse the caches).
            record_file.write_text(json.dumps({"timings": arm_timings, "summaries": summaries[arm]}, indent=2) + "\n")
    for arm in ("image", "text"):
        record_file = args.cache / f"arm_{arm}.json"
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            timings.update(record["timings"])
            summaries[arm] = record["summaries"]
        elif arm in args.arms:
            raise RuntimeError(f"{record_file} missing after the {arm} arm ran")
    return summaries, model_dirs


def score_methods(args, folders: dict, events: pd.DataFrame, model_dirs: dict) -> tuple[pd.DataFrame, dict, dict]:
    """The test rows and every method's metrics (the references and the rankers), and the two
    arms' test scores."""
    test = _test_frame(folders["image"], events)
    methods = {}

    def add(name: str, table: pd.DataFrame, sees_pictures: str, extra=None):
        table = table.merge(test[["group_id", "item_id", "taste"]], on=["group_id", "item_id"]) if "taste" not in table else table
        by_taste = {
            taste: metrics_of(part)["auc"] for taste, part in table.groupby("taste")
        }
        methods[name] = {"metrics": metrics_of(table), "auc_by_taste": by_taste, "sees_pictures": sees_pictures, **(extra or {})}

    for name, table in reference_scores(folders["image"], events).items():
        add(name, table, "no (ids)" if name == "popularity" else "attribute oracle")
    runs = [("MLLM-MSR (images)", "image", model_dirs["image"], False, "yes"),
            ("MLLM-MSR_I (text only)", "text", model_dirs["text"], False, "no")]
    if args.zero_shot:
        runs.append(("zero-shot SmolLM2 (image-arm summaries)", "image", None, True, "no"))
    arm_scores = {}
    for name, arm, model_dir, zero_shot, sees in runs:
        key = "zero_shot_image_summaries" if zero_shot else f"MLLM-MSR_{arm}"
        result = evaluate_arm(args, key, folders[arm], args.cache / f"store_{arm}", model_dir, zero_shot=zero_shot)
        scores = pd.read_parquet(result["run"]["scores"])
        add(name, scores, sees, {"evaluate_ranker": {k: result[k] for k in ("auc", "hr@5", "ndcg@5")}})
        if not zero_shot:
            arm_scores[arm] = scores
    return test, methods, arm_scores


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.cache = args.cache.resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timings = {}

    package_dir = args.package_dir or install_package(args.cache, args.package_version)
    catalogue, events, reviews, set_info, balanced = build_set(args, package_dir)
    log(f"set: {json.dumps(set_info)}")
    folders = prepare_arms(args, reviews, package_dir)
    timings["set_and_prepare"] = round(time.time() - started, 1)
    summaries, model_dirs = run_arms(args, folders, timings)
    if set(args.arms) != {"image", "text"}:
        log(f"arms {args.arms} done; run again with both arms to write the results")
        return {}
    if args.zero_shot:
        tick = time.time()
        evaluate_arm(args, "zero_shot_image_summaries", folders["image"], args.cache / "store_image", None, zero_shot=True)
        timings["eval_zero_shot"] = round(time.time() - tick, 1)

    test, methods, arm_scores = score_methods(args, folders, events, model_dirs)
    # Same test rows in both arms (checked at prepare time): pair them by (group, item).
    from merlin_mllm.metrics import auc_difference_interval, paired_scores
    from merlin_mllm.ranker.saved import TRAINING_LOG_FILE

    paired = paired_scores(arm_scores["image"], arm_scores["text"], ("image", "text"), where="visual check")
    image_vs_text = auc_difference_interval(paired["label"], paired["score_image"], paired["score_text"], paired["group_id"])

    training = {arm: json.loads((Path(model_dirs[arm]).parent / TRAINING_LOG_FILE).read_text()) for arm in model_dirs}
    results = {
        # What the ranker's image tokens can tell (EfficientNet part vs cell colours). Made here,
        # once per results run: it encodes every balanced picture (about a minute on this CPU).
        "set": {**set_info, "image_token_probe_all_balanced_items": visual_set.image_token_probe(balanced, seed=args.seed)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "test_groups": int(test["group_id"].nunique()),
        "rows_per_split": json.loads((folders["image"] / "report.json").read_text())["rows_per_split"],
        "methods": methods,
        "image_minus_text_auc": image_vs_text,
        "summaries": summaries,
        "training": {arm: {k: t[k] for k in ("global_step", "train_rows", "epoch_mean_loss", "val_loss", "seconds")} for arm, t in training.items()},
        "colour_words_in_user_summaries": {arm: colour_word_share(folders[arm], args.cache / f"store_{arm}") for arm in folders},
        "timings_seconds": timings,
        # This process only; a run that reuses the caches takes seconds (stage times above are the real work).
        "this_process_seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), no GPU",
    }
    write_results(args, results)
    return results


if __name__ == "__main__":
    main()
