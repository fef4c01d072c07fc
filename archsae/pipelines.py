"""Runs that chain stages: the stability study with its shared centroids, and the paper's two
benchmarks end to end (images -> extract -> fit -> evaluate). They live here, above the stages;
the maths is in `archsae.evaluate` (study, identifiability, plausibility) and the collage images
in `archsae.extract.collages`.
"""

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from archsae.cache import is_store, open_store
from archsae.errors import UserError
from archsae.evaluate.identifiability import ARCHETYPAL, METHODS, score_methods
from archsae.evaluate.plausibility import head_rows, plausibility, random_plausibility
from archsae.evaluate.study import stability_study
from archsae.extract.collages import (OBJECT_SETS, PER_COLLAGE, bundled_objects, collage_objects,
                                      folder_objects, presence, write_collages)
from archsae.extract.presets import build_backbone
from archsae.extract.run import extract
from archsae.fit import (CentroidSettings, FitSettings, centroid_set, fit, fit_settings, load, open_fit_store,
                         read_config, sae_settings)


def run_stability_study(store, out, names: list[str], cfg: FitSettings, kmeans: CentroidSettings,
                        seeds: int, varies: str = "seed", progress: bool = True, **sae_values) -> dict:
    """The stability study of the named SAEs and their controls. Every variant, the TopK control
    started at the centroids included, shares one centroid set of the train split; across
    centroid sets (`varies="centroids"`), run i uses the set of K-means seed kmeans.seed + i."""
    if seeds < 2:
        raise UserError(f"{seeds} seeds: stability compares pairs of runs, use at least 2")
    if not names:
        raise UserError("no SAE to study: name at least one (e.g. ra,a)")
    d = open_store(store).d
    saes = [sae_settings(name, d, **sae_values) for name in names]  # refuse bad names first
    centroid_sets = None
    if varies == "centroids":
        if sae_values.get("centroids") is not None:
            raise UserError("a study across centroid sets computes its own: leave --centroids out")
        centroid_sets = [centroid_set(store, replace(kmeans, seed=kmeans.seed + i), cfg.tokens,
                                      cfg.split, progress) for i in range(seeds)]
    elif sae_values.get("centroids") is None:
        points = centroid_set(store, kmeans, cfg.tokens, cfg.split, progress)
        saes = [replace(sae, centroids=points) for sae in saes]
    return stability_study(store, out, saes, cfg, seeds, varies, centroid_sets, progress)


def run_identifiability(model: str, weights: str, out, n_collages: int = 4000, objects_dir=None,
                        methods=METHODS, seed: int = 0, seeds: int = 3, epochs: int = 200,
                        batch_size: int = 32, device: str | None = None, progress: bool = True) -> dict:
    """Build (or reuse) each object set's collages (layout drawn with `seed`) and their store,
    fit every method `seeds` times, score it. `batch_size` is in images (the backbone's batches)."""
    if n_collages < 20:
        raise UserError(f"{n_collages} collages are too few: use at least 20 (4000 by default)")
    out = Path(out)
    sets = ({Path(objects_dir).name: folder_objects(objects_dir)} if objects_dir else
            {name: bundled_objects(name) for name in OBJECT_SETS})
    for name, objects in sets.items():  # check before any image is made
        if set(methods) & set(ARCHETYPAL) and n_collages // 2 < len(objects):
            raise UserError(f"{n_collages} collages are too few for {len(objects)} archetypes "
                            f"({name}): use at least {2 * len(objects)}")
    report = {"model": model, "collages_per_set": n_collages, "split": "half train, half test",
              "per_collage": PER_COLLAGE, "seeds": seeds, "epochs": epochs, "sets": {}}
    for name, objects in sets.items():
        data = out / f"{name}-{n_collages}-seed{seed}"
        pattern = write_collages(objects, n_collages, data / "shards", seed)
        store = extract(model, pattern, data / model.replace(":", "_"), weights=weights,
                        batch_size=batch_size, device=device, progress=progress)
        pooled = torch.from_numpy(np.asarray(store.group["pooled"][:], np.float32))
        present = presence(collage_objects(n_collages, len(objects), seed), len(objects))
        report["weights"] = store.attrs["weights"]
        report["sets"][name] = {
            "objects": [o[0] for o in objects], "store": str(store.path),
            "chance": 1 - PER_COLLAGE / len(objects),
            "methods": score_methods(pooled, present, PER_COLLAGE, methods, seeds, epochs, progress, name)}
    report["mean"] = {m: float(np.mean([s["methods"][m]["score"] for s in report["sets"].values()]))
                      for m in methods}
    return report


