"""The report: every number of the evaluate stage in `report.json`, and `index.md` with the
same numbers as tables (rendered from that JSON, rounded to 4 decimals) and PNG plots.

Inputs are what the other commands wrote: stability studies (`stability-<varies>.json`; the first run
of each variant, evaluated in full by the study, gives the metrics), baselines (`baselines.json`), the
two benchmarks (`identifiability.json`, `plausibility.json`), and the concept browser's folder.
"""

import json
import os
from pathlib import Path

import numpy as np

from archsae.errors import UserError
from archsae.evaluate.study import VARIES, study_file
from archsae.files import replaced_atomically, write_json

STABILITY = tuple(column for _, column in VARIES.values())
HEADLINE = ("r2", "l0", "dead") + STABILITY + ("max_cosine", "ood", "stable_rank",
                                               "effective_rank", "coherence", "connectivity", "negative_interference")
LABELS = {"r2": "R^2", "l0": "L0", "dead": "dead", "stability_seeds": "stability (seeds)",
          "stability_subsets": "stability (90% subsets)", "stability_centroids": "stability (centroid sets)",
          "max_cosine": "max cosine", "ood": "OOD", "stable_rank": "stable rank",
          "effective_rank": "effective rank", "coherence": "coherence",
          "connectivity": "connectivity", "negative_interference": "neg. interference"}
ENCODER_LABELS = {"topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU", "relu": "ReLU (L1 penalty)"}


def _read(path):
    return json.loads(Path(path).read_text()) if path else None


def _study_files(path: Path) -> list[Path]:
    """A study's JSON, or every study written to a folder (`stability-<varies>.json`)."""
    if not path.is_dir():
        return [path]
    files = [study_file(path, varies) for varies in VARIES if study_file(path, varies).is_file()]
    if not files:
        raise UserError(f"{path} holds no stability study (stability-*.json): give the folder "
                        "`archsae stability-study --out` wrote")
    return files


def _describe(name: str) -> str:
    """A reader's label for an SAE name (`SAESettings.name`): what it is, and which control."""
    for suffix, note in (("-random-encoder", "{}, encoder drawn at random (the reference's init)"),
                         ("-tied-encoder", "{}, encoder started along its random atoms"),
                         ("-no-projection", "control: {} with the projection off"),
                         ("-centroid-init", "control: {}, decoder started at the centroids")):
        if name.endswith(suffix):
            return note.format(_describe(name[: -len(suffix)]))
    base, _, encoder = name.partition("-")
    if base in ("ra", "a"):
        label = "RA-SAE" if base == "ra" else "A-SAE"
        return label + (f" ({ENCODER_LABELS.get(encoder, encoder)} encoder)" if encoder else "")
    if name in ENCODER_LABELS:
        return f"{ENCODER_LABELS[name]} SAE (free dictionary)"
    return name


def collect(studies=(), baselines=None, identifiability=None, plausibility=None, browser=None) -> dict:
    """Every number of the report, as one JSON-able dict."""
    paths = [p for s in studies for p in _study_files(Path(s))]
    studies = [_read(p) for p in paths]
    methods, curves = {}, {}
    for path, study in zip(paths, studies):
        key = VARIES[study["varies"]][1]
        for name, v in study["variants"].items():
            row = methods.setdefault(name, {"method": name, "family": "sae",
                                            "description": _describe(name)})
            row[key] = v["mean"]
            row[key + "_sd"] = v["sd"]
            if key == "stability_seeds" and "max_cosine" in v:
                row["max_cosine"] = v["max_cosine"]
            if "metrics" not in row:
                first = v["first_run"]
                row.update(fit=first["fit"], concepts=first["concepts"], top_k=first["top_k"],
                           metrics=first["metrics"])
                curves[name] = _training_curve(path.parent / name / v["runs"][0] / "metrics.jsonl")
    base = _read(baselines)
    for name, b in (base or {}).get("baselines", {}).items():
        note = "" if all(b.get("converged", [True])) else " (solver at its iteration limit)"
        methods[name] = {"method": name, "family": "baseline", "description": f"baseline: {name}{note}",
                         "concepts": b["concepts"], "metrics": b["metrics"],
                         "stability_seeds": b["stability"]["mean"], "stability_seeds_sd": b["stability"]["sd"],
                         "max_cosine": b["stability"].get("max_cosine")}
    for row in methods.values():
        overall = next(iter(row["metrics"].values()))
        for k in HEADLINE:
            if k in overall:
                row[k] = overall[k]
            row.setdefault(k, None)
    report = {"methods": list(methods.values()), "training_curves": curves,
              "identifiability": _read(identifiability), "plausibility": _read(plausibility),
              "store": studies[0]["store"] if studies else (base or {}).get("store"),
              "data": _data(studies[0]["store"] if studies else (base or {}).get("store")),
              "browser": str(browser) if browser else None}
    return report


