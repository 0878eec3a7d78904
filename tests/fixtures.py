"""Small real data for tests: an image-folder tree built from photos shipped in scikit-image and scikit-learn,
with every corrupt-file kind the ingest job must quarantine, and IDX slices of Fashion-MNIST."""
from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def photo(name: str) -> Image.Image:
    """A real photo: skimage's 'astronaut', 'coffee', 'chelsea', 'camera', or sklearn's 'china'/'flower'."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


PHOTO_CLASSES = ("astronaut", "coffee", "chelsea", "china", "flower", "rocket")


def build_photo_classes(root: Path, per_class: int, classes: tuple[str, ...] = PHOTO_CLASSES[:3],
                        seed: int = 0) -> dict[str, int]:
    """ROOT/<photo name>/NNN.jpg|png: `per_class` different crops of each real photo (random position and size,
    rescaled, some mirrored, JPEG at several qualities or PNG), as a user's folder of photos would be."""
    rng = np.random.default_rng(seed)
    for name in classes:
        img = photo(name).convert("RGB")
        w, h = img.size
        for i in range(per_class):
            side = int(min(w, h) * rng.uniform(0.5, 0.95))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = img.crop((x, y, x + side, y + side)).resize((int(rng.integers(80, 200)),) * 2)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if i % 4 == 3:
                _save(crop, root / name / f"{i:03d}.png", "PNG")
            else:
                _save(crop, root / name / f"{i:03d}.jpg", "JPEG", quality=int(rng.integers(70, 96)))
    return {name: per_class for name in classes}


def build_image_tree(root: Path) -> dict[str, int]:
    """ROOT/<label>/... with good images of every format and bad files of every kind.

    Returns the expected counts: good rows, each quarantine reason, duplicates and skipped files.
    """
    astro, coffee, chelsea = photo("astronaut"), photo("coffee"), photo("chelsea")
    china, flower, camera = photo("china"), photo("flower"), photo("camera")
    small = lambda im, w=96: im.resize((w, int(w * im.height / im.width)))  # noqa: E731

    # label "cat": JPEG variants
    _save(small(chelsea), root / "cat" / "baseline.jpg", "JPEG", quality=90)
    _save(small(chelsea, 90), root / "cat" / "progressive.JPG", "JPEG", progressive=True)
    _save(small(chelsea, 80).convert("CMYK"), root / "cat" / "cmyk.jpeg", "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: exif_transpose must turn it upright
    _save(small(chelsea, 70), root / "cat" / "nested" / "deeper" / "exif rotated.jpg", "JPEG", exif=exif.tobytes())
    # label "coffee": PNG variants
    c = small(coffee)
    _save(c, root / "coffee" / "rgb.png", "PNG")
    arr16 = (np.asarray(c.convert("L"), dtype=np.uint16) * 257)
    _save(Image.fromarray(arr16, "I;16"), root / "coffee" / "sixteen bit.PNG", "PNG")
    _save(c.convert("P", palette=Image.Palette.ADAPTIVE), root / "coffee" / "palette.png", "PNG")
    rgba = c.convert("RGBA")
    alpha = np.zeros((c.height, c.width), dtype=np.uint8)
    alpha[:, : c.width // 2] = 255
    rgba.putalpha(Image.fromarray(alpha))
    _save(rgba, root / "coffee" / "alpha.png", "PNG")
    # label "space": other formats and awkward names
    a = small(astro)
    _save(a, root / "space" / "astronaut.bmp", "BMP")
    _save(a, root / "space" / "astronaut.gif", "GIF")
    _save(a, root / "space" / "astronaut.tiff", "TIFF")
    _save(a, root / "space" / "astronaut.webp", "WEBP", quality=80)
    _save(small(china), root / "space" / "chïnä temple ✓.jpg", "JPEG")
    _save(small(flower), root / "space" / "flower.Tif", "TIFF")
    good = 14

    # duplicates: same bytes under the same label (kept once)
    dup = _save(small(camera), root / "space" / "camera.png", "PNG")
    (root / "space" / "camera copy.png").write_bytes(dup)
    good += 1
    duplicates = 1
    # label conflict: same bytes under two labels (both quarantined)
    conflict = _save(small(camera, 64), root / "cat" / "conflict.png", "PNG")
    (root / "coffee" / "conflict.png").write_bytes(conflict)
    # corrupt files
    (root / "cat" / "empty.jpg").write_bytes(b"")
    jpeg = (root / "cat" / "baseline.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "coffee" / "not really.png").write_bytes(b"this is a text file, not a PNG\n" * 20)
    _save(Image.new("1", (3000, 3000)), root / "space" / "bomb.png", "PNG")  # 9 Mpx > the tests' max_pixels
    _save(small(coffee, 40), root / "loose-at-root.png", "PNG")  # no label folder
    # skipped: hidden files and non-image extensions
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "cat" / ".hidden.jpg").write_bytes(jpeg)
    (root / "coffee" / "README.txt").write_text("not an image")
    return {"good": good, "duplicates": duplicates, "label_conflict": 2, "empty_file": 1, "truncated": 1,
            "not_an_image": 1, "too_many_pixels": 1, "unknown_label": 1, "hidden": 2, "not_image_extension": 1}


def write_idx_slice(dest: Path, train: int, test: int) -> Path:
    """The first `train` / `test` Fashion-MNIST records as gzipped IDX files under dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        with gzip.open(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz") as fh:
            fh.read(16)
            pixels = fh.read(n * 784)
        with gzip.open(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz") as fh:
            fh.read(8)
            labels = fh.read(n)
        with gzip.open(dest / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">IIII", 0x803, n, 28, 28) + pixels)
        with gzip.open(dest / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">II", 0x801, n) + labels)
    return dest


def listening_addresses(pid: int) -> dict[tuple[str, int], str]:
    """Every (address, port) that process `pid` or one of its descendants listens on, with the listener's command."""
    import psutil

    root = psutil.Process(pid)
    pids = {pid} | {p.pid for p in root.children(recursive=True)}
    out = {}
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                what = " ".join(psutil.Process(c.pid).cmdline())[:120]
            except psutil.Error:
                what = "?"
            out[(c.laddr.ip, c.laddr.port)] = what
    return out


def is_loopback(address: str) -> bool:
    return address in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


class ListeningSampler:
    """While in use, samples what this process and its descendants listen on (for servers that live only as long as
    a call: Horovod's services during training)."""

    def __init__(self, every: float = 0.25):
        import threading

        self.every, self.seen = every, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import os

        while not self._stop.wait(self.every):
            self.seen.update(listening_addresses(os.getpid()))

    def __enter__(self) -> "ListeningSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
