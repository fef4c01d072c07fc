"""The activation store: one zarr v3 group of token activations, written in units.

`docs/cache-format.md` is the normative description of what is on disk; this module is its
implementation. A unit is a run of `chunk_images` consecutive images: it owns exactly one chunk
of every per-image array and one row of the statistics, and is marked done only after all of
them are flushed. Nothing is summarised at the end of a run, so any set of processes can fill
the units in any order and the store is complete when every unit is done.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm
from zarr.codecs import BloscCodec, Crc32cCodec

from archsae.errors import InvalidSetting, UserError
from archsae.files import temporary_sibling
from archsae.cache.quantise import dequantise, quantise
from archsae.cache.stats import merge_moments, moments, standard_deviation

FORMAT_NAME = "archsae.activations"
FORMAT_VERSION = 2
TOKEN_KINDS = ("cls", "register", "patch", "token")
DTYPES = ("float16", "float32", "int8")  # int8: per-feature affine (cache/quantise.py)

# Chosen by benchmarks/codecs.py on float16 activations: bit-shuffled LZ4 saves about 9% and
# encodes/decodes at GB/s, faster than a GPU extraction writes or a GPU fit reads. zstd saves
# more only at levels that encode at ~200 MB/s. Figures in docs/cache-format.md.
TOKEN_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
# A checksum on every chunk of the data: a damaged chunk fails to read instead of reading as
# other numbers. Every chunk is written, zeros included, so a missing chunk file is damage.
DATA_CODECS = [TOKEN_CODEC, Crc32cCodec()]
# zarr keeps an array's config at run time only, not in its metadata: every write asks for it
DATA_CONFIG = {"write_empty_chunks": True}
DATA_ARRAYS = ("tokens", "pooled")

# What a store is: the attributes hashed into its `id`. A rerun resumes a store only when they
# agree, and a fit belongs to the store whose id it recorded.
IDENTITY_KEYS = ("model", "timm_name", "weights", "layer", "dtype", "preprocessing",
                 "source_hash", "chunk_images", "shape", "precision")
# identity keys added later, with the value every store written before them had; a default
# value is left out of the hash, so those stores keep their id
IDENTITY_DEFAULTS = {"precision": "float32"}


def identity(attrs: dict, key: str):
    return attrs.get(key, IDENTITY_DEFAULTS.get(key))


def store_id(attrs: dict) -> str:
    """The content hash of a store's identity attributes (16 hex digits)."""
    values = [identity(attrs, k) for k in IDENTITY_KEYS
              if k not in IDENTITY_DEFAULTS or identity(attrs, k) != IDENTITY_DEFAULTS[k]]
    key = json.dumps(values, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class StoreSpec:
    """What a new store will hold; `provenance` becomes the `archsae` attribute."""

    n_images: int
    token_kind: np.ndarray  # (n_tokens,) codes into TOKEN_KINDS
    d: int
    chunk_images: int
    dtype: str = "float16"
    d_pooled: int | None = None
    provenance: dict = field(default_factory=dict)
    quantisation: tuple[np.ndarray, np.ndarray] | None = None  # int8: (scale, offset) per feature

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise InvalidSetting("dtype", f"{{name}} {self.dtype!r} is not supported: use one of "
                                          f"{', '.join(DTYPES)}")
        if self.dtype == "int8" and self.quantisation is None:
            raise InvalidSetting("dtype", "{name} int8 needs each feature's range before the first "
                                          "unit is written: store float16, then `archsae convert "
                                          "STORE --dtype int8 --out NEW`")
        if self.dtype != "int8" and self.quantisation is not None:
            raise ValueError("quantisation constants belong to int8 stores only")
        if self.n_images < 1 or self.n_tokens < 1 or self.d < 1:
            raise UserError(f"no activations to store ({self.n_images} items x {self.n_tokens} "
                            f"tokens x {self.d} features): give at least one item with features")
        if self.chunk_images < 1:
            raise InvalidSetting("chunk_images", f"{{name}} {self.chunk_images} must be at least 1")

    @property
    def n_tokens(self) -> int:
        return int(len(self.token_kind))


def default_chunk_images(n_images: int, n_tokens: int, d: int, itemsize: int,
                         target_bytes: int = 8 << 20) -> int:
    """Images per chunk so that a chunk of tokens holds about `target_bytes` before compression."""
    return max(1, min(n_images, int(target_bytes // (n_tokens * d * itemsize))))


def unit_bounds(unit: int, chunk_images: int, n_images: int) -> tuple[int, int]:
    """[start, stop) of the images of a unit: the unit-th chunk along the image axis."""
    start = unit * chunk_images
    return start, min(start + chunk_images, n_images)


def _attrs_for(spec: StoreSpec) -> dict:
    from archsae import __version__

    attrs = {
        **spec.provenance,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "dtype": spec.dtype,
        "chunk_images": spec.chunk_images,
        "shape": [spec.n_images, spec.n_tokens, spec.d],
        "token_kinds": list(TOKEN_KINDS),
    }
    return {**attrs, "id": store_id(attrs)}


def provenance_of(attrs: dict) -> dict:
    """The attributes of a store that describe where its data came from (a StoreSpec's
    provenance), without those the format derives (dtype, shape, id...)."""
    derived = _attrs_for(StoreSpec(1, np.zeros(1, np.uint8), 1, 1))
    return {k: v for k, v in attrs.items() if k not in derived}


def pooled_dtype(dtype: str) -> str:
    """The pooled vectors are few: an int8 store keeps them in float16."""
    return "float16" if dtype == "int8" else dtype


def _create_group(path: Path, spec: StoreSpec) -> None:
    n, t, d, u = spec.n_images, spec.n_tokens, spec.d, spec.chunk_images
    n_units = -(-n // u)
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    group.create_array("tokens", shape=(n, t, d), chunks=(u, t, d), dtype=spec.dtype,
                       compressors=DATA_CODECS, fill_value=0)
    if spec.d_pooled is not None:
        group.create_array("pooled", shape=(n, spec.d_pooled), chunks=(u, spec.d_pooled),
                           dtype=pooled_dtype(spec.dtype), compressors=DATA_CODECS, fill_value=0)
    if spec.quantisation is not None:
        quant = group.create_group("quant")
        for name, values in zip(("scale", "offset"), spec.quantisation):
            quant.create_array(name, shape=(d,), chunks=(d,), dtype="float32")[:] = values
    kind = group.create_array("token_kind", shape=(t,), chunks=(t,), dtype="uint8")
    kind[:] = spec.token_kind.astype(np.uint8)
    group.create_array("keys", shape=(n,), chunks=(u,), dtype=str)
    group.create_array("errors", shape=(n,), chunks=(u,), dtype=str)
    group.create_array("labels", shape=(n,), chunks=(u,), dtype="int64", fill_value=-1)
    stats = group.create_group("stats")
    k = len(TOKEN_KINDS)
    stats.create_array("count", shape=(n_units, k), chunks=(1, k), dtype="int64", fill_value=0)
    stats.create_array("mean", shape=(n_units, k, d), chunks=(1, k, d), dtype="float64", fill_value=0)
    stats.create_array("m2", shape=(n_units, k, d), chunks=(1, k, d), dtype="float64", fill_value=0)
    group.create_array("done", shape=(n_units,), chunks=(1,), dtype="bool", fill_value=False)
    group.attrs["archsae"] = _attrs_for(spec)


def is_store(path) -> bool:
    return (Path(path) / "zarr.json").is_file()


def create_or_open(path, spec: StoreSpec) -> "ActivationStore":
    """Open the store at `path` if it was made with the same identity, else create it atomically.

    Creation happens in a sibling temporary folder renamed into place, so a crash never leaves a
    half-made store, and processes racing to create the same store all end up opening one.
    """
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        try:
            _create_group(tmp, spec)
            os.rename(tmp, path)
        except OSError:
            if not is_store(path):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    store = open_store(path, mode="r+")
    store.check_identity(_attrs_for(spec))
    return store


def resumable_units(store: "ActivationStore", units: list[int], progress: bool = True) -> list[int]:
    """Which of `units` a (re)run must write: those not done, and done ones whose chunks are
    missing or fail to decode (they are marked not done first)."""
    done = store.done_units()
    damaged = store.unreadable_units([u for u in units if done[u]], progress)
    store.undo(damaged)
    return [u for u in units if not done[u] or u in damaged]


def open_store(path, mode: str = "r") -> "ActivationStore":
    path = Path(path)
    if not is_store(path):
        raise UserError(f"{path} is not an archsae activation store: run `archsae extract` or "
                        "`archsae import` to make one")
    try:
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        attrs = group.attrs.get("archsae")
    except OSError:
        raise  # the disk, not the store: the CLI says so in one line
    except Exception as exc:  # damaged metadata: invalid JSON, wrong types
        raise UserError(f"{path} is damaged: its zarr metadata cannot be read ({type(exc).__name__}: "
                        f"{str(exc)[:120]}): extract or import it again into a new folder") from None
    if not attrs or attrs.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is a zarr group but not an archsae activation store: "
                        "point at a folder made by `archsae extract` or `archsae import`")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has store format version {attrs.get('format_version')}, this "
                        f"archsae reads version {FORMAT_VERSION}: re-extract or use a matching archsae")
    try:
        return ActivationStore(path, group)
    except Exception as exc:
        raise UserError(f"{path} is damaged: its layout does not match docs/cache-format.md "
                        f"({type(exc).__name__}: {str(exc)[:120]}): extract or import it again") from None


class ActivationStore:
    """Reads and writes one store; see docs/cache-format.md for the layout."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self.attrs = dict(group.attrs["archsae"])
        self.id = self.attrs["id"]
        self.n_images, self.n_tokens, self.d = self.attrs["shape"]
        self.chunk_images = self.attrs["chunk_images"]
        self.n_units = -(-self.n_images // self.chunk_images)
        self.token_kind = np.asarray(group["token_kind"][:])
        self.quantisation = ((np.asarray(group["quant/scale"][:]), np.asarray(group["quant/offset"][:]))
                             if self.attrs["dtype"] == "int8" else None)

    # -- layout ---------------------------------------------------------------------------
    @property
    def tokens(self) -> zarr.Array:
        return self.group["tokens"]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The stored dtype, as torch names it."""
        return torch.from_numpy(np.empty(0, self.attrs["dtype"])).dtype

    def unit_bounds(self, unit: int) -> tuple[int, int]:
        return unit_bounds(unit, self.chunk_images, self.n_images)

    def kind_counts(self) -> dict[str, int]:
        """Tokens of each kind per image, e.g. {"cls": 1, "register": 4, "patch": 256}."""
        codes, counts = np.unique(self.token_kind, return_counts=True)
        return {TOKEN_KINDS[c]: int(n) for c, n in zip(codes, counts)}

    def positions(self, kinds) -> np.ndarray:
        """Token positions (within an image) whose kind is in `kinds`; "all" means every one."""
        if kinds == "all":
            return np.arange(self.n_tokens)
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        unknown = [k for k in kinds if k not in TOKEN_KINDS]
        if unknown:
            raise UserError(f"unknown token kind {unknown[0]!r}: use all or one of {', '.join(TOKEN_KINDS)}")
        codes = [TOKEN_KINDS.index(k) for k in kinds]
        pos = np.flatnonzero(np.isin(self.token_kind, codes))
        if len(pos) == 0:
            raise InvalidSetting("tokens", f"{self.path} has no {'/'.join(kinds)} tokens (it has "
                                           f"{self.kind_counts()}): choose {{name}} among those")
        return pos

    # -- progress -------------------------------------------------------------------------
    def done_units(self) -> np.ndarray:
        """Units marked done whose data chunks are all on disk (a missing one is damage)."""
        done = np.asarray(self.group["done"][:], dtype=bool)
        for name in DATA_ARRAYS:
            if name in self.group:
                arr = self.group[name]
                encode = arr.metadata.chunk_key_encoding.encode_chunk_key
                zeros = (0,) * (arr.ndim - 1)
                done &= [(self.path / name / encode((u, *zeros))).is_file() for u in range(self.n_units)]
        return done

    def unreadable_units(self, units=None, progress: bool = True) -> list[int]:
        """Units (default: every done unit) whose data chunks fail to decode (checksum, codec):
        every chunk of them is read."""
        bad = []
        units = np.flatnonzero(self.done_units()) if units is None else units
        for u in tqdm(units, unit="unit", desc="verify", disable=not progress):
            start, stop = self.unit_bounds(u)
            try:
                for name in DATA_ARRAYS:
                    if name in self.group:
                        self.group[name][start:stop]
            except Exception:  # any decoding failure is damage, whatever the codec says
                bad.append(int(u))
        return bad

    def undo(self, units) -> None:
        """Mark units not done, so that the next extraction or import writes them again."""
        for u in units:
            self.group["done"][u] = False

    @property
    def complete(self) -> bool:
        return bool(self.done_units().all())

    def check_identity(self, wanted: dict) -> None:
        """Refuse to resume into a store that is not the one `wanted` describes."""
        if self.id == wanted["id"]:
            return
        for key in IDENTITY_KEYS:
            if identity(self.attrs, key) != identity(wanted, key):
                what = {"model": "model", "timm_name": "backbone", "weights": "weights",
                        "source_hash": "data"}.get(key, key)
                raise InvalidSetting(
                    "out", f"{self.path} already holds a store with another {what} "
                    f"({identity(self.attrs, key)!r}, not {identity(wanted, key)!r}): pass another {{name}} "
                    "or delete that folder")

    def damaged(self, unit: int, exc: Exception) -> UserError:
        """The one error for a unit whose chunks fail to read (damaged since written)."""
        start, stop = self.unit_bounds(unit)
        return UserError(f"{self.path}: unit {unit} (images {start}..{stop - 1}) cannot be read "
                         f"({type(exc).__name__}: {str(exc)[:120]}): rerun the command that made the "
                         "store (`archsae extract`, `import` or `convert`): it rewrites damaged units")

    # -- writing --------------------------------------------------------------------------
    def write_unit(self, unit: int, tokens: np.ndarray, keys, labels=None, errors=None,
                   pooled: np.ndarray | None = None) -> None:
        """Write one unit's arrays and statistics, then mark it done (last, after the flush)."""
        start, stop = self.unit_bounds(unit)
        n = stop - start
        if tokens.shape != (n, self.n_tokens, self.d):
            raise ValueError(f"unit {unit} expects tokens of shape {(n, self.n_tokens, self.d)}, "
                             f"got {tokens.shape}")
        errors = np.array([""] * n if errors is None else errors, dtype=str)
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            tokens = np.asarray(tokens, dtype=np.float32 if self.quantisation else self.attrs["dtype"])
        self._check_finite(unit, tokens, errors, keys)
        if self.quantisation:  # stored as int8; the statistics are those of what reads back
            stored = quantise(tokens, *self.quantisation)
            tokens = dequantise(stored, *self.quantisation)
        else:
            stored = tokens
        self.group["tokens"].with_config(DATA_CONFIG)[start:stop] = stored
        if pooled is not None:
            pooled = np.asarray(pooled, dtype=pooled_dtype(self.attrs["dtype"]))
            self.group["pooled"].with_config(DATA_CONFIG)[start:stop] = pooled
        self.group["keys"][start:stop] = np.array(keys, dtype=str)
        self.group["errors"][start:stop] = errors
        if labels is not None:
            self.group["labels"][start:stop] = np.asarray(labels, dtype=np.int64)
        count, mean, m2 = self.unit_moments(tokens[errors == ""])
        self.group["stats/count"][unit] = count
        self.group["stats/mean"][unit] = mean
        self.group["stats/m2"][unit] = m2
        self.group["done"][unit] = True

    def _check_finite(self, unit: int, tokens: np.ndarray, errors: np.ndarray, keys) -> None:
        """Refuse NaN and infinite activations (also values beyond the dtype's range)."""
        bad = ~np.isfinite(tokens).reshape(len(tokens), -1).all(axis=1) & (errors == "")
        if bad.any():
            count = int((~np.isfinite(tokens[bad])).sum())
            names = ", ".join(str(keys[i]) for i in np.flatnonzero(bad)[:3])
            raise UserError(f"{count} activations of {int(bad.sum())} images in unit {unit} (first: "
                            f"{names}) are NaN or infinite in {self.attrs['dtype']} (float16 "
                            "overflows beyond 65504): fix the model or the data, or store float32")

    def unit_moments(self, tokens: np.ndarray):
        """Per-kind moments of one unit's valid tokens (n, n_tokens, d), as stored."""
        k = len(TOKEN_KINDS)
        count = np.zeros(k, np.int64)
        mean = np.zeros((k, self.d))
        m2 = np.zeros((k, self.d))
        for code in np.unique(self.token_kind):
            rows = tokens[:, self.token_kind == code].reshape(-1, self.d)
            count[code], mean[code], m2[code] = moments(rows)
        return count, mean, m2

    # -- reading --------------------------------------------------------------------------
    def feature_stats(self, kinds="all") -> tuple[int, np.ndarray, np.ndarray]:
        """(count, mean, std) per feature over the valid tokens of `kinds`, merged in unit order."""
        codes = np.unique(self.token_kind[self.positions(kinds)])
        counts = np.asarray(self.group["stats/count"][:])[:, codes].reshape(-1)
        means = np.asarray(self.group["stats/mean"][:])[:, codes].reshape(-1, self.d)
        m2s = np.asarray(self.group["stats/m2"][:])[:, codes].reshape(-1, self.d)
        n, mean, m2 = merge_moments(counts, means, m2s)
        return n, mean, standard_deviation(n, m2)

    def errors(self) -> dict[str, str]:
        """Key -> reason for every image that could not be read (done units only)."""
        errs = np.asarray(self.group["errors"][:])
        bad = np.flatnonzero(errs != "")
        keys = np.asarray(self.group["keys"][:])
        return {str(keys[i]): str(errs[i]) for i in bad}

    def valid_images(self, done: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask of images that are in done units (`done`, when the caller already has
        it) and were read without error."""
        done = np.repeat(self.done_units() if done is None else done, self.chunk_images)[: self.n_images]
        return done & (np.asarray(self.group["errors"][:]) == "")

    # -- centroids ------------------------------------------------------------------------
    def centroid_names(self) -> list[str]:
        if "centroids" not in self.group:
            return []
        return sorted(n for n in self.group["centroids"].group_keys() if not n.startswith("."))

    def save_centroids(self, name: str, points: np.ndarray, settings: dict) -> None:
        """Write `centroids/<name>` atomically: built under a temporary name, then renamed."""
        tmp = temporary_sibling(self.path / "centroids" / name)
        parent = self.group.require_group("centroids")
        try:
            g = parent.create_group(tmp.name)
            arr = g.create_array("points", shape=points.shape, chunks=points.shape, dtype="float32")
            arr[:] = points.astype(np.float32)
            g.attrs["archsae"] = settings
            shutil.rmtree(self.path / "centroids" / name, ignore_errors=True)  # recomputed
            os.replace(tmp, self.path / "centroids" / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_centroids(self, name: str) -> tuple[np.ndarray, dict]:
        if name not in self.centroid_names():
            raise UserError(f"{self.path} has no centroids {name!r} (it has "
                            f"{self.centroid_names() or 'none'}): run `archsae centroids`")
        g = self.group["centroids"][name]
        return np.asarray(g["points"][:]), dict(g.attrs["archsae"])

    def bytes_on_disk(self, array: str | None = None) -> int:
        """Size of the whole store, or of one array, on a local filesystem."""
        root = self.path / array if array else self.path
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    def summary(self) -> dict:
        """What `archsae info --json` prints."""
        done = self.done_units()
        size = self.bytes_on_disk()
        tokens_bytes = self.bytes_on_disk("tokens")
        written_values = sum(self.unit_bounds(u)[1] - self.unit_bounds(u)[0]
                             for u in np.flatnonzero(done)) * self.n_tokens * self.d
        errors = self.errors()
        a = self.attrs
        return {
            "path": str(self.path),
            "model": a.get("model"),
            "timm_name": a.get("timm_name"),
            "weights": a.get("weights"),
            "layer": a.get("layer"),
            "dtype": a.get("dtype"),
            "shape": [self.n_images, self.n_tokens, self.d],
            "token_kinds": self.kind_counts(),
            "patch_grid": a.get("patch_grid"),
            "pooled": "pooled" in self.group,
            "complete": bool(done.all()),
            "units_done": int(done.sum()),
            "units": self.n_units,
            "images_skipped": len(errors),
            "skipped": errors,
            "bytes_on_disk": size,
            "bytes_per_value": (tokens_bytes / written_values) if written_values else None,
            "source": a.get("source"),
            "preprocessing": a.get("preprocessing"),
            "package_version": a.get("package_version"),
        }
