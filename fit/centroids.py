"""Archetype points C: faiss K-means on standardised tokens streamed from the store.

The paper uses K-means centroids of all training tokens (32,000 per backbone). Tokens are drawn
as a uniform sample of the train split (the loader's shuffled stream), at most `sample` of them
(default 256 per centroid, faiss's own cap), so the memory needed does not grow with the store.
The result is saved into the store as `centroids/k<K>-seed<S>-<tokens>` and reused by every fit.
"""

import time

import numpy as np
import torch
from tqdm import tqdm

from archsae.errors import UserError
from archsae.cache import TokenStore, open_store

MIN_TOKENS_PER_CENTROID = 4  # below this K-means mostly memorises single tokens
DEFAULT_TOKENS_PER_CENTROID = 256


def centroid_name(k: int, seed: int, tokens: str) -> str:
    return f"k{k}-seed{seed}-{tokens}"


def largest_sensible_k(n_tokens: int) -> int:
    return n_tokens // MIN_TOKENS_PER_CENTROID


def compute_centroids(store_path, k: int, seed: int = 0, sample: int | None = None,
                      tokens: str = "all", niter: int = 20, gpu: bool | None = None,
                      progress: bool = True, force: bool = False) -> str:
    """Compute (or reuse) the centroid set; returns its name in the store."""
    import faiss

    store = open_store(store_path, mode="r+")
    name = centroid_name(k, seed, tokens)
    if name in store.centroid_names() and not force:
        return name
    loader = TokenStore(store, tokens=tokens, split="train")
    if k < 1 or k > largest_sensible_k(loader.n_tokens):
        raise UserError(f"K={k} centroids need at least {MIN_TOKENS_PER_CENTROID * k} tokens, the "
                        f"train split has {loader.n_tokens}: the largest sensible K is "
                        f"{largest_sensible_k(loader.n_tokens)}")
    x = loader.sample(sample or DEFAULT_TOKENS_PER_CENTROID * k, seed=seed, progress=progress)
    n = len(x)
    use_gpu = (faiss.get_num_gpus() > 0 and torch.cuda.is_available()) if gpu is None else gpu
    kmeans = faiss.Kmeans(store.d, k, niter=1, seed=seed, gpu=use_gpu, verbose=False,
                          max_points_per_centroid=max(1, n // k + 1),
                          min_points_per_centroid=MIN_TOKENS_PER_CENTROID)
    centroids, inertia = None, float("nan")
    t = time.perf_counter()
    with tqdm(total=niter, unit="iter", desc=f"k-means K={k}", disable=not progress) as bar:
        for it in range(niter):  # one faiss iteration per call, so progress can be shown
            kmeans.train(x, init_centroids=centroids)
            centroids = kmeans.centroids.copy()
            inertia = float(kmeans.obj[-1])
            bar.set_postfix(inertia=f"{inertia:.4g}", tok_s=f"{n * (it + 1) / (time.perf_counter() - t):.3g}")
            bar.update(1)
    store.save_centroids(name, centroids, {
        "k": k, "seed": seed, "tokens": tokens, "split": "train", "n_tokens_sampled": n,
        "niter": niter, "inertia": inertia, "standardised": True, "faiss_version": faiss.__version__,
        "gpu": bool(use_gpu)})
    return name


def load_points(store, name: str) -> torch.Tensor:
    points, _ = store.load_centroids(name)
    return torch.from_numpy(points)


def faiss_kmeans(x, k: int, seed: int = 0, niter: int = 25):
    """K-means of rows held in memory: (the trained faiss.Kmeans, each row's cluster)."""
    import faiss

    data = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    kmeans = faiss.Kmeans(data.shape[1], k, niter=niter, seed=seed, verbose=False,
                          max_points_per_centroid=max(1, len(data) // k + 1),
                          min_points_per_centroid=1)
    kmeans.train(data)
    _, labels = kmeans.index.search(data, 1)
    return kmeans, labels[:, 0]
