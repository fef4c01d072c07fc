"""`archsae import`: activations made by another tool (.npy, .safetensors, zarr) into a store.

Rows (n, d) become n "images" of one token each; (n, t, d) keeps t tokens per item. Every token
is of kind "token", so fits read imported stores exactly like extracted ones, whatever model
(a language model included) produced them.
"""

import hashlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from archsae.errors import InvalidSetting, UserError
from archsae.cache.store import (TOKEN_KINDS, StoreSpec, create_or_open, default_chunk_images,
                                 resumable_units)


def open_array(src: str, key: str | None = None):
    """A lazily sliceable (n, d) or (n, t, d) array from a .npy, .safetensors or zarr path."""
    path = Path(src)
    if not path.exists():
        raise UserError(f"{src} does not exist: pass a .npy, .safetensors or zarr array path")
    if path.suffix == ".npy":
        arr = _open_npy(path)
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors' own error type differs between versions
            raise UserError(f"{src} is not a readable .safetensors file ({str(exc)[:200]}): save "
                            "the activations with safetensors.torch.save_file") from None
        names = list(handle.keys())
        if key is None and len(names) != 1:
            raise InvalidSetting("key", f"{src} holds {len(names)} tensors ({', '.join(names[:8])}): "
                                        "choose one with {name}")
        name = key or names[0]
        if name not in names:
            raise UserError(f"{src} has no tensor {name!r}: choose one of {', '.join(names[:8])}")
        arr = _SafetensorsSlice(handle.get_slice(name))
    elif (path / "zarr.json").exists() or (path / ".zarray").exists() or (path / ".zgroup").exists():
        import zarr

        try:
            node = zarr.open(str(path), mode="r")
        except Exception as exc:
            raise UserError(f"{src} is not a readable zarr array or group ({type(exc).__name__}: "
                            f"{str(exc)[:200]}): check its metadata") from None
        if isinstance(node, zarr.Group):
            if key is None or key not in node:
                raise InvalidSetting("key", f"{src} is a zarr group: choose an array in it with {{name}} "
                                f"(one of {', '.join(list(node.array_keys())[:8])})")
            node = node[key]
        arr = node
    else:
        raise UserError(f"{src} is not a .npy, .safetensors or zarr array: convert it to one of those")
    if len(arr.shape) not in (2, 3) or not np.issubdtype(np.dtype(arr.dtype), np.floating):
        raise UserError(f"{src} has shape {tuple(arr.shape)} and dtype {arr.dtype}: activations "
                        "must be floating point of shape (n, d) or (n, tokens, d)")
    return arr


def _open_npy(path: Path) -> np.ndarray:
    """A .npy file memory-mapped, once its header says it holds numbers and the file is whole."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
            start = f.tell()
    except ValueError as exc:
        raise UserError(f"{path} is not a readable .npy file ({exc}): save the activations with "
                        "numpy.save") from None
    if dtype.hasobject:
        raise UserError(f"{path} holds Python objects, which archsae never unpickles: save a "
                        "numeric array with numpy.save")
    need = start + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size < need:
        raise UserError(f"{path} is truncated ({path.stat().st_size} bytes, its header says "
                        f"{need}): copy or save it again")
    return np.load(path, mmap_mode="r", allow_pickle=False)


class _SafetensorsSlice:
    """A safetensors tensor read a slice at a time (through torch, so bfloat16 works too)."""

    def __init__(self, sl):
        self.sl, self.shape = sl, tuple(sl.get_shape())
        floating = sl.get_dtype() in ("F16", "BF16", "F32", "F64")
        self.dtype = np.dtype(np.float32 if floating else np.int64)

    def __getitem__(self, item):
        return self.sl[item].float().numpy()


def source_hash(src: str, arr) -> str:
    """Identity of an imported array: its name, shape, dtype and first and last rows."""
    h = hashlib.sha256(f"{Path(src).name}\t{tuple(arr.shape)}\t{arr.dtype}\n".encode())
    h.update(np.ascontiguousarray(arr[:1]).tobytes())
    h.update(np.ascontiguousarray(arr[-1:]).tobytes())
    return h.hexdigest()


def import_activations(src: str, out, key: str | None = None, dtype: str = "float16",
                       chunk_images: int | None = None, progress: bool = True):
    """Copy `src` into a store at `out` (resumable, like an extraction); returns the store."""
    arr = open_array(src, key)
    n, t, d = (arr.shape[0], 1, arr.shape[1]) if len(arr.shape) == 2 else tuple(arr.shape)
    itemsize = np.dtype(dtype).itemsize
    spec = StoreSpec(
        n_images=n, token_kind=np.full(t, TOKEN_KINDS.index("token")), d=d, dtype=dtype,
        chunk_images=default_chunk_images(n, t, d, itemsize) if chunk_images is None else chunk_images,
        provenance={"model": "imported", "timm_name": None, "weights": "unknown (imported)",
                    "layer": None, "preprocessing": None, "patch_grid": None,
                    "source": {"kind": "import", "location": str(src), "key": key,
                               "n_images": n, "label_names": None},
                    "source_hash": source_hash(src, arr)})
    store = create_or_open(out, spec)
    todo = resumable_units(store, list(range(store.n_units)), progress)
    with tqdm(total=sum(np.diff(store.unit_bounds(u))[0] for u in todo) * t, unit="tok",
              unit_scale=True, desc="import", disable=not progress) as bar:
        for u in todo:
            start, stop = store.unit_bounds(u)
            try:
                rows = np.asarray(arr[start:stop], dtype=np.float32).reshape(stop - start, t, d)
            except Exception as exc:  # a truncated or damaged file fails here, whatever its format
                raise UserError(f"rows {start}..{stop - 1} of {src} cannot be read ({type(exc).__name__}: "
                                f"{str(exc)[:200]}): the file may be truncated or damaged") from None
            store.write_unit(u, rows, keys=[str(i) for i in range(start, stop)])
            bar.update((stop - start) * t)
    return store
