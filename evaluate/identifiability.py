"""The soft-identifiability benchmark (PAPER.md): can one concept tell whether an object is in
an image?

Each object set is a handful of distinct photos. A sample is a 2 x 2 collage of 4 distinct
objects of the set (each a random square crop, maybe flipped); collages are written as tar
shards and go through `archsae extract` like any data, so the store records the backbone and
weights and a killed run resumes. Each method learns a dictionary with as many atoms as the set
has objects from the pooled activations of the train half; object j's score is the accuracy of
"j is present" predicted by one code crossing one threshold, with the code, the threshold (the
1st..100th percentiles of the code on the train half) and the direction (above or below: PCA
and ICA codes have no sign) chosen on the train half and the accuracy measured on the test half.
The paper's optimistic variant (best code and threshold picked on the test half) is reported
beside it. Always answering "absent" scores 1 - 4/N: the chance level.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from archsae.cache import open_store
from archsae.errors import UserError
from archsae.evaluate.baselines import fit_baseline
from archsae.extract.demo_data import load_photo, write_shards
from archsae.extract.run import extract
from archsae.fit.centroids import faiss_kmeans
from archsae.fit.sae import sae_settings
from archsae.fit.step import FitSettings
from archsae.fit.train import fit_tensor

# Two sets of real photos bundled with scikit-image / scikit-learn: objects and scenes, and
# textures and microscopy.
OBJECT_SETS = {
    "objects": ("astronaut", "chelsea", "coffee", "rocket", "camera", "clock", "coins", "moon",
                "china.jpg", "flower.jpg"),
    "textures": ("brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                 "retina", "cell", "page", "text", "microaneurysms"),
}
PER_COLLAGE = 4
TILE = 160  # pixels per collage quarter
METHODS = ("kmeans", "pca", "ica", "semi_nmf", "topk", "a", "ra")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def bundled_objects(name: str) -> list[tuple[str, np.ndarray]]:
    return [(photo.split(".")[0], load_photo(photo)) for photo in OBJECT_SETS[name]]


def folder_objects(folder) -> list[tuple[str, np.ndarray]]:
    """One object per image file of `folder` (sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--objects {folder} is not a folder: give a folder with one image per object")
    objects = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as img:
                objects.append((path.stem, np.asarray(img.convert("RGB"))))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{path} is not a readable image ({type(exc).__name__}): "
                            "remove it or replace it") from None
    if len(objects) <= PER_COLLAGE:
        raise UserError(f"--objects {folder} has {len(objects)} images: the benchmark needs more "
                        f"than {PER_COLLAGE} objects (9 to 20 is usual)")
    return objects


