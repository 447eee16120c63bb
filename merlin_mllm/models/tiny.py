"""Tiny random instances of real MLLM architectures, built offline from configs.

Tests (and quick experiments) need a multimodal model that runs the real Hugging Face code
paths of LLaVA-NeXT, Qwen2-VL and Idefics3/SmolVLM, with no download and in well under a second
per forward pass on a CPU. ``build_tiny_mllm`` writes such a model as a normal Hugging Face
folder: seeded random weights, config, image processor, tokenizer and chat template. The
folder loads with ``merlin_mllm.models.load(folder)`` as kind ``"mllm"``
(``AutoModelForImageTextToText`` + ``AutoProcessor``).

The tokenizer is SmolLM2's (the embedded model, see :mod:`merlin_mllm.models.embedded`; its
first use converts the GGUF once, about 20 s) plus the special tokens each architecture needs. The text backbone has hidden size 64, 2 layers and
4 attention heads; the vision towers see images of at most 64 px. The weights are random, so
the outputs are meaningless: these models check plumbing (image tokens, padding, generation,
LoRA), not quality.

Every prompt uses a ChatML chat template (SmolLM2's own format), where an ``{"type": "image"}``
content item becomes the architecture's image placeholder, which the processor then expands
into the right number of image tokens.

Usage
-----
>>> from merlin_mllm.models.tiny import build_tiny_mllm
>>> from merlin_mllm.models import load
>>> folder = build_tiny_mllm("qwen2_vl", "/tmp/tiny-qwen2-vl")
>>> loaded = load(folder)  # loaded.kind == "mllm"
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

from merlin_mllm.models import embedded

#: The architectures ``build_tiny_mllm`` can build.
TINY_ARCHS = ("llava_next", "qwen2_vl", "idefics3")

# Bump when a build changes, so stale folders (cache or tests) are rebuilt rather than reused.
_BUILD_VERSION = 1
# Written last into a finished build: its presence means the folder is complete.
_MARKER = "tiny_mllm.json"

# The shared text backbone: small enough that one forward pass takes milliseconds.
_TEXT_HIDDEN = 64
_TEXT_LAYERS = 2
_TEXT_HEADS = 4
_TEXT_KV_HEADS = 2
_TEXT_INTERMEDIATE = 128
# The vision towers of LLaVA-NeXT (CLIP) and Idefics3 (SigLIP) share one tiny size.
_VISION_SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

# ChatML, as SmolLM2 uses, with multimodal content lists. ``IMAGE_PLACEHOLDER`` is replaced per
# architecture by the text its processor expands into image tokens. String contents work too, so
# the tokenizer can share the template for text-only prompts.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ 'IMAGE_PLACEHOLDER' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _chat_template(image_placeholder: str) -> str:
    return _CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", image_placeholder)


def _text_config_kwargs(vocab_size: int, tokenizer) -> dict:
    """Llama-style text backbone settings shared by the three architectures."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=_TEXT_INTERMEDIATE,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=_TEXT_HEADS,
        num_key_value_heads=_TEXT_KV_HEADS,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _smollm2_tokenizer(extra_special_tokens):
    """SmolLM2's tokenizer with the architecture's special tokens added (before any processor
    is built from it: processors look their token ids up at construction)."""
    from transformers import AutoTokenizer

    # Left padding (saved with the tokenizer): batched generation and last-position scoring
    # both need the prompts to end at the same column.
    tokenizer = AutoTokenizer.from_pretrained(str(embedded.smollm2_path()), padding_side="left")
    tokenizer.add_tokens(list(extra_special_tokens), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _pil_image_processor(arch: str, name: str):
    """The PIL (no torchvision) image processor class of ``transformers.models.<arch>``.

    transformers 5 calls it ``<name>ImageProcessorPil`` (its plain name is the torchvision one);
    4.x calls it ``<name>ImageProcessor`` (its torchvision one is ``...Fast``).
    """
    import importlib

    try:
        module = importlib.import_module(f"transformers.models.{arch}.image_processing_pil_{arch}")
        return getattr(module, f"{name}ImageProcessorPil")
    except ModuleNotFoundError:
        module = importlib.import_module(f"transformers.models.{arch}.image_processing_{arch}")
        return getattr(module, f"{name}ImageProcessor")


def _build_llava_next():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )

    LlavaNextImageProcessorPil = _pil_image_processor("llava_next", "LlavaNext")

    tokenizer = _smollm2_tokenizer(["<image>"])
    image_size, patch_size = 32, 8
    # The processor tiles an image onto the best of these grids, so the model config and the
    # image processor must list the same ones.
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    vision_config = CLIPVisionConfig(**_VISION_SIZE, image_size=image_size, patch_size=patch_size, projection_dim=32)
    text_config = LlamaConfig(**_text_config_kwargs(len(tokenizer), tokenizer))
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        # "default" drops CLIP's CLS feature; the processor is told about the CLS below.
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=True,
    )
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        # CLIP adds a CLS feature; without this, the token count is off by one per tile.
        num_additional_image_tokens=1,
        chat_template=_chat_template("<image>"),
    )
    return model, processor


