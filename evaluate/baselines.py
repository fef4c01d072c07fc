"""Classical dictionary-learning baselines, judged with the same metrics as the SAEs.

PCA, FastICA and sparse PCA are scikit-learn's, K-means is faiss's; only Semi-NMF and
Convex-NMF (Ding, Li & Jordan 2010), which no dependency provides, are written here, short.
Every baseline is fitted on a uniform sample of standardised training tokens and gives a
`Baseline`: its atoms (k, d) in the standardised space, an encoder and a decoder, so the
evaluate stage's `CodeTally` streams the held-out split through it exactly as through an SAE.
Linear methods give at most d atoms (their number of components is capped at d).
"""

import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from archsae.cache import Split, TokenStore, open_store
from archsae.evaluate.run import evaluate_model
from archsae.evaluate.stability import compare_runs
from archsae.fit import faiss_kmeans

BASELINES = ("pca", "ica", "sparse_pca", "kmeans", "semi_nmf", "convex_nmf")
CONVEX_NMF_POINTS = 2048  # its kernel is points x points


@dataclass
class Baseline:
    name: str
    atoms: torch.Tensor  # (k, d), standardised space
    encode: Callable[[torch.Tensor], torch.Tensor]  # (n, d) -> codes (n, k)
    decode: Callable[[torch.Tensor], torch.Tensor]  # codes -> (n, d)
    converged: bool = True  # False: the solver stopped at its iteration limit

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, codes)."""
        z = self.encode(x)
        return self.decode(z), z


def _fista(z: torch.Tensor, gradient, lipschitz: float, steps: int) -> torch.Tensor:
    """Accelerated projected gradient steps of a convex quadratic over z >= 0."""
    y, t = z, 1.0
    for _ in range(steps):
        z_next = torch.relu(y - gradient(y) / lipschitz)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = z_next + (t - 1) / t_next * (z_next - z)
        z, t = z_next, t_next
    return z


def _largest_eigenvalue(gram: torch.Tensor) -> float:
    return max(float(torch.linalg.eigvalsh(gram.double())[-1]), 1e-12)


def nonnegative_codes(x: torch.Tensor, atoms: torch.Tensor, z: torch.Tensor | None = None,
                      iters: int = 200) -> torch.Tensor:
    """argmin_{Z >= 0} ||X - Z D||^2 (exact zeros, so L0 means something). In float32, as the
    NMFs below: on the demo's tokens float64 gave Semi-NMF the same R^2 to 6 digits in 2.3x the
    time."""
    x, atoms = x.float(), atoms.float()
    gram, target = atoms @ atoms.T, x @ atoms.T
    z = torch.zeros(len(x), len(atoms)) if z is None else z
    return _fista(z, lambda y: y @ gram - target, _largest_eigenvalue(gram), iters)


def semi_nmf(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """X ~ Z D with Z >= 0 and D free, by alternating least squares for D and non-negative
    least squares for Z, from K-means: (D (k, d), Z (n, k))."""
    x = x.float()
    kmeans, _ = faiss_kmeans(x, k, seed)
    atoms = torch.from_numpy(kmeans.centroids)
    z = nonnegative_codes(x, atoms)
    for _ in range(iters):
        atoms = torch.linalg.lstsq(z, x).solution
        z = nonnegative_codes(x, atoms, z, iters=10)
    return atoms, z


def convex_nmf(x: torch.Tensor, k: int, seed: int = 0, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """X ~ Z D with D = W X, W >= 0 and Z >= 0 (every atom is a non-negative combination of the
    data points), by alternating projected gradient on Z and W from K-means (atoms = cluster
    means): (D (k, d), Z (n, k))."""
    x = x.float()
    _, labels = faiss_kmeans(x, k, seed)
    w = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), k).float().T
    w = w / w.sum(1, keepdim=True).clamp_min(1)
    kernel = x @ x.T  # the W-gradient is (Z^T Z) W K - Z^T K with K = X X^T
    kernel_norm = _largest_eigenvalue(kernel)
    z = nonnegative_codes(x, w @ x)
    for _ in range(iters):
        ztz, ztk = z.T @ z, z.T @ kernel
        w = _fista(w, lambda y: ztz @ y @ kernel - ztk, _largest_eigenvalue(ztz) * kernel_norm, 3)
        z = nonnegative_codes(x, w @ x, z, iters=10)
    return w @ x, z


def _sklearn(name: str, model, x: torch.Tensor) -> Baseline:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x.numpy())
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)

    def encode(v):
        return torch.from_numpy(model.transform(v.float().numpy())).double()

    def decode(z):
        return torch.from_numpy(model.inverse_transform(z.numpy())).double()

    return Baseline(name, torch.from_numpy(model.components_).double(), encode, decode, converged)


def fit_baseline(name: str, x: torch.Tensor, k: int, seed: int = 0) -> Baseline:
    """Fit baseline `name` with k atoms on standardised tokens x (n, d)."""
    from sklearn.decomposition import PCA, FastICA, MiniBatchSparsePCA

    x = x.float()
    linear_k = min(k, x.shape[1])
    if name == "pca":
        return _sklearn(name, PCA(linear_k, random_state=seed), x)
    if name == "ica":
        return _sklearn(name, FastICA(linear_k, random_state=seed, whiten="unit-variance",
                                      max_iter=400, tol=1e-3), x)
    if name == "sparse_pca":
        return _sklearn(name, MiniBatchSparsePCA(linear_k, alpha=1.0, batch_size=256, max_iter=5,
                                                 random_state=seed), x)
    if name == "kmeans":
        kmeans, _ = faiss_kmeans(x, k, seed)
        centroids = torch.from_numpy(kmeans.centroids).double()

        def encode(v):
            _, idx = kmeans.index.search(np.ascontiguousarray(v.float().numpy()), 1)
            return torch.nn.functional.one_hot(torch.from_numpy(idx[:, 0]), k).double()

        return Baseline(name, centroids, encode, lambda z: z @ centroids)
    if name in ("semi_nmf", "convex_nmf"):
        atoms, _ = (semi_nmf if name == "semi_nmf" else convex_nmf)(x, k, seed)
        return Baseline(name, atoms, lambda v: nonnegative_codes(v, atoms), lambda z: z @ atoms)
    raise ValueError(f"unknown baseline {name!r}: one of {', '.join(BASELINES)}")


def evaluate_baselines(store, concepts: int, names=BASELINES, seeds: int = 2, sample: int = 8192,
                       tokens: str = "all", split: Split = Split(), progress: bool = True) -> dict:
    """Fit each baseline `seeds` times on a sample of training tokens (the sample drawn anew for
    each seed); held-out metrics of the first, stability (signed Hungarian) across all pairs."""
    opened = open_store(store)
    loader = TokenStore(opened, tokens=tokens, part="train", split=split)

    def standardise(x):
        return (x - loader.mean) / loader.std

    results = {}
    bar = tqdm(total=len(names) * seeds, unit="fit", desc="fit baselines", disable=not progress)
    for name in names:
        n = min(sample, CONVEX_NMF_POINTS) if name == "convex_nmf" else sample
        fitted, seconds = [], []
        for seed in range(seeds):
            bar.set_postfix(method=name, seed=seed, tokens=n)
            x = torch.from_numpy(loader.sample(n, seed=1000 + seed))
            t = time.perf_counter()
            fitted.append(fit_baseline(name, x, concepts, seed))
            seconds.append(time.perf_counter() - t)
            bar.update(1)
        first = fitted[0]
        metrics = evaluate_model(opened, first, first.atoms.float(), standardise, tokens, split,
                                 progress=progress, name=name)
        results[name] = {
            "concepts": int(first.atoms.shape[0]), "sample": n, "fit_seconds": seconds,
            "converged": [f.converged for f in fitted],
            "metrics": metrics,
            "stability": compare_runs([f.atoms for f in fitted])}
    bar.close()
    return {"store": str(store), "tokens": tokens, "heldout": split.heldout, "split_seed": split.seed,
            "seeds": seeds,
            "baselines": results}
