"""Shared-prefix P(yes) scoring equals independent single-candidate scoring (fp32, < 1e-4).

The scorer runs the user prefix once, repeats its KV cache over a batch of candidates and
computes only the candidates' tokens (title, image tokens, question). Each test compares that
with one full forward per candidate (no cache, no padding, batch of 1), on real models: the
embedded SmolLM2 + EfficientNet-Lite0 (with and without image tokens) and tiny random
LLaVA-NeXT, Qwen2-VL and Idefics3. Candidate lists mix images of different sizes, items
without images and titles of different lengths, and are scored in batches smaller than the
list, so padding, several batches and cache reuse are all exercised. LoRA weights are set to
random values so the adapters take part in both paths.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from merlin_mllm.models.tiny import tiny_mllm_path  # noqa: E402
from merlin_mllm.models.vision import TOKEN_DIM  # noqa: E402
from merlin_mllm.ranker import Candidate, ItemImageFeatures, RankerModel  # noqa: E402

TOLERANCE = 1e-4
SUMMARY = "The user appears to have a preference for cats, strong coffee and space documentaries."


def randomize_lora(ranker: RankerModel, seed: int = 1, scale: float = 0.05) -> None:
    """Give LoRA's B matrices (zero at init) seeded random values, so the adapters matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in ranker.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def photos():
    return {
        "cat": Image.fromarray(skimage_data.chelsea()),
        "coffee": Image.fromarray(skimage_data.coffee()),
        "astronaut": Image.fromarray(skimage_data.astronaut()),
        "tall": Image.fromarray(skimage_data.coffee()).resize((48, 120)),
    }


@pytest.fixture(scope="module")
def item_table(photos):
    # Item 3 has no picture: its prompt has no image tokens.
    return ItemImageFeatures.from_images(
        [1, 2, 3, 4], [photos["cat"], photos["coffee"], None, photos["astronaut"]], progress=False
    )


@pytest.fixture(scope="module")
def embedded_ranker(item_table):
    ranker = RankerModel.build("embedded", item_features=item_table, device="cpu")
    randomize_lora(ranker)
    return ranker


def embedded_candidates():
    return [
        Candidate("Cat scratching post", item_id=1),
        Candidate("Espresso cup, porcelain, set of two, dishwasher safe", item_id=2),
        Candidate("A book without a picture", item_id=3),
        Candidate("Astronaut poster", item_id=4),
        "Plain title, no item id",
    ]


def assert_matches_independent(ranker, candidates, batch_size):
    shared = ranker.score(SUMMARY, candidates, batch_size=batch_size)
    independent = ranker.score_independent(SUMMARY, candidates)
    assert shared.shape == (len(candidates),)
    assert np.all((shared > 0) & (shared < 1))
    assert np.abs(shared - independent).max() < TOLERANCE, (shared, independent)
    # Different candidates get different scores: the match is not a constant.
    assert np.ptp(independent) > 1e-4, independent
    return shared


def test_embedded_with_images_matches_independent(embedded_ranker):
    candidates = embedded_candidates()
    prompts, grids, _ = embedded_ranker.encode([SUMMARY] * len(candidates), candidates)
    # Items 1, 2, 4 show 49 image tokens each, in the candidate part; items 3 and 5 none.
    image_id = embedded_ranker.image_token_id
    assert [p.input_ids.count(image_id) for p in prompts] == [49, 49, 0, 49, 0]
    assert grids.shape == (3, 49, TOKEN_DIM)
    # The user part is one token prefix, identical for every candidate.
    prefix = prompts[0].prefix_len
    assert prefix > 20 and all(p.input_ids[:prefix] == prompts[0].input_ids[:prefix] for p in prompts)
    assert all(image_id not in p.input_ids[:prefix] for p in prompts)
    assert_matches_independent(embedded_ranker, candidates, batch_size=2)


