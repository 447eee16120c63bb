"""Serving through Triton vs the in-process ranker: latency, throughput, and a load run.

Measures, on the same requests (one user + 1 positive and 20 negative candidates, the test
groups of the data):

1. end-to-end latency (p50/p99) of one client through the `mllm_rerank` ensemble (gRPC,
   loopback) vs the in-process ranker (`RankerModel.score`, what `evaluate` runs) and vs the
   in-process serving steps (feature step + ranker step, the code the server runs);
2. throughput with 8 concurrent clients, with and without dynamic batching on the ranker;
3. a load run: 8 clients for `--load-seconds` (60) with the count of failed valid requests
   (must be 0) and whether the server is still ready afterwards.

Every loop is bounded by time and by a request count; the server binds to 127.0.0.1 only.

Usage::

    .venv/bin/python -m benchmarks.bench_serving                       # demo ranker on an ML-100k subset
    .venv/bin/python -m benchmarks.bench_serving --model runs/ranker/model --summaries data/summaries --data data/ml100k
    .venv/bin/python -m benchmarks.bench_serving --quick                # smoke run: a few seconds per part

Prints a table and writes ``benchmarks/speed/serving.json`` (committed; ``--out``).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import SPEED_RESULTS, markdown_table, write_json


def _percentile(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def _demo_artefacts(work: Path, users: int, seed: int):
    """An ML-100k subset, summary-like placeholder texts, and an untrained embedded ranker.

    The placeholder summaries are about as long as SmolLM2's real ones (~100 words), so the
    shared prefix has a realistic length. Timings do not depend on the weights' values.
    """
    from merlin_mllm.data.prepare import prepare_dataset
    from merlin_mllm.data.tables import read_table
    from merlin_mllm.ranker import RankerModel

    data = work / "data"
    prepare_dataset("ml-100k", "paper", data, max_users=users, seed=seed)
    items = read_table(data / "items").set_index("item_id")
    frames = []
    for split in ("train", "valid", "test"):
        rows = read_table(data / split).drop_duplicates(["user_id", "target_position"])
        texts = []
        for history in rows["history_item_ids"]:
            genres = ", ".join(dict.fromkeys(g.strip() for i in history for g in str(items.loc[int(i), "genres"]).split(",")))
            titles = "; ".join(items.loc[int(i), "title"] for i in history[-9:])
            texts.append(f"The user appears to have a preference for {genres} films. They recently watched {titles}. "
                         "They seem to enjoy well-known titles with strong characters and a clear story, "
                         "and rate familiar genres higher than unusual ones.")
        frames.append(pd.DataFrame({"user_id": rows["user_id"], "target_position": rows["target_position"],
                                    "user_summary": texts}))
    summaries = work / "summaries.parquet"
    pd.concat(frames, ignore_index=True).to_parquet(summaries, index=False)
    model = work / "model"
    RankerModel.build("embedded", use_images=False, lora_init="gaussian", seed=seed).save_pretrained(model)
    return model, summaries, data


def _requests(data: Path, candidates: int, seed: int):
    """(user_id, [item ids]) of the test groups: 1 positive + negatives, `candidates` in all."""
    from merlin_mllm.data.tables import read_table

    rows = read_table(data / "test")
    out = []
    for _, group in rows.groupby("group_id", sort=True):
        items = group["item_id"].tolist()[:candidates]
        if len(items) == candidates:
            out.append((int(group["user_id"].iloc[0]), items))
    if not out:
        raise SystemExit(f"{data}/test has no group with {candidates} candidates")
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order]


def _in_process(repo: Path, model: Path, data: Path, requests, count: int, seconds: float):
    """Latencies of RankerModel.score (evaluate's path) and of the serving steps, in this process."""
    import torch

    from merlin_mllm.data.tables import read_table
    from merlin_mllm.ranker.model import RankerModel
    from merlin_mllm.serving.ranker_step import RankerStep
    from merlin_mllm.serving.steps import ARTIFACTS_DIR, FeatureStep

    features = FeatureStep.load(repo / "mllm_features" / "1" / ARTIFACTS_DIR)
    step = RankerStep.load(repo / "mllm_ranker" / "1" / ARTIFACTS_DIR, device="cpu")
    ranker: RankerModel = step.ranker
    titles = dict(zip(read_table(data / "items")["item_id"].astype(int), read_table(data / "items")["title"]))
    features.warm_up()
    step.warm_up()
    result = {"torch_threads": torch.get_num_threads()}
    for name in ("ranker_score", "serving_steps"):
        latencies, deadline = [], time.monotonic() + seconds
        for index in range(count):
            if index and time.monotonic() > deadline:
                break
            user, items = requests[index % len(requests)]
            tick = time.perf_counter()
            if name == "ranker_score":
                summary, _ = features.summary_for(user)
                ranker.score(summary, [{"title": titles[i], "item_id": i} for i in items])
            else:
                batch = features.prepare(np.array([[user]]), np.array([items]))
                step.score_rows(batch["prompt_ids"], batch["prompt_lengths"], np.array([items]))
            latencies.append(time.perf_counter() - tick)
        result[name] = {"requests": len(latencies), "p50_ms": _percentile(latencies, 50) * 1e3,
                        "p99_ms": _percentile(latencies, 99) * 1e3, "mean_ms": statistics.fmean(latencies) * 1e3}
    del features, step, ranker
    return result


def _latency(url: str, requests, count: int, seconds: float):
    from merlin_mllm.serving.client import RerankClient

    latencies, deadline = [], time.monotonic() + seconds
    with RerankClient(url, timeout=600) as client:
        for index in range(count):
            if index and time.monotonic() > deadline:
                break
            user, items = requests[index % len(requests)]
            tick = time.perf_counter()
            client.rank(user, items)
            latencies.append(time.perf_counter() - tick)
    return {"requests": len(latencies), "p50_ms": _percentile(latencies, 50) * 1e3,
            "p99_ms": _percentile(latencies, 99) * 1e3, "mean_ms": statistics.fmean(latencies) * 1e3}


def _concurrent(url: str, requests, clients: int, seconds: float, max_requests: int):
    """`clients` threads, each with its own gRPC client, sending valid requests until the deadline."""
    from merlin_mllm.serving.client import RerankClient

    latencies, failures, lock = [], [], threading.Lock()
    sent = [0]
    deadline = time.monotonic() + seconds

    def worker(offset: int):
        with RerankClient(url, timeout=600) as client:
            index = offset
            while time.monotonic() < deadline:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                user, items = requests[index % len(requests)]
                index += clients
                tick = time.perf_counter()
                try:
                    client.rank(user, items)
                    with lock:
                        latencies.append(time.perf_counter() - tick)
                except Exception as exc:  # counted: a valid request must never fail
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 900)
    elapsed = time.monotonic() - started
    return {"clients": clients, "seconds": round(elapsed, 2), "completed": len(latencies), "failed": len(failures),
            "failures": failures[:5], "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
            "p50_ms": _percentile(latencies, 50) * 1e3 if latencies else None,
            "p99_ms": _percentile(latencies, 99) * 1e3 if latencies else None}


