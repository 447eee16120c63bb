"""Tiny random LLaVA-NeXT, Qwen2-VL and Idefics3 models: built offline, loaded through
``merlin_mllm.models.load``, and run on real photos through the real Hugging Face code paths."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skimage_data

from merlin_mllm.models import load
from merlin_mllm.models import embedded
from merlin_mllm.models.tiny import TINY_ARCHS, build_tiny_mllm, tiny_mllm_path

MODEL_CLASS = {
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
}


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request, tmp_path_factory):
    folder = build_tiny_mllm(request.param, tmp_path_factory.mktemp(request.param) / "model")
    loaded = load(folder, device="cpu")
    return request.param, folder, loaded


@pytest.fixture(scope="module")
def cat():
    return Image.fromarray(skimage_data.chelsea())  # 451 x 300 photo


@pytest.fixture(scope="module")
def coffee():
    return Image.fromarray(skimage_data.coffee())  # 600 x 400 photo


def image_message(image, text):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def encode(processor, messages):
    """Chat template, image loading and tokenisation in one call (the processor's own route)."""
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


class ImageFeatureCounter:
    """Wraps the model's vision path to count the image feature rows it hands the LLM."""

    def __init__(self, model):
        self.rows = []
        self.inner = model.model.get_image_features
        model.model.get_image_features = self

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.rows.append(sum(int(f.shape[0]) for f in out.pooler_output))
        return out


def test_loads_as_mllm_of_the_real_architecture(tiny):
    arch, folder, loaded = tiny
    assert loaded.kind == "mllm"
    assert type(loaded.model).__name__ == MODEL_CLASS[arch]
    assert json.loads((folder / "tiny_mllm.json").read_text())["arch"] == arch
    # Every added special token has an embedding row, and the image token is one of them.
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    assert vocab == len(loaded.tokenizer)
    assert loaded.processor.image_token_id == loaded.model.config.image_token_id
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.processor.image_token_id) == loaded.processor.image_token
    assert loaded.tokenizer.padding_side == "left"
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert n_params < 5_000_000, n_params  # tiny: mostly the 49k x 64 embedding table


def test_forward_uses_every_image_token_and_the_image(tiny, cat, coffee):
    arch, _, loaded = tiny
    model, processor = loaded.model, loaded.processor
    counter = ImageFeatureCounter(model)
    try:
        enc = encode(processor, image_message(cat, "Describe this item."))
        with torch.no_grad():
            logits = model(**enc).logits
        vocab = len(loaded.tokenizer)
        assert logits.shape == (1, enc["input_ids"].shape[1], vocab)
        assert torch.isfinite(logits).all()
        n_image_tokens = int((enc["input_ids"] == processor.image_token_id).sum())
        assert n_image_tokens > 1
        assert counter.rows == [n_image_tokens]

        other = encode(processor, image_message(coffee, "Describe this item."))
        with torch.no_grad():
            other_logits = model(**other).logits
        assert counter.rows[-1] == int((other["input_ids"] == processor.image_token_id).sum())
        # Same text, another photo: the answer position must see the difference.
        change = (logits[0, -1] - other_logits[0, -1]).abs().max().item()
        assert change > 1e-4, change
    finally:
        del model.model.get_image_features  # back to the class method


def test_batched_left_padded_forward_matches_single(tiny, cat, coffee):
    _, _, loaded = tiny
    model, processor = loaded.model, loaded.processor
    prompts = [
        image_message(cat, "Describe it."),
        image_message(coffee, "Would this user, who likes tea, cats and long walks, like this item?"),
    ]
    # The two-step route: render the template to text, then process text and images together.
    texts = [processor.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    batch = processor(text=texts, images=[cat, coffee], padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert mask.shape[0] == 2
    lengths = mask.sum(1).tolist()
    assert lengths[0] != lengths[1]
    short = int(np.argmin(lengths))
    assert mask[short, 0] == 0 and mask[short, -1] == 1  # padded on the left
    with torch.no_grad():
        batch_logits = model(**batch).logits
    assert batch_logits.shape[:2] == mask.shape and torch.isfinite(batch_logits).all()
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            single = model(**encode(processor, [prompt])).logits
        torch.testing.assert_close(batch_logits[row, -1], single[0, -1], atol=1e-4, rtol=1e-4)


def test_greedy_generate_three_tokens(tiny, cat):
    _, _, loaded = tiny
    model, processor = loaded.model, loaded.processor
    enc = encode(processor, image_message(cat, "Describe this item."))
    with torch.no_grad():
        first = model(**enc).logits[0, -1].argmax().item()
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    prompt_len = enc["input_ids"].shape[1]
    assert out.shape == (1, prompt_len + 3)
    assert torch.equal(out[0, :prompt_len], enc["input_ids"][0])
    assert out[0, prompt_len].item() == first  # greedy = argmax of the forward pass


def test_build_is_seeded_and_cached(tmp_path):
    first = build_tiny_mllm("llava_next", tmp_path / "a", seed=3)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_mllm("llava_next", first, seed=3) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt

    again = load_file(build_tiny_mllm("llava_next", tmp_path / "b", seed=3) / "model.safetensors")
    weights = load_file(first / "model.safetensors")
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)

    # Another seed in the same folder replaces the build with different weights.
    build_tiny_mllm("llava_next", first, seed=4)
    reseeded = load_file(first / "model.safetensors")
    assert json.loads((first / "tiny_mllm.json").read_text())["seed"] == 4
    assert any(not torch.equal(weights[k], reseeded[k]) for k in weights if weights[k].numel() > 1)


def test_cache_path_builds_once():
    folder = tiny_mllm_path("qwen2_vl", seed=0)
    assert folder.parent == embedded.cache_dir()
    assert json.loads((folder / "tiny_mllm.json").read_text())["arch"] == "qwen2_vl"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert tiny_mllm_path("qwen2_vl", seed=0) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny MLLM architecture 'llava'"):
        build_tiny_mllm("llava", tmp_path / "x")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="occupied"):
        build_tiny_mllm("qwen2_vl", occupied)
    assert (occupied / "notes.txt").read_text() == "mine"
