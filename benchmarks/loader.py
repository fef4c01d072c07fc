"""Loader throughput on the train split a fit reads, at d=768, against a plain sequential read
of the same array into memory, into a reused buffer through zarr, and chunk by chunk straight
into a reused buffer (`read_chunks_into`, the loader's own decode, with nothing else: the
strictest baseline), in one run on the same store, as float16 and converted to int8
(`archsae convert`):
- raw: the stored values for a device (what a GPU fit reads): the host's whole part of that path,
  each shuffle window decoded and its order drawn (`TokenStore.windows`); the window is then
  copied whole to the GPU, which gathers, decodes and standardises the batches (measured there by
  `make gpu-check`, a fit fed from a store);
- standardised: float32 batches gathered and standardised on the host (what a CPU fit reads).
Then the int8 error on a store of real activations (the demo's): bytes per value on disk and
R^2 of the values read back against the original ones.

    python -m benchmarks.loader [--images 8192] [--batch-size 4096]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from zarr.core.buffer.cpu import NDBuffer

from benchmarks.common import count, real_activation_store, result
from archsae.cache import TokenStore, is_store, open_store
from archsae.cache.chunks import read_chunks_into
from archsae.cache.convert import convert, read_unit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=count(), default=8192)
    ap.add_argument("--batch-size", type=count(), default=4096)
    ap.add_argument("--repeat", type=count(2, even=True), default=8, help="an even number: half in each order")
    ap.add_argument("--real-store", default="runs/demo/efficientnet_lite0",
                    help="a store of real activations for the int8 error (made by `make demo`)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="archsae-bench-") as work:
        store = real_activation_store(args.images, work)
        fp16 = measure(store, args)
        int8 = measure(convert(store.path, Path(work) / "int8", "int8", progress=False), args)
        result("loader_vs_reused_buffer_read", fp16, ">=", 0.80)
        result("loader_vs_reused_buffer_read_int8", int8, ">=", 0.80)
        if is_store(args.real_store):
            int8_error(args.real_store, Path(work) / "real-int8")
        else:
            print(f"int8 error: no store at {args.real_store} (run `make demo` first)")


def int8_error(path, out) -> None:
    """Bytes per value on disk and R^2 of the int8 store's values against the original's."""
    source = open_store(path)
    int8 = convert(path, out, "int8", progress=False)
    sse, total, sq = 0.0, np.zeros(source.d), np.zeros(source.d)
    n = 0
    for u in range(source.n_units):
        a, b = read_unit(source, u), read_unit(int8, u)
        valid = np.array(a["errors"]) == ""
        x, y = a["tokens"][valid].reshape(-1, source.d).astype(np.float64), b["tokens"][valid].reshape(-1, source.d)
        sse += float(np.square(x - y).sum())
        total += x.sum(0)
        sq += np.square(x).sum(0)
        n += len(x)
    r2 = 1 - sse / float((sq - total ** 2 / n).sum())
    values = int8.n_images * int8.n_tokens * int8.d
    bpv = int8.bytes_on_disk("tokens") / values
    print(f"int8 conversion of {path} ({source.attrs['dtype']}, {n} valid tokens): "
          f"{bpv:.3f} bytes per value on disk ({source.bytes_on_disk('tokens') / values:.3f} before), "
          f"R^2 of the values read back against the original {r2:.6f}")
    result("int8_bytes_per_value", bpv, "<=", 1.0)
    result("int8_r2_vs_float32", r2, ">=", 0.9995, digits=6)


def measure(store, args) -> float:
    """The loader's rate against the faster bare read's. The bare chunk read and the loader's
    windows run back to back, in turns first: on these machines the second of two reads in a row
    ran slower (the same bare read twice: by 12% in the median of 8 repeats, up to 2x), which
    put the loader, always second, 12% behind. Two repeats, one of each order, give one figure
    free of that: the geometric mean of their ratios; the ratio is the median of those."""
    n_tokens = store.n_images * store.n_tokens
    seq, seq_into, chunked, raw, std = [], [], [], [], []
    reused = np.empty(store.tokens.shape, store.tokens.dtype)
    into = NDBuffer.from_numpy_array(reused)
    pieces = [((u, 0, 0), reused[slice(*store.unit_bounds(u))]) for u in range(store.n_units)]
    loader = TokenStore(store, part="train")
    n = loader.n_tokens

    def bare_chunks():
        t = time.perf_counter()
        read_chunks_into(store.tokens, pieces)
        chunked.append(time.perf_counter() - t)

    def windows(seed):
        t = time.perf_counter()
        assert sum(len(order) for _, order in loader.windows(seed=seed)) == n
        raw.append(time.perf_counter() - t)

    for r in range(args.repeat):
        t = time.perf_counter()
        data = np.asarray(store.tokens[:])
        seq.append(time.perf_counter() - t)
        del data
        t = time.perf_counter()
        store.tokens.get_basic_selection(slice(None), out=into)
        seq_into.append(time.perf_counter() - t)
        pair = (bare_chunks, lambda: windows(r))
        for step in pair if r % 2 == 0 else pair[::-1]:
            step()
        t = time.perf_counter()
        sum(len(b) for b in loader.batches(args.batch_size, seed=r))
        std.append(time.perf_counter() - t)
    seq_rate, into_rate, chunk_rate = (n_tokens / np.median(t) for t in (seq, seq_into, chunked))
    raw_rate, std_rate = n / np.median(raw), n / np.median(std)
    ratios = (n / np.array(raw)) / np.maximum(n_tokens / np.array(seq_into), n_tokens / np.array(chunked))
    pairs = np.sqrt(ratios[0::2] * ratios[1::2])
    print(f"store: {store.n_images} images x {store.n_tokens} tokens x {store.d} {store.attrs['dtype']} "
          f"({n_tokens} tokens; train split {n}, {n / n_tokens:.3f} of them); {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    print(f"sequential read into memory: {seq_rate:,.0f} tokens/s; into a reused buffer through zarr: "
          f"{into_rate:,.0f} tokens/s; chunk by chunk straight into it: {chunk_rate:,.0f} tokens/s")
    print(f"TokenStore train split, raw {store.attrs['dtype']} windows for a device (batches gathered "
          f"there): {raw_rate:,.0f} tokens/s; batches standardised to float32 on the host: "
          f"{std_rate:,.0f} tokens/s")
    print(f"windows against the faster bare read, each repeat (bare read first, then windows first, "
          f"in turns): {' '.join(f'{x:.3f}' for x in ratios)}; each pair: {' '.join(f'{x:.3f}' for x in pairs)}")
    suffix = "" if store.attrs["dtype"] == "float16" else f"_{store.attrs['dtype']}"
    result(f"loader_tokens_per_s{suffix}", raw_rate, ">=", 1100000)
    result(f"loader_standardised_tokens_per_s{suffix}", std_rate, ">=", 650000)
    return float(np.median(pairs))

if __name__ == "__main__":
    main()
