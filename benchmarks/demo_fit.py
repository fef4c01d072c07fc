"""RA-SAE against TopK SAE on the demo store, at the same L0: held-out R^2 and seed stability.

Fits two seeds of each on `runs/demo/vit` (made by `make demo`), with a size a CPU trains in
minutes: 256 concepts, top-k 16, 512 centroids, 5 epochs, batch 1,024. RA seeds share their
initial dictionary (the centroids) and TopK seeds do not; the evaluate stage reports the
controls that separate the two effects.

    python -m benchmarks.demo_fit [--store runs/demo/vit] [--epochs 5]
"""

import argparse
import statistics
import tempfile

from benchmarks.common import result
from archsae.evaluate.run import evaluate_fit
from archsae.evaluate.stability import stability
from archsae.fit import CentroidSettings, FitSettings, centroid_set, fit, load, sae_settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="runs/demo/vit")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--concepts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--centroids", type=int, default=512)
    args = ap.parse_args()
    centroids = centroid_set(args.store, CentroidSettings(n_centroids=args.centroids), progress=False)
    with tempfile.TemporaryDirectory(prefix="archsae-demo-fit-") as work:
        r2, dictionaries = fit_pairs(args, centroids, work)
    stab = {sae: stability(*dictionaries[sae]) for sae in dictionaries}
    print(f"stability (signed Hungarian, seeds 0 vs 1): topk {stab['topk']:.3f}, ra {stab['ra']:.3f}")
    result("demo_ra_r2_minus_topk_r2", statistics.mean(r2["ra"]) - statistics.mean(r2["topk"]), ">=", -0.02)
    result("demo_stability_ra_minus_topk", stab["ra"] - stab["topk"], ">", 0)


def fit_pairs(args, centroids: str, work: str):
    """Two seeds of TopK and of RA-SAE: (held-out R^2, dictionaries) per SAE."""
    r2, dictionaries = {}, {}
    for sae in ("topk", "ra"):
        for seed in (0, 1):
            settings = sae_settings(sae, 768, args.concepts, args.top_k, centroids=centroids)
            out = f"{work}/{sae}-{seed}"
            fit(args.store, out, settings, FitSettings(epochs=args.epochs, seed=seed), progress=False)
            summary = evaluate_fit(out, progress=False)["metrics"]["all"]
            r2.setdefault(sae, []).append(summary["r2"])
            dictionaries.setdefault(sae, []).append(load(out).dictionary.weight())
            print(f"{sae} seed {seed}: held-out R^2 {summary['r2']:.4f}, L0 {summary['l0']:.1f}, "
                  f"dead {summary['dead']:.3f}")
    return r2, dictionaries


if __name__ == "__main__":
    main()
