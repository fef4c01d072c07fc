"""Extraction speed: `archsae extract` (decode, preprocess, forward, pooled head, compress,
write) against the bare `forward_features` of the same model on the same images, already
preprocessed in memory, with the same batch size and torch threads, in one run.

Extraction's throughput is its marginal rate: N / (time for 2N images - time for N images),
so the one-off start (building the model, indexing the shards, starting the decoding workers,
a few seconds) is printed apart instead of being spread over a small demo set.

    python -m benchmarks.extract [--model vit] [--images 64] [--batch-size 32]
"""

import argparse
import statistics
import io
import tempfile
import time

import torch
from PIL import Image

from benchmarks.common import result
from archsae.extract.presets import build_backbone
from archsae.extract.run import extract, resolve_data
from archsae.extract.sources import open_source


def bare_forward(backbone, source, batch_size: int) -> float:
    """Images/s of forward_features alone, on tensors prepared beforehand."""
    import timm

    transform = timm.data.create_transform(**backbone.data_config)
    images = [transform(Image.open(io.BytesIO(source.read(i))).convert("RGB"))
              for i in range(len(source))]
    t = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(images), batch_size):
            backbone.model.forward_features(torch.stack(images[b:b + batch_size]))
    return len(images) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.images
    data = resolve_data("demo", 2 * n)
    source = open_source(data).limit(n)
    backbone = build_backbone(args.model, "random")

    def timed_extract(limit: int) -> float:
        with tempfile.TemporaryDirectory(prefix="archsae-bench-") as work:
            t = time.perf_counter()
            extract(args.model, data, f"{work}/store", weights="random", limit=limit,
                    batch_size=args.batch_size, progress=False, demo_images=2 * n)
            return time.perf_counter() - t

    bare, ours, start = [], [], []
    for _ in range(args.repeat):  # interleaved pairs; the median ratio is reported
        bare.append(bare_forward(backbone, source, args.batch_size))
        t_n, t_2n = timed_extract(n), timed_extract(2 * n)
        ours.append(n / (t_2n - t_n))
        start.append(t_n - n / ours[-1])
    ratios = [o / b for o, b in zip(ours, bare)]
    print(f"{args.model}: bare forward_features {statistics.median(bare):.2f} images/s, archsae "
          f"extract {statistics.median(ours):.2f} images/s plus {statistics.median(start):.1f} s "
          f"to start (torch threads {torch.get_num_threads()}, batch {args.batch_size}, {n} and "
          f"{2 * n} images); ratios per pair {', '.join(f'{r:.3f}' for r in ratios)}")
    result("extract_vs_forward", statistics.median(ratios), ">=", 0.90)


if __name__ == "__main__":
    main()