def _data(store) -> dict | None:
    """What the store was made from: backbone, weights, images (the source's `about` line)."""
    from archsae.cache import is_store, open_store

    if not store or not is_store(store):
        return None
    attrs = open_store(store).attrs
    source = attrs.get("source", {})
    return {"model": attrs.get("model"), "weights": attrs.get("weights"),
            "n_images": source.get("n_images"), "about": source.get("about")}


def _training_curve(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"step": [r["step"] for r in rows], "r2": [r["r2"] for r in rows],
            "l0": [r["l0"] for r in rows], "dead": [r["dead"] for r in rows]}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _mean_sd(r: dict) -> str:
    return f"{r['score']:.4f}" + ("" if r["score_sd"] is None else f" +- {r['score_sd']:.4f}")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def write_markdown(report: dict, out: Path, plots: dict[str, str]) -> None:
    md = ["# archsae report", "",
          f"Store: `{report['store']}`. Every number here is in `report.json` (rounded to 4 "
          "decimals in these tables). Metrics are on the held-out images of the store, "
          "standardised activations; stability is the signed-Hungarian mean |cos| over every "
          "pair of runs (for the baselines each seed also draws a fresh training sample); max "
          "cosine is max_ij cos(D_i, D'_j) between two runs, mean over pairs.", ""]
    data = report.get("data")
    if data:
        md += [f"Data: {data['about'] or str(data['n_images']) + ' images'}; backbone {data['model']} "
               f"(weights {data['weights']}).", ""]
    if report["browser"]:
        md += [f"Concept browser: [{report['browser']}]({report['browser']}/index.html)", ""]
    if report["methods"]:
        md += ["## Headline: reconstruction, sparsity, stability (with the critique's controls)", ""]
        md += _table(["method", "concepts"] + [LABELS[k] for k in HEADLINE],
                     [[r["description"], r.get("concepts")] + [r[k] for k in HEADLINE]
                      for r in report["methods"]])
        if any(r.get(k + "_sd") is not None for r in report["methods"] for k in STABILITY):
            md += ["", "Stability standard deviations across pairs:", ""]
            md += _table(["method"] + [f"sd ({LABELS[k][len('stability ('):-1]})" for k in STABILITY],
                         [[r["description"]] + [r.get(k + "_sd") for k in STABILITY]
                          for r in report["methods"]])
        else:
            md += ["", "Each stability is of one pair of runs: no standard deviation (3 runs or more give one).", ""]
        kinds = [k for k in next(iter(report["methods"]))["metrics"] if k != "all"]
        if kinds:
            md += ["", "## R^2 by token kind", ""]
            md += _table(["method"] + kinds,
                         [[r["description"]] + [r["metrics"].get(k, {}).get("r2") for k in kinds]
                          for r in report["methods"]])
    ident = report["identifiability"]
    if ident:
        sets = list(ident["sets"])
        md += ["", "## Soft identifiability", "",
               f"{ident['model']} ({ident['weights']}), {ident['collages_per_set']} collages per set, "
               "code and threshold chosen on the train half, accuracy on the test half, mean +- sd "
               f"over {ident['seeds']} seeds of each method; chance = always answering 'absent'.", ""]
        md += _table(["method"] + sets + ["mean"],
                     [[m] + [_mean_sd(ident["sets"][s]["methods"][m]) for s in sets] + [ident["mean"][m]]
                      for m in ident["mean"]] + [["chance"] + [ident["sets"][s]["chance"] for s in sets]
                                                  + [float(np.mean([ident["sets"][s]["chance"] for s in sets]))]])
    plaus = report["plausibility"]
    if plaus:
        md += ["", "## Plausibility", "",
               f"{plaus['model']} ({plaus['weights']}), {plaus['classes']} classes; head mapping: "
               f"{plaus['head']}.", ""]
        md += _table(["dictionary", "concepts", "delta", "plausibility"],
                     [[r["sae"], r["concepts"], r["delta"], r["plausibility"]] for r in plaus["rows"]])
    if plots:
        md += ["", "## Plots", ""]
        md += [f"![{title}]({name})" for name, title in plots.items()]
    (out / "index.md").write_text("\n".join(md) + "\n")


