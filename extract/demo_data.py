"""The bundled demo data, written once as webdataset tar shards so the demo goes through
exactly the path user data takes. Nothing is downloaded.

- Photos: crops at several scales (15-100% of the short side) and flips of the real photos
  shipped inside scikit-image and scikit-learn (18 scenes).
- Drawings: where Debian's `openclipart-png` is installed (`make demo` installs it when apt
  works), three images in four are Open Clip Art drawings (8,000 objects, people, animals,
  food, vehicles, buildings, signs...) on white, drawn evenly across its top-level categories.
The set's composition is written to `about.txt` beside the shards (recorded in the store).
"""

import io
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from archsae.errors import InvalidSetting
from archsae.extract.sources import ABOUT_FILE
from archsae.files import temporary_sibling
from archsae.paths import runs_dir

# Photographs only (no drawings or synthetic patterns); grey ones are converted to RGB.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "camera", "coins", "clock", "brick", "grass",
                  "gravel", "moon", "cell", "stereo_motorcycle")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
OPENCLIPART = Path("/usr/share/openclipart/png")
IMAGES_PER_SHARD = 64
MAX_SIDE = 320
MAX_DRAWING_PIXELS = 4_000_000  # a few drawings are rendered at 100+ megapixels: left out


def load_photo(name: str) -> np.ndarray:
    """A bundled photo as RGB uint8: a scikit-image `data` function name or a scikit-learn
    sample image (`china.jpg`, `flower.jpg`)."""
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(name))
    import skimage.data

    img = getattr(skimage.data, name)()
    img = np.asarray(img[0] if isinstance(img, tuple) else img)  # stereo pairs: the left view
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3].astype(np.uint8)


def demo_photos() -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 array) for every bundled photo, in a fixed order."""
    return [(name.split(".")[0], load_photo(name)) for name in SKIMAGE_PHOTOS + SKLEARN_PHOTOS]


def demo_image(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop (15-100% of the short side, log-uniform, aspect 3:4 to 4:3), maybe flipped,
    max side 320."""
    h, w = photo.shape[:2]
    side = np.exp(rng.uniform(np.log(0.15), 0.0)) * min(h, w)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch, cw = min(h, int(side / np.sqrt(aspect))), min(w, int(side * np.sqrt(aspect)))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(photo[top:top + ch, left:left + cw])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return img


def clipart_files(root: Path = OPENCLIPART) -> list[Path]:
    """The drawings of `root`, interleaved across its top-level categories (one of each in
    turn), so any prefix of the list is balanced; [] where the package is not installed."""
    if not root.is_dir():
        return []
    by_category: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.png")):
        if _pixels(path) <= MAX_DRAWING_PIXELS:
            by_category.setdefault(path.relative_to(root).parts[0], []).append(path)
    rng = np.random.default_rng(0)
    queues = [[files[i] for i in rng.permutation(len(files))] for files in by_category.values()]
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def _pixels(path: Path) -> float:
    """Width x height from the header alone (inf if unreadable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                return img.width * img.height
        except (OSError, Image.DecompressionBombError):
            return float("inf")


def clipart_image(path: Path, rng: np.random.Generator) -> Image.Image:
    """A drawing flattened on white with a margin, maybe flipped, max side 320."""
    with Image.open(path) as img:
        img = img.convert("RGBA")
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    margin = int(rng.uniform(0.05, 0.3) * max(img.size))
    canvas = Image.new("RGB", (img.width + 2 * margin, img.height + 2 * margin), "white")
    canvas.paste(img, (margin, margin), img)
    if rng.random() < 0.5:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    canvas.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return canvas


def write_shards(out: Path, n_images: int, render, prefix: str, about: str) -> str:
    """Write (once) `n_images` images as tar shards and `about` (what the set is) as about.txt;
    return their brace pattern. `render(i)` gives image i as (key, PIL image, integer label).

    Written into a temporary folder renamed into place, so an interrupted run leaves nothing.
    """
    import webdataset as wds

    out = Path(out)
    n_shards = -(-n_images // IMAGES_PER_SHARD)
    pattern = str(out / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")
    if out.is_dir():
        return pattern
    tmp = temporary_sibling(out)
    tmp.mkdir(parents=True)

    def encoded(i):
        key, img, label = render(i)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        return {"__key__": key, "jpg": buf.getvalue(), "cls": label}

    try:  # a shard's images are rendered on every core (PIL decodes and resizes outside the GIL)
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            for s in range(n_shards):
                with wds.TarWriter(str(tmp / f"{prefix}-{s:06d}.tar")) as sink:
                    shard = range(s * IMAGES_PER_SHARD, min((s + 1) * IMAGES_PER_SHARD, n_images))
                    for sample in pool.map(encoded, shard):
                        sink.write(sample)
        (tmp / ABOUT_FILE).write_text(about + "\n")
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pattern


def write_demo_shards(n_images: int = 256, out: Path | None = None, seed: int = 0,
                      clipart_root: Path = OPENCLIPART) -> str:
    """The demo set as tar shards: crops of the bundled photos (label = photo) and, where Open
    Clip Art is installed, drawings for three images in four (label = 100 + category)."""
    if n_images < 1:
        raise InvalidSetting("demo_images", f"{{name}} {n_images} must be at least 1 image")
    photos = demo_photos()
    drawings = clipart_files(clipart_root)
    n_drawings = 3 * n_images // 4 if drawings else 0
    categories = sorted({p.relative_to(clipart_root).parts[0] for p in drawings})

    def render(i):
        rng = np.random.default_rng([seed, i])
        if i < n_drawings:
            path = drawings[i % len(drawings)]
            category = path.relative_to(clipart_root).parts[0]
            return (f"clipart-{category}-{i:06d}", clipart_image(path, rng),
                    100 + categories.index(category))
        label = i % len(photos)
        return f"photo-{photos[label][0]}-{i:06d}", demo_image(photos[label][1], rng), label

    about = (f"{n_images} images: {n_images - n_drawings} crops (15-100% of the short side) and "
             f"flips of the {len(photos)} photos bundled with scikit-image and scikit-learn")
    if n_drawings:
        about += (f", and {n_drawings} Open Clip Art drawings (Debian openclipart-png, "
                  f"{min(n_drawings, len(drawings))} distinct, balanced over {len(categories)} categories)")
    name = f"shards-{n_images}" + ("-clipart" if n_drawings else "")
    return write_shards(out or runs_dir() / "demo" / name, n_images, render, "demo", about)
