"""Soft identifiability (PAPER.md): can one concept tell whether an object is in an image?

Given the pooled activations of collages of known objects (`archsae.extract.collages`), each
method learns a dictionary with as many atoms as there are objects from the train half. Object
j's score is the accuracy of "j is present" predicted by one code crossing one threshold, with
the code, the threshold (the 1st..100th percentiles of the code on the train half) and the
direction (above or below: PCA and ICA codes have no sign) chosen on the train half and the
accuracy measured on the test half. The paper's optimistic reading (best code and threshold
picked on the test half itself) is kept beside it. Always answering "absent" scores 1 - 4/N:
the chance level.
"""

import numpy as np
import torch
from tqdm import tqdm

from archsae.evaluate.baselines import fit_baseline
from archsae.fit import FitSettings, faiss_kmeans, fit_tensor, sae_settings

METHODS = ("kmeans", "pca", "ica", "semi_nmf", "topk", "a", "ra")
ARCHETYPAL = ("a", "ra")
# Archetype points: the train vectors themselves, as in archetypal analysis, up to this many
# (K-means centroids of them beyond). Centroids lie inside the data's hull and shrink it: on
# the demo's collages (500 train vectors) A-/RA-SAE scored 0.864/0.866 on 50 centroids, 0.874/
# 0.882 on 125, 0.883/0.888 on 250 and 0.904/0.894 on the vectors themselves (docs/evaluate.md).
MAX_POINTS = 4096


def identifiability_scores(z_train: np.ndarray, p_train: np.ndarray, z_test: np.ndarray,
                           p_test: np.ndarray) -> dict:
    """Per object: test accuracy of the best (code, threshold, direction) chosen on the train
    half, and the best on the test half itself (the paper's reading)."""
    def accuracies(z, p, thresholds):
        # (codes, thresholds, 2 directions, objects): accuracy of "present iff z > t" (or <= t)
        above = (z[:, :, None] > thresholds[None]).astype(np.float64)  # (n, codes, T)
        p = p.astype(np.float64)
        hit_above = np.einsum("nct,nj->ctj", above, p) + np.einsum("nct,nj->ctj", 1 - above, 1 - p)
        return np.stack([hit_above, len(z) - hit_above], axis=2) / len(z)

    thresholds = np.percentile(z_train, np.arange(1, 101), axis=0).T  # (codes, 100)
    train = accuracies(z_train, p_train, thresholds)
    test = accuracies(z_test, p_test, thresholds)
    n_objects = train.shape[-1]
    chosen = train.reshape(-1, n_objects).argmax(0)
    held = test.reshape(-1, n_objects)[chosen, np.arange(n_objects)]
    return {"score": float(held.mean()), "per_object": held.tolist(),
            "score_best_on_test": float(test.reshape(-1, n_objects).max(0).mean())}


def method_codes(method: str, train: torch.Tensor, test: torch.Tensor, k: int, top_k: int,
                 seed: int, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the train and test vectors (standardised) for a dictionary of k atoms."""
    if method in ("kmeans", "pca", "ica", "semi_nmf"):
        model = fit_baseline(method, train, k, seed)
        if method == "kmeans":  # soft codes: closeness to each centroid
            def encode(v):
                return -torch.cdist(v.double(), model.atoms)
        else:
            encode = model.encode
        return encode(train).numpy(), encode(test).numpy()
    sae = sae_settings(method, train.shape[1], concepts=k, top_k=min(top_k, k))
    points = None
    if sae.needs_centroids:
        points = (train if len(train) <= MAX_POINTS else
                  torch.from_numpy(faiss_kmeans(train, MAX_POINTS, seed)[0].centroids))
    model = fit_tensor(train.float(), sae, FitSettings(epochs=epochs, batch_size=256, seed=seed), points)
    with torch.no_grad():
        return (model.encode(train.float()).dense.cpu().numpy(),
                model.encode(test.float()).dense.cpu().numpy())


def score_methods(pooled: torch.Tensor, present: np.ndarray, per_collage: int, methods=METHODS,
                  seeds: int = 3, epochs: int = 200, progress: bool = True, name: str = "") -> dict:
    """Every method on one object set, `seeds` times (seeds 0..seeds-1 of its initialisation
    or sample): the first half of the vectors trains, the second tests. SAEs keep `per_collage`
    codes per image (top-k = objects per collage). Scores are means over seeds, with their sd."""
    half = len(pooled) // 2
    mean, std = pooled[:half].mean(0), pooled[:half].std(0).clamp_min(1e-6)
    train, test = (pooled[:half] - mean) / std, (pooled[half:] - mean) / std
    k = present.shape[1]
    scores = {}
    bar = tqdm(total=len(methods) * seeds, unit="fit", desc=f"dictionaries {name}", disable=not progress)
    for method in methods:
        runs = []
        for seed in range(seeds):
            z_train, z_test = method_codes(method, train, test, k, per_collage, seed, epochs)
            runs.append(identifiability_scores(z_train, present[:half], z_test, present[half:]))
            bar.update(1)
        scores[method] = {
            "score": float(np.mean([r["score"] for r in runs])),
            "score_sd": float(np.std([r["score"] for r in runs], ddof=1)) if seeds > 1 else None,
            "scores": [r["score"] for r in runs],
            "per_object": np.mean([r["per_object"] for r in runs], axis=0).tolist(),
            "score_best_on_test": float(np.mean([r["score_best_on_test"] for r in runs]))}
    bar.close()
    return scores


def format_identifiability(report: dict) -> str:
    sets = list(report["sets"])
    lines = [f"soft identifiability ({report['model']}, {report['weights']}, "
             f"{report['collages_per_set']} collages per set, test half, mean +- sd over "
             f"{report['seeds']} seeds):",
             f"  {'method':10s} " + " ".join(f"{s[:16]:>16s}" for s in sets) + f" {'mean':>8s}"]
    for m, mean in report["mean"].items():
        cells = []
        for s in sets:
            r = report["sets"][s]["methods"][m]
            sd = "" if r["score_sd"] is None else f" +- {r['score_sd']:.3f}"
            cells.append(f"{r['score']:.3f}{sd}".rjust(16))
        lines.append(f"  {m:10s} " + " ".join(cells) + f" {mean:8.4f}")
    lines.append(f"  {'chance':10s} " + " ".join(f"{report['sets'][s]['chance']:16.3f}" for s in sets))
    return "\n".join(lines)
