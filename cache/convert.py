"""`archsae convert`: a complete store rewritten with another dtype, unit by unit (resumable),
e.g. float16 -> int8 (per-feature affine, `cache/quantise.py`: a first pass finds each
feature's range over the valid tokens, a second writes the units)."""

import numpy as np
from tqdm import tqdm

from archsae.cache.quantise import affine_constants, dequantise
from archsae.cache.store import StoreSpec, create_or_open, open_store, provenance_of, resumable_units
from archsae.errors import InvalidSetting, UserError


def read_unit(store, unit: int) -> dict:
    """One unit's arrays as write_unit takes them (tokens as float32 activations)."""
    start, stop = store.unit_bounds(unit)
    g = store.group
    try:
        tokens = np.asarray(g["tokens"][start:stop])
    except Exception as exc:
        raise store.damaged(unit, exc) from None
    tokens = dequantise(tokens, *store.quantisation) if store.quantisation else tokens.astype(np.float32)
    return {"tokens": tokens, "keys": [str(k) for k in np.asarray(g["keys"][start:stop])],
            "labels": np.asarray(g["labels"][start:stop]),
            "errors": [str(e) for e in np.asarray(g["errors"][start:stop])],
            "pooled": np.asarray(g["pooled"][start:stop]) if "pooled" in g else None}


def feature_range(store, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of each feature over the valid tokens of the store."""
    lo = np.full(store.d, np.inf, np.float32)
    hi = np.full(store.d, -np.inf, np.float32)
    bar = tqdm(total=store.n_images, unit="img", desc="feature ranges", disable=not progress)
    for u in range(store.n_units):
        unit = read_unit(store, u)
        bar.update(len(unit["keys"]))
        rows = unit["tokens"][np.array(unit["errors"]) == ""].reshape(-1, store.d)
        if len(rows):
            lo, hi = np.minimum(lo, rows.min(0)), np.maximum(hi, rows.max(0))
    bar.close()
    return lo, hi


def convert(src, out, dtype: str, progress: bool = True):
    """Write the store at `src` with `dtype` into `out` (or finish an interrupted conversion)."""
    source = open_store(src)
    if not source.complete:
        raise UserError(f"{src} is incomplete: rerun the `archsae extract` that made it first")
    if dtype == source.attrs["dtype"]:
        raise InvalidSetting("dtype", f"{src} is already {dtype}: choose another {{name}}")
    d_pooled = source.group["pooled"].shape[1] if "pooled" in source.group else None
    quantisation = affine_constants(*feature_range(source, progress)) if dtype == "int8" else None
    spec = StoreSpec(source.n_images, source.token_kind, source.d, source.chunk_images, dtype, d_pooled,
                     {**provenance_of(source.attrs), "converted_from": source.id}, quantisation)
    store = create_or_open(out, spec)
    if quantisation is not None and not all(np.array_equal(a, b) for a, b in zip(store.quantisation, quantisation)):
        raise UserError(f"{out} holds a conversion with other quantisation constants: pass another "
                        "--out or delete that folder")
    todo = resumable_units(store, list(range(store.n_units)), progress)
    with tqdm(total=sum(np.subtract(*store.unit_bounds(u)[::-1]) for u in todo), unit="img",
              desc=f"convert to {dtype}", disable=not progress) as bar:
        for u in todo:
            unit = read_unit(source, u)
            store.write_unit(u, **unit)
            bar.update(len(unit["keys"]))
    return store