def _ranker_stats(url: str):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics("mllm_ranker", as_json=True)["model_stats"][0]
    client.close()
    return {"inference_count": int(stats.get("inference_count", 0)), "execution_count": int(stats.get("execution_count", 0))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="trained ranker folder (default: an untrained demo ranker)")
    parser.add_argument("--summaries", type=Path, help="summary store or table (with --model)")
    parser.add_argument("--data", type=Path, help="prepared data folder (with --model)")
    parser.add_argument("--users", type=int, default=100, help="demo: ML-100k users")
    parser.add_argument("--candidates", type=int, default=21, help="candidates per request (1 positive + 20 negatives)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--latency-requests", type=int, default=30, help="sequential requests per latency measurement")
    parser.add_argument("--latency-seconds", type=float, default=120.0, help="time bound of each latency measurement")
    parser.add_argument("--throughput-seconds", type=float, default=45.0, help="per throughput run")
    parser.add_argument("--load-seconds", type=float, default=60.0, help="the load run")
    parser.add_argument("--max-requests", type=int, default=10_000, help="bound on requests per concurrent run")
    parser.add_argument("--max-batch-delay-us", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="smoke run: ~5 s per part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=SPEED_RESULTS / "serving.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.latency_requests, args.latency_seconds = 3, 5.0
        args.throughput_seconds = args.load_seconds = 5.0
    if args.model and not (args.summaries and args.data):
        parser.error("--model needs --summaries and --data")

    warnings.simplefilter("ignore")
    from merlin_mllm.serving.export import export
    from merlin_mllm.serving.tritonserver import TritonServer

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    started = time.time()
    try:
        if args.model:
            model, summaries, data = args.model, args.summaries, args.data
        else:
            model, summaries, data = _demo_artefacts(work, args.users, args.seed)
        requests = _requests(data, args.candidates, args.seed)
        repos = {}
        for batching in (True, False):
            repos[batching] = work / ("repo_batching" if batching else "repo_no_batching")
            export(model, summaries, data, repos[batching], dynamic_batching=batching,
                   max_batch_delay_us=args.max_batch_delay_us, max_candidates=max(100, args.candidates))

        print(f"in-process ({args.latency_requests} requests of 1 user x {args.candidates} candidates) ...", flush=True)
        in_process = _in_process(repos[True], model, data, requests, args.latency_requests, args.latency_seconds)

        results = {}
        for batching in (True, False):
            label = "dynamic_batching" if batching else "no_batching"
            print(f"serving with {label} ...", flush=True)
            with TritonServer(repos[batching], http_port=0, grpc_port=0, metrics_port=0,
                              log_file=work / f"triton_{label}.log") as server:
                run = {}
                if batching:
                    run["latency"] = _latency(server.grpc_url, requests, args.latency_requests, args.latency_seconds)
                before = _ranker_stats(server.grpc_url)
                run["throughput"] = _concurrent(server.grpc_url, requests, args.clients, args.throughput_seconds,
                                                args.max_requests)
                after = _ranker_stats(server.grpc_url)
                run["ranker_stats"] = {k: after[k] - before[k] for k in after}
                if batching:
                    print(f"load run: {args.clients} clients for {args.load_seconds:.0f} s ...", flush=True)
                    run["load"] = _concurrent(server.grpc_url, requests, args.clients, args.load_seconds, args.max_requests)
                    run["load"]["ready_after"] = server.is_ready()
                code = server.stop()
                run["shutdown_code"] = code
            results[label] = run
    finally:
        shutil.rmtree(work, ignore_errors=True)

    latency = results["dynamic_batching"]["latency"]
    overhead = latency["p50_ms"] / in_process["ranker_score"]["p50_ms"]
    result = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "torch_threads": in_process["torch_threads"]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "requests": {"users": len({u for u, _ in requests}), "candidates": args.candidates},
        "in_process": in_process,
        "triton": results,
        "triton_over_in_process_p50": round(overhead, 3),
        "load_failed_requests": results["dynamic_batching"]["load"]["failed"],
        "seconds": round(time.time() - started, 1),
    }

    print(f"\n1 user x {args.candidates} candidates, {os.cpu_count()} CPUs, torch threads {in_process['torch_threads']}")
    rows = [("in-process RankerModel.score", in_process["ranker_score"]),
            ("in-process serving steps", in_process["serving_steps"]),
            ("Triton, 1 client", latency)]
    for label in ("dynamic_batching", "no_batching"):
        rows.append((f"Triton, {args.clients} clients, {label.replace('_', ' ')}", results[label]["throughput"]))
    rows.append((f"load run {args.load_seconds:.0f} s, {args.clients} clients", results["dynamic_batching"]["load"]))
    def cells(name: str, r: dict) -> tuple:
        milliseconds = [f"{r[k]:.0f}" if r.get(k) is not None else "-" for k in ("p50_ms", "p99_ms")]
        rate = f"{r['requests_per_s']:.2f}" if "requests_per_s" in r else "-"
        return (name, r.get("completed", r.get("requests")), *milliseconds, rate, r.get("failed", 0))

    print("\n".join(markdown_table(["measurement", "requests", "p50 ms", "p99 ms", "req/s", "failed"],
                                   [cells(name, r) for name, r in rows])))
    print(f"Triton p50 / in-process p50: {overhead:.3f}x; ranker executions vs requests with dynamic batching: "
          f"{results['dynamic_batching']['ranker_stats']}")
    return write_json(args.out, result)


if __name__ == "__main__":
    main()
