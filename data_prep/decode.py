"""Image and mask decoding: torchvision for images, Pillow for index masks (palette PNGs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from data_prep.errors import DataError

_INDEX_MODES = ("P", "L", "I;16", "I")


def decode_image_bytes(data: bytes, path: str | Path) -> torch.Tensor:
    """RGB uint8 (3, H, W) from encoded bytes of any mode; DataError names the file when it does not decode.

    torchvision decodes JPEG, PNG, WebP and GIF (grey, palette and alpha images become RGB; 16-bit
    PNGs keep their high byte); Pillow decodes what it does not (BMP, TIFF, 16-bit and float greys).
    """
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        image = _decode_with_pillow(data)
        if image is None:
            raise DataError(f"{path}: image does not decode ({_why_not(data)})") from None
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


# The first bytes of each format s4mim decodes (WebP: RIFF....WEBP, checked apart).
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
HEADER_BYTES = 16


def image_format(head: bytes) -> str | None:
    """The format the first bytes of a file announce, or None when they announce none s4mim knows."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES.items() if head.startswith(magic)), None)


def _why_not(data: bytes) -> str:
    """Why bytes that neither torchvision nor Pillow decodes are not an image, in a user's words."""
    if not data:
        return "the file is empty"
    announced = image_format(data[:HEADER_BYTES])
    if announced:
        return f"its {announced} data is damaged or cut short"
    sample = data[:4096]
    try:
        is_text = b"\x00" not in sample and bool(sample.decode("utf-8").strip())
    except UnicodeDecodeError:
        is_text = False
    if is_text:
        return "the file holds text, not image data"
    return "its content is not JPEG, PNG, WebP, GIF, BMP or TIFF data"


def _decode_with_pillow(data: bytes) -> torch.Tensor | None:
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode.startswith("I;16"):
                img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8), mode="L")
            elif img.mode in ("I", "F"):
                array = np.asarray(img, dtype=np.float64)
                top = 65535.0 if array.max(initial=0) > 255 else 255.0
                img = Image.fromarray((np.clip(array, 0, top) * (255.0 / top)).astype(np.uint8), mode="L")
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def decode_mask_bytes(data: bytes, path: str | Path) -> torch.Tensor:
    """Class-index mask uint8 (H, W) from a palette or grayscale PNG."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in _INDEX_MODES:
                raise DataError(
                    f"{path}: mask has mode {img.mode}; masks must hold class indices (palette or grayscale PNG)"
                )
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: mask does not decode ({exc})") from None
    if array.max(initial=0) > 255:
        raise DataError(f"{path}: mask value {int(array.max())} is above 255; class indices must fit in 8 bits")
    return torch.from_numpy(array.astype(np.uint8))


def read_image(path: str | Path) -> torch.Tensor:
    return decode_image_bytes(_read(path), path)


def check_image_header(path: str | Path) -> None:
    """Fail as ``read_image`` would on a file that is not an image at all, from its first bytes alone
    (a file whose header announces no known format is decoded whole, to be sure)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_BYTES)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if image_format(head) is None:
        read_image(path)


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None


def read_mask(path: str | Path, lut: torch.Tensor | None = None) -> torch.Tensor:
    """Mask as class indices; ``lut`` (256,) maps raw values (e.g. Cityscapes label ids) first."""
    mask = decode_mask_bytes(Path(path).read_bytes(), path)
    return lut[mask.long()] if lut is not None else mask
