"""Item images on disk: finding ``<item_key>.<ext>`` files, a dataset's image root, and
downloading images once.

:func:`dataset_image_root` says where a prepared dataset's ``items/`` ``image_path`` values are
confined: ``data prepare`` records the images folder as ``image_root`` in ``report.json`` and
writes the paths relative to it, and every reader resolves them through
:meth:`ImageRoot.resolve` (a ``..`` escape, or an absolute path outside the root, is refused).

:func:`fetch_images` downloads item images (for example the Amazon 2023 ``image_url`` column of
a prepared ``items/`` table) into a folder laid out the way :func:`image_index` reads it. It
skips files already there (a cache), writes each file atomically (temporary file, then rename),
retries transient failures with exponential backoff, and shows a progress bar.

Each download is bounded: a connect timeout, a read timeout (the longest wait for the next bytes),
a total time per attempt, and a size cap (by default the loader's file-size limit,
:func:`merlin_mllm.image_loading.image_limits`, so every file fetched can also be loaded). A response
over the cap is refused from its ``Content-Length`` when it announces one, and otherwise read in
chunks and dropped as soon as it passes the cap; it counts as a failure naming the URL.

Usage::

    from merlin_mllm.data.image_files import dataset_image_root, fetch_images
    report = fetch_images({"B00ABC": "https://example.com/b00abc.jpg"}, "images/")
    report["downloaded"], report["failed"]
    path = dataset_image_root("data/amazon").resolve("B00ABC.jpg")   # ImageLoadError if it escapes
"""
from __future__ import annotations

import functools
import http.client
import io
import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union

from PIL import Image
from tqdm.auto import tqdm

from merlin_mllm.image_loading import image_limits, resolve_image_path

logger = logging.getLogger(__name__)

#: Image file extensions looked for, in order of preference.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_FORMAT_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}
# HTTP statuses worth another try; other 4xx answers are final.
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 1 << 16


class ResponseTooLarge(ValueError):
    """A response over the size cap (final: not retried)."""

    def __init__(self, url: str, max_bytes: int, seen: str):
        super().__init__(f"{url}: response too large: {seen}, over the cap of {max_bytes:,} bytes (max_bytes)")


def image_index(folder: Path | str) -> dict[str, Path]:
    """Map ``stem -> file`` for every image file in ``folder`` (not recursive).

    When one stem has several files, the extension earliest in :data:`IMAGE_EXTENSIONS` wins.
    Hidden and temporary files (starting with ``.``) are ignored. The files are absolute paths
    *inside* ``folder`` (``folder/<name>``): a symlink in the folder is named as the link, not
    followed, so the path stays under the folder as an image root.
    """
    folder = Path(os.path.abspath(folder))
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
            index[stem] = folder / entry.name
            rank[stem] = order
    return index


#: The prepared dataset's report, and its key that records the image root.
REPORT_FILE = "report.json"
IMAGE_ROOT_KEY = "image_root"


@dataclass(frozen=True)
class ImageRoot:
    """Where a dataset's item image paths are confined, and how to resolve one.

    Attributes
    ----------
    path : pathlib.Path
        The image root: relative ``image_path`` values are taken relative to it, and may not
        leave it.
    allow_absolute : bool or None
        Whether an absolute path outside ``path`` is read. ``None``: the default of
        :func:`merlin_mllm.image_loading.resolve_image_path` (refused unless
        ``MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS`` is set); ``True`` for folders with no recorded
        root (prepared before roots were recorded), whose absolute paths are read as before.
    recorded : bool
        True when the root comes from the dataset's ``report.json``.
    """

    path: Path
    allow_absolute: Optional[bool] = None
    recorded: bool = False

    def resolve(self, image_path: Union[str, os.PathLike], *, allow_absolute: Optional[bool] = None) -> Path:
        """The file an ``image_path`` value names, confined to the root.

        Parameters
        ----------
        image_path : str or path
        allow_absolute : bool, optional
            Overrides :attr:`allow_absolute` for this call.

        Raises
        ------
        merlin_mllm.image_loading.ImageLoadError
            The path climbs out of the root with ``..``, or is absolute and outside it while
            absolute paths are not allowed; the message names the path, the root and the flag.
        """
        flag = self.allow_absolute if allow_absolute is None else allow_absolute
        return resolve_image_path(image_path, self.path, allow_absolute=flag)


