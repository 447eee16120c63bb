"""The embedded EfficientNet-Lite0 encoder on real photos (scikit-image samples).

The reference numbers (chelsea -> Egyptian cat 0.77, coffee -> espresso 0.90) are what timm's
``tf_efficientnet_lite0`` gives with these weights; they fail if padding, BN eps, resizing or
normalisation drift.
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from merlin_mllm.models.vision import COLOUR_PALETTE, VisionEncoder, cell_colour_features, dominant_colours  # noqa: E402


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    return VisionEncoder.load(device="cpu")


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(skimage_data.chelsea())


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(skimage_data.coffee())


def test_load_is_cached_per_device(encoder):
    assert VisionEncoder.load(device="cpu") is encoder
    assert encoder.device == torch.device("cpu")
    assert not encoder.training
    assert len(encoder.labels) == 1000 and encoder.labels[285] == "Egyptian cat"


def test_preprocess_shape_and_range(encoder, chelsea, coffee):
    pixels = encoder.preprocess([chelsea, coffee])
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() < -0.9 and 0.9 < pixels.max() <= 1.0
    # A uniform mid-grey image maps to ~0 in every channel: (x - 0.5) / 0.5.
    grey = encoder.preprocess(Image.new("RGB", (50, 30), (128, 128, 128)))
    assert grey.shape == (1, 3, 224, 224)
    assert torch.allclose(grey, torch.full_like(grey, (128 / 255 - 0.5) / 0.5), atol=1e-6)


def test_chelsea_is_an_egyptian_cat(encoder, chelsea):
    (labels,) = encoder.top_labels([chelsea], k=5)
    assert len(labels) == 5
    name, prob = labels[0]
    assert name == "Egyptian cat"
    # Tighter than bilinear resizing would pass (0.794): bicubic is what the reference used.
    assert prob == pytest.approx(0.77, abs=0.01)
    assert {"tabby", "tiger cat", "Persian cat", "Siamese cat"} & {n for n, _ in labels[1:]}
    probs = [p for _, p in labels]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6


def test_coffee_is_espresso_from_any_source(encoder, coffee, tmp_path):
    path = tmp_path / "coffee.png"
    coffee.save(path)
    buffer = io.BytesIO()
    coffee.save(buffer, format="PNG")
    results = encoder.top_labels([coffee, path, buffer.getvalue(), skimage_data.coffee()], k=3)
    for labels in results:
        assert labels[0][0] == "espresso"
        assert labels[0][1] == pytest.approx(0.90, abs=0.03)
        assert len(labels) == 3


def test_logits_match_the_reference_network(encoder, chelsea, coffee):
    # Our pooled -> classifier path must equal the reference package's own forward().
    with torch.inference_mode():
        reference = encoder.network(encoder.preprocess([chelsea, coffee]))
    assert torch.allclose(encoder.logits([chelsea, coffee]), reference, atol=1e-4)


def test_grid_tokens_and_pooled_relation(encoder, chelsea, coffee):
    grid = encoder.grid([chelsea, coffee])
    assert grid.shape == (2, 49, 1290)
    deep = grid[..., :1280]
    # Tokens are the 7x7 map in row-major order.
    with torch.inference_mode():
        feature_map = encoder.network.extract_features(encoder.preprocess([chelsea, coffee]))
    assert torch.equal(deep[:, 7 * 2 + 5], feature_map[:, :, 2, 5])
    # pooled is global average pooling of that map: exactly the deep features' token mean.
    pooled = encoder.pooled([chelsea, coffee])
    assert pooled.shape == (2, 1280)
    assert torch.allclose(pooled, deep.mean(dim=1), atol=1e-6)
    # The head ends in ReLU6, so features are bounded; the two photos must differ.
    assert deep.min() >= 0 and deep.max() <= 6
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-2)
    # The colour part: mean RGB in [0, 1], and hue/grey shares that sum to 1 in every cell.
    colour = grid[..., 1280:]
    assert colour[..., :3].min() >= 0 and colour[..., :3].max() <= 1
    assert torch.allclose(colour[..., 3:].sum(dim=-1), torch.ones(2, 49), atol=1e-5)


def test_colour_features_see_what_the_deep_features_do_not():
    """Cells of a red/blue image name their hue; the mean colour follows the pixels."""
    pixels = np.zeros((224, 224, 3), dtype=np.uint8)
    pixels[:, :112] = (230, 40, 30)    # red left half (hue 3 degrees: sector 0)
    pixels[:, 112:] = (30, 60, 220)    # blue right half (hue 229 degrees: sector 3)
    pixels[:32, :32] = (128, 128, 128)  # one grey cell
    encoder_input = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1
    cells = cell_colour_features(encoder_input)[0]  # (49, 10)
    assert cells.shape == (49, 10)
    grey_cell, red_cell, blue_cell = cells[0], cells[1], cells[6]
    assert grey_cell[9] == 1.0 and grey_cell[3:9].sum() == 0
    assert red_cell[3] == 1.0 and abs(red_cell[0].item() - 230 / 255) < 1e-3
    assert blue_cell[6] == 1.0 and blue_cell[2] > blue_cell[0]
    # The cell on the border (x 96..128) is half red, half blue.
    assert torch.allclose(cells[3][[3, 6]], torch.tensor([0.5, 0.5]))


def test_batch_equals_single_images(encoder, chelsea, coffee):
    together = encoder.grid([chelsea, coffee])
    alone = torch.cat([encoder.grid(chelsea), encoder.grid([coffee])])
    assert torch.allclose(together, alone, atol=1e-4)
    # batch_size only chunks the work.
    assert torch.allclose(encoder.grid([chelsea, coffee], batch_size=1), together, atol=1e-4)


def test_missing_image_in_batch_names_its_position(encoder, chelsea):
    with pytest.raises(ValueError, match="image 1 of the batch is missing"):
        encoder.pooled([chelsea, None])
    assert encoder.grid([]).shape == (0, 49, 1290)


def test_dominant_colours_of_synthetic_images():
    assert dominant_colours(Image.new("RGB", (30, 30), (255, 0, 0)))[0] == "red"
    half = np.full((40, 60, 3), 255, dtype=np.uint8)
    half[:, :30] = (0, 0, 255)
    colours = dominant_colours(half, k=3)
    assert set(colours) == {"blue", "white"}  # nothing else covers 5% of the pixels
    # Near-identical shades merge into one name rather than repeating it.
    shades = np.zeros((20, 20, 3), dtype=np.uint8)
    shades[:10] = (250, 5, 5)
    shades[10:] = (235, 15, 20)
    assert dominant_colours(shades) == ["red"]
    # The order follows pixel share: 3/4 green before 1/4 yellow.
    mixed = np.zeros((40, 40, 3), dtype=np.uint8)
    mixed[:] = (30, 160, 40)
    mixed[:10] = (255, 225, 0)
    assert dominant_colours(mixed) == ["green", "yellow"]
    assert VisionEncoder.dominant_colours(mixed, k=1) == ["green"]
    # Every palette colour names itself.
    for name, rgb in COLOUR_PALETTE:
        assert dominant_colours(Image.new("RGB", (4, 4), rgb)) == [name]


def test_describe_combines_labels_and_colours(encoder, chelsea, coffee):
    cat, cup = encoder.describe_batch([chelsea, coffee], k=3)
    assert cat.startswith("looks like: Egyptian cat")
    assert "tabby" in cat and "; colours: " in cat
    # Labels under 5% are dropped: coffee's runner-up 'cup' has ~3.5%.
    assert cup.startswith("looks like: espresso;")
    colours = cat.split("; colours: ")[1].split(", ")
    assert colours == dominant_colours(chelsea, k=3) and 1 <= len(colours) <= 3
    assert encoder.describe(chelsea) == cat