PLAUSIBILITY_SIZES = (512, 2048, 8192)  # a sweep up to the paper's sizes (Table 2: up to 32k)


def run_plausibility(model: str, weights: str, out, store=None, sizes=None,
                     deltas=(0.0, 1.0), cfg: FitSettings = FitSettings(),
                     centroids: CentroidSettings = CentroidSettings(), fits=None,
                     progress: bool = True) -> dict:
    """Score dictionaries' atoms against the head: the given `fits` (finished fit folders of this
    model's last layer), else TopK and archetypal SAEs (one per delta) fitted at each size on the
    store (extracted from the demo data when not given). Sizes default to `PLAUSIBILITY_SIZES`
    up to the number of centroids the store supports."""
    out = Path(out)
    backbone = build_backbone(model, weights)
    rows, mapping = head_rows(backbone.model)  # refuse a headless backbone before any work

    def check(opened):  # before any fit
        _check_plausibility_store(opened, model, backbone.weights, rows.shape[1])
        return opened

    if fits is None:
        fits = _plausibility_fits(model, weights, out, store, sizes, deltas, cfg, centroids, check, progress)
    stores = [check(open_fit_store(run)[0]) for run in fits]
    report = {"model": model, "weights": backbone.weights, "store": str(stores[0].path),
              "head": mapping, "classes": int(rows.shape[0]), "rows": []}
    for run in fits:
        sae, trained = fit_settings(read_config(run))[0], load(run)  # the name as fitted
        report["rows"].append({"sae": sae.name, "concepts": sae.concepts, "fit": str(run),
                               "delta": sae.delta if sae.dictionary == "archetypal" else None,
                               "plausibility": plausibility(rows, trained.dictionary.weight(), trained.input_std)})
    std = trained.input_std  # the chance level's scale (the fits' stores are of one model)
    for size in sorted({row["concepts"] for row in report["rows"]}):
        report["rows"].append({"sae": "random atoms", "concepts": size, "delta": None, "fit": None,
                               "plausibility": random_plausibility(rows, size, std)})
    return report


def _plausibility_fits(model, weights, out: Path, store, sizes, deltas, cfg, centroids, check,
                       progress) -> list[Path]:
    """Fit TopK and one archetypal SAE per delta at each size, sharing one centroid set."""
    store = Path(store) if store else out / "store"
    if not is_store(store):
        extract(model, "demo", store, weights=weights, device=cfg.device, progress=progress)
    opened = check(open_store(store))
    points = centroid_set(store, centroids, cfg.tokens, cfg.split, progress)
    n_points = len(opened.load_centroids(points)[0])
    if sizes is None:
        sizes = tuple(s for s in PLAUSIBILITY_SIZES if s <= n_points) or (n_points,)
    if n_points < max(sizes):
        raise UserError(f"{max(sizes)} archetypal atoms need at least as many centroids, the set "
                        f"{points} has {n_points}: compute more centroids or use smaller sizes")
    runs = []
    variants = [("topk", None)] + [("ra" if delta > 0 else "a", delta) for delta in deltas]
    for size, (sae, delta) in itertools.product(sizes, variants):
        settings = sae_settings(sae, opened.d, concepts=size, delta=delta, centroids=points)
        runs.append(out / (f"{sae}-k{size}" + ("" if delta is None else f"-delta{delta:g}")))
        fit(store, runs[-1], settings, cfg, resume=True, progress=progress)
    return runs


def _check_plausibility_store(opened, model: str, weights: str, d_head: int) -> None:
    """The store must hold the last layer of the same model and weights as the head."""
    if opened.attrs.get("model") != model:
        raise UserError(f"{opened.path} was made by {opened.attrs.get('model')!r}, not {model!r}: "
                        "give a store (or fits) of that model, or leave the store out")
    if weights != opened.attrs["weights"]:
        raise UserError(f"{opened.path} holds activations of weights {opened.attrs['weights']}, the "
                        f"head is from {weights}: use the same weights")
    if opened.attrs.get("layer") != "forward_features" or d_head != opened.d:
        raise UserError(f"{opened.path} holds layer {opened.attrs.get('layer')} ({opened.d} "
                        f"features); the head reads the last layer's {d_head}: extract the last layer")
