"""load_image: every accepted source form, missing values, and clear errors for bad files."""
import io
import math

import numpy as np
import pytest
from PIL import Image

from merlin_mllm.images import ImageLoadError, is_missing, load_image


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
