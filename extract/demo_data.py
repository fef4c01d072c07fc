"""The bundled demo data: real photos shipped inside scikit-image and scikit-learn, turned into
a deterministic set of crops and flips and written once as webdataset tar shards, so the demo
goes through exactly the path user data takes. Nothing is downloaded.
"""

import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from archsae.errors import InvalidSetting
from archsae.files import temporary_sibling
from archsae.paths import runs_dir

# Photographs only (no drawings or synthetic patterns); grey ones are converted to RGB.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "camera", "coins", "clock", "brick", "grass",
                  "gravel", "moon", "cell")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
IMAGES_PER_SHARD = 64


def load_photo(name: str) -> np.ndarray:
    """A bundled photo as RGB uint8: a scikit-image `data` function name or a scikit-learn
    sample image (`china.jpg`, `flower.jpg`)."""
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(name))
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3].astype(np.uint8)


def demo_photos() -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 array) for every bundled photo, in a fixed order."""
    return [(name.split(".")[0], load_photo(name)) for name in SKIMAGE_PHOTOS + SKLEARN_PHOTOS]


def demo_image(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop (35-100% of the short side, aspect 3:4 to 4:3), maybe flipped, max side 320."""
    h, w = photo.shape[:2]
    side = rng.uniform(0.35, 1.0) * min(h, w)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch, cw = min(h, int(side / np.sqrt(aspect))), min(w, int(side * np.sqrt(aspect)))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(photo[top:top + ch, left:left + cw])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.thumbnail((320, 320), Image.Resampling.BICUBIC)
    return img


def write_shards(out: Path, n_images: int, render, prefix: str) -> str:
    """Write (once) `n_images` images as tar shards; return their brace pattern. `render(i)`
    gives image i as (key, PIL image, integer label).

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
    try:
        for s in range(n_shards):
            with wds.TarWriter(str(tmp / f"{prefix}-{s:06d}.tar")) as sink:
                for i in range(s * IMAGES_PER_SHARD, min((s + 1) * IMAGES_PER_SHARD, n_images)):
                    key, img, label = render(i)
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=90)
                    sink.write({"__key__": key, "jpg": buf.getvalue(), "cls": label})
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pattern


def write_demo_shards(n_images: int = 256, out: Path | None = None, seed: int = 0) -> str:
    """The demo set (crops and flips of the bundled photos, label = photo) as tar shards."""
    if n_images < 1:
        raise InvalidSetting("demo_images", f"{{name}} {n_images} must be at least 1 image")
    photos = demo_photos()

    def render(i):
        label = i % len(photos)
        img = demo_image(photos[label][1], np.random.default_rng([seed, i]))
        return f"{photos[label][0]}-{i:06d}", img, label

    return write_shards(out or runs_dir() / "demo" / f"shards-{n_images}", n_images, render, "demo")
