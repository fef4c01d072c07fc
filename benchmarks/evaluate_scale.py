"""`archsae evaluate` at the paper's dictionary sizes: time and peak memory at 10,240 and 32,000
random concepts (top-k = concepts / 10) on this machine's CPU, and the projection to one GPU.

Each size runs in its own process (its peak resident memory is its own) over the held-out half
of a small store in DINOv2's layout (CLS, 4 registers, 256 patches: three token kinds, tallied
in one pass), through `evaluate_model`, the function `archsae evaluate` runs. Time splits into
a part per token (encode, decode, the tallies: 2 k^2 flops of co-firing dominate) and a part per
dictionary (the blocked pass over D D^T); both are projected to the paper's held-out split (10%
of 334M tokens) on the CPU, measured, and on one GPU, from the flops at a stated sustained rate.

    python -m benchmarks.evaluate_scale [--sizes 10240,32000] [--images 8]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import PAPER_D, PAPER_TOKENS, paper_store, result

HELDOUT_TOKENS = PAPER_TOKENS // 10  # the default held-out split (10% of images)
GPU_FLOPS = 50e12  # sustained float32 matmul of one H100/H200 (about 75% of its 67 TFLOP/s peak)
KINDS = 3  # CLS, register, patch: one co-firing tally each
SIZES = (10240, 32000)  # ResNet50's 10,240 concepts; 32,000 (archetypes drawn from all centroids)
TARGET_MINUTES, TARGET_GB = 30, 16  # one evaluation at 32,000 concepts on one GPU


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--images", type=int, default=8, help="images in the store (half held out)")
    ap.add_argument("--one", type=int, help="(internal) measure this size in this process")
    ap.add_argument("--store", help="(internal)")
    return ap.parse_args()


def measure(concepts: int, store_path: str, device: str = "cpu", batch_size: int = 512) -> dict:
    """Seconds per token and per dictionary, and the peak memory (resident on the CPU, allocated
    on a GPU), of one evaluation of random atoms on `device`."""
    from archsae.cache import Split, open_store
    from archsae.evaluate.metrics import summarise
    from archsae.evaluate.run import evaluate_model
    from archsae.fit import unit_rows

    store = open_store(store_path)
    top_k = concepts // 10
    atoms = torch.randn(concepts, store.d, generator=torch.Generator().manual_seed(0)).to(device)
    encoder = unit_rows(atoms).T.contiguous()

    def predict(x):
        values, indices = torch.relu(x @ encoder).topk(top_k, dim=-1)
        z = torch.zeros(len(x), concepts, device=x.device).scatter_(-1, indices, values)
        return z @ atoms, z

    gpu = atoms.is_cuda
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    metrics = evaluate_model(store, predict, atoms, lambda x: x, split=Split(0.5, 0), batch_size=batch_size,
                             progress=False)  # summarise reads its figures back: the device is done
    total = time.perf_counter() - t
    t = time.perf_counter()
    summarise({}, atoms)  # the per-dictionary part alone: one blocked pass over D D^T
    per_dictionary = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = metrics["all"]["tokens"]
    return {"tokens": tokens, "seconds": total, "per_dictionary": per_dictionary,
            "per_token": (total - per_dictionary) / tokens, "peak_gb": peak / 1e9, "peak_gb_added": (peak - base) / 1e9}


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.store)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"CPU: {torch.get_num_threads()} torch threads; paper's held-out split: {HELDOUT_TOKENS:,} "
          f"tokens of d = {PAPER_D}; GPU projection at {GPU_FLOPS / 1e12:.0f} TFLOP/s float32")
    with tempfile.TemporaryDirectory(prefix="archsae-eval-") as work:
        paper_store(Path(work) / "store", args.images)
        for k in sizes:
            done = subprocess.run([sys.executable, "-m", "benchmarks.evaluate_scale", "--one", str(k),
                                   "--store", str(Path(work) / "store")],
                                  stdout=subprocess.PIPE, text=True, check=True)
            m = json.loads(done.stdout.strip().splitlines()[-1])
            flops_token = 2 * k * k + 6 * k * PAPER_D  # co-firing; encode, decode, best cosine
            flops_dictionary = 2 * k * k * PAPER_D
            cpu_h = (m["per_token"] * HELDOUT_TOKENS + m["per_dictionary"]) / 3600
            gpu_min = (flops_token * HELDOUT_TOKENS + flops_dictionary) / GPU_FLOPS / 60
            gpu_gb = (KINDS * 4 * k * k + 3 * 4 * 4096 * k) / 1e9  # tallies; a 4,096 batch's z, cos
            print(f"{k:6d} concepts: {m['tokens']} tokens in {m['seconds']:.1f} s "
                  f"({m['per_token'] * 1e3:.2f} ms per token, {m['per_dictionary']:.1f} s per dictionary), "
                  f"peak resident {m['peak_gb']:.1f} GB ({m['peak_gb_added']:.1f} GB for the evaluation); "
                  f"projected to {HELDOUT_TOKENS / 1e6:.1f}M tokens: CPU {cpu_h:.1f} h, one GPU "
                  f"{gpu_min:.1f} min and {gpu_gb:.1f} GB")
            result(f"evaluate_peak_gb_cpu_{k}", m["peak_gb_added"], "<=", TARGET_GB)
            result(f"evaluate_projected_gpu_minutes_{k}", gpu_min, "<=", TARGET_MINUTES)
            result(f"evaluate_projected_gpu_gb_{k}", gpu_gb, "<=", TARGET_GB)


if __name__ == "__main__":
    main()
