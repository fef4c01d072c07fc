"""The extraction loop: images -> backbone -> the units of an activation store.

Each process takes the units `u` with `u % world == rank` that are not done yet. Images are
decoded and preprocessed in DataLoader workers, the backbone runs in the main process, and
finished units are written by background threads while the next ones are computed. Batches never
cross a unit boundary and always start at the unit's first image, so a unit's tokens do not
depend on which process computed it, or whether the run was interrupted before.
"""

import io
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from archsae.devices import resolve_device
from archsae.errors import InvalidSetting, UserError
from archsae.ranks import resolve_ranks
from archsae.cache import (StoreSpec, create_or_open, default_chunk_images, is_store, open_store,
                           resumable_units)
from archsae.extract.presets import build_backbone
from archsae.extract.sources import ImageSource, open_source
from archsae.extract.demo_data import write_demo_shards

ON_ERROR = ("skip", "fail")
# the backbone's compute precision: float32, or autocast to a 16-bit type (fast on GPUs)
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Units written at once, each by a thread of its own (a unit owns its chunks: docs/cache-format.md):
# one thread's check, compression and statistics took about 7 ms per image of 261 x 768 tokens,
# which held a GPU extraction to about 140 images/s against a backbone of 6,000
WRITERS = 4


def resolve_data(data: str, demo_images: int) -> str:
    return write_demo_shards(demo_images) if data == "demo" else data