def collage_objects(n_collages: int, n_objects: int, seed: int = 0) -> np.ndarray:
    """(n_collages, 4) distinct object indices, in reading order of the 2 x 2 grid."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_objects)[:PER_COLLAGE] for _ in range(n_collages)])


def presence(layout: np.ndarray, n_objects: int) -> np.ndarray:
    """(n_collages, n_objects) bool: object j is in collage i."""
    out = np.zeros((len(layout), n_objects), bool)
    np.put_along_axis(out, layout, True, axis=1)
    return out


def render_collage(photos: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    """A 2 x 2 collage: each photo a random square crop (70-100% of its short side), maybe
    flipped, resized to one quarter."""
    canvas = Image.new("RGB", (2 * TILE, 2 * TILE))
    for q, photo in enumerate(photos):
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.7, 1.0) * min(h, w))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        tile = Image.fromarray(photo[top:top + side, left:left + side]).resize(
            (TILE, TILE), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        canvas.paste(tile, ((q % 2) * TILE, (q // 2) * TILE))
    return canvas


def write_collages(objects, n_collages: int, out: Path, seed: int = 0) -> str:
    layout = collage_objects(n_collages, len(objects), seed)

    def render(i):
        rng = np.random.default_rng([seed, i])
        img = render_collage([objects[j][1] for j in layout[i]], rng)
        return f"collage-{i:06d}", img, int(layout[i][0])

    return write_shards(out, n_collages, render, "collage")


def identifiability_scores(z_train: np.ndarray, p_train: np.ndarray, z_test: np.ndarray,
                           p_test: np.ndarray) -> dict:
    """Per object: test accuracy of the best (code, threshold, direction) chosen on the train
    half, and the best on the test half itself (the paper's reading)."""
    def accuracies(z, p, thresholds):
        # (codes, thresholds, 2 directions, objects): accuracy of "present iff z > t" (or < t)
        above = (z[:, :, None] > thresholds[None]).astype(np.float64)  # (n, codes, T)
        p = p.astype(np.float64)
        hit_above = np.einsum("nct,nj->ctj", above, p) + np.einsum("nct,nj->ctj", 1 - above, 1 - p)
        return np.stack([hit_above, len(z) - hit_above], axis=2) / len(z)

    thresholds = np.percentile(z_train, np.arange(1, 101), axis=0).T  # (codes, 100)
    train = accuracies(z_train, p_train, thresholds)
    test = accuracies(z_test, p_test, thresholds)
    flat_train = train.reshape(-1, train.shape[-1])
    chosen = flat_train.argmax(0)
    objects = np.arange(train.shape[-1])
    held = test.reshape(-1, test.shape[-1])[chosen, objects]
    return {"score": float(held.mean()), "per_object": held.tolist(),
            "score_best_on_test": float(test.reshape(-1, test.shape[-1]).max(0).mean())}


def method_codes(method: str, train: torch.Tensor, test: torch.Tensor, k: int, seed: int,
                 epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the train and test vectors (standardised) for a dictionary of k atoms."""
    if method in ("kmeans", "pca", "ica", "semi_nmf"):
        model = fit_baseline(method, train, k, seed)
        if method == "kmeans":  # soft codes: closeness to each centroid
            def encode(v):
                return -torch.cdist(v.double(), model.atoms)
        else:
            encode = model.encode
        return encode(train).numpy(), encode(test).numpy()
    n_points = min(512, len(train) // 4)
    sae = sae_settings(method, train.shape[1], k, min(PER_COLLAGE, k), n_centroids=n_points)
    points = None
    if sae.needs_centroids:
        kmeans, _ = faiss_kmeans(train, n_points, seed)
        points = torch.from_numpy(kmeans.centroids)
    cfg = FitSettings(epochs=epochs, batch_size=256, seed=seed, warmup=0.05)
    model = fit_tensor(train.float(), sae, cfg, points)
    with torch.no_grad():
        return (model.encode(train.float()).dense.cpu().numpy(),
                model.encode(test.float()).dense.cpu().numpy())


def run_identifiability(model: str, weights: str, out, n_collages: int = 4000, objects_dir=None,
                        methods=METHODS, seed: int = 0, epochs: int = 200, batch_size: int = 32,
                        device: str | None = None, progress: bool = True) -> dict:
    """Build (or reuse) each set's collages and store, fit every method, score it."""
    if n_collages < 20:
        raise UserError(f"--collages {n_collages} is too few: use at least 20 (4000 by default)")
    out = Path(out)
    sets = ({Path(objects_dir).name: folder_objects(objects_dir)} if objects_dir else
            {name: bundled_objects(name) for name in OBJECT_SETS})
    archetypal = [m for m in methods if m in ("a", "ra")]
    for name, objects in sets.items():  # archetype points: 4 train collages per centroid
        if archetypal and (n_collages // 2) // 4 < len(objects):
            raise UserError(f"--collages {n_collages} is too few for {len(objects)} archetypes "
                            f"({name}): use at least {8 * len(objects)}")
    report = {"model": model, "collages_per_set": n_collages, "split": "half train, half test",
              "per_collage": PER_COLLAGE, "sets": {}}
    for name, objects in sets.items():
        data = out / f"{name}-{n_collages}-seed{seed}"
        pattern = write_collages(objects, n_collages, data / "shards", seed)
        store = extract(model, pattern, data / model.replace(":", "_"), weights=weights,
                        batch_size=batch_size, device=device, progress=progress)
        pooled = torch.from_numpy(np.asarray(open_store(store.path).group["pooled"][:], np.float32))
        present = presence(collage_objects(n_collages, len(objects), seed), len(objects))
        half = n_collages // 2
        mean, std = pooled[:half].mean(0), pooled[:half].std(0).clamp_min(1e-6)
        train, test = (pooled[:half] - mean) / std, (pooled[half:] - mean) / std
        k = len(objects)
        scores = {}
        for method in tqdm(methods, unit="method", desc=f"dictionaries ({name})", disable=not progress):
            z_train, z_test = method_codes(method, train, test, k, seed, epochs)
            scores[method] = identifiability_scores(z_train, present[:half], z_test, present[half:])
        report["weights"] = store.attrs["weights"]
        report["sets"][name] = {"objects": [o[0] for o in objects], "store": str(store.path),
                                "chance": 1 - PER_COLLAGE / k, "methods": scores}
    report["mean"] = {m: float(np.mean([s["methods"][m]["score"] for s in report["sets"].values()]))
                      for m in methods}
    return report


def format_identifiability(report: dict) -> str:
    sets = list(report["sets"])
    lines = [f"soft identifiability ({report['model']}, {report['weights']}, "
             f"{report['collages_per_set']} collages per set, test half):",
             f"  {'method':10s} " + " ".join(f"{s[:12]:>12s}" for s in sets) + f" {'mean':>8s}"]
    for m, mean in report["mean"].items():
        lines.append(f"  {m:10s} " + " ".join(f"{report['sets'][s]['methods'][m]['score']:12.4f}"
                                              for s in sets) + f" {mean:8.4f}")
    lines.append(f"  {'chance':10s} " + " ".join(f"{report['sets'][s]['chance']:12.4f}" for s in sets))
    return "\n".join(lines)