def _build_qwen2_vl():
    import transformers
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    Qwen2VLImageProcessorPil = _pil_image_processor("qwen2_vl", "Qwen2VL")

    from merlin_mllm.models.loading import processor_without_video

    # The video token is needed even for image-only use: the processor looks its id up.
    tokenizer = _smollm2_tokenizer(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    )
    patch_size, merge_size = 8, 2
    head_dim = _TEXT_HIDDEN // _TEXT_HEADS
    text_kwargs = _text_config_kwargs(len(tokenizer), tokenizer)
    # Multimodal RoPE splits each head's rotary half (head_dim / 2 frequencies) between the
    # temporal, height and width positions: the three sections must add up to head_dim / 2.
    text_kwargs["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
    }
    assert sum(text_kwargs["rope_parameters"]["mrope_section"]) == head_dim // 2
    if int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4.x names the same settings rope_scaling (the "mrope" type) and rope_theta.
        rope = text_kwargs.pop("rope_parameters")
        text_kwargs["rope_theta"] = rope["rope_theta"]
        text_kwargs["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    config = Qwen2VLConfig(
        text_config=text_kwargs,
        vision_config=dict(
            depth=2,
            embed_dim=32,
            # The patch merger projects straight into the text model's embedding space.
            hidden_size=_TEXT_HIDDEN,
            mlp_ratio=2,
            num_heads=4,
            patch_size=patch_size,
            spatial_merge_size=merge_size,
            temporal_patch_size=2,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    model = Qwen2VLForConditionalGeneration(config)
    # Images are resized to between 16x16 and 64x64 pixels (in multiples of 16 px), i.e.
    # 1 to 16 image tokens after the 2x2 merge.
    factor = patch_size * merge_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": factor * factor, "longest_edge": 64 * 64},
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
    )
    # Video processors need torchvision; the tiny models handle images and text only.
    processor = processor_without_video(Qwen2VLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=_chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    return model, processor


def _build_idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    Idefics3ImageProcessorPil = _pil_image_processor("idefics3", "Idefics3")

    # Every token the processor looks up must exist before it is built, else it caches the
    # unknown-token id for them.
    row_col = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer = _smollm2_tokenizer(
        ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *row_col]
    )
    tile, patch_size, scale_factor = 32, 8, 2
    # Each tile yields (tile/patch)^2 patches; pixel shuffle merges scale_factor^2 of them.
    image_seq_len = (tile // patch_size) ** 2 // scale_factor**2
    config = Idefics3Config(
        text_config=_text_config_kwargs(len(tokenizer), tokenizer) | {"model_type": "llama"},
        vision_config=dict(**_VISION_SIZE, image_size=tile, patch_size=patch_size),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
        tie_word_embeddings=True,
    )
    model = Idefics3ForConditionalGeneration(config)
    # Images are resized to at most 64 px and split into 32-px tiles (at most 2x2) plus one
    # global 32-px view.
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * tile},
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=_chat_template("<image>"),
    )
    return model, processor


_BUILDERS = {
    "llava_next": _build_llava_next,
    "qwen2_vl": _build_qwen2_vl,
    "idefics3": _build_idefics3,
}


def _read_marker(folder: Path):
    try:
        return json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def build_tiny_mllm(arch: str, out_dir: Union[str, os.PathLike], seed: int = 0) -> Path:
    """Write a tiny random MLLM of a real architecture into ``out_dir`` and return the folder.

    The folder holds ``model.safetensors``, ``config.json``, the processor and tokenizer files
    and a chat template; ``merlin_mllm.models.load(out_dir)`` loads it as an ``"mllm"``. The
    weights depend only on ``arch`` and ``seed`` (for a given transformers version). When ``out_dir`` already holds a finished
    build of the same ``arch``, ``seed`` and build version, it is returned as is (no rebuild).
    The build is written to a temporary sibling folder and renamed into place, so an
    interrupted build never leaves a half-written folder that looks finished.

    Parameters
    ----------
    arch : {"llava_next", "qwen2_vl", "idefics3"}
        The Hugging Face architecture: LLaVA-NeXT (CLIP + Llama), Qwen2-VL, or Idefics3
        (SmolVLM's architecture: SigLIP + Llama).
    out_dir : str or path
        The folder to write. It must not exist, be empty, or hold a previous tiny build.
    seed : int
        Seeds the random weights.

    Returns
    -------
    Path
        ``out_dir``.

    Examples
    --------
    >>> folder = build_tiny_mllm("llava_next", tmp_path / "tiny-llava")
    >>> loaded = merlin_mllm.models.load(folder)
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown tiny MLLM architecture {arch!r}; choose one of {TINY_ARCHS}")
    out_dir = Path(out_dir)
    wanted = {"arch": arch, "seed": int(seed), "build_version": _BUILD_VERSION}
    if out_dir.exists():
        found = _read_marker(out_dir)
        if found == wanted:
            return out_dir
        if found is None and any(out_dir.iterdir()):
            raise FileExistsError(
                f"{out_dir} is not empty and holds no tiny MLLM build ({_MARKER} missing); "
                "refusing to overwrite it"
            )

    import torch
    from transformers import set_seed

    set_seed(seed)  # the weights are drawn in the constructors below
    with torch.device("cpu"):
        model, processor = _BUILDERS[arch]()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    # The tokenizer gets the same template, so text-only prompts render the same way.
    processor.tokenizer.chat_template = processor.chat_template

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps(wanted))
        if out_dir.exists() and _read_marker(out_dir) != wanted:
            shutil.rmtree(out_dir)  # empty, or a build of another arch/seed/version
        try:
            os.replace(staging, out_dir)
        except OSError:
            # Another process (e.g. a parallel test worker) finished the same build first.
            if _read_marker(out_dir) != wanted:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def tiny_mllm_path(arch: str, seed: int = 0) -> Path:
    """A tiny MLLM of ``arch`` in the merlin-mllm cache, built on first use.

    Parameters
    ----------
    arch : {"llava_next", "qwen2_vl", "idefics3"}
    seed : int

    Examples
    --------
    >>> loaded = merlin_mllm.models.load(tiny_mllm_path("qwen2_vl"))
    """
    return build_tiny_mllm(
        arch, embedded.cache_dir() / f"tiny-{arch}-s{seed}-v{_BUILD_VERSION}-{embedded.saved_format()}", seed=seed
    )