class DecodedImages(torch.utils.data.Dataset):
    """Image i of a source, decoded and preprocessed; a failure becomes an error string."""

    def __init__(self, source: ImageSource, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            with Image.open(io.BytesIO(self.source.read(i))) as img:
                return i, self.transform(img.convert("RGB")), ""
        except UnidentifiedImageError:
            return i, None, "not a readable image (unknown or corrupt format)"
        except Exception as exc:  # any decoder failure is a bad image, never a crash
            return i, None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def collate(items) -> tuple[list[int], torch.Tensor | None, list[str]]:
    """A batch as (its image indices, its readable images stacked, an error per image). Stacked
    in the worker, so that the main process does not copy the batch and a GPU's copy of it is
    from page-locked memory (`pin_memory`), not a synchronous one from a fresh stack."""
    images = [x for _, x, err in items if not err]
    return [i for i, _, _ in items], torch.stack(images) if images else None, [err for _, _, err in items]


def unit_batches(bounds: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Image indices per batch; batches start at each unit's first image and stay inside it."""
    return [list(range(b, min(b + batch_size, stop)))
            for start, stop in bounds for b in range(start, stop, batch_size)]


def extract(model: str, data: str, out, weights: str = "pretrained", limit: int | None = None,
            batch_size: int = 32, layer: int | None = None, rank: int | None = None,
            world: int | None = None, dtype: str = "float16", on_error: str = "skip",
            chunk_images: int | None = None, workers: int | None = None,
            device: str | None = None, demo_images: int = 256, precision: str = "float32",
            progress: bool = True):
    """Fill (or finish) the store at `out`; returns the open store. `precision` other than
    float32 runs the backbone under autocast (recorded in the store: it changes the tokens)."""
    if precision not in PRECISIONS:
        raise InvalidSetting("precision", f"{{name}} {precision!r} is not one of {', '.join(PRECISIONS)}")
    if on_error not in ON_ERROR:
        raise InvalidSetting("on_error", f"{{name}} {on_error!r} is not one of {', '.join(ON_ERROR)}")
    if batch_size < 1:
        raise InvalidSetting("batch_size", f"{{name}} {batch_size} must be a positive number of images")
    if limit is not None and limit < 1:
        raise InvalidSetting("limit", f"{{name}} {limit} must be a positive number of images")
    if is_store(out):  # refuse a foreign store before building anything
        existing = open_store(out).attrs
        if existing.get("model") != model:
            raise InvalidSetting("out", f"{out} already holds a store made by model "
                                        f"{existing.get('model')!r}, not {model!r}: pass another "
                                        "{name} or delete that folder")
    ranks = resolve_ranks(rank, world)
    device = ranks.device(resolve_device(device))
    source = open_source(resolve_data(data, demo_images)).limit(limit)
    backbone = build_backbone(model, weights, layer, device)
    itemsize = np.dtype(dtype).itemsize
    spec = _store_spec(model, backbone, source, layer, dtype, chunk_images, precision)
    if ranks.distributed:  # rank 0 creates; a refusal reaches every rank, none waits forever
        problem = [None]
        if ranks.rank == 0:
            try:
                _check_disk(out, spec, itemsize)
                create_or_open(out, spec)
            except UserError as exc:
                problem = [str(exc)]
        torch.distributed.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            ranks.close()
            raise UserError(problem[0])
    else:
        _check_disk(out, spec, itemsize)
    store = create_or_open(out, spec)
    todo = resumable_units(store, [u for u in range(store.n_units) if u % ranks.world == ranks.rank],
                           progress and ranks.rank == 0)
    if progress and ranks.rank == 0:
        if weights == "auto" and backbone.weights.startswith("random"):
            print(f"archsae: no pretrained weights for {backbone.timm_name} in the local cache: "
                  "using random weights (recorded in the store)")
        print(f"archsae: {model} ({backbone.timm_name}) weights={backbone.weights}, "
              f"{len(source)} images -> {out}")
    _run_units(store, source, backbone, todo, batch_size, on_error, workers, device,
               PRECISIONS[precision], progress, ranks)
    ranks.barrier()
    ranks.close()
    return store


def _store_spec(model: str, backbone, source, layer, dtype: str, chunk_images: int | None,
                precision: str) -> StoreSpec:
    """What the store of this backbone over this source holds, with its provenance."""
    kinds, grid, d, d_pooled = backbone.token_layout()
    itemsize = np.dtype(dtype).itemsize
    return StoreSpec(
        n_images=len(source), token_kind=kinds, d=d, d_pooled=d_pooled, dtype=dtype,
        chunk_images=(default_chunk_images(len(source), len(kinds), d, itemsize) if chunk_images is None
                      else chunk_images),
        provenance={
            "model": model, "timm_name": backbone.timm_name, "weights": backbone.weights,
            "layer": "forward_features" if layer is None else layer,
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v
                              for k, v in backbone.data_config.items()},
            "patch_grid": grid, "source": source.describe(),
            "source_hash": source.manifest_hash(), "precision": precision,
        })


def _check_disk(out, spec: StoreSpec, itemsize: int) -> None:
    """Refuse to start when the uncompressed tokens would not fit on the disk of `out`."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    need = spec.n_images * (spec.n_tokens * spec.d + (spec.d_pooled or 0)) * itemsize
    if is_store(out):
        st = open_store(out)
        need = int(need * (1 - st.done_units().mean()))
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UserError(f"not enough free disk for {out}: about {need / 1e9:.2f} GB needed, "
                        f"{free / 1e9:.2f} GB free: free some space or write to another folder")


def _run_units(store, source, backbone, units, batch_size, on_error, workers, device, autocast,
               progress, ranks) -> None:
    import timm

    if not units:
        return
    transform = timm.data.create_transform(**backbone.data_config)
    bounds = [store.unit_bounds(u) for u in units]
    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 2) // max(1, ranks.world) - 1))
    loader = torch.utils.data.DataLoader(
        DecodedImages(source, transform), batch_sampler=unit_batches(bounds, batch_size),
        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=False)
    np_dtype = np.dtype(store.attrs["dtype"])
    token_dtype = store.torch_dtype  # cast on the device: half the copy
    writers = max(1, min(WRITERS, (os.cpu_count() or 2) // (4 * max(1, ranks.world))))
    n_total = sum(b - a for a, b in bounds)
    unit_iter = iter(zip(units, bounds))
    unit, (start, stop) = next(unit_iter)
    buf = _UnitBuffer(store, start, stop, np_dtype)
    writing: deque = deque()
    with tqdm(total=n_total, unit="img", desc=f"extract rank {ranks.rank}" if ranks.world > 1
              else "extract", position=ranks.rank if ranks.distributed else 0,
              disable=not progress, dynamic_ncols=True) as bar, \
            ThreadPoolExecutor(writers) as writer, torch.inference_mode():
        for indices, images, errors in loader:
            for i, err in zip(indices, errors):
                buf.keys[i - start] = source.records[i].key
                buf.labels[i - start] = source.records[i].label
                if err:
                    if on_error == "fail":
                        raise InvalidSetting("on_error", f"cannot read image {source.records[i].key} "
                                             f"in {source.records[i].path}: {err}: fix or remove "
                                             "it, or pass {name} skip")
                    buf.errors[i - start] = err
            if images is not None:
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    tokens, pooled = backbone.features(images.to(device, non_blocking=True))
                rows = [i - start for i, err in zip(indices, errors) if not err]
                buf.tokens[rows] = tokens.to(token_dtype).cpu().numpy()
                buf.pooled[rows] = pooled.float().cpu().numpy()
            bar.update(len(indices))
            if indices[-1] == stop - 1:  # unit complete: hand it to a writer
                if len(writing) == writers:
                    writing.popleft().result()
                writing.append(writer.submit(buf.write, unit))
                nxt = next(unit_iter, None)
                if nxt is not None:
                    unit, (start, stop) = nxt
                    buf = _UnitBuffer(store, start, stop, np_dtype)
        while writing:
            writing.popleft().result()


class _UnitBuffer:
    """One unit's arrays, filled batch by batch, written in one go."""

    def __init__(self, store, start, stop, dtype):
        n = stop - start
        self.store = store
        self.tokens = np.zeros((n, store.n_tokens, store.d), dtype)
        self.pooled = np.zeros((n, store.group["pooled"].shape[1]), dtype)
        self.keys = [""] * n
        self.labels = np.full(n, -1, np.int64)
        self.errors = [""] * n

    def write(self, unit: int) -> None:
        self.store.write_unit(unit, self.tokens, self.keys, self.labels, self.errors, self.pooled)
