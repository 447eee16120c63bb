"""load_image: every accepted source form, missing values, clear errors for bad files, and the
pixel, file-size and image-root limits."""
import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from merlin_mllm.image_loading import ImageLoadError, is_missing, load_image, resolve_image_path


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    # A non-uniform picture, so that any pixel mix-up shows.
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8), mode="RGB")


def test_path_bytes_pil_and_array_give_the_same_pixels(tmp_path, picture):
    path = tmp_path / "item.png"
    path.write_bytes(_png_bytes(picture))
    expected = np.asarray(picture)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()),
                   memoryview(path.read_bytes()), picture, expected):
        image = load_image(source)
        assert isinstance(image, Image.Image) and image.mode == "RGB", type(source)
        assert image.size == (40, 24)
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_non_rgb_modes_become_rgb(tmp_path):
    grey = Image.new("L", (5, 5), 77)
    assert np.asarray(load_image(grey))[0, 0].tolist() == [77, 77, 77]
    # Fully transparent pixels are drawn on white, not as their hidden colour.
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    transparent.putpixel((0, 0), (0, 0, 255, 255))
    rgb = np.asarray(load_image(_png_bytes(transparent)))
    assert rgb[0, 0].tolist() == [0, 0, 255]
    assert rgb[3, 3].tolist() == [255, 255, 255]


def test_exif_rotation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    data = _jpeg_bytes(Image.new("RGB", (40, 20), (10, 200, 10)), exif=exif.tobytes())
    assert load_image(data).size == (20, 40)


@pytest.mark.parametrize("missing", [None, float("nan"), np.float32("nan"), "", "   ", b"", bytearray()])
def test_missing_images_return_none(missing):
    assert is_missing(missing)
    assert load_image(missing) is None


def test_pandas_na_is_missing():
    pd = pytest.importorskip("pandas")
    assert load_image(pd.NA) is None
    assert not is_missing(0.5) and not is_missing(b"x") and not is_missing(math.inf)


def test_corrupt_bytes_name_their_size():
    junk = b"this is not an image at all" * 3
    with pytest.raises(ImageLoadError) as info:
        load_image(junk)
    assert f"<{len(junk)} bytes>" in str(info.value)
    assert info.value.source == f"<{len(junk)} bytes>"
    assert "not a recognised image format" in info.value.reason


