"""One image file's bytes -> canonical uint8 H x W x C pixels, or a quarantine reason.

Shared by ingest and by inference on raw files, so both see exactly the same pixels.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# Reasons a file is quarantined instead of becoming a row.
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
UNDECODABLE = "undecodable"
TOO_MANY_PIXELS = "too_many_pixels"
UNKNOWN_LABEL = "unknown_label"
LABEL_CONFLICT = "label_conflict"

# Our own pixel limit replaces Pillow's global one (checked from the header, before decoding).
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageSpec:
    """The canonical pixel format of a dataset."""

    height: int
    width: int
    channels: int
    resize_policy: str = "resize"
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = 50_000_000

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def nbytes(self) -> int:
        return self.height * self.width * self.channels


class Quarantined(Exception):
    """A file that cannot become a row; `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:500]


def skip_reason(path: str) -> str | None:
    """Why a listed file is not an image candidate at all ('hidden', 'not_image_extension'), or None."""
    parts = PurePosixPath(path).parts
    if any(p.startswith((".", "_")) for p in parts[-1:]):
        return "hidden"
    if PurePosixPath(path).suffix.lower() not in IMAGE_EXTENSIONS:
        return "not_image_extension"
    return None


def decode(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode file bytes to canonical pixels (uint8, spec.shape); raise Quarantined when that is impossible."""
    if not data:
        raise Quarantined(EMPTY_FILE, "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Quarantined(NOT_AN_IMAGE, "no known image format in the file header") from None
    except Exception as exc:  # header parsers raise a variety of errors on garbage
        raise Quarantined(NOT_AN_IMAGE, f"{type(exc).__name__}: {exc}") from None
    width, height = img.size
    if width * height > spec.max_pixels:  # from the header alone: nothing is decoded
        raise Quarantined(TOO_MANY_PIXELS, f"{width}x{height} > max_pixels {spec.max_pixels}")
    if width == 0 or height == 0:
        raise Quarantined(UNDECODABLE, f"empty image {width}x{height}")
    if img.format == "JPEG":
        # Decode JPEGs at the smallest DCT scale still >= the target (either orientation): same result
        # quality for small targets, several times less work for photos.
        side = max(spec.width, spec.height)
        img.draft(img.mode, (side, side))
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        reason = TRUNCATED if ("truncated" in text.lower() or isinstance(exc, EOFError)) else UNDECODABLE
        raise Quarantined(reason, f"{type(exc).__name__}: {text}") from None
    except Exception as exc:
        raise Quarantined(UNDECODABLE, f"{type(exc).__name__}: {exc}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose the image
        pass
    return normalize(img, spec)


def to_standard_mode(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> 'L' or 'RGB': 16-bit scaled down, alpha composited on `background`, CMYK converted."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    elif mode == "1":
        img = img.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    if img.mode == "RGBA":
        canvas = Image.new("RGB", img.size, tuple(background))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img


def normalize(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """A decoded image -> uint8 array of spec.shape, with the configured channels and resize policy."""
    img = to_standard_mode(img, spec.background)
    img = img.convert("L" if spec.channels == 1 else "RGB")
    size = (spec.width, spec.height)
    if img.size != size:
        if spec.resize_policy == "pad":
            fill = int(np.mean(spec.background)) if spec.channels == 1 else tuple(spec.background)
            img = ImageOps.pad(img, size, method=Image.Resampling.BILINEAR, color=fill)
        elif spec.resize_policy == "center_crop":
            img = ImageOps.fit(img, size, method=Image.Resampling.BILINEAR)
        else:
            img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(spec.shape)


def normalize_array(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Already-decoded uint8 pixels (H x W or H x W x C) -> spec.shape; a no-op when they already match."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape == spec.shape and pixels.dtype == np.uint8:
        return pixels
    mode = "L" if pixels.shape[2] == 1 else "RGB"
    return normalize(Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode), spec)
