"""Which compressor for float16 activations? Ratio and encode/decode speed of numcodecs' codecs
on real activations (a store made by `archsae extract`, default: a fresh demo extraction).

    python -m benchmarks.codecs [STORE]

Prints one line per codec, then RESULT lines for the codec the store uses.
"""

import sys
import tempfile
import time

import numpy as np
from numcodecs import LZ4, Blosc, Zstd

from archsae.cache import open_store


def sample_activations(path: str | None) -> np.ndarray:
    if path is None:
        from archsae.extract.run import extract

        with tempfile.TemporaryDirectory(prefix="archsae-bench-") as work:
            extract("vit", "demo", f"{work}/store", weights="auto", limit=32, progress=False,
                    demo_images=32)
            return sample_activations(f"{work}/store")
    store = open_store(path)
    return np.asarray(store.tokens[: store.chunk_images]).astype(np.float16)


def measure(codec, data: np.ndarray, repeat: int = 3) -> tuple[float, float, float]:
    raw = data.tobytes()
    enc = dec = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        packed = codec.encode(raw)
        enc = min(enc, time.perf_counter() - t)
        t = time.perf_counter()
        codec.decode(packed)
        dec = min(dec, time.perf_counter() - t)
    mb = len(raw) / 1e6
    return len(packed) / len(raw), mb / enc, mb / dec


def main() -> None:
    data = sample_activations(sys.argv[1] if len(sys.argv) > 1 else None)
    codecs = {"none": None, "zstd-1": Zstd(1), "zstd-3": Zstd(3), "lz4": LZ4()}
    for cname in ("lz4", "zstd"):
        for shuffle, sname in ((Blosc.NOSHUFFLE, "noshuffle"), (Blosc.SHUFFLE, "shuffle"),
                               (Blosc.BITSHUFFLE, "bitshuffle")):
            for level in (1, 5):
                codecs[f"blosc-{cname}-{level}-{sname}"] = Blosc(cname, level, shuffle, typesize=2)
    print(f"{data.size / 1e6:.1f}M float16 values; ratio = compressed / raw bytes")
    print(f"{'codec':32s} {'ratio':>6s} {'enc MB/s':>9s} {'dec MB/s':>9s}")
    results = {}
    for name, codec in codecs.items():
        if codec is None:
            continue
        results[name] = measure(codec, data)
        r, e, d = results[name]
        print(f"{name:32s} {r:6.3f} {e:9.0f} {d:9.0f}")
    chosen = "blosc-lz4-5-bitshuffle"  # what cache/store.py writes
    ratio, enc, dec = results[chosen]
    print(f"chosen: {chosen}")
    # A GPU extraction of ViT-B writes ~400 MB/s of float16 tokens; a GPU fit reads ~1 GB/s.
    print(f"RESULT codec_compressed_over_raw {ratio:.3f} target <= 0.95")
    print(f"RESULT codec_encode_mb_s {enc:.0f} target >= 400")
    print(f"RESULT codec_decode_mb_s {dec:.0f} target >= 1000")


if __name__ == "__main__":
    main()
