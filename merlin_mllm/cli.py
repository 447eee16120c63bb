"""The ``merlin-mllm`` command line.

Commands import torch, Merlin and tritonclient (through the pipelines, summaries, serving and
``merlin_compat``) inside their bodies, on purpose: ``merlin-mllm --help`` then starts in a
fraction of a second. Everything light is imported here.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Optional

import typer

from merlin_mllm.choices import (CANDIDATE_TEXTS, LOSSES, NEGATIVE_SAMPLING, PROMPT_VERSIONS, PROTOCOLS, SERVER_PROTOCOLS,
                                 TRAIN_TARGETS, UNKNOWN_USER_POLICIES, USER_CONTEXTS, USER_SUMMARY_SOURCES)
from merlin_mllm.data.registry import DATASETS, datasets_help
from merlin_mllm.doctor import run_checks
from merlin_mllm.models.embedded import AssetNotInstalled
from merlin_mllm.models.precision import PRECISIONS
from merlin_mllm.pipelines.train_config import BATCHINGS, DEFAULT_RECIPE, RECIPES, TrainConfig
from merlin_mllm.ranker.prompt import DEFAULT_MAX_PROMPT_TOKENS  # torch-free
from merlin_mllm.serving.tritonserver import TritonServer
from merlin_mllm.text import TokenBudgets

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MLLM-MSR ranking stage for NVIDIA Merlin.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets as Merlin parquet + schema.")
app.add_typer(data_app, name="data")
summarize_app = typer.Typer(no_args_is_help=True, help="Item and recurrent user summaries (MLLM-MSR stages 1-2).")
app.add_typer(summarize_app, name="summarize")


@contextlib.contextmanager
def user_errors():
    """Bad input is reported as one clear line (exit code 2), not a traceback.

    Known harmless third-party warnings are hidden meanwhile (``merlin_compat.KNOWN_WARNINGS``).
    """
    from merlin_mllm.merlin_compat import quiet_known_warnings  # lazy: imports torch

    try:
        with quiet_known_warnings():
            yield
    except (ValueError, FileNotFoundError, FileExistsError, AssetNotInstalled) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def doctor():
    """Versions, embedded assets, GPU, and the bundled tritonserver: each checked for real."""
    checks = run_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        typer.echo(f"{'ok ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.detail}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        typer.echo(f"\n{len(failed)} check(s) failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
    typer.echo("\nall checks passed")


@data_app.command("prepare")
def data_prepare(
    dataset: str = typer.Option(..., metavar="|".join(DATASETS), help=datasets_help()),
    protocol: str = typer.Option("paper", metavar="|".join(PROTOCOLS), help="paper (random user "
                                 "split, last item) | leave-last-out (every user: last, second and third to last "
                                 "item; 'temporal' is its old name) | timeline (two global cut times)"),
    out: Path = typer.Option(..., help="Output folder: train/ valid/ test/ events/ items/ + report.json"),
    input: Optional[Path] = typer.Option(None, help="Raw data file or folder (what each dataset takes: see --dataset)"),
    images: Optional[Path] = typer.Option(None, help="Folder of item images named <item key>.<ext>"),
    max_history: Optional[int] = typer.Option(None, help="Keep each user's most recent N interactions (0 = all; "
                                              "default 12, on the timeline 0)"),
    max_users: int = typer.Option(0, help="Seeded subset of N users for quick runs (0 = all)"),
    seed: int = typer.Option(42),
    min_user: Optional[int] = typer.Option(None, help="k-core: minimum interactions per user"),
    min_item: Optional[int] = typer.Option(None, help="k-core: minimum interactions per item"),
    skip_bad_lines: bool = typer.Option(False, help="Skip and count malformed lines instead of failing"),
    train_negatives: int = typer.Option(1, metavar="K", help="Negatives per training group (valid groups keep 1, "
                                        "test groups 20)"),
    train_targets: str = typer.Option("last", metavar="|".join(TRAIN_TARGETS), help="Training targets per user: the "
                                      "protocol's last item only (the paper); also one at every summary-block "
                                      "boundary before it; or also one at every position after the first block"),
    train_negative_sampling: str = typer.Option("uniform", metavar="|".join(NEGATIVE_SAMPLING), help="How training "
                                                "negatives are drawn (valid/test negatives stay uniform)"),
    train_block_size: int = typer.Option(3, help="The user summaries' block size that blocks|every count in"),
    valid_cut: Optional[int] = typer.Option(None, help="Timeline: T_valid as a timestamp (the data's unit)"),
    test_cut: Optional[int] = typer.Option(None, help="Timeline: T_test as a timestamp (the data's unit)"),
    valid_cut_quantile: Optional[float] = typer.Option(None, help="Timeline: T_valid as a quantile of the k-core "
                                                       "events' times (default 0.7)"),
    test_cut_quantile: Optional[float] = typer.Option(None, help="Timeline: T_test as a quantile (default 0.8)"),
    test_users: int = typer.Option(0, help="Timeline, with --max-users: draw this many of the users among those "
                                   "with an event at or after T_test (one test group each), the rest among the "
                                   "others (0 = all uniformly)"),
):
    """Turn a recommendation dataset into Merlin parquet with a tagged schema."""
    from merlin_mllm.data.prepare import prepare_dataset

    with user_errors():
        report = prepare_dataset(
            dataset, protocol, out, input=input, images=images, max_history=max_history,
            max_users=max_users, seed=seed, min_user_interactions=min_user,
            min_item_interactions=min_item, on_bad_line="skip" if skip_bad_lines else "error",
            train_negatives=train_negatives, train_targets=train_targets,
            train_negative_sampling=train_negative_sampling, train_block_size=train_block_size,
            valid_cut=valid_cut, test_cut=test_cut, valid_cut_quantile=valid_cut_quantile,
            test_cut_quantile=test_cut_quantile, test_users=test_users,
        )
    typer.echo(json.dumps(report, indent=2, default=str))


def _generation_settings(max_new_tokens: int, batch_size: int, sample: bool, seed: int):
    from merlin_mllm.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=sample, seed=seed)


def _print_report(report) -> None:
    typer.echo(json.dumps(report.to_dict(), indent=2, default=str))
    typer.echo(f"report: {report}")


def _budget_option(name: str, help: str):
    """A token-budget option with :class:`TokenBudgets`' default for field ``name``."""
    return typer.Option(TokenBudgets.__dataclass_fields__[name].default, help=f"{help} (recorded in the summary keys)")


