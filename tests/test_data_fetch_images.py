"""fetch_images against a local HTTP server on 127.0.0.1 (loopback only): downloads, a 404,
a transient 503 that succeeds on retry, a non-image answer, the cache, atomic writes, the size
cap, and the read and total timeouts."""
from __future__ import annotations

import collections
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from merlin_mllm.data.image_files import fetch_images, image_index


def _image_bytes(fmt: str, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = _image_bytes("PNG", (200, 10, 10))
JPEG = _image_bytes("JPEG", (10, 200, 10))
STREAM_LIMIT = 64 << 20  # what the endless route sends at most, if the client never stopped


@pytest.fixture(autouse=True)
def no_proxy_for_loopback(monkeypatch):
    # A proxy set in the environment must not see (or break) requests to the local server.
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture()
def server():
    hits: collections.Counter = collections.Counter()
    lock = threading.Lock()
    release = threading.Event()  # ends the slow routes' waits at teardown

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
            elif self.path == "/announced.png":  # says how big it is: refused before the body
                self._send(200, PNG + bytes(300_000), "image/png")
            elif self.path == "/endless.png":  # no Content-Length: the client must stop reading
                self._stream()
            elif self.path == "/silent.jpg":  # accepts the request, never answers in time
                release.wait(10)
                self._send(200, JPEG, "image/jpeg")
            elif self.path == "/to-ftp.jpg":
                self.send_response(302)
                self.send_header("Location", "ftp://127.0.0.1/x.jpg")
                self.end_headers()
            elif self.path == "/drip.jpg":  # answers, then a byte at a time, never idle for long
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()
                for byte in JPEG:
                    if release.wait(0.05):
                        break
                    try:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    except OSError:
                        break
            else:
                self._send(404, b"missing", "text/plain")

        def _send(self, status, body, content_type):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _stream(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            sent, block = 0, PNG + bytes(65536)
            try:
                while sent < STREAM_LIMIT:
                    self.wfile.write(block)
                    sent += len(block)
            except OSError:  # the client closed the connection
                pass
            with lock:
                hits[f"sent {self.path}"] = sent  # bytes written before the client hung up

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, hits
    release.set()
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


def test_redirects_leave_http_only_for_http(server, tmp_path):
    base, hits = server
    report = fetch_images({"R": f"{base}/to-ftp.jpg"}, tmp_path, retries=2, backoff=0.01)
    assert report["failed"] == 1 and hits["/to-ftp.jpg"] == 1
    assert "redirects to 'ftp://127.0.0.1/x.jpg': only http(s) URLs are fetched" in report["failures"]["R"]


def test_responses_over_the_size_cap_fail_naming_the_url(server, tmp_path):
    base, hits = server
    urls = {"ANNOUNCED": f"{base}/announced.png", "ENDLESS": f"{base}/endless.png", "SMALL": f"{base}/a.png"}
    started = time.monotonic()
    report = fetch_images(urls, tmp_path, retries=2, timeout=5, workers=3, backoff=0.01, max_bytes=100_000)
    assert report["downloaded"] == 1 and report["failed"] == 2
    announced, endless = report["failures"]["ANNOUNCED"], report["failures"]["ENDLESS"]
    assert f"{base}/announced.png: response too large: Content-Length 300," in announced
    assert f"{base}/endless.png: response too large: more than 100,000 bytes received" in endless
    for message in (announced, endless):
        assert "over the cap of 100,000 bytes" in message and "after 1 attempt(s)" in message
    # Too large is final (not retried), and the endless answer was dropped soon after the cap:
    # the server managed to send far less than it would have (socket buffers hold a few MB).
    assert hits["/announced.png"] == 1 and hits["/endless.png"] == 1
    deadline = time.monotonic() + 30
    while "sent /endless.png" not in hits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 0 < hits["sent /endless.png"] < 16 << 20
    assert time.monotonic() - started < 30
    assert sorted(path.name for path in tmp_path.iterdir()) == ["SMALL.png"]  # nothing else written


def test_the_default_cap_is_the_loaders_file_size_limit(server, tmp_path, monkeypatch):
    base, _ = server
    monkeypatch.setenv("MERLIN_MLLM_MAX_IMAGE_BYTES", "1000")
    report = fetch_images({"ANNOUNCED": f"{base}/announced.png"}, tmp_path, retries=0, timeout=5)
    assert "over the cap of 1,000 bytes" in report["failures"]["ANNOUNCED"]


def test_read_timeout_and_total_timeout(server, tmp_path):
    base, hits = server
    started = time.monotonic()
    report = fetch_images({"SILENT": f"{base}/silent.jpg"}, tmp_path, retries=1, timeout=(5, 0.3), backoff=0.01)
    assert report["failed"] == 1 and time.monotonic() - started < 5
    message = report["failures"]["SILENT"]
    assert f"{base}/silent.jpg" in message and "timed out" in message and "after 2 attempt(s)" in message
    assert hits["/silent.jpg"] == 2  # a timeout is retried like a network error

    # Each byte arrives well within the read timeout, but the whole answer takes too long.
    report = fetch_images({"DRIP": f"{base}/drip.jpg"}, tmp_path, retries=0, timeout=5, total_timeout=0.5)
    assert report["failed"] == 1
    assert f"{base}/drip.jpg: download not finished after 0.5 s" in report["failures"]["DRIP"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="timeouts must be > 0"):
        fetch_images({"X": f"{base}/a.png"}, tmp_path, timeout=(0, 1))
