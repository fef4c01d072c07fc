"""Image sources: webdataset tar shards and image folders, indexed for random access.

Extraction works in units of consecutive images that any process may pick up in any order, so a
source is first turned into a manifest (one record per image: where its bytes are, its label).
Tar shards are indexed with the standard library's tarfile (headers only, no image is read);
webdataset's own rule splits member names into sample key and field. Only uncompressed tars
can be read at an offset, which is webdataset's default format.
"""

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from archsae.errors import InvalidSetting, UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
LABEL_FIELDS = ("cls", "cls.txt", "cls2")
ABOUT_FILE = "about.txt"  # beside the images or shards: one line saying what the set is


@dataclass(frozen=True)
class ImageRecord:
    key: str
    path: str  # the tar shard or the image file
    offset: int  # byte offset of the image inside `path` (0 for plain files)
    size: int
    label: int = -1


@dataclass
class ImageSource:
    """An ordered list of images; `read(i)` returns the encoded bytes of image i."""

    kind: str  # "webdataset" or "folder"
    location: str
    records: list[ImageRecord]
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def read(self, i: int) -> bytes:
        r = self.records[i]
        with open(r.path, "rb") as f:
            f.seek(r.offset)
            return f.read(r.size)

    def limit(self, n: int | None) -> "ImageSource":
        if n is None:
            return self
        return ImageSource(self.kind, self.location, self.records[:n], self.label_names)

    def manifest_hash(self) -> str:
        """Identifies the data independently of where it is mounted: names, sizes, labels."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{Path(r.path).name}\t{r.key}\t{r.size}\t{r.label}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"kind": self.kind, "location": self.location, "n_images": len(self.records),
                "label_names": self.label_names, "about": self.about()}

    def about(self) -> str | None:
        """The first line of `about.txt` in the images' folder (the shards' folder), if any."""
        folder = Path(self.location)
        path = (folder if self.kind == "folder" else folder.parent) / ABOUT_FILE
        try:
            return path.read_text(errors="replace").splitlines()[0].strip() or None
        except (OSError, IndexError):
            return None


def open_source(spec: str) -> ImageSource:
    """A tar shard pattern (`/data/train-{000000..001281}.tar`), one .tar, or an image folder;
    the location is recorded as an absolute path, so later stages find it from anywhere."""
    path = Path(spec).absolute()
    spec = str(path)
    if path.is_file() and is_image_file(path):
        raise InvalidSetting("data", f"{{name}} {spec} is a single image: pass the folder that holds "
                                     "the images (or a .tar shard)")
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if shards and not any(is_image_file(p) for p in path.iterdir()):
            return _tar_source(spec, [str(p) for p in shards])
        return _folder_source(path)
    if ".tar" in spec:
        shards = list(braceexpand(spec))
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise InvalidSetting("data", f"data shard {missing[0]} does not exist ({len(missing)} of "
                                         f"{len(shards)} missing): check the {{name}} pattern")
        return _tar_source(spec, shards)
    raise UserError(f"data path {spec} does not exist: pass an image folder, a .tar shard or a "
                    "brace pattern like /data/train-{000000..000009}.tar, or demo")


def _tar_source(location: str, shards: list[str]) -> ImageSource:
    records = []
    for shard in shards:
        try:
            with tarfile.open(shard, "r:") as tar:
                samples: dict[str, dict] = {}
                for m in tar:
                    if not m.isfile():
                        continue
                    key, field = base_plus_ext(m.name)
                    if key is None:
                        continue
                    sample = samples.setdefault(key, {})
                    if field.lower() in IMAGE_EXTENSIONS and "image" not in sample:
                        sample["image"] = m
                    elif field in LABEL_FIELDS:
                        sample["label"] = tar.extractfile(m).read()
        except tarfile.TarError as exc:
            raise UserError(f"{shard} is not an uncompressed tar ({exc}): write shards with "
                            "webdataset's TarWriter or `tar cf`, without compression") from None
        end = Path(shard).stat().st_size
        for key, sample in samples.items():
            if "image" not in sample:
                continue
            m = sample["image"]
            if m.offset_data + m.size > end:
                raise UserError(f"{shard} is damaged: member {m.name!r} claims {m.size} bytes past the "
                                "end of the file: write the shard again")
            _check_name(key, f"sample key in {shard}: the")
            label = _parse_label(sample.get("label"), key, shard)
            records.append(ImageRecord(key, shard, m.offset_data, m.size, label))
    if not records:
        raise UserError(f"no images found in {location}: shards must hold samples like "
                        "KEY.jpg (and optionally KEY.cls)")
    return ImageSource("webdataset", location, records)


INT64 = np.iinfo(np.int64)


def _check_name(name: str, what: str) -> None:
    """Image names are recorded in the store as text: refuse one that is not UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"the {what} name {name.encode('utf-8', 'surrogateescape')!r} is not UTF-8 "
                        "text: rename it (archsae records every image's name)") from None


def _parse_label(raw: bytes | None, key: str, shard: str) -> int:
    """An integer class label; anything that is not an integer is no label (-1)."""
    if raw is None:
        return -1
    try:
        label = int(raw.decode().strip())
    except ValueError:
        return -1
    if not INT64.min <= label <= INT64.max:
        raise UserError(f"{shard} is damaged: the label of sample {key!r} ({label}) does not fit "
                        "in 64 bits: write the shard again with integer class labels")
    return label


def _folder_source(root: Path) -> ImageSource:
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and is_image_file(p))
    for p in files:
        _check_name(str(p), "file")
    if not files:
        raise UserError(f"no images found in {root}: use a folder of images (class sub-folders "
                        f"give labels), extensions {', '.join(IMAGE_EXTENSIONS)}")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    labelled = classes and all(len(p.relative_to(root).parts) > 1 for p in files)
    index = {c: i for i, c in enumerate(classes)}
    records = [ImageRecord(str(p.relative_to(root).with_suffix("")), str(p), 0, p.stat().st_size,
                           index[p.relative_to(root).parts[0]] if labelled else -1)
               for p in files]
    return ImageSource("folder", str(root), records, classes if labelled else None)
