"""Benchmark: shared-prefix single-pass P(yes) scoring vs generate() per candidate, and roofline.

For one user and 1 + N candidates (default 1 + 20, as in the paper's test protocol), each with
its picture shown as 49 image tokens, it times three ways of getting P(yes):

* ``generate``: ``generate(max_new_tokens=30)`` per candidate, P(yes) from the first step's
  logits (the authors' evaluation code);
* ``forward``: one full forward per candidate;
* ``shared``: the ranker's scorer: the user prefix once, its KV cache repeated over all
  candidates, the candidates in one batch, lm_head only on the answer rows.

and checks that the three give the same probabilities (max |dp|). It then measures the forward
throughput against this machine's matmul roofline: ``2 * params * tokens`` (non-embedding
parameters of the language model, LoRA included) divided by the time, compared with the
FLOP/s of a large ``torch.mm`` measured in the same run, in the model's dtype.

Targets (issue 4): shared >= 5x faster than generate, max |dp| < 1e-4 (fp32), forward >= 60%
of the roofline. Timings are only meaningful on a quiet machine.

Usage::

    python -m benchmarks.bench_scoring                       # 1 + 20 candidates, embedded model
    python -m benchmarks.bench_scoring --negatives 4 --max-new-tokens 5 --repeats 1   # smoke run

Writes ``benchmarks/speed/scoring.json`` (committed; ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from benchmarks.common import SPEED_RESULTS, write_json

SUMMARY = (
    "The user appears to have a preference for science fiction and space exploration films with "
    "strong visual effects, such as Star Wars, Alien and 2001: A Space Odyssey, and also enjoys "
    "classic crime dramas with complex characters, for example The Godfather and Pulp Fiction. "
    "They rate thoughtful, slow-paced films highly, but they tend to avoid romantic comedies and "
    "musicals. Recently they watched several documentaries about astronauts and the Apollo "
    "missions, which suggests a growing interest in real space history, photography of planets and "
    "stories about engineering achievements. They like strong coffee while watching late-night "
    "films and often pick titles with striking posters in dark colours."
)
TITLES = [
    "Apollo 13 (1995)", "Alien (1979)", "Notting Hill (1999)", "The Right Stuff (1983)",
    "Blade Runner (1982)", "Mamma Mia! (2008)", "Heat (1995)", "Gravity (2013)", "Amelie (2001)",
    "The Martian (2015)", "Casablanca (1942)", "Interstellar (2014)", "Grease (1978)",
    "Moon (2009)", "Se7en (1995)", "Solaris (1972)", "Love Actually (2003)", "Contact (1997)",
    "Goodfellas (1990)", "First Man (2018)", "Sunshine (2007)", "Chinatown (1974)",
]


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a size^3 matrix product (the roofline)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: torch.device):
    """(best seconds, last result) over ``repeats`` runs."""
    best, result = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def pictures(count: int):
    """Real photos (scikit-image samples) when available, else seeded synthetic images."""
    from PIL import Image

    try:
        from skimage import data

        base = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    except ImportError:
        rng = np.random.default_rng(0)
        base = [rng.integers(0, 255, (300, 400, 3), dtype=np.uint8) for _ in range(4)]
    images = []
    for index in range(count):
        array = base[index % len(base)]
        # Different crops, so items do not share features.
        shift = 7 * (index // len(base))
        images.append(Image.fromarray(np.ascontiguousarray(array[shift:, shift:])))
    return images


def language_model_params(ranker) -> int:
    """Non-embedding parameters the forward multiplies with (LoRA included, tied lm_head not)."""
    embedding = ranker.hf_model.get_input_embeddings().weight
    decoder = ranker.hf_model.get_decoder()
    return sum(p.numel() for p in decoder.parameters() if p is not embedding)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="'embedded' or an HF MLLM id/folder")
    parser.add_argument("--negatives", type=int, default=20, help="candidates besides the positive")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="generate() length (authors: 30)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per way (best is kept)")
    parser.add_argument("--batch-size", type=int, default=0, help="candidates per forward (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--prompt-version", default="2",
                        help="ranker prompt layout: '2' (what train's default, groups, uses) or '1'")
    parser.add_argument("--skip-forward-per-candidate", action="store_true")
    parser.add_argument("--out", default=str(SPEED_RESULTS / "scoring.json"))
    return parser.parse_args(argv)


def print_report(result: dict) -> None:
    """The run's table: each way's time, speed-up over ``generate()`` and max |dp|; the roofline shares."""
    setup, machine, roof = result["setup"], result["machine"], result["roofline"]
    print(f"\n{setup['candidates']} candidates ({setup['image_tokens_per_candidate']} image tokens each), "
          f"prefix {setup['prefix_tokens']} tokens, candidate part {setup['candidate_tokens_mean']:.0f} tokens; "
          f"{machine['device']} {machine['dtype']}, {machine['threads']} threads")
    print(f"{'way':<10}{'seconds':>10}{'speedup':>10}{'max |dp|':>12}")
    for name in ("generate", "forward", "shared"):
        if name in result["ways"]:
            way = result["ways"][name]
            print(f"{name:<10}{way['seconds']:>10.3f}{way['speedup_vs_generate']:>9.2f}x"
                  f"{way['max_abs_dp_vs_generate']:>12.2e}")
    print(f"\nmatmul roofline {roof['matmul_gflops']:.1f} GFLOP/s; forward {roof['forward_gflops']:.1f} GFLOP/s "
          f"= {100 * roof['forward_fraction']:.0f}% ({roof['forward_padded_tokens']} tokens, "
          f"{setup['language_model_params'] / 1e6:.1f}M params); "
          f"shared scoring {roof['shared_scoring_gflops']:.1f} GFLOP/s = {100 * roof['shared_scoring_fraction']:.0f}%")
    print("targets:", json.dumps(result["targets"]))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from merlin_mllm.models.loading import default_device, default_dtype
    from merlin_mllm.ranker import Candidate, ItemImageFeatures, RankerModel

    device = torch.device(args.device) if args.device else default_device()
    dtype = default_dtype(device)
    count = args.negatives + 1
    images = pictures(count)
    titles = [TITLES[i % len(TITLES)] for i in range(count)]
    if args.model == "embedded":
        table = ItemImageFeatures.from_images(list(range(count)), images, progress=False)
        ranker = RankerModel.build("embedded", item_features=table, device=device, dtype=dtype,
                                   prompt_version=args.prompt_version)
        candidates = [Candidate(title, item_id=i) for i, title in enumerate(titles)]
    else:
        ranker = RankerModel.build(args.model, device=device, dtype=dtype, prompt_version=args.prompt_version)
        candidates = [Candidate(title, image=image) for title, image in zip(titles, images)]
    batch_size = args.batch_size or count

    # Untrained LoRA is the identity (B = 0); give it seeded values so the adapters compute.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in ranker.named_parameters():
            if "lora_B" in name:
                parameter.copy_((torch.randn(parameter.shape, generator=generator) * 0.02).to(parameter))

    prompts, _, _ = ranker.encode([SUMMARY] * count, candidates)
    prefix_tokens = prompts[0].prefix_len
    candidate_tokens = [len(p.input_ids) - p.prefix_len for p in prompts]
    image_tokens = [p.input_ids.count(ranker.image_token_id) for p in prompts] if ranker.image_token_id is not None else []

    ranker.score(SUMMARY, candidates[:2])  # warm-up (allocator, kernels, template compile)
    rows = {}
    shared_s, shared = timed(lambda: ranker.score(SUMMARY, candidates, batch_size=batch_size), args.repeats, device)
    rows["shared"] = {"seconds": shared_s, "scores": shared}
    if not args.skip_forward_per_candidate:
        forward_s, forward = timed(lambda: ranker.score_independent(SUMMARY, candidates), 1, device)
        rows["forward"] = {"seconds": forward_s, "scores": forward}
    generate_s, (generated, new_tokens) = timed(
        lambda: ranker.score_generate(SUMMARY, candidates, max_new_tokens=args.max_new_tokens), 1, device)
    rows["generate"] = {"seconds": generate_s, "scores": generated, "new_tokens": new_tokens}

    # Forward throughput: one batch of all full prompts (no cache) through the ranker.
    batch = ranker.make_batch([SUMMARY] * count, candidates)
    batch_tokens = int(batch["attention_mask"].sum())
    padded_tokens = int(batch["attention_mask"].numel())
    with torch.inference_mode():
        ranker(**batch)
        batch_s, _ = timed(lambda: ranker(**batch), args.repeats, device)
    params = language_model_params(ranker)
    roofline = matmul_flops(device, dtype)
    forward_flops = 2 * params * padded_tokens / batch_s  # padding is computed too
    shared_tokens = prefix_tokens + sum(candidate_tokens)
    shared_flops = 2 * params * shared_tokens / shared_s

    reference = rows["generate"]["scores"]
    result = {
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        },
        "setup": {
            "model": args.model, "prompt_version": args.prompt_version, "candidates": count,
            "prefix_tokens": prefix_tokens,
            "candidate_tokens_mean": float(np.mean(candidate_tokens)),
            "image_tokens_per_candidate": image_tokens[:1] and image_tokens[0],
            "max_new_tokens": args.max_new_tokens, "batch_size": batch_size, "repeats": args.repeats,
            "language_model_params": params,
        },
        "ways": {
            name: {
                "seconds": row["seconds"],
                "speedup_vs_generate": rows["generate"]["seconds"] / row["seconds"],
                "max_abs_dp_vs_generate": float(np.abs(row["scores"] - reference).max()),
                **({"new_tokens": row["new_tokens"]} if "new_tokens" in row else {}),
            }
            for name, row in rows.items()
        },
        "roofline": {
            "matmul_gflops": roofline / 1e9,
            "forward_batch_tokens": batch_tokens, "forward_padded_tokens": padded_tokens,
            "forward_seconds": batch_s, "forward_gflops": forward_flops / 1e9,
            "forward_fraction": forward_flops / roofline,
            "shared_scoring_tokens": shared_tokens, "shared_scoring_gflops": shared_flops / 1e9,
            "shared_scoring_fraction": shared_flops / roofline,
        },
    }
    speedup = result["ways"]["shared"]["speedup_vs_generate"]
    max_dp = max(w["max_abs_dp_vs_generate"] for w in result["ways"].values())
    result["targets"] = {
        "speedup_at_least_5x": speedup >= 5.0,
        "max_abs_dp_below_1e-4": max_dp < 1e-4 if dtype == torch.float32 else None,
        "forward_at_least_60pct_roofline": result["roofline"]["forward_fraction"] >= 0.60,
    }

    print_report(result)
    return write_json(args.out, result)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
