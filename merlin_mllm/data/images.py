"""Item images on disk: finding ``<item_key>.<ext>`` files, and downloading them once.

:func:`fetch_images` downloads item images (for example the Amazon 2023 ``image_url`` column of
a prepared ``items/`` table) into a folder laid out the way :func:`image_index` reads it. It
skips files already there (a cache), writes each file atomically (temporary file, then rename),
retries transient failures with exponential backoff, and shows a progress bar.

Usage::

    from merlin_mllm.data.images import fetch_images
    report = fetch_images({"B00ABC": "https://example.com/b00abc.jpg"}, "images/")
    report["downloaded"], report["failed"]
"""
from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Mapping, Optional

from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: Image file extensions looked for, in order of preference.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_FORMAT_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}
# HTTP statuses worth another try; other 4xx answers are final.
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


def image_index(folder: Path | str) -> dict[str, Path]:
    """Map ``stem -> file`` for every image file in ``folder`` (not recursive).

    When one stem has several files, the extension earliest in :data:`IMAGE_EXTENSIONS` wins.
    Hidden and temporary files (starting with ``.``) are ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    index: dict[str, Path] = {}
    rank: dict[str, int] = {}
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        stem, ext = os.path.splitext(entry.name)
        ext = ext.lower()
        if ext not in IMAGE_EXTENSIONS or os.path.getsize(entry.path) == 0:
            continue
        order = IMAGE_EXTENSIONS.index(ext)
        if stem not in index or order < rank[stem]:
            index[stem] = Path(entry.path).resolve()
            rank[stem] = order
    return index


def _check_key(key) -> str:
    key = str(key)
    if not _SAFE_KEY.fullmatch(key):
        raise ValueError(f"item key {key!r} cannot be used as a file name (letters, digits, '_', '-', '.')")
    return key


def _download(url: str, timeout: float) -> bytes:
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"only http(s) URLs are fetched, got {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "merlin-mllm/0.1"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _retryable(error: Exception) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code in _RETRY_STATUSES
    return isinstance(error, (urllib.error.URLError, TimeoutError, ConnectionError, OSError))


def _image_extension(payload: bytes) -> str:
    """The file extension for the image in ``payload``; ``ValueError`` if it is not an image."""
    try:
        with Image.open(io.BytesIO(payload)) as image:
            image.verify()
            image_format = image.format
    except Exception as exc:  # PIL raises many types for bad data
        raise ValueError(f"the response is not a readable image ({exc})") from exc
    return _FORMAT_EXTENSIONS.get(image_format or "", ".jpg")


def _write_atomically(folder: Path, key: str, payload: bytes, extension: str) -> Path:
    target = folder / f"{key}{extension}"
    # A hidden temporary file in the same folder, so the rename is atomic and image_index skips it.
    handle, temporary = tempfile.mkstemp(prefix=f".{key}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return target


def _fetch_one(key: str, url: str, folder: Path, retries: int, timeout: float, backoff: float) -> tuple[str, int]:
    """Download one image; returns (outcome, attempts). Raises the last error on failure."""
    attempt = 0
    while True:
        attempt += 1
        try:
            payload = _download(url, timeout)
            extension = _image_extension(payload)
            _write_atomically(folder, key, payload, extension)
            return "downloaded", attempt
        except Exception as exc:
            if attempt > retries or not _retryable(exc):
                exc.attempts = attempt  # type: ignore[attr-defined]
                raise
            time.sleep(backoff * (2 ** (attempt - 1)))


def fetch_images(
    meta_urls: Mapping[str, Optional[str]],
    folder: Path | str,
    retries: int = 3,
    timeout: float = 10,
    workers: int = 4,
    *,
    backoff: float = 0.5,
) -> dict:
    """Download one image per item into ``folder`` as ``<item_key>.<ext>``.

    Parameters
    ----------
    meta_urls : mapping
        Item key -> image URL (http or https). Items whose URL is ``None`` or empty are counted
        as ``no_url`` and skipped.
    folder : Path or str
        Where the images go (created if needed). An item that already has an image file there
        is not downloaded again.
    retries : int
        Further attempts after a failed one, for network errors, timeouts and HTTP 408/429/5xx.
        Other HTTP errors (such as 404) and responses that are not images fail at once.
    timeout : float
        Seconds per request.
    workers : int
        Parallel downloads.
    backoff : float
        The wait before the first retry, in seconds; it doubles on each further retry.

    Returns
    -------
    dict
        ``requested``, ``cached``, ``downloaded``, ``no_url``, ``failed`` (counts), ``retried``
        (downloads that needed more than one attempt) and ``failures`` (key -> error message).
    """
    if retries < 0 or workers < 1 or timeout <= 0:
        raise ValueError(f"need retries >= 0, workers >= 1, timeout > 0; got {retries}, {workers}, {timeout}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = image_index(folder)
    report = {"requested": len(meta_urls), "cached": 0, "downloaded": 0, "no_url": 0, "failed": 0, "retried": 0}
    failures: dict[str, str] = {}
    todo: list[tuple[str, str]] = []
    for raw_key, url in meta_urls.items():
        key = _check_key(raw_key)
        if key in existing:
            report["cached"] += 1
        elif not url:
            report["no_url"] += 1
        else:
            todo.append((key, str(url)))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(_fetch_one, key, url, folder, retries, timeout, backoff): key for key, url in todo
        }
        for future in tqdm(as_completed(futures), total=len(futures), desc="fetch images", unit=" images", disable=None):
            key = futures[future]
            try:
                _, attempts = future.result()
            except Exception as exc:
                report["failed"] += 1
                attempts = getattr(exc, "attempts", 1)
                failures[key] = f"{type(exc).__name__}: {exc} (after {attempts} attempt(s))"
                logger.warning("image for %s failed: %s", key, failures[key])
                continue
            report["downloaded"] += 1
            report["retried"] += attempts > 1
    report["failures"] = dict(sorted(failures.items()))
    return report