_WORKERS_HELP = ("0: run in this process; N: an NVTabular workflow on a local Dask cluster of N worker "
                 "processes (one store segment each)")
_SCHEDULER_HELP = ("Address of an existing dask.distributed scheduler (tcp://host:8786) to run the workflow on; "
                   "its workers must see --data and --summaries at the same paths")


def _on_cluster(workers: int, scheduler: Optional[str], run_here, cluster_job: str, data: Path, summaries: Path,
                options: dict) -> dict:
    """``run_here(data, summaries, progress=True, **options)`` when neither --workers nor --scheduler
    is given, else the job ``cluster_job`` of :mod:`merlin_mllm.pipelines.summaries` on a Dask client
    (imported only then: Dask is slow to load)."""
    if not workers and not scheduler:
        return run_here(data, summaries, progress=True, **options)
    from merlin_mllm.pipelines import summaries as cluster_jobs

    with cluster_jobs.dask_client(workers=workers, scheduler=scheduler) as client:
        return getattr(cluster_jobs, cluster_job)(data, summaries, client, **options)


@summarize_app.command("items")
def summarize_items_cmd(
    data: Path = typer.Option(..., help="Prepared data folder (holds items/)"),
    summaries: Path = typer.Option(..., help="Summary store folder (created if missing; shared by all stages)"),
    backend: str = typer.Option("textualizer", help="textualizer (offline default) | mllm"),
    model: Optional[str] = typer.Option(None, help="HF id or local folder; default: embedded SmolLM2 (textualizer)"),
    mode: str = typer.Option("image_and_text", help="image_and_text (the paper: the image description and the text "
                             "summary combined) | image_only (authors' code)"),
    max_new_tokens: int = typer.Option(96),
    batch_size: int = typer.Option(16),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding"),
    seed: int = typer.Option(0),
    skip_empty: bool = typer.Option(True, help="Skip (and count) items with neither image nor text, instead of failing"),
    title_tokens: int = _budget_option("title", "Titles are cut to this many tokens"),
    description_tokens: int = _budget_option("description", "Descriptions are cut to this many tokens"),
    workers: int = typer.Option(0, help=_WORKERS_HELP),
    scheduler: Optional[str] = typer.Option(None, help=_SCHEDULER_HELP),
):
    """Summarise every item from its image and text into the store."""
    from merlin_mllm.summaries.item import summarize_items

    with user_errors():
        options = dict(backend=backend, model=model, mode=mode,
                       settings=_generation_settings(max_new_tokens, batch_size, sample, seed),
                       budgets=TokenBudgets(title=title_tokens, description=description_tokens),
                       on_empty="skip" if skip_empty else "error")
        report = _on_cluster(workers, scheduler, summarize_items, "summarize_items_on_cluster", data, summaries, options)
    _print_report(report)


