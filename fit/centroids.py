"""Archetype points C: faiss K-means on standardised tokens streamed from the store.

The paper uses K-means centroids of all training tokens (32,000 per backbone). Tokens are drawn
as a uniform sample of the train part of the fit's split (the loader's shuffled stream), so no
held-out image shapes the archetype points; at most `sample` of them (default 256 per centroid,
faiss's own cap), so the memory needed does not grow with the store. The result is saved into
the store as `centroids/k<K>-seed<S>-<tokens>-<split>` (e.g. `k512-seed0-all-heldout0.1s0`),
with its settings and split in its attributes, and reused by every fit on that split.
"""

import time

import numpy as np
import torch
from tqdm import tqdm

from archsae.cache import Split, TokenStore, open_store
from archsae.errors import InvalidSetting, UserError
from archsae.fit.settings import DEFAULT_NITER, PAPER_CENTROIDS, CentroidSettings

MIN_TOKENS_PER_CENTROID = 4  # below this K-means mostly memorises single tokens
DEFAULT_TOKENS_PER_CENTROID = 256


def centroid_name(k: int, seed: int, tokens: str, split: Split) -> str:
    return f"k{k}-seed{seed}-{tokens}-{split.name}"


def largest_sensible_k(n_tokens: int) -> int:
    return n_tokens // MIN_TOKENS_PER_CENTROID


def centroid_set(store_path, settings: CentroidSettings = CentroidSettings(), tokens: str = "all",
                 split: Split = Split(), progress: bool = True, force: bool = False,
                 gpu: bool | None = None) -> str:
    """Compute (or reuse) the centroid set of the train part of `split`; returns its name.
    K defaults to min(32000, train tokens / 4)."""
    import faiss

    store = open_store(store_path, mode="r+")
    loader = TokenStore(store, tokens=tokens, part="train", split=split)
    largest = largest_sensible_k(loader.n_tokens)
    k = settings.n_centroids or max(1, min(PAPER_CENTROIDS, largest))
    name = centroid_name(k, settings.seed, tokens, split)
    n_sample = min(loader.n_tokens, settings.sample or DEFAULT_TOKENS_PER_CENTROID * k)
    if name in store.centroid_names() and not force:
        _check_same_kmeans(store, name, settings, n_sample)
        return name
    if k > largest:
        raise UserError(f"{k} centroids need at least {MIN_TOKENS_PER_CENTROID * k} tokens, the "
                        f"train split has {loader.n_tokens}: the largest sensible number is {largest}")
    if settings.sample is not None and settings.sample < MIN_TOKENS_PER_CENTROID * k:
        raise InvalidSetting("sample", f"{{name}} {settings.sample} tokens are too few for {k} "
                                       f"centroids: give at least {MIN_TOKENS_PER_CENTROID * k}")
    seed, niter = settings.seed, settings.niter or DEFAULT_NITER
    x = loader.sample(n_sample, seed=seed, progress=progress)
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
        "k": k, "seed": seed, "tokens": tokens, "part": "train",
        "split": {"heldout": split.heldout, "seed": split.seed}, "n_tokens_sampled": n,
        "niter": niter, "inertia": inertia, "standardised": True, "faiss_version": faiss.__version__,
        "gpu": bool(use_gpu), "seconds": round(time.perf_counter() - t, 3)})
    return name


def _check_same_kmeans(store, name: str, settings: CentroidSettings, n_sample: int) -> None:
    """A stored set is reused only as asked: its name says K, seed, tokens and split; a sample
    size or a number of iterations given explicitly must match what it was computed with."""
    meta = store.load_centroids(name)[1]
    differ = [f"{what} {asked} (it used {used})" for what, asked, used in (
        ("sample", settings.sample and n_sample, meta["n_tokens_sampled"]),
        ("niter", settings.niter, meta["niter"])) if asked is not None and asked != used]
    if differ:
        raise UserError(f"the centroid set {name} exists but you asked for {', '.join(differ)}: "
                        "leave those out to reuse it, or recompute it with `archsae centroids --force`")


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