def test_embedded_images_change_the_score(embedded_ranker, photos):
    # The same title with and without its picture scores differently: image tokens are used.
    with_image = embedded_ranker.score(SUMMARY, [Candidate("Item", item_id=1)])
    without = embedded_ranker.score(SUMMARY, [Candidate("Item")])
    assert abs(with_image[0] - without[0]) > 1e-4
    # A picture given directly (no item id) is encoded on the fly, with the same result.
    direct = embedded_ranker.score(SUMMARY, [Candidate("Item", image=photos["cat"])])
    assert abs(direct[0] - with_image[0]) < 1e-3  # table grids are stored in float16


def test_embedded_scores_do_not_depend_on_order_or_batch(embedded_ranker):
    candidates = embedded_candidates()
    forward = embedded_ranker.score(SUMMARY, candidates, batch_size=5)
    backward = embedded_ranker.score(SUMMARY, candidates[::-1], batch_size=3)
    assert np.abs(forward - backward[::-1]).max() < TOLERANCE


def test_token_id_scoring_matches_text_scoring(embedded_ranker):
    """What a Merlin pipeline delivers (token ids + item ids) scores like the text API."""
    candidates = embedded_candidates()[:4]
    prompts, _, _ = embedded_ranker.encode([SUMMARY] * 4, candidates)
    from_ids = embedded_ranker.score_token_ids([p.input_ids for p in prompts], item_ids=[1, 2, 3, 4], batch_size=3)
    from_text = embedded_ranker.score(SUMMARY, candidates)
    assert np.abs(from_ids - from_text).max() < TOLERANCE


def test_generate_first_step_gives_the_same_scores(embedded_ranker):
    """The authors' way (generate() per candidate, first-step logits) agrees with one forward."""
    candidates = embedded_candidates()[:2]
    generated, new_tokens = embedded_ranker.score_generate(SUMMARY, candidates, max_new_tokens=1)
    assert new_tokens == 2
    assert np.abs(generated - embedded_ranker.score(SUMMARY, candidates)).max() < TOLERANCE


def test_embedded_text_only_matches_independent():
    ranker = RankerModel.build("embedded", use_images=False, device="cpu")
    randomize_lora(ranker, seed=2)
    assert ranker.projector is None and ranker.prompt.image_mode == "none"
    candidates = embedded_candidates()
    prompts, grids, _ = ranker.encode([SUMMARY] * len(candidates), candidates)
    assert grids is None and all(not p.has_image for p in prompts)
    assert_matches_independent(ranker, candidates, batch_size=2)


@pytest.mark.parametrize("arch", ["llava_next", "qwen2_vl", "idefics3"])
def test_tiny_mllm_with_images_matches_independent(arch, photos):
    ranker = RankerModel.build(str(tiny_mllm_path(arch)), device="cpu")
    randomize_lora(ranker, seed=3, scale=0.3)
    candidates = [
        Candidate("Cat scratching post", image=photos["cat"]),
        Candidate("Espresso cup with a much longer title than the others", image=photos["coffee"]),
        "A book without a picture",
        Candidate("Tall picture", image=photos["tall"]),
    ]
    prompts, _, image_inputs = ranker.encode([SUMMARY] * len(candidates), candidates)
    image_id = ranker.image_token_id
    counts = [p.input_ids.count(image_id) for p in prompts]
    assert counts[2] == 0 and min(counts[0], counts[1], counts[3]) > 0
    assert "pixel_values" in image_inputs
    prefix = prompts[0].prefix_len
    assert prefix > 20 and all(p.input_ids[:prefix] == prompts[0].input_ids[:prefix] for p in prompts)
    assert all(image_id not in p.input_ids[:prefix] for p in prompts)
    assert_matches_independent(ranker, candidates, batch_size=3)


def test_merged_lora_scoring_restores_the_weights_bit_for_bit(embedded_ranker):
    """Scoring folds LoRA into copies of the weights; the originals come back unchanged."""
    layer = embedded_ranker.hf_model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    embedded_ranker.score(SUMMARY, embedded_candidates()[:2])
    assert embedded_ranker._merged_weights, "merged weights were not used"
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged
    # A LoRA update (optimizer-style, in place) invalidates the merged copy.
    key = embedded_ranker._merged_key
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(1.0)
    embedded_ranker.score(SUMMARY, embedded_candidates()[:1])
    assert embedded_ranker._merged_key != key