@summarize_app.command("users")
def summarize_users_cmd(
    data: Path = typer.Option(..., help="Prepared data folder (train/ valid/ test/ events/ items/)"),
    summaries: Path = typer.Option(..., help="Summary store folder (run `summarize items` into it first)"),
    block_size: int = typer.Option(3, help="Items per recurrent step (the paper's k)"),
    mode: str = typer.Option("recurrent", help="recurrent | direct (whole history in one prompt: MLLM-MSR_R)"),
    model: Optional[str] = typer.Option(None, help="HF id or local folder; default: embedded SmolLM2"),
    max_new_tokens: int = typer.Option(96),
    batch_size: int = typer.Option(16),
    sample: bool = typer.Option(False, help="Sample (the paper used T=0.6, top-p 0.9) instead of greedy"),
    seed: int = typer.Option(0),
    title_tokens: int = _budget_option("title", "A history item's title is cut to this many tokens"),
    history_item_tokens: int = _budget_option("history_item", "Each history line (title + item summary) is cut to this"),
    previous_summary_tokens: int = _budget_option("previous_summary", "The summary a recurrent step continues is cut to this"),
    history_tokens: int = _budget_option("history", "A prompt's block of history lines is cut to this, keeping the most recent"),
    ratings: bool = typer.Option(False, "--ratings", help="Ratings-aware summaries: each history line shows the user's "
                                 "rating from its own event before the row, and the prompt asks what the user disliked "
                                 "(needs a rating column in events/; its own prompt version and keys)"),
    max_history: int = typer.Option(0, help="History depth: 0 summarises the whole history before each row; D (a "
                                    "multiple of --block-size) the last D to 2D-1 items, on a fixed grid"),
    workers: int = typer.Option(0, help=_WORKERS_HELP),
    scheduler: Optional[str] = typer.Option(None, help=_SCHEDULER_HELP),
):
    """Recurrent user-preference summaries for every row's history, cached in the store."""
    from merlin_mllm.summaries.user import summarize_users

    with user_errors():
        if workers and (ratings or max_history):
            raise ValueError("--ratings and --max-history run in this process only for now: drop --workers")
        # Only when set, so a run without them calls the cluster job with the arguments it takes.
        extra = {name: value for name, value in (("ratings", ratings), ("max_history", max_history)) if value}
        options = dict(model=model, block_size=block_size, mode=mode, **extra,
                       settings=_generation_settings(max_new_tokens, batch_size, sample, seed),
                       budgets=TokenBudgets(title=title_tokens, history_item=history_item_tokens,
                                            previous_summary=previous_summary_tokens, history=history_tokens))
        report = _on_cluster(workers, scheduler, summarize_users, "summarize_users_on_cluster", data, summaries, options)
    _print_report(report)


