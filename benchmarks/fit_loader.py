"""Is training starved by the store? TopK SAE steps/s fed by `TokenStore` from a store at d=768,
against the same model fed batches from a tensor already in memory (same batch, same machine).

    python -m benchmarks.fit_loader [--images 1024] [--steps 30] [--batch-size 1024]
"""

import argparse
import tempfile
import time

import torch

from benchmarks.common import real_activation_store, result
from archsae.cache import TokenStore
from archsae.fit import FitSettings, sae_settings
from archsae.fit.step import TrainingStep


def steps_per_s(learner, batches, n: int) -> float:
    learner(next(batches))  # warm-up
    t = time.perf_counter()
    for _ in range(n):
        learner(next(batches))
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="archsae-bench-") as work:
        measure(real_activation_store(args.images, work), args)


def measure(store, args) -> None:
    loader = TokenStore(store, part="all")
    memory = torch.cat(list(loader.batches(args.batch_size, seed=1)))  # standardised, in RAM
    sae = sae_settings("topk", store.d)
    rates = {"store": [], "memory": []}
    for _ in range(2):  # interleaved, best of each
        for source in rates:
            learner = TrainingStep(sae, FitSettings(), None, 10**6, torch.device("cpu"))
            if source == "store":
                batches = iter(loader.batches(args.batch_size, seed=0))
            else:
                perm = torch.randperm(len(memory))
                batches = (memory[perm[i:i + args.batch_size]]
                           for i in range(0, len(memory) - args.batch_size + 1, args.batch_size))
            rates[source].append(steps_per_s(learner, batches, args.steps))
    store_rate, memory_rate = max(rates["store"]), max(rates["memory"])
    print(f"TopK SAE d={store.d}, {sae.concepts} concepts, batch {args.batch_size}: "
          f"{store_rate:.2f} steps/s from the store, {memory_rate:.2f} steps/s from memory")
    result("fit_store_vs_memory", store_rate / memory_rate, ">=", 0.90)


if __name__ == "__main__":
    main()
