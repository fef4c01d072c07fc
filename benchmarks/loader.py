"""Loader throughput: shuffled, standardised float32 batches from a store at d=768, against a
plain sequential read of the same array into memory, in one run on the same store.

    python -m benchmarks.loader [--images 8192] [--batch-size 4096]
"""

import argparse
import tempfile
import time

import numpy as np
from zarr.core.buffer.cpu import NDBuffer

from benchmarks.common import real_activation_store, result
from archsae.cache import TokenStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="archsae-bench-") as work:
        measure(real_activation_store(args.images, work), args)


def measure(store, args) -> None:
    n_tokens = store.n_images * store.n_tokens
    seq, seq_into, ours = [], [], []
    into = NDBuffer.from_numpy_array(np.empty(store.tokens.shape, store.tokens.dtype))
    loader = TokenStore(store, part="all")
    for r in range(args.repeat):  # interleaved, median of each: both see the same machine state
        t = time.perf_counter()
        data = np.asarray(store.tokens[:])
        seq.append(time.perf_counter() - t)
        del data
        t = time.perf_counter()
        store.tokens.get_basic_selection(slice(None), out=into)
        seq_into.append(time.perf_counter() - t)
        t = time.perf_counter()
        n = sum(len(b) for b in loader.batches(args.batch_size, seed=r))
        ours.append(time.perf_counter() - t)
    seq_rate, our_rate = n_tokens / np.median(seq), n / np.median(ours)
    gb = our_rate * store.d * 4 / 1e9
    print(f"store: {store.n_images} images x {store.n_tokens} tokens x {store.d} ({n_tokens} tokens)")
    print(f"sequential read into memory: {seq_rate:,.0f} tokens/s (into a reused buffer, "
          f"no allocation: {n_tokens / np.median(seq_into):,.0f} tokens/s)")
    print(f"TokenStore shuffled+standardised: {our_rate:,.0f} tokens/s, {gb:.2f} GB/s of float32 "
          f"(a GPU fit at d=768 wants about 650,000 tokens/s)")
    result("loader_vs_sequential_read", our_rate / seq_rate, ">=", 0.80)
    result("loader_tokens_per_s", our_rate, ">=", 650000)


if __name__ == "__main__":
    main()
