import io

import numpy as np
import pytest
from PIL import Image

from pipelines.images import (EMPTY_FILE, NOT_AN_IMAGE, TOO_MANY_PIXELS, TRUNCATED, ImageSpec, Quarantined,
                              decode, skip_reason)
from tests.fixtures import photo


def png_bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((10, 10), 32768, dtype=np.uint16)
    out = decode(png_bytes(Image.fromarray(arr, "I;16")), ImageSpec(10, 10, 1))
    assert out.shape == (10, 10, 1)
    assert abs(int(out[0, 0, 0]) - 128) <= 1  # half of 16-bit full scale is mid grey, not white


def test_alpha_is_composited_on_the_background():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    out = decode(png_bytes(rgba), ImageSpec(8, 8, 3, background=(0, 0, 255)))
    assert out[0, 0].tolist() == [0, 0, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode(png_bytes(img, "JPEG", exif=exif.tobytes()), ImageSpec(20, 40, 1, resize_policy="pad", background=(255, 255, 255)))
    # 40x20 landscape rotated to 20x40 portrait, then padded into 40 wide x 20 high: white bars left and right
    assert out[:, 0, 0].mean() > 200 and out[:, 20, 0].mean() < 50


@pytest.mark.parametrize("policy", ["resize", "pad", "center_crop"])
def test_resize_policies_give_the_canonical_shape(policy):
    out = decode(png_bytes(photo("coffee")), ImageSpec(32, 48, 3, resize_policy=policy))
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8


def test_cmyk_and_palette_convert():
    cmyk = photo("chelsea").convert("CMYK")
    assert decode(png_bytes(cmyk, "JPEG"), ImageSpec(16, 16, 3)).shape == (16, 16, 3)
    pal = photo("coffee").convert("P")
    assert decode(png_bytes(pal), ImageSpec(16, 16, 1)).shape == (16, 16, 1)


@pytest.mark.parametrize("data, reason", [
    (b"", EMPTY_FILE),
    (b"hello, I am text" * 10, NOT_AN_IMAGE),
])
def test_bad_bytes_are_quarantined(data, reason):
    with pytest.raises(Quarantined) as q:
        decode(data, ImageSpec(8, 8, 1))
    assert q.value.reason == reason


@pytest.mark.fault('a truncated JPEG', kind='bad_input', shows='quarantined as truncated')
def test_truncated_jpeg_is_quarantined():
    data = png_bytes(photo("chelsea"), "JPEG")
    with pytest.raises(Quarantined) as q:
        decode(data[: len(data) // 3], ImageSpec(8, 8, 1))
    assert q.value.reason == TRUNCATED


@pytest.mark.fault('a decompression bomb', kind='security', shows='refused from the header (5000x5000) before decoding')
def test_decompression_bomb_is_refused_from_the_header():
    bomb = png_bytes(Image.new("1", (5000, 5000)))  # small file, 25 Mpx
    with pytest.raises(Quarantined) as q:
        decode(bomb, ImageSpec(8, 8, 1, max_pixels=1_000_000))
    assert q.value.reason == TOO_MANY_PIXELS and "5000x5000" in q.value.detail


def test_skip_reason():
    assert skip_reason("a/b/.DS_Store") == "hidden"
    assert skip_reason("a/b/notes.txt") == "not_image_extension"
    assert skip_reason("a/b/Photo.JPEG") is None
