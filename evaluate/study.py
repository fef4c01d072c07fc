"""The stability study with its controls (the critique in PAPER.md, "Ablating Archetypes").

For one SAE, fits `seeds` runs that differ in one thing (`VARIES`): their seed; or the 90% of
training images they see, seed fixed; or their centroids (a K-means seed per run) and their
seed, which is the honest test of a dictionary pinned to its centroids. Then the same for the
controls that separate the hull constraint from its side effects:
- TopK, random init: the usual baseline;
- TopK, decoder initialised at the centroids: the shared, deterministic K-means start alone;
- the archetypal SAE with the projection turned off: the start without the constraint.
Stability = signed-Hungarian mean |cos| over every pair of runs, mean +- sd; data are
standardised (centred) activations, so cosines are not inflated by a shared mean. Each
variant's held-out R^2 is reported beside it: a stable dictionary that reconstructs worse is
not a win.
"""

import statistics
from dataclasses import replace
from pathlib import Path

from archsae.evaluate.run import evaluate_fit
from archsae.evaluate.stability import compare_runs
from archsae.errors import UserError
from archsae.files import write_json
from archsae.fit import FitSettings, SAESettings, fit, load


def study_variants(saes: list[SAESettings]) -> dict[str, SAESettings]:
    """The SAEs themselves and their controls, all with the same size, sparsity and centroids,
    each under its own name (`SAESettings.name`)."""
    topk = replace(saes[0], encoder="topk", dictionary="free", delta=0.0, decoder_init="random")
    controls = [topk, replace(topk, decoder_init="centroids")]
    # without the projection W and Lambda are free: A-SAE and RA-SAE are the same control
    archetypal = [sae for sae in saes if sae.dictionary == "archetypal"]
    if archetypal:
        controls.append(replace(archetypal[0], project=False))
    variants = {sae.name: sae for sae in saes}
    for control in controls:
        variants.setdefault(control.name, control)
    return variants


# what changes between the runs of a study -> (its description, the report's column)
VARIES = {
    "seed": ("seed", "stability_seeds"),
    "subset": ("data subset (90% of training images, seed fixed)", "stability_subsets"),
    "centroids": ("K-means seed of the centroids, and seed", "stability_centroids"),
}


def _run(settings: SAESettings, cfg: FitSettings, varies: str, i: int, centroid_sets):
    """The folder name and settings of run i of a study. Runs are named by what they are, so
    studies written to one folder share their identical runs: run 0 across centroid sets (seed 0,
    the first set) is run 0 across seeds (`fit` refuses a folder whose settings differ)."""
    if varies == "subset":
        return f"subset{i}", settings, replace(cfg, subset=0.9, subset_seed=i)
    if varies == "centroids":
        settings = replace(settings, centroids=centroid_sets[i])
        return ("run0" if i == 0 else f"run{i}-centroids{i}"), settings, replace(cfg, seed=i)
    return f"run{i}", settings, replace(cfg, seed=i)


def study_file(out, varies: str) -> Path:
    """Where a study's report is written: one file per kind, so studies can share a folder."""
    return Path(out) / f"stability-{varies}.json"


def stability_study(store, out, saes: list[SAESettings], cfg: FitSettings, seeds: int = 4,
                    varies: str = "seed", centroid_sets: list[str] | None = None,
                    progress: bool = True) -> dict:
    """Fit every variant `seeds` times (finished runs are reused, those of another study in the
    same folder too) and report their stability.
    With `varies="centroids"`, run i uses `centroid_sets[i]`, and variants without centroids
    (TopK, random init: the same runs as a seed study) are left out."""
    out = Path(out)
    if varies == "centroids" and len(centroid_sets or ()) < seeds:
        raise UserError(f"a study across centroid sets needs {seeds} sets, got {len(centroid_sets or ())}")
    report = {"store": str(store), "saes": [s.to_dict() for s in saes], "fit": cfg.to_dict(), "seeds": seeds,
              "varies": varies, "varies_description": VARIES[varies][0], "variants": {}}
    for name, settings in study_variants(saes).items():
        if varies == "centroids" and not settings.needs_centroids:
            continue
        folders, runs, evaluations = [], [], []
        for i in range(seeds):
            folder, *run_settings = _run(settings, cfg, varies, i, centroid_sets)
            run_dir = out / name / folder
            fit(store, run_dir, *run_settings, resume=True, progress=progress)
            folders.append(folder)
            runs.append(load(run_dir).dictionary.weight().detach())
            evaluations.append(evaluate_fit(run_dir, progress=False))
        report["variants"][name] = {
            **compare_runs(runs), "heldout_r2": [e["metrics"][cfg.tokens]["r2"] for e in evaluations],
            "runs": folders, "first_run": evaluations[0]}  # every metric of run 0, for the report
    write_json(study_file(out, varies), report)
    return report


def format_study(report: dict) -> str:
    lines = [f"stability across {report['seeds']} runs varying the {report['varies_description']}, "
             "and held-out R^2:"]
    for name, r in report["variants"].items():
        sd = "" if r["sd"] is None else f" +- {r['sd']:.4f}"
        lines.append(f"  {name:28s} {r['mean']:.4f}{sd:10s}   R^2 "
                     f"{statistics.mean(r['heldout_r2']):.4f}")
    methods = sorted({m for r in report["variants"].values() for m in r["matching"]})
    lines.append(f"matching: {', '.join(methods)}")
    return "\n".join(lines)
