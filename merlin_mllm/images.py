"""Loading item images from paths, raw bytes or PIL images into RGB PIL images.

Item tables hold images in several forms: a file path, the encoded bytes (e.g. a parquet
``binary`` column, or the ``bytes`` Triton hands to python models), an already decoded PIL image
or a numpy array. :func:`load_image` turns any of them into one fully decoded RGB image, so a
corrupt file fails here, with its name, rather than deep inside a model.

A missing image (``None``, NaN, an empty string or empty bytes) is not an error: it returns
``None`` and the caller counts it (many catalogue items have no picture).

Usage::

    from merlin_mllm.images import load_image, ImageLoadError

    image = load_image("data/items/42.jpg")        # PIL.Image.Image, mode "RGB"
    image = load_image(row["image_bytes"])         # same, from encoded bytes
    assert load_image(None) is None                # missing: the caller counts it
"""
from __future__ import annotations

import io
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageLoadError", "load_image", "is_missing"]

# Colour behind transparent pixels: product photos with an alpha channel are drawn on white,
# and converting them straight to RGB would show whatever colour hides under alpha=0.
_BACKGROUND = (255, 255, 255)


class ImageLoadError(ValueError):
    """An image could not be read or decoded.

    ``source`` names what was being loaded (a path, or ``"<N bytes>"``) and ``reason`` says why.
    """

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot load image from {source}: {reason}")


def describe_source(source: Any) -> str:
    """A short name for an image source, for error messages (never the bytes themselves)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{memoryview(source).nbytes} bytes>"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, np.ndarray):
        return f"<array of shape {source.shape}>"
    return f"<{type(source).__name__}>"


def is_missing(source: Any) -> bool:
    """True for the values that mean "this item has no image": None, NaN, pd.NA, "" and b""."""
    if source is None:
        return True
    if isinstance(source, float) and math.isnan(source):
        return True
    if isinstance(source, np.floating) and np.isnan(source):
        return True
    if isinstance(source, str) and not source.strip():
        return True
    if isinstance(source, (bytes, bytearray, memoryview)) and memoryview(source).nbytes == 0:
        return True
    pandas = sys.modules.get("pandas")  # only check pd.NA / NaT when pandas is in use anyway
    if pandas is not None and (source is pandas.NA or source is pandas.NaT):
        return True
    return False


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of ``image``, with transparent areas drawn on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, _BACKGROUND)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float greyscale: scale to 0-255 first, or convert("RGB") clips to white.
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.size else 0.0
        scale = 255.0 / top if top > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def _decode(opener, name: str) -> Image.Image:
    """Open and fully decode an image; every decoder failure becomes an ImageLoadError."""
    try:
        with opener() as handle:
            image = Image.open(handle)
            # load() decodes all pixel data now, so truncated or corrupt files fail here.
            image.load()
            # Phone photos store their rotation in EXIF; apply it so content is upright.
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(name, f"image too large ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(name, "not a recognised image format") from exc
    except FileNotFoundError as exc:
        raise ImageLoadError(name, "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(name, "is a directory, not an image file") from exc
    except PermissionError as exc:
        raise ImageLoadError(name, "permission denied") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports broken data as OSError ("image file is truncated"), SyntaxError or
        # ValueError depending on the plugin.
        raise ImageLoadError(name, f"corrupt or truncated image ({exc})") from exc


def load_image(source: Any) -> Optional[Image.Image]:
    """Load one image as a fully decoded RGB ``PIL.Image.Image``.

    Parameters
    ----------
    source : str, pathlib.Path, bytes, bytearray, memoryview, PIL.Image.Image, numpy.ndarray or None
        A file path; the encoded file bytes (JPEG, PNG, WebP, ...); a PIL image (converted to
        RGB, transparency on white); or a ``uint8`` array of shape (H, W), (H, W, 3) or
        (H, W, 4). ``None``, NaN, ``pd.NA``, an empty/blank string and empty bytes mean
        "no image".

    Returns
    -------
    PIL.Image.Image or None
        The RGB image (EXIF rotation applied), or ``None`` when ``source`` is missing.

    Raises
    ------
    ImageLoadError
        The file does not exist, or the data is not a decodable image (corrupt, truncated,
        unknown format). The message names the path, or ``<N bytes>`` for raw bytes.
    TypeError
        ``source`` is of a type that cannot hold an image.

    Examples
    --------
    >>> load_image(None) is None
    True
    """
    if is_missing(source):
        return None
    if isinstance(source, Image.Image):
        try:
            source.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError(describe_source(source), f"corrupt or truncated image ({exc})") from exc
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _decode(lambda: io.BytesIO(data), describe_source(source))
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, str) and path.startswith(("http://", "https://")):
            raise ImageLoadError(path, "URLs are not downloaded; fetch the images to files first")
        return _decode(lambda: open(Path(path), "rb"), str(path))
    raise TypeError(
        f"cannot load an image from a {type(source).__name__}; pass a path, bytes, "
        "a PIL image or a uint8 array"
    )


def _from_array(array: np.ndarray) -> Image.Image:
    name = describe_source(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(name, "expected an array of shape (H, W), (H, W, 3) or (H, W, 4)")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and np.nanmax(array) <= 1.0:
            array = array * 255.0  # skimage-style floats in [0, 1]
        array = np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))
