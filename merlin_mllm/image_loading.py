"""Loading item images from paths, raw bytes or PIL images into RGB PIL images.

Item tables hold images in several forms: a file path, the encoded bytes (e.g. a parquet
``binary`` column, or the ``bytes`` Triton hands to python models), an already decoded PIL image
or a numpy array. :func:`load_image` turns any of them into one fully decoded RGB image, so a
corrupt file fails here, with its name, rather than deep inside a model.

A missing image (``None``, NaN, an empty string or empty bytes) is not an error: it returns
``None`` and the caller counts it (many catalogue items have no picture).

Limits
------
Catalogue images are untrusted input, so the loader bounds what one image may cost:

* **pixels**: at most ``max_pixels`` (default :data:`DEFAULT_MAX_IMAGE_PIXELS`, 40 megapixels,
  about 120 MB decoded as RGB). The size is read from the file header, before any pixel data is
  decoded. Environment variable ``MERLIN_MLLM_MAX_IMAGE_PIXELS``.
* **file size**: at most ``max_bytes`` (default :data:`DEFAULT_MAX_IMAGE_BYTES`, 64 MiB) of
  encoded data, checked before the file is read. Environment variable
  ``MERLIN_MLLM_MAX_IMAGE_BYTES``.
* **paths**: with an image ``root``, a relative path must stay inside it (no ``..`` escape) and
  an absolute path must lie inside it, unless absolute paths are allowed (``allow_absolute``,
  environment variable ``MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS=1``). See
  :func:`resolve_image_path`.

An explicit argument wins over the environment variable, which wins over the default. An image
over a limit raises :class:`ImageLoadError` naming the file and the limit, so callers skip and
count it like any unreadable image.

Usage::

    from merlin_mllm.image_loading import load_image, ImageLoadError

    image = load_image("data/items/42.jpg")        # PIL.Image.Image, mode "RGB"
    image = load_image(row["image_bytes"])         # same, from encoded bytes
    assert load_image(None) is None                # missing: the caller counts it
    image_sha256("data/items/42.jpg")              # "sha256:..." of the file, within max_bytes
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ImageLoadError", "load_image", "is_missing", "resolve_image_path", "image_limits", "image_sha256",
    "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_IMAGE_BYTES",
]

#: Default pixel limit: 40 megapixels (a 40 MP image is about 120 MB once decoded to RGB).
#: PIL's own default lets about 179 MP through, several hundred MB per image.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
#: Default file-size limit: 64 MiB. A JPEG or WebP within the pixel limit is far smaller (a 40 MP
#: JPEG is about 10-25 MB); only uncompressed bitmaps or non-images are bigger.
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_PIXELS_ENV = "MERLIN_MLLM_MAX_IMAGE_PIXELS"
MAX_BYTES_ENV = "MERLIN_MLLM_MAX_IMAGE_BYTES"
ALLOW_ABSOLUTE_ENV = "MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS"

#: Block size for hashing image files: they are read in blocks, never whole.
_HASH_BLOCK = 1 << 20

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


def _positive_int(value: Any, what: str) -> int:
    try:
        number = int(str(value).replace("_", "").strip())
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{what} must be a positive whole number, not {value!r}")
    return number


def image_limits(max_pixels: Optional[int] = None, max_bytes: Optional[int] = None) -> Tuple[int, int]:
    """The limits in force: ``(max_pixels, max_bytes)``.

    Parameters
    ----------
    max_pixels, max_bytes : int, optional
        Explicit limits; ``None`` takes the environment variable (``MERLIN_MLLM_MAX_IMAGE_PIXELS``
        / ``MERLIN_MLLM_MAX_IMAGE_BYTES``), else the default (40 MP / 64 MiB).

    Raises
    ------
    ValueError
        A limit (or the environment variable) is not a positive whole number.
    """
    if max_pixels is None:
        env = os.environ.get(MAX_PIXELS_ENV, "").strip()
        max_pixels = _positive_int(env, MAX_PIXELS_ENV) if env else DEFAULT_MAX_IMAGE_PIXELS
    if max_bytes is None:
        env = os.environ.get(MAX_BYTES_ENV, "").strip()
        max_bytes = _positive_int(env, MAX_BYTES_ENV) if env else DEFAULT_MAX_IMAGE_BYTES
    return _positive_int(max_pixels, "max_pixels"), _positive_int(max_bytes, "max_bytes")


def _allow_absolute(allow_absolute: Optional[bool]) -> bool:
    if allow_absolute is not None:
        return bool(allow_absolute)
    value = os.environ.get(ALLOW_ABSOLUTE_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ALLOW_ABSOLUTE_ENV} must be 1/0 (true/false), not {value!r}")


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_image_path(
    path: Union[str, os.PathLike],
    root: Optional[Union[str, os.PathLike]],
    *,
    allow_absolute: Optional[bool] = None,
) -> Path:
    """Where an item's ``image_path`` points, confined to the image ``root``.

    The check is on the path as written (normalised, symlinks not followed): a catalogue
    row cannot name a file outside the root, while a symlink the operator placed inside the
    root (e.g. an images folder linked into the data folder) still works.

    Parameters
    ----------
    path : str or path
        The ``image_path`` value.
    root : str or path or None
        The image root: relative paths are taken relative to it. ``None``: no root, the path is
        returned as given (nothing to confine it to).
    allow_absolute : bool, optional
        Accept absolute paths outside ``root``. ``None`` reads ``MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS``
        (default off). A relative path that climbs out of the root with ``..`` is refused either way.

    Returns
    -------
    pathlib.Path
        The path to open (absolute when ``root`` is given).

    Raises
    ------
    ImageLoadError
        The path escapes the root with ``..``, or is absolute and outside the root while absolute
        paths are not allowed. The message names the path, the root and the flag.

    Examples
    --------
    >>> str(resolve_image_path("img/1.jpg", "/data"))
    '/data/img/1.jpg'
    >>> resolve_image_path("../etc/passwd", "/data")
    Traceback (most recent call last):
    ...
    merlin_mllm.image_loading.ImageLoadError: cannot load image from ../etc/passwd: the path leaves the image root /data
    """
    raw = os.fspath(path)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if root is None:
        return Path(raw)
    root_abs = os.path.normpath(os.path.abspath(os.fspath(root)))
    if os.path.isabs(raw):
        target = os.path.normpath(raw)
        if _inside(target, root_abs) or _allow_absolute(allow_absolute):
            return Path(target)
        raise ImageLoadError(
            raw,
            f"absolute path outside the image root {root_abs}; pass allow_absolute=True "
            f"(or set {ALLOW_ABSOLUTE_ENV}=1) to allow absolute image paths",
        )
    target = os.path.normpath(os.path.join(root_abs, raw))
    if not _inside(target, root_abs):
        raise ImageLoadError(raw, f"the path leaves the image root {root_abs}")
    return Path(target)


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


def _check_pixels(size: Tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageLoadError(
            name,
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (max_pixels, or {MAX_PIXELS_ENV})",
        )


def _check_bytes(size: int, name: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageLoadError(
            name, f"file is {size:,} bytes, over the limit of {max_bytes:,} (max_bytes, or {MAX_BYTES_ENV})"
        )


def _open_image_file(path: str, max_bytes: int):
    """Open ``path`` for reading after checking it is a regular file within the size limit."""
    # O_NONBLOCK: opening a FIFO named as an image must not hang the loader; a regular file
    # reads the same with or without it.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(info.st_mode):
            raise ImageLoadError(path, "not a regular file")
        _check_bytes(info.st_size, path, max_bytes)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def image_sha256(source: Any, *, max_bytes: Optional[int] = None) -> str:
    """``"sha256:<hex>"`` of an image's encoded bytes, within the file-size limit.

    A file's size is checked before any of it is read (a huge file is refused, not read to be
    hashed), and it is then hashed in 1 MiB blocks, never held whole. Nothing is decoded: a
    corrupt image hashes fine and fails later, in :func:`load_image`.

    Parameters
    ----------
    source : str, pathlib.Path, bytes, bytearray or memoryview
        A file path (used as given: resolve it first with :func:`resolve_image_path` to confine
        it to an image root) or the encoded bytes.
    max_bytes : int, optional
        Largest encoded size. Default: ``MERLIN_MLLM_MAX_IMAGE_BYTES``, else 64 MiB.

    Returns
    -------
    str
        ``"sha256:"`` followed by 64 hex digits.

    Raises
    ------
    ImageLoadError
        The file is missing, unreadable, not a regular file, or over ``max_bytes`` (also when it
        grows past the limit while being read). The message names the path.
    TypeError
        ``source`` is neither a path nor bytes.

    Examples
    --------
    >>> image_sha256(b"abc")[:15]
    'sha256:ba7816bf'
    """
    _, max_bytes = image_limits(max_bytes=max_bytes)
    digest = hashlib.sha256()
    if isinstance(source, (bytes, bytearray, memoryview)):
        _check_bytes(memoryview(source).nbytes, describe_source(source), max_bytes)
        digest.update(source)
        return "sha256:" + digest.hexdigest()
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot hash an image from a {type(source).__name__}; pass a path or bytes")
    path = os.fspath(source)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        handle = _open_image_file(path, max_bytes)
    except OSError as exc:
        raise ImageLoadError(path, _file_problem(exc)) from exc
    seen = 0
    with handle:
        while True:
            try:
                block = handle.read(_HASH_BLOCK)
            except OSError as exc:
                raise ImageLoadError(path, _file_problem(exc)) from exc
            if not block:
                break
            seen += len(block)
            _check_bytes(seen, path, max_bytes)  # a file that grows while it is read
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _file_problem(exc: OSError) -> str:
    """Why a file could not be opened or read, in the words every image error uses."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot read the file ({exc.strerror or exc})"