@summarize_app.command("update")
def summarize_update_cmd(
    events: Path = typer.Option(..., help="Parquet of new interactions: user_id, item_id, timestamp"),
    summaries: Path = typer.Option(..., help="The summary store of an earlier `summarize users` run"),
    items: Optional[Path] = typer.Option(None, help="Items table, if not the one recorded in the store"),
):
    """Incremental update: only newly completed blocks are summarised (one LLM call per block)."""
    from merlin_mllm.summaries.user import update_users

    with user_errors():
        report = update_users(events, summaries, items=items, progress=True)
    _print_report(report)


def _train_option(name: str):
    """A ``train`` option with :class:`TrainConfig`'s default and help text for field ``name``."""
    setting = TrainConfig.__dataclass_fields__[name]
    return typer.Option(setting.default, help=setting.metadata["help"])


def _recipe_option(name: str):
    """A ``train`` option whose default comes from the ``--recipe`` (``None`` here)."""
    values = ", ".join(f"{recipe} {getattr(TrainConfig.recipe(recipe), name):g}" for recipe in RECIPES)
    help = TrainConfig.__dataclass_fields__[name].metadata["help"]
    return typer.Option(None, help=f"{help} (default: the recipe's: {values})", show_default=False)


_HYBRID_HELP = ("Train a hybrid: the LLM's yes-minus-no logit plus a tabular head over collaborative features "
                "(NVTabular counts of the candidate and the user, each row's as of its own time, and the score of a "
                "SASRec trained on the events before the split), trained jointly")
_FEATURES_HELP = ("Parquet of {split} rows (group_id, item_id and the hybrid's feature columns), e.g. with your "
                  "pipeline's retrieval scores; default: computed from the prepared folder (written beside the output)")


def _head_columns(hybrid: bool, head_features: Optional[str]):
    """The hybrid's feature columns from ``--hybrid`` / ``--head-features`` (None: the LLM alone)."""
    if not hybrid:
        return None
    if head_features is None:
        from merlin_mllm.data.collaborative import HEAD_FEATURES

        return tuple(HEAD_FEATURES)
    columns = tuple(c.strip() for c in head_features.split(",") if c.strip())
    if not columns:
        raise ValueError(f"--head-features names no column: {head_features!r}")
    return columns


def _split_features(data: Path, split: str, columns, features: Optional[Path], out_dir: Path,
                    recent_days: float) -> Path:
    """The parquet of ``split``'s rows with ``columns``: ``features`` when given, else
    ``out_dir/features_<split>.parquet`` made by the hybrid pipeline (``write_feature_table``:
    counts as of each row's time, SASRec trained on the events before ``split``; reused while
    current)."""
    from merlin_mllm.pipelines.hybrid import write_feature_table

    if features is not None:
        return features
    typer.echo(f"the {split} rows' features ({', '.join(columns)}) from {data}")
    return write_feature_table(data, split, Path(out_dir) / f"features_{split}.parquet", columns=columns,
                               recent_days=recent_days)


_PRECISION_HELP = ("float32 | bfloat16 | auto (bf16 where this machine runs it natively, else float32; "
                   "`merlin-mllm doctor` says which and why); default: the precision the ranker was saved with")
_RECIPE_HELP = ("Training settings, overridden by the options below: "
                + "; ".join(f"{name}: {text}" for name, text in RECIPES.items()))


