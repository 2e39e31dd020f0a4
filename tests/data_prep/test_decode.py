"""Images of any mode and format decode to RGB uint8; what does not decode names the file."""

import io

import numpy as np
import pytest
from PIL import Image

from data_prep.decode import decode_image_bytes
from data_prep.errors import DataError

RGB = np.random.default_rng(0).integers(0, 255, (30, 36, 3), dtype=np.uint8)


def _encoded(array: np.ndarray, mode: str | None, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode, fmt",
    [("RGB", "JPEG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"), ("RGB", "BMP"),
     ("RGB", "TIFF"), ("RGB", "WEBP")],
)  # fmt: skip
def test_every_mode_becomes_rgb_uint8(mode, fmt):
    image = decode_image_bytes(_encoded(RGB, mode, fmt), "x")
    assert image.shape == (3, 30, 36) and str(image.dtype) == "torch.uint8"
    if (mode, fmt) in (("RGB", "BMP"), ("RGB", "TIFF"), ("RGBA", "PNG")):  # lossless: the pixels themselves
        assert np.array_equal(image.permute(1, 2, 0).numpy(), RGB)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_keeps_its_high_byte(fmt):
    deep = (np.arange(30 * 36, dtype=np.uint16).reshape(30, 36) * 60).astype(np.uint16)
    image = decode_image_bytes(_encoded(deep, None, fmt), "x")
    assert str(image.dtype) == "torch.uint8"
    assert np.array_equal(image[0].numpy(), (deep >> 8).astype(np.uint8))


def test_what_does_not_decode_names_the_file():
    with pytest.raises(DataError, match="photo.jpg: image does not decode"):
        decode_image_bytes(b"\xff\xd8 not a jpeg", "photo.jpg")


@pytest.mark.parametrize(
    "data, cause",
    [(b"", "the file is empty"),
     (b"name,label\nimg001,cat\n", "the file holds text, not image data"),
     (b"\xff\xd8\xff\xe0\x00\x10JFIF cut short", "its JPEG data is damaged or cut short"),
     (bytes(range(256)), "its content is not JPEG, PNG, WebP, GIF, BMP or TIFF data")],
)  # fmt: skip
def test_the_cause_is_in_plain_words(data, cause):
    with pytest.raises(DataError) as raised:
        decode_image_bytes(data, "photo.jpg")
    assert str(raised.value) == f"photo.jpg: image does not decode ({cause})"  # no decoder source path or advice


def test_a_header_check_refuses_what_is_no_image_and_passes_what_announces_one(tmp_path):
    from data_prep.decode import check_image_header

    (tmp_path / "notes.jpg").write_text("not a photo")
    with pytest.raises(DataError, match="notes.jpg: image does not decode \\(the file holds text"):
        check_image_header(tmp_path / "notes.jpg")
    (tmp_path / "cut.jpg").write_bytes(_encoded(RGB, "RGB", "JPEG")[:40])
    check_image_header(tmp_path / "cut.jpg")  # the header alone: damage past it shows when decoded
    with pytest.raises(DataError, match="missing.png: cannot be read"):
        check_image_header(tmp_path / "missing.png")