def _decode(opener, name: str, max_pixels: int) -> Image.Image:
    """Open, check the header size, and fully decode an image; failures become ImageLoadError."""
    try:
        with opener() as handle:
            image = Image.open(handle)
            # The header gives the size: refuse a huge image before decoding any pixel data.
            _check_pixels(image.size, name, max_pixels)
            # load() decodes all pixel data now, so truncated or corrupt files fail here.
            image.load()
            # Phone photos store their rotation in EXIF; apply it so content is upright.
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        # PIL's own check runs inside Image.open, before ours, for images over twice
        # Image.MAX_IMAGE_PIXELS (about 179 MP): only reached when max_pixels is set above that.
        raise ImageLoadError(
            name, f"image too large: over PIL's own limit, which a max_pixels of {max_pixels:,} does not lift ({exc})"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(name, "not a recognised image format") from exc
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise ImageLoadError(name, _file_problem(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports broken data as OSError ("image file is truncated"), SyntaxError or
        # ValueError depending on the plugin.
        raise ImageLoadError(name, f"corrupt or truncated image ({exc})") from exc


def load_image(
    source: Any,
    *,
    max_pixels: Optional[int] = None,
    max_bytes: Optional[int] = None,
    root: Optional[Union[str, os.PathLike]] = None,
    allow_absolute: Optional[bool] = None,
) -> Optional[Image.Image]:
    """Load one image as a fully decoded RGB ``PIL.Image.Image``, within the image limits.

    Parameters
    ----------
    source : str, pathlib.Path, bytes, bytearray, memoryview, PIL.Image.Image, numpy.ndarray or None
        A file path; the encoded file bytes (JPEG, PNG, WebP, ...); a PIL image (converted to
        RGB, transparency on white); or a ``uint8`` array of shape (H, W), (H, W, 3) or
        (H, W, 4). ``None``, NaN, ``pd.NA``, an empty/blank string and empty bytes mean
        "no image".
    max_pixels : int, optional
        Most pixels (width x height) an image may have, checked on the header before decoding.
        Default: ``MERLIN_MLLM_MAX_IMAGE_PIXELS``, else 40,000,000.
    max_bytes : int, optional
        Largest encoded size (a file, or the bytes passed). Default:
        ``MERLIN_MLLM_MAX_IMAGE_BYTES``, else 64 MiB.
    root : str or path, optional
        The image root for path sources: relative paths are taken relative to it and must stay
        inside it (see :func:`resolve_image_path`). ``None``: paths are used as given.
    allow_absolute : bool, optional
        With a ``root``, accept absolute paths outside it. Default:
        ``MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS``, else refused.

    Returns
    -------
    PIL.Image.Image or None
        The RGB image (EXIF rotation applied), or ``None`` when ``source`` is missing.

    Raises
    ------
    ImageLoadError
        The file does not exist or is not a regular file; the data is not a decodable image
        (corrupt, truncated, unknown format); the image is over a limit; or the path leaves the
        image root. The message names the path (``<N bytes>`` for raw bytes) and the limit.
    TypeError
        ``source`` is of a type that cannot hold an image.
    ValueError
        A limit, or its environment variable, is not a positive whole number.

    Examples
    --------
    >>> load_image(None) is None
    True
    """
    if is_missing(source):
        return None
    max_pixels, max_bytes = image_limits(max_pixels, max_bytes)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, describe_source(source), max_pixels)
        try:
            source.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError(describe_source(source), f"corrupt or truncated image ({exc})") from exc
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = describe_source(source)
        _check_bytes(memoryview(source).nbytes, name, max_bytes)
        data = bytes(source)
        return _decode(lambda: io.BytesIO(data), name, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if path.startswith(("http://", "https://")):
            raise ImageLoadError(path, "URLs are not downloaded; fetch the images to files first")
        path = str(resolve_image_path(path, root, allow_absolute=allow_absolute))
        return _decode(lambda: _open_image_file(path, max_bytes), path, max_pixels)
    raise TypeError(
        f"cannot load an image from a {type(source).__name__}; pass a path, bytes, "
        "a PIL image or a uint8 array"
    )


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    name = describe_source(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(name, "expected an array of shape (H, W), (H, W, 3) or (H, W, 4)")
    _check_pixels((array.shape[1], array.shape[0]), name, max_pixels)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and np.nanmax(array) <= 1.0:
            array = array * 255.0  # skimage-style floats in [0, 1]
        array = np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))