@app.command()
def train(
    data: Path = typer.Option(..., help="Prepared data folder (train/ valid/ items/)"),
    summaries: Optional[Path] = typer.Option(None, help="Summary store with the user summaries (`summarize users`); "
                                                       "not needed with --user-context titles"),
    out: Path = typer.Option(..., help="Run folder: checkpoints/ (resumed if present) and model/"),
    # TrainConfig.base_model / use_images; --model and --no-image are the familiar spellings.
    base_model: Optional[str] = typer.Option(None, "--base-model", "--model", help="Base MLLM id or folder; default: "
                                             "embedded SmolLM2 + EfficientNet-Lite0"),
    no_images: bool = typer.Option(False, "--no-images", "--no-image",
                                   help="Text-only ranker (the MLLM-MSR_I ablation)"),
    recipe: str = typer.Option(DEFAULT_RECIPE, metavar="|".join(RECIPES), help=_RECIPE_HELP),
    epochs: Optional[int] = _recipe_option("epochs"),
    max_steps: int = _train_option("max_steps"),
    lr: Optional[float] = _recipe_option("lr"),
    projector_lr: Optional[float] = _train_option("projector_lr"),
    lora_r: int = _train_option("lora_r"),
    lora_alpha: int = _train_option("lora_alpha"),
    lora_dropout: float = _train_option("lora_dropout"),
    grad_accum: Optional[int] = _recipe_option("grad_accum"),
    batch_size: Optional[int] = _recipe_option("batch_size"),
    max_length: int = _train_option("max_length"),
    seed: int = _train_option("seed"),
    batching: str = typer.Option(TrainConfig.batching, metavar="|".join(BATCHINGS),
                                 help=TrainConfig.__dataclass_fields__["batching"].metadata["help"]),
    loss: Optional[str] = typer.Option(None, metavar="|".join(LOSSES),
                                       help=TrainConfig.__dataclass_fields__["loss"].metadata["help"]),
    prompt_version: Optional[str] = typer.Option(
        None, metavar="|".join(PROMPT_VERSIONS),
        help=TrainConfig.__dataclass_fields__["prompt_version"].metadata["help"]),
    user_context: str = typer.Option(TrainConfig.user_context, metavar="|".join(USER_CONTEXTS),
                                     help=TrainConfig.__dataclass_fields__["user_context"].metadata["help"]),
    context_titles: int = _train_option("context_titles"),
    context_ratings: bool = typer.Option(False, "--context-ratings",
                                         help=TrainConfig.__dataclass_fields__["context_ratings"].metadata["help"]),
    context_attributes: bool = typer.Option(
        False, "--context-attributes", help=TrainConfig.__dataclass_fields__["context_attributes"].metadata["help"]),
    candidate_text: str = typer.Option(TrainConfig.candidate_text, metavar="|".join(CANDIDATE_TEXTS),
                                       help=TrainConfig.__dataclass_fields__["candidate_text"].metadata["help"]),
    collab_tokens: bool = typer.Option(False, "--collab-tokens",
                                       help=TrainConfig.__dataclass_fields__["collab_tokens"].metadata["help"]),
    hybrid: bool = typer.Option(False, "--hybrid", help=_HYBRID_HELP),
    head_features: Optional[str] = typer.Option(
        None, help="Comma-separated feature columns of the hybrid's head (default with --hybrid: item_log_count, "
                   "item_log_recent_count, user_log_count, retrieval_score)"),
    features: Optional[Path] = typer.Option(None, help=_FEATURES_HELP.format(split="train")),
    devices: int = typer.Option(TrainConfig.devices, help="Processes/GPUs; >1 trains with DDP"),
    precision: str = typer.Option(TrainConfig.precision, metavar="|".join(PRECISIONS),
                                  help=TrainConfig.__dataclass_fields__["precision"].metadata["help"]),
):
    """LoRA SFT of the Yes/No ranker through Merlin's dataloader and Lightning (loss on the answer only).

    With --hybrid the ranker is trained jointly with a tabular head over collaborative features
    (the score adds the head's logit to the LLM's). Warns, with the numbers, when the run makes
    too few optimizer steps to move the adapter.
    """
    from merlin_mllm.pipelines.training import train_ranker

    with user_errors():
        chosen = {name: value for name, value in dict(epochs=epochs, lr=lr, grad_accum=grad_accum,
                                                      batch_size=batch_size).items() if value is not None}
        columns = _head_columns(hybrid or head_features is not None or features is not None, head_features)
        config = TrainConfig.recipe(
            recipe, base_model=base_model, use_images=not no_images, lora_r=lora_r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, projector_lr=projector_lr, max_steps=max_steps, max_length=max_length,
            seed=seed, devices=devices, strategy="ddp" if devices > 1 else "auto", batching=batching, loss=loss,
            prompt_version=prompt_version, user_context=user_context, context_titles=context_titles,
            context_ratings=context_ratings, context_attributes=context_attributes,
            candidate_text=candidate_text, collab_tokens=collab_tokens, head_features=columns, precision=precision,
            **chosen,
        )
        if summaries is None and config.user_context != "titles":
            raise ValueError(f"--summaries is needed with --user-context {config.user_context} (only 'titles' reads none)")
        if summaries is None and "summary" in config.candidate_text.split("+"):
            raise ValueError(f"--summaries (the store `summarize items` wrote) is needed with --candidate-text "
                             f"{config.candidate_text}")
        rank0 = os.environ.get("LOCAL_RANK", "0") == "0"
        if rank0:
            typer.echo(f"recipe {recipe}: lr {config.lr:g}, micro-batches of {config.batch_size}, "
                       f"{config.grad_accum} per optimizer step, {config.epochs} epoch(s); {config.batching} "
                       f"batching, {config.loss} loss, prompt v{config.prompt_version}, {config.precision}"
                       + (f"; hybrid over {', '.join(columns)}" if columns else ""))
        table = None
        if columns:
            from merlin_mllm.data.collaborative import DEFAULT_RECENT_DAYS

            table = _split_features(data, "train", columns, features, out, config.head_recent_days or DEFAULT_RECENT_DAYS)
        path = train_ranker(data, summaries, out, config, features=table, progress=True)
    # Under DDP Lightning re-runs this command on every rank: only rank 0 reports.
    if os.environ.get("LOCAL_RANK", "0") == "0":
        typer.echo(f"model: {path}")