def test_truncated_jpeg_file_names_its_path(tmp_path, picture):
    data = _jpeg_bytes(picture.resize((200, 120)))
    path = tmp_path / "broken.jpg"
    path.write_bytes(data[: len(data) // 2])  # a download cut off half way
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value)
    # The same cut-off data as bytes names its size instead.
    with pytest.raises(ImageLoadError, match=rf"<{len(data) // 2} bytes>"):
        load_image(data[: len(data) // 2])


def test_missing_file_and_directory_and_url(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found") as info:
        load_image(tmp_path / "nope.jpg")
    assert str(tmp_path / "nope.jpg") in str(info.value)
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="URLs are not downloaded"):
        load_image("https://example.com/a.jpg")


def test_bad_types_and_shapes():
    with pytest.raises(TypeError, match="int"):
        load_image(12)
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((2, 3, 5), dtype=np.uint8))
    # skimage-style float arrays in [0, 1] are scaled, not clipped to black.
    assert np.asarray(load_image(np.full((2, 2), 1.0)))[0, 0].tolist() == [255, 255, 255]


def test_error_is_a_value_error():
    assert issubclass(ImageLoadError, ValueError)


# ---------------------------------------------------------------------------- limits
def test_a_huge_image_is_refused_from_its_header_before_decoding(tmp_path):
    # 8000 x 6000 = 48 MP, over the 40 MP default; 1-bit pixels keep it cheap to make (6 MB).
    huge = Image.new("1", (8000, 6000), 0)
    data = _png_bytes(huge)
    path = tmp_path / "huge.png"
    # Keep the header, cut the pixel data: decoding would fail as "truncated", so an error about
    # the size proves the size was checked before any decoding.
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "8000x6000 = 48,000,000 pixels" in message
    assert "over the limit of 40,000,000" in message and "MERLIN_MLLM_MAX_IMAGE_PIXELS" in message
    with pytest.raises(ImageLoadError, match="48,000,000 pixels"):
        load_image(data)  # the same as bytes
    # Under a higher limit the same cut file gets past the size check and fails on its data.
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(path, max_pixels=50_000_000)


def test_pixel_limit_is_settable_by_argument_and_environment(tmp_path, picture, monkeypatch):
    path = tmp_path / "item.png"
    path.write_bytes(_png_bytes(picture))  # 40 x 24 = 960 pixels
    assert load_image(path, max_pixels=960).size == (40, 24)  # the limit itself is allowed
    for source in (path, path.read_bytes(), picture, np.asarray(picture)):
        with pytest.raises(ImageLoadError, match="40x24 = 960 pixels, over the limit of 959"):
            load_image(source, max_pixels=959)
    monkeypatch.setenv("MERLIN_MLLM_MAX_IMAGE_PIXELS", "959")
    with pytest.raises(ImageLoadError, match="over the limit of 959"):
        load_image(path)
    assert load_image(path, max_pixels=960) is not None  # an explicit argument wins
    monkeypatch.setenv("MERLIN_MLLM_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="MERLIN_MLLM_MAX_IMAGE_PIXELS must be a positive whole number"):
        load_image(path)


def test_file_size_limit(tmp_path, picture, monkeypatch):
    path = tmp_path / "item.png"
    path.write_bytes(_png_bytes(picture))
    size = path.stat().st_size
    assert load_image(path, max_bytes=size) is not None
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_bytes=size - 1)
    assert str(path) in str(info.value)
    assert f"file is {size:,} bytes, over the limit of {size - 1:,}" in str(info.value)
    with pytest.raises(ImageLoadError, match=rf"<{size} bytes>: file is {size:,} bytes"):
        load_image(path.read_bytes(), max_bytes=size - 1)
    monkeypatch.setenv("MERLIN_MLLM_MAX_IMAGE_BYTES", str(size - 1))
    with pytest.raises(ImageLoadError, match="MERLIN_MLLM_MAX_IMAGE_BYTES"):
        load_image(path)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(fifo)  # open() on a FIFO with no writer would block forever


def test_image_paths_are_confined_to_the_root(tmp_path, picture, monkeypatch):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    inside = root / "img" / "a.png"
    inside.write_bytes(_png_bytes(picture))
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png_bytes(picture))

    assert load_image("img/a.png", root=root).size == (40, 24)
    assert resolve_image_path("img/./a.png", root) == inside
    assert load_image(str(inside), root=root) is not None  # absolute but inside the root
    for escape in ("../secret.png", "img/../../secret.png"):
        with pytest.raises(ImageLoadError) as info:
            load_image(escape, root=root)
        assert escape in str(info.value) and f"leaves the image root {root}" in str(info.value)
        # Allowing absolute paths does not allow climbing out of the root.
        with pytest.raises(ImageLoadError, match="leaves the image root"):
            load_image(escape, root=root, allow_absolute=True)

    with pytest.raises(ImageLoadError) as info:
        load_image(str(outside), root=root)
    assert str(outside) in str(info.value) and "absolute path outside the image root" in str(info.value)
    assert "allow_absolute=True" in str(info.value) and "MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS" in str(info.value)
    # "/data/../secret.png" is outside too, however it is spelled.
    with pytest.raises(ImageLoadError, match="outside the image root"):
        load_image(f"{root}/../secret.png", root=root)
    assert load_image(str(outside), root=root, allow_absolute=True).size == (40, 24)
    monkeypatch.setenv("MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS", "1")
    assert load_image(outside, root=root) is not None
    with pytest.raises(ImageLoadError, match="outside the image root"):
        load_image(outside, root=root, allow_absolute=False)  # the argument wins over the variable
    # Without a root there is nothing to confine to: paths are used as given (as before).
    monkeypatch.delenv("MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS")
    assert load_image(outside) is not None
    assert resolve_image_path("../x.png", None) == Path("../x.png")


def test_a_picture_over_a_limit_is_skipped_and_counted(tmp_path, picture, monkeypatch):
    """The ranker's image features skip and count an oversized picture like any unreadable one."""
    from merlin_mllm.ranker.image_features import ItemImageFeatures

    small = tmp_path / "small.png"
    small.write_bytes(_png_bytes(picture.resize((20, 12))))  # 240 pixels
    large = tmp_path / "large.png"
    large.write_bytes(_png_bytes(picture))  # 960 pixels
    monkeypatch.setenv("MERLIN_MLLM_MAX_IMAGE_PIXELS", "500")
    features = ItemImageFeatures.from_images([1, 2, 3], [small, large, None], progress=False)
    assert features.has_image.tolist() == [True, False, False]
    assert list(features.skipped) == [2]
    assert str(large) in features.skipped[2] and "over the limit of 500" in features.skipped[2]
