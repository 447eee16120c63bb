"""LLM calls and tokens of an incremental user-summary update vs a full recompute.

Each user's last ``--new-items`` events are held back. The users' recurrent summaries are built
from the earlier events, then the held-back events arrive through ``update_users``: only newly
completed blocks cost an LLM step. The full recompute summarises every user's whole history
again in an empty store. Both must end at the same summary keys (the same content), which the
benchmark checks.

Usage::

    .venv/bin/python -m benchmarks.bench_incremental --users 8 --new-items 3
    .venv/bin/python -m benchmarks.bench_incremental --data data/ml100k --users 0   # all users

Prints a table and writes ``benchmarks/speed/incremental.json`` (committed; ``--out``).
"""
from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


from merlin_mllm.data.tables import read_table
from merlin_mllm.generation import GenerationSettings
from merlin_mllm.models.loading import model_id_of
from merlin_mllm.summaries.store import SummaryStore
from merlin_mllm.summaries.user import summarize_users, update_users
from merlin_mllm.summaries.user_summarizer import UserSummaryConfig

from benchmarks.common import SPEED_RESULTS, markdown_table, write_json


def _prepare_default(folder: Path, users: int, seed: int) -> Path:
    """A small ML-100k subset through the project's own data layer (leave-last-out protocol)."""
    from merlin_mllm.data.prepare import prepare_dataset

    # At least 30 users: a very small catalogue cannot give every test row its 20 negatives.
    prepare_dataset("ml-100k", "leave-last-out", folder, max_users=max(users, 30) if users else 0, seed=seed, max_history=12)
    return folder


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="output of `merlin-mllm data prepare` (default: an ML-100k subset)")
    parser.add_argument("--users", type=int, default=8, help="users to keep (0 = all users of --data)")
    parser.add_argument("--new-items", type=int, default=3, help="events per user held back as the update")
    parser.add_argument("--block-size", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default=None, help="LLM id or folder (default: embedded SmolLM2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=SPEED_RESULTS / "incremental.json")
    args = parser.parse_args(argv)

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        data = args.data or _prepare_default(work / "data", args.users, args.seed)
        events = read_table(data / "events").sort_values(["user_id", "position"], kind="stable")
        if args.users:
            keep = sorted(events.user_id.unique())[: args.users]
            events = events[events.user_id.isin(keep)]
        from_end = events.groupby("user_id").cumcount(ascending=False)
        old, new = events[from_end >= args.new_items], events[from_end < args.new_items]

        # The "before" dataset: the same items, only the earlier events (no row splits needed).
        before = work / "before"
        (before / "events").mkdir(parents=True)
        old.to_parquet(before / "events" / "part_0.parquet", index=False)
        shutil.copytree(data / "items", before / "items")
        after = work / "after"
        (after / "events").mkdir(parents=True)
        events.to_parquet(after / "events" / "part_0.parquet", index=False)
        shutil.copytree(data / "items", after / "items")
        new[["user_id", "item_id", "timestamp"]].to_parquet(work / "new_events.parquet", index=False)

        common = dict(model=args.model, block_size=args.block_size, settings=settings, progress=True)
        base = summarize_users(before, work / "incremental", splits=(), **common)
        start = time.perf_counter()
        incremental = update_users(work / "new_events.parquet", work / "incremental", model=args.model, progress=True)
        incremental_s = time.perf_counter() - start
        start = time.perf_counter()
        full = summarize_users(after, work / "recompute", splits=(), **common)
        full_s = time.perf_counter() - start

        # Same configuration, same histories: the incremental chain must end where a recompute ends.
        scope = UserSummaryConfig(model_id_of(args.model), args.block_size, "recurrent", settings).scope
        inc_states = SummaryStore(work / "incremental").user_states(scope)
        full_states = SummaryStore(work / "recompute").user_states(scope)
        same = {k: v.latest_key for k, v in inc_states.items()} == {k: v.latest_key for k, v in full_states.items()}
        if not same:
            raise SystemExit("incremental update and full recompute disagree on the users' summaries")
        # Same keys mean same inputs; under greedy decoding the texts must agree too.
        inc_texts = SummaryStore(work / "incremental").get_many(v.latest_key for v in inc_states.values() if v.latest_key)
        full_texts = SummaryStore(work / "recompute").get_many(v.latest_key for v in full_states.values() if v.latest_key)
        same_texts = inc_texts == full_texts

        n_users = int(events.user_id.nunique())
        lengths = events.groupby("user_id").size()
        old_lengths = old.groupby("user_id").size().reindex(lengths.index, fill_value=0)
        expected_calls = int(((lengths // args.block_size) - (old_lengths // args.block_size)).sum())
        result = {
            "users": n_users,
            "events": int(len(events)),
            "new_events": int(len(new)),
            "block_size": args.block_size,
            "max_new_tokens": args.max_new_tokens,
            "model": model_id_of(args.model),
            "base_build": base.to_dict(),
            "incremental": {**incremental.to_dict(), "seconds": round(incremental_s, 2)},
            "full_recompute": {**full.to_dict(), "seconds": round(full_s, 2)},
            "expected_incremental_calls": expected_calls,
            "calls_ratio": round(full.llm_calls / max(incremental.llm_calls, 1), 2),
            "tokens_ratio": round(full.new_tokens / max(incremental.new_tokens, 1), 2),
            "same_final_summaries": same,
            "same_final_texts": same_texts,
            "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("incremental update", result["incremental"]),
        ("full recompute", result["full_recompute"]),
    ]
    print(f"\n{n_users} users, {len(events)} events, {len(new)} new (block size {args.block_size})")
    print("\n".join(markdown_table(["way", "LLM calls", "tokens", "seconds"],
                                   [(name, r["llm_calls"], r["new_tokens"], r["seconds"]) for name, r in rows])))
    print(f"full / incremental: {result['calls_ratio']}x calls, {result['tokens_ratio']}x tokens; "
          f"expected incremental calls {expected_calls}; same final summaries: {same}, same texts: {same_texts}")
    return write_json(args.out, result)


if __name__ == "__main__":
    main()