@app.command()
def evaluate(
    data: Path = typer.Option(..., help="Prepared data folder (test/ items/)"),
    summaries: Optional[Path] = typer.Option(None, help="Summary store with the user summaries (not needed for a "
                                                       "ranker trained with --user-context titles)"),
    model: Optional[Path] = typer.Option(None, help="Trained ranker: the folder `train --out` wrote, or its model/"),
    out: Path = typer.Option(..., help="Metrics JSON; scores parquet and a PNG plot are written beside it"),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="Score with the base model, no SFT"),
    split: str = typer.Option("test"),
    max_groups: Optional[int] = typer.Option(None, help="Evaluate a seeded subset of groups"),
    features: Optional[Path] = typer.Option(None, help=_FEATURES_HELP.format(split="the split's")),
    precision: Optional[str] = typer.Option(None, metavar="|".join(PRECISIONS), help=_PRECISION_HELP),
):
    """AUC and HR/MRR/NDCG@3/5/10 per group of 1 positive + N negatives, from P(yes).

    A hybrid ranker (trained with --hybrid) is scored with its head: features from --features, or
    computed here from the prepared folder.
    """
    from merlin_mllm.pipelines.evaluation import evaluate_ranker
    from merlin_mllm.ranker.ranker_config import HEAD_FILE

    if model is None and not zero_shot:
        typer.echo("error: give --model, or --zero-shot to score the base model", err=True)
        raise typer.Exit(2)
    with user_errors():
        table = None
        head = None
        if model is not None and not zero_shot:
            from merlin_mllm.ranker.hybrid_head import saved_head

            head = saved_head(model)
        if head is not None:  # the features it was trained with: its columns, counted with its recent window
            table = _split_features(data, split, head.feature_names, features, Path(out).parent, head.recent_days)
        elif features is not None:
            raise ValueError(f"--features was given, but {model} is not a hybrid ranker (no {HEAD_FILE})")
        result = evaluate_ranker(data, summaries, model, out, zero_shot=zero_shot, split=split,
                                 max_groups=max_groups, features=table, precision=precision, progress=True)
    keys = ["auc"] + [f"{m}@{k}" for m in ("hr", "mrr", "ndcg") for k in (3, 5, 10)]
    typer.echo("  ".join(f"{k}={result[k]:.4f}" for k in keys if k in result))
    typer.echo(f"written: {out}")


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="Working folder; finished stages are reused"),
    max_users: Optional[int] = typer.Option(None, help="Seeded MovieLens-100k user subset (default: the "
                                            "quickstart's, sized for 15 minutes on a 2-core CPU)"),
    test_users: Optional[int] = typer.Option(None, help="How many of them are drawn among the users with an event "
                                             "at or after T_test, each a test group (default: half of them)"),
    seed: int = typer.Option(42),
):
    """The main job on the embedded default models, end to end, with a summary line per stage."""
    from merlin_mllm.quickstart import Quickstart, QuickstartSettings

    # None: QuickstartSettings' default (the one home of the sizes).
    sizes = {name: value for name, value in {"max_users": max_users, "test_users": test_users}.items()
             if value is not None}
    with user_errors():
        Quickstart(QuickstartSettings(out=out, seed=seed, **sizes)).run()