def record_image_root(images: Union[str, os.PathLike], out: Union[str, os.PathLike]) -> str:
    """How ``data prepare`` records the images folder in ``out/report.json``.

    Relative to ``out`` (e.g. ``"images"``) when the folder lies inside it, so that the dataset
    folder can move with its images; otherwise the absolute path (symlinks not followed).
    """
    root = os.path.normpath(os.path.abspath(images))
    base = os.path.normpath(os.path.abspath(out))
    if os.path.commonpath([root, base]) == base:
        return os.path.relpath(root, base)
    return root


def dataset_image_root(data_dir: Union[str, os.PathLike]) -> ImageRoot:
    """The image root of a prepared dataset (or of any folder given as an image root).

    Parameters
    ----------
    data_dir : str or path
        A folder written by ``data prepare``, or any other folder.

    Returns
    -------
    ImageRoot
        * ``data_dir/report.json`` records ``image_root``: that folder (a relative value is
          taken relative to ``data_dir``), with absolute paths outside it refused unless
          ``MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS`` is set. A recorded ``null`` (prepared
          without images): ``data_dir`` itself, under the same rule.
        * no recorded root (no ``report.json``, one written before roots were recorded, or one
          that cannot be read): ``data_dir``, with absolute paths read as they are, as before;
          only a relative path that climbs out of ``data_dir`` with ``..`` is refused. Prepare
          the dataset again to confine its absolute paths too.
    """
    data_dir = Path(os.path.abspath(data_dir))
    report_path = data_dir / REPORT_FILE
    report = None
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            logger.warning("%s cannot be read (%s): its image root is taken to be %s", report_path, exc, data_dir)
    if not isinstance(report, dict) or IMAGE_ROOT_KEY not in report:
        logger.info("%s records no image root: relative image paths are read inside %s and absolute "
                    "ones as they are (prepare it again to confine them)", data_dir, data_dir)
        return ImageRoot(data_dir, allow_absolute=True, recorded=False)
    recorded = report[IMAGE_ROOT_KEY]
    if recorded is None:
        return ImageRoot(data_dir, recorded=True)
    if not isinstance(recorded, str) or not recorded.strip():
        raise ValueError(f"{report_path}: {IMAGE_ROOT_KEY} must be a folder path or null, not {recorded!r}")
    root = Path(os.path.normpath(data_dir / recorded))  # an absolute value replaces data_dir
    return ImageRoot(root, recorded=True)


def _check_key(key) -> str:
    key = str(key)
    if not _SAFE_KEY.fullmatch(key):
        raise ValueError(f"item key {key!r} cannot be used as a file name (letters, digits, '_', '-', '.')")
    return key


class _ReadTimeout:
    """Connection mixin: the socket timeout is the connect timeout until connected (TLS
    handshake included), then the read timeout for every later wait on the server."""

    def __init__(self, *args, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout

    def connect(self):
        super().connect()
        self.sock.settimeout(self.read_timeout)


class _HTTPConnection(_ReadTimeout, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ReadTimeout, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout: float):
        super().__init__()
        self.read_timeout = read_timeout

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, read_timeout=self.read_timeout), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout: float):
        super().__init__()
        self.read_timeout = read_timeout

    def https_open(self, req):
        return self.do_open(
            functools.partial(_HTTPSConnection, read_timeout=self.read_timeout), req, context=self._context
        )


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow one to ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme not in ("http", "https"):
            raise ValueError(f"{req.full_url} redirects to {newurl!r}: only http(s) URLs are fetched")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _timeouts(timeout: Union[float, Tuple[float, float]]) -> Tuple[float, float]:
    connect, read = timeout if isinstance(timeout, (tuple, list)) else (timeout, timeout)
    connect, read = float(connect), float(read)
    if connect <= 0 or read <= 0:
        raise ValueError(f"timeouts must be > 0, got connect={connect}, read={read}")
    return connect, read


