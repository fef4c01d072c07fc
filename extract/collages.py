"""The images of the soft-identifiability benchmark: 2 x 2 collages of 4 distinct objects.

An object set is a handful of distinct photos: two are bundled (real photos shipped with
scikit-image and scikit-learn), or a user's folder holds one image per object. Collages are
written once as tar shards, so they go through `archsae extract` like any data. The layout
(which objects, where) is a pure function of (number of collages, number of objects, seed).
"""

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from archsae.errors import InvalidSetting, UserError
from archsae.extract.demo_data import load_photo, write_shards
from archsae.extract.sources import is_image_file

# objects and scenes; textures and microscopy
OBJECT_SETS = {
    "objects": ("astronaut", "chelsea", "coffee", "rocket", "camera", "clock", "coins", "moon",
                "china.jpg", "flower.jpg"),
    "textures": ("brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                 "retina", "cell", "page", "text", "microaneurysms"),
}
PER_COLLAGE = 4
TILE = 160  # pixels per collage quarter


def bundled_objects(name: str) -> list[tuple[str, np.ndarray]]:
    return [(photo.split(".")[0], load_photo(photo)) for photo in OBJECT_SETS[name]]


def folder_objects(folder) -> list[tuple[str, np.ndarray]]:
    """One object per image file of `folder` (sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidSetting("objects", f"{{name}} {folder} is not a folder: give a folder with one "
                                        "image per object")
    objects = []
    for path in sorted(p for p in folder.iterdir() if is_image_file(p)):
        try:
            with Image.open(path) as img:
                objects.append((path.stem, np.asarray(img.convert("RGB"))))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{path} is not a readable image ({type(exc).__name__}): "
                            "remove it or replace it") from None
    if len(objects) <= PER_COLLAGE:
        raise InvalidSetting("objects", f"{{name}} {folder} has {len(objects)} images: the benchmark needs more "
                        f"than {PER_COLLAGE} objects (9 to 20 is usual)")
    return objects


def collage_objects(n_collages: int, n_objects: int, seed: int = 0) -> np.ndarray:
    """(n_collages, 4) distinct object indices, in reading order of the 2 x 2 grid."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_objects)[:PER_COLLAGE] for _ in range(n_collages)])


def presence(layout: np.ndarray, n_objects: int) -> np.ndarray:
    """(n_collages, n_objects) bool: object j is in collage i."""
    out = np.zeros((len(layout), n_objects), bool)
    np.put_along_axis(out, layout, True, axis=1)
    return out


def render_collage(photos: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    """A 2 x 2 collage: each photo a random square crop (70-100% of its short side), maybe
    flipped, resized to one quarter."""
    canvas = Image.new("RGB", (2 * TILE, 2 * TILE))
    for q, photo in enumerate(photos):
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.7, 1.0) * min(h, w))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        tile = Image.fromarray(photo[top:top + side, left:left + side]).resize(
            (TILE, TILE), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        canvas.paste(tile, ((q % 2) * TILE, (q // 2) * TILE))
    return canvas


def write_collages(objects, n_collages: int, out: Path, seed: int = 0) -> str:
    """Write (once) the collages of an object set as tar shards; return their brace pattern."""
    layout = collage_objects(n_collages, len(objects), seed)

    def render(i):
        img = render_collage([objects[j][1] for j in layout[i]], np.random.default_rng([seed, i]))
        return f"collage-{i:06d}", img, int(layout[i][0])

    about = (f"{n_collages} 2 x 2 collages of 4 distinct objects out of {len(objects)} "
             f"({', '.join(name for name, _ in objects)}), seed {seed}")
    return write_shards(out, n_collages, render, "collage", about)