@app.command()
def serve(
    model_repository: Path = typer.Option(Path("triton_repo"), help="Triton model repository (merlin-mllm export writes one)"),
    address: str = typer.Option("127.0.0.1", help="Interface to bind HTTP/gRPC/metrics to"),
    http_port: int = typer.Option(8000),
    grpc_port: int = typer.Option(8001),
    metrics_port: int = typer.Option(8002),
    log_verbose: int = typer.Option(0),
    ready_timeout: float = typer.Option(300.0, help="Seconds to wait for /v2/health/ready"),
):
    """Start the bundled tritonserver on a model repository; Ctrl-C shuts it down cleanly."""
    with user_errors():
        server = TritonServer(model_repository, address=address, http_port=http_port, grpc_port=grpc_port,
                              metrics_port=metrics_port, log_verbose=log_verbose)
    # Forward SIGINT/SIGTERM as SIGTERM: Triton then unloads models and removes its /dev/shm regions.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: server.send_signal(signal.SIGTERM))
    try:
        server.start(timeout=ready_timeout)
    except (RuntimeError, TimeoutError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  (Ctrl-C to stop)")
    code = server.wait()
    server.stop()
    raise typer.Exit(code)


@app.command("export")
def export_cmd(
    model: Path = typer.Option(..., help="Trained ranker: the folder `train --out` wrote, or its model/"),
    summaries: Path = typer.Option(..., help="Summary store folder (or a user-summary parquet table)"),
    data: Path = typer.Option(..., help="Prepared data folder (items/ and the splits)"),
    out: Path = typer.Option(Path("triton_repo"), help="Triton model repository to write"),
    gpu: bool = typer.Option(False, help="Ranker instances of KIND_GPU instead of KIND_CPU"),
    gpu_instances: int = typer.Option(1, help="Ranker instances per GPU (with --gpu)"),
    cpu_instances: int = typer.Option(1, help="Feature-model instances (and ranker instances without --gpu)"),
    max_candidates: int = typer.Option(100, help="Most candidates per user in one request"),
    top_k: int = typer.Option(10, help="Ranked items returned when a request has no top_k"),
    max_batch_size: int = typer.Option(8, help="Users per request / per dynamic batch"),
    dynamic_batching: bool = typer.Option(True, help="Triton dynamic batching on the ranker"),
    max_batch_delay_us: int = typer.Option(2000, help="Dynamic batcher queue delay (microseconds)"),
    user_summaries: str = typer.Option("last_row", metavar="|".join(USER_SUMMARY_SOURCES),
                                       help="last_row (what evaluate scored) | store_latest (live)"),
    unknown_users: str = typer.Option("empty_summary", metavar="|".join(UNKNOWN_USER_POLICIES),
                                      help="A user with no summary: score with the empty-history summary "
                                           "(reply known_user=false), or reject the request naming the id"),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longest served prompt in tokens (default: the "
                                                    f"training run's max_length, as training cut prompts; else "
                                                    f"{DEFAULT_MAX_PROMPT_TOKENS})"),
    precision: Optional[str] = typer.Option(None, metavar="|".join(PRECISIONS), help=_PRECISION_HELP
                                            + "; auto is decided by each ranker instance on the serving machine"),
):
    """Write a Triton ensemble (features -> MLLM ranker) that `merlin-mllm serve` can serve."""
    from merlin_mllm.serving.export import MANIFEST_FILE, export

    with user_errors():
        manifest = export(
            model, summaries, data, out, gpu=gpu, gpu_instances=gpu_instances, cpu_instances=cpu_instances,
            max_candidates=max_candidates, top_k_default=top_k, max_batch_size=max_batch_size,
            dynamic_batching=dynamic_batching, max_batch_delay_us=max_batch_delay_us,
            user_summaries=user_summaries, unknown_users=unknown_users, max_prompt_tokens=max_prompt_tokens,
            precision=precision, progress=True,
        )
    ranker, features = manifest["ranker"], manifest["features"]
    typer.echo(f"wrote {out}: ensemble {manifest['ensemble']} = {' -> '.join(manifest['steps'])}")
    typer.echo(f"  ranker: {ranker['kind']} x{ranker['instances']}, dynamic batching {ranker['dynamic_batching']}, "
               f"base {ranker['base_model']}, images {ranker['use_images']}, precision {ranker['precision']}")
    typer.echo(f"  features: {features['users']} users, {features['items']} items "
               f"({features['items_with_image']} with image), summaries {features['user_summaries']}, "
               f"unknown users: {features['unknown_users']}")
    typer.echo(f"  prompts cut to {features['max_prompt_tokens']} tokens ({features['max_prompt_tokens_source']})")
    typer.echo(f"  limits: {manifest['limits']}; manifest {Path(out) / MANIFEST_FILE}")
    typer.echo(f"serve it: merlin-mllm serve --model-repository {out}")


def _item_titles(data_dir: Path) -> dict:
    from merlin_mllm.data.tables import read_table

    items = read_table(Path(data_dir) / "items")
    return dict(zip(items["item_id"].astype(int), items["title"].fillna("").astype(str)))


@app.command("query")
def query_cmd(
    user: int = typer.Option(..., help="User id"),
    items: str = typer.Option(..., help="Candidate item ids, comma-separated: 12,40,3"),
    url: Optional[str] = typer.Option(None, help="host:port (default localhost:8001 for grpc, localhost:8000 for http)"),
    protocol: str = typer.Option("grpc", metavar="|".join(SERVER_PROTOCOLS), help="How to talk to the server"),
    top_k: Optional[int] = typer.Option(None, help="Ranked items to return (default: the export's top_k)"),
    titles: Optional[Path] = typer.Option(None, help="Prepared data folder: show item titles"),
    as_json: bool = typer.Option(False, "--json", help="Print the answer as JSON"),
    timeout: Optional[float] = typer.Option(None, help="Seconds to wait for the answer"),
):
    """Ask a running server (`merlin-mllm serve`) to rank candidate items for a user."""
    from merlin_mllm.serving.client import RerankClient

    with user_errors():
        try:
            candidates = [int(part) for part in items.replace(" ", "").split(",") if part]
        except ValueError:
            raise ValueError(f"--items must be comma-separated integer item ids, not {items!r}") from None
        names = _item_titles(titles) if titles is not None else {}
        with RerankClient(url, protocol=protocol, timeout=timeout) as client:
            result = client.rank(user, candidates, top_k=top_k)
    if as_json:
        typer.echo(json.dumps({
            "user_id": result.user_id,
            "known_user": result.known_user,
            "ranked": [{"item_id": i, "score": s, **({"title": names.get(i, "")} if names else {})} for i, s in result.ranked],
            "scores": {str(int(i)): float(s) for i, s in zip(result.item_ids, result.scores)},
        }, indent=2))
        return
    known = {True: "known", False: "unknown: cold start, empty-history summary", None: "known_user not reported"}
    typer.echo(f"user {result.user_id} ({known[result.known_user]}): "
               f"top {len(result.ranked)} of {len(result.item_ids)} candidates")
    typer.echo(f"{'rank':>4}  {'item_id':>8}  {'P(yes)':>8}" + ("  title" if names else ""))
    for position, (item_id, score) in enumerate(result.ranked, 1):
        typer.echo(f"{position:>4}  {item_id:>8}  {score:>8.5f}" + (f"  {names.get(item_id, '')}" if names else ""))


if __name__ == "__main__":
    app()