def write_plots(report: dict, out: Path) -> dict[str, str]:
    """PNG files written into `out`: {file name: title}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}

    def save(fig, name, title):
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        plots[name] = title

    if report["methods"]:
        _method_plots(plt, report["methods"], save)
    if report["training_curves"]:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
        for name, c in report["training_curves"].items():
            axes[0].plot(c["step"], c["r2"], label=name)
            axes[1].plot(c["step"], c["dead"], label=name)
        axes[0].set(xlabel="step", ylabel="batch R^2", ylim=(0, 1))
        axes[1].set(xlabel="step", ylabel="dead fraction")
        axes[0].legend(fontsize=6)
        save(fig, "training_curves.png", "Training curves (first run of each variant)")
    plaus = report["plausibility"]
    if plaus:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in dict.fromkeys((r["sae"], r["delta"]) for r in plaus["rows"]):
            rows = [r for r in plaus["rows"] if (r["sae"], r["delta"]) == label]
            name = label[0] if label[1] is None else f"{label[0]} delta={label[1]:g}"
            ax.plot([r["concepts"] for r in rows], [r["plausibility"] for r in rows], "o-", label=name)
        ax.set(xscale="log", xlabel="concepts", ylabel="plausibility")
        ax.legend(fontsize=7)
        save(fig, "plausibility.png", "Plausibility vs dictionary size")
    return plots


def _method_plots(plt, methods: list[dict], save) -> None:
    """R^2 vs L0, stability with its controls, code-frequency histograms."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in methods:
        ax.scatter(r["l0"], r["r2"], marker="o" if r["family"] == "sae" else "s")
        ax.annotate(r["method"], (r["l0"], r["r2"]), fontsize=7)
    ax.set(xscale="log", xlabel="L0 (active codes per token)", ylabel="held-out R^2")
    save(fig, "r2_vs_l0.png", "R^2 vs L0 per method")

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["method"] for r in methods]
    width = 0.8 / len(STABILITY)
    for i, key in enumerate(STABILITY):
        vals = [r.get(key) or 0 for r in methods]
        errs = [r.get(key + "_sd") or 0 for r in methods]
        ax.bar(np.arange(len(names)) + width * i, vals, width, yerr=errs, label=LABELS[key])
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="mean |cos| after matching", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    save(fig, "stability.png", "Stability with controls")

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(-6, 0, 49)
    for r in methods:
        freq = np.asarray(next(iter(r["metrics"].values()))["firing_frequency"])
        ax.hist(np.log10(freq[freq > 0]).clip(-6, 0), bins=bins, histtype="step", label=r["method"])
    ax.set(xlabel="log10 firing frequency (dead codes left out)", ylabel="atoms")
    ax.legend(fontsize=6)
    save(fig, "code_frequency.png", "Code-frequency histograms")


def build_report(out, **inputs) -> dict:
    """Write report.json, index.md and the plots into `out` (atomically, as a whole folder)."""
    out = Path(out)
    if inputs.get("browser"):  # linked relative to the report, so the pair can move together
        inputs["browser"] = os.path.relpath(inputs["browser"], out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        raise UserError(f"{out} exists and is not a report made by `archsae report`: choose another "
                        "output folder (only an empty folder or an earlier report is replaced)")
    report = collect(**inputs)
    with replaced_atomically(out, folder=True) as tmp:
        plots = write_plots(report, tmp)
        write_json(tmp / "report.json", report)
        write_markdown(report, tmp, plots)
    return report