def _download(url: str, timeout: Tuple[float, float], max_bytes: int, total_timeout: float) -> bytes:
    """The body at ``url``, read in chunks and dropped past ``max_bytes`` or ``total_timeout``."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"only http(s) URLs are fetched, got {url!r}")
    connect_timeout, read_timeout = timeout
    # A fresh opener per download: the handlers carry the read timeout (cheap to build).
    opener = urllib.request.build_opener(_HTTPHandler(read_timeout), _HTTPSHandler(read_timeout), _RedirectHandler())
    request = urllib.request.Request(url, headers={"User-Agent": "merlin-mllm/0.1"})
    started = time.monotonic()
    with opener.open(request, timeout=connect_timeout) as response:
        announced = (response.headers.get("Content-Length") or "").strip()
        if announced.isdigit() and int(announced) > max_bytes:
            raise ResponseTooLarge(url, max_bytes, f"Content-Length {int(announced):,}")
        read1 = getattr(response, "read1", response.read)
        chunks, received = [], 0
        while True:
            # read1: what has arrived (one socket read), so the deadline is checked while a slow
            # server sends; read(n) would block until n bytes came. At most one byte past the
            # cap is asked for: enough to tell "over" from "exactly at".
            chunk = read1(min(_CHUNK, max_bytes + 1 - received))
            if not chunk:
                break
            received += len(chunk)
            if received > max_bytes:
                raise ResponseTooLarge(url, max_bytes, f"more than {max_bytes:,} bytes received")
            if time.monotonic() - started > total_timeout:
                # The read timeout bounds each wait; this bounds a server that sends slowly.
                raise TimeoutError(f"{url}: download not finished after {total_timeout:g} s")
            chunks.append(chunk)
    return b"".join(chunks)


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


def _fetch_one(key: str, url: str, folder: Path, retries: int, timeout: Tuple[float, float], backoff: float,
               max_bytes: int, total_timeout: float) -> tuple[str, int]:
    """Download one image; returns (outcome, attempts). Raises the last error on failure."""
    attempt = 0
    while True:
        attempt += 1
        try:
            payload = _download(url, timeout, max_bytes, total_timeout)
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
    timeout: Union[float, Tuple[float, float]] = 10,
    workers: int = 4,
    *,
    backoff: float = 0.5,
    max_bytes: Optional[int] = None,
    total_timeout: float = 300,
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
    timeout : float or (float, float)
        Seconds: one number for both the connect timeout (until connected, TLS included) and the
        read timeout (the longest wait for the server's next bytes), or a ``(connect, read)``
        pair. A timeout is retried like a network error.
    workers : int
        Parallel downloads.
    backoff : float
        The wait before the first retry, in seconds; it doubles on each further retry.
    max_bytes : int, optional
        Size cap per image. Default: the image loader's file-size limit
        (``MERLIN_MLLM_MAX_IMAGE_BYTES``, else 64 MiB). A bigger response fails at once (not
        retried) with a message naming the URL; nothing is written for it.
    total_timeout : float
        Seconds one download attempt may take in all (bounds a server that drips bytes just
        faster than the read timeout).

    Returns
    -------
    dict
        ``requested``, ``cached``, ``downloaded``, ``no_url``, ``failed`` (counts), ``retried``
        (downloads that needed more than one attempt) and ``failures`` (key -> error message,
        naming the URL).
    """
    timeouts = _timeouts(timeout)
    if retries < 0 or workers < 1 or total_timeout <= 0:
        raise ValueError(f"need retries >= 0, workers >= 1, total_timeout > 0; got {retries}, {workers}, {total_timeout}")
    _, max_bytes = image_limits(max_bytes=max_bytes)
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
            pool.submit(_fetch_one, key, url, folder, retries, timeouts, backoff, max_bytes, total_timeout): (key, url)
            for key, url in todo
        }
        for future in tqdm(as_completed(futures), total=len(futures), desc="fetch images", unit=" images", disable=None):
            key, url = futures[future]
            try:
                _, attempts = future.result()
            except Exception as exc:
                report["failed"] += 1
                attempts = getattr(exc, "attempts", 1)
                detail = str(exc) if url in str(exc) else f"{url}: {exc}"
                failures[key] = f"{type(exc).__name__}: {detail} (after {attempts} attempt(s))"
                logger.warning("image for %s failed: %s", key, failures[key])
                continue
            report["downloaded"] += 1
            report["retried"] += attempts > 1
    report["failures"] = dict(sorted(failures.items()))
    return report
