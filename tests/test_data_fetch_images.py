"""fetch_images against a local HTTP server on 127.0.0.1 (loopback only): downloads, a 404,
a transient 503 that succeeds on retry, a non-image answer, the cache, and atomic writes."""
from __future__ import annotations

import collections
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from merlin_mllm.data.images import fetch_images, image_index


def _image_bytes(fmt: str, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = _image_bytes("PNG", (200, 10, 10))
JPEG = _image_bytes("JPEG", (10, 200, 10))


@pytest.fixture(autouse=True)
def no_proxy_for_loopback(monkeypatch):
    # A proxy set in the environment must not see (or break) requests to the local server.
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture()
def server():
    hits: collections.Counter = collections.Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            with lock:
                hits[self.path] += 1
                count = hits[self.path]
            if self.path == "/a.png":
                self._send(200, PNG, "image/png")
            elif self.path == "/b":  # no extension in the URL: the bytes say JPEG
                self._send(200, JPEG, "image/jpeg")
            elif self.path == "/flaky.jpg" and count == 1:
                self._send(503, b"busy", "text/plain")
            elif self.path == "/flaky.jpg":
                self._send(200, JPEG, "image/jpeg")
            elif self.path == "/page.jpg":
                self._send(200, b"<html>not an image</html>", "text/html")
            else:
                self._send(404, b"missing", "text/plain")

        def _send(self, status, body, content_type):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, hits
    httpd.shutdown()
    httpd.server_close()


def test_fetch_images(server, tmp_path):
    base, hits = server
    urls = {
        "A1": f"{base}/a.png",
        "B2": f"{base}/b",
        "FLAKY": f"{base}/flaky.jpg",
        "GONE": f"{base}/gone.jpg",
        "PAGE": f"{base}/page.jpg",
        "NOURL": None,
    }
    folder = tmp_path / "images"
    report = fetch_images(urls, folder, retries=3, timeout=5, workers=3, backoff=0.01)
    assert report["requested"] == 6 and report["downloaded"] == 3 and report["failed"] == 2
    assert report["no_url"] == 1 and report["cached"] == 0 and report["retried"] == 1
    assert sorted(report["failures"]) == ["GONE", "PAGE"]
    assert "404" in report["failures"]["GONE"] and "not a readable image" in report["failures"]["PAGE"]
    # A 404 and a non-image answer are final; the 503 is retried once.
    assert hits["/gone.jpg"] == 1 and hits["/page.jpg"] == 1 and hits["/flaky.jpg"] == 2
    assert (folder / "A1.png").read_bytes() == PNG
    assert (folder / "B2.jpg").read_bytes() == JPEG and (folder / "FLAKY.jpg").read_bytes() == JPEG
    assert sorted(path.name for path in folder.iterdir()) == ["A1.png", "B2.jpg", "FLAKY.jpg"]  # no temp files
    assert set(image_index(folder)) == {"A1", "B2", "FLAKY"}

    # Second run: what is on disk is not fetched again; the failures are tried again.
    again = fetch_images(urls, folder, retries=0, timeout=5, workers=2, backoff=0.01)
    assert again["cached"] == 3 and again["downloaded"] == 0 and again["failed"] == 2
    assert hits["/a.png"] == 1 and hits["/b"] == 1 and hits["/flaky.jpg"] == 2 and hits["/gone.jpg"] == 2


def test_retries_run_out(server, tmp_path):
    base, hits = server
    report = fetch_images({"F": f"{base}/flaky.jpg"}, tmp_path, retries=0, timeout=5, backoff=0.01)
    assert report["failed"] == 1 and "503" in report["failures"]["F"] and hits["/flaky.jpg"] == 1
    assert list(tmp_path.iterdir()) == []


def test_unsafe_keys_and_schemes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot be used as a file name"):
        fetch_images({"../evil": "http://127.0.0.1:9/x.jpg"}, tmp_path)
    report = fetch_images({"K": "file:///etc/passwd"}, tmp_path, retries=2, backoff=0.01)
    assert report["failed"] == 1 and "only http(s) URLs" in report["failures"]["K"]
