"""The `archsae` command line: one sub-command per stage, a thin layer over the stages and
`archsae.pipelines`. Settings options are generated from the settings dataclasses
(`archsae.options`); a `UserError` from anywhere becomes one line on stderr and exit code 2.
"""

import errno
import json
import os
from pathlib import Path

import click

from archsae.cache import DTYPES
from archsae.errors import InvalidSetting, UserError
from archsae.files import write_json
from archsae.fit.settings import (SAE_PRESETS, CentroidSettings, FitSettings, SAESettings,
                                  preset_values)
from archsae.evaluate.study import VARIES
from archsae.extract.presets import PRESETS
from archsae.extract.run import PRECISIONS
from archsae.options import SettingsOptions, flag_of
from archsae.paths import default_store_dir

# The options of the settings, grouped by the commands that take them.
SAE_SIZE = SettingsOptions(SAESettings, ("concepts", "top_k", "projection", "multiplier", "pre_bias",
                                          "encoder_init", "centroids", "w_candidates"))
SAE_KIND = SettingsOptions(SAESettings, ("encoder", "dictionary", "delta", "project", "decoder_init"))
TRAINING = SettingsOptions(FitSettings)
N_CENTROIDS = SettingsOptions(CentroidSettings, ("n_centroids", "sample", "niter"))
KMEANS = SettingsOptions(CentroidSettings)
CENTROID_DATA = SettingsOptions(FitSettings, ("tokens", "heldout", "split_seed"))


# Failures of the machine rather than of the program: a folder one may not write, a full disk.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


class OneLineErrors(click.Group):
    """Prints a `UserError` (a bad setting named by its option) or a refused write as one line,
    and exits with 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InvalidSetting as exc:
            raise _Failure(exc.named(flag_of(exc.setting))) from None
        except UserError as exc:
            raise _Failure(str(exc)) from None
        except OSError as exc:
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise _Failure(f"cannot write {exc.filename or 'the output'}: {exc.strerror}: choose a "
                           "writable folder or free some disk, then rerun (unfinished work is "
                           "redone, nothing half-written is used)") from None


class _Failure(click.ClickException):
    exit_code = 2


@click.group(cls=OneLineErrors,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="archsae")
def main():
    """Concept extraction with Archetypal and Relaxed-Archetypal sparse autoencoders."""


def _dataset_name(data: str) -> str:
    return "demo" if data == "demo" else Path(data.split("{")[0]).name.split(".")[0] or "data"


@main.command()
@click.option("--model", required=True, help=f"Preset ({', '.join(PRESETS)}) or timm:<name>.")
@click.option("--data", default="demo", show_default=True,
              help="demo, an image folder, a .tar shard or a brace pattern of shards.")
@click.option("--out", type=click.Path(file_okay=False), help="Store folder [runs/<data>/<model>].")
@click.option("--weights", default="pretrained", show_default=True,
              help="pretrained, auto (pretrained if cached, else random), random, or a .safetensors file.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per backbone batch.")
@click.option("--layer", type=int, help="Block index (timm's forward_intermediates) instead of forward_features.")
@click.option("--rank", type=click.IntRange(min=0), help="This process's rank when splitting by hand (default: torchrun's).")
@click.option("--world", type=click.IntRange(min=1), help="Number of processes splitting the work.")
@click.option("--dtype", type=click.Choice(DTYPES), default=DTYPES[0], show_default=True)
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="What an unreadable image does: skipped and recorded, or stops the run.")
@click.option("--chunk-images", type=click.IntRange(min=1), help="Images per chunk (one unit of work) [about 8 MiB of tokens].")
@click.option("--workers", type=click.IntRange(min=0), help="Image decoding processes [cores - 1].")
@click.option("--device", help="cpu, cuda, cuda:1 ... [cuda when available].")
@click.option("--demo-images", type=click.IntRange(min=1), default=256, show_default=True, help="Size of the demo set.")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="float32", show_default=True,
              help="The backbone's compute precision: 16-bit types run under autocast (GPUs; "
                   "`make gpu-check` reports their error against float32).")
def extract(model, data, out, weights, limit, batch_size, layer, rank, world, dtype, on_error,
            chunk_images, workers, device, demo_images, precision):
    """Run a backbone over images once and store every token's activation."""
    from archsae.extract.run import extract as run_extract

    out = out or default_store_dir(_dataset_name(data), model)
    store = run_extract(model, data, out, weights=weights, limit=limit, batch_size=batch_size,
                        layer=layer, rank=rank, world=world, dtype=dtype, on_error=on_error,
                        chunk_images=chunk_images, workers=workers, device=device,
                        demo_images=demo_images, precision=precision)
    if store.complete and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports
        _print_info(store.summary())


@main.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@click.option("--verify", is_flag=True, help="Also decode every chunk (checksums): finds damaged units.")
def info(store, as_json, verify):
    """Describe a store: provenance, shape, token kinds, completeness, size on disk."""
    from archsae.cache import open_store

    opened = open_store(store)
    summary = opened.summary()
    if verify:
        summary["damaged_units"] = opened.unreadable_units(progress=not as_json)
        summary["complete"] = summary["complete"] and not summary["damaged_units"]
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _print_info(summary)


def _print_info(s: dict) -> None:
    n, t, d = s["shape"]
    kinds = ", ".join(f"{v} {k}" for k, v in s["token_kinds"].items())
    bpv = f"{s['bytes_per_value']:.3f}" if s["bytes_per_value"] else "n/a"
    lines = [
        f"store        {s['path']}",
        f"model        {s['model']} ({s['timm_name']}), layer {s['layer']}",
        f"weights      {s['weights']}",
        f"images       {(s['source'] or {}).get('about') or (s['source'] or {}).get('location')}",
        f"shape        {n} images x {t} tokens x {d} features ({s['dtype']})",
        f"tokens       {kinds} per image" + (f"; patch grid {s['patch_grid']}" if s["patch_grid"] else ""),
        f"complete     {'yes' if s['complete'] else 'no'} ({s['units_done']}/{s['units']} units"
        + (f"; damaged: {s['damaged_units'][:10]}" if s.get("damaged_units") else "")
        + ("" if s["complete"] else "; rerun the command that made it to finish or mend it") + ")",
        f"skipped      {s['images_skipped']} images" + "".join(
            f"\n               {k}: {v}" for k, v in list(s["skipped"].items())[:10]),
        f"on disk      {s['bytes_on_disk'] / 1e6:.1f} MB, {bpv} bytes per stored value",
    ]
    click.echo("\n".join(lines))


@main.command("import")
@click.argument("src", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store folder to create.")
@click.option("--key", help="Tensor name in a .safetensors file, or array in a zarr group.")
@click.option("--dtype", type=click.Choice(DTYPES), default=DTYPES[0], show_default=True)
@click.option("--chunk-images", type=click.IntRange(min=1), help="Rows (items) per chunk [about 8 MiB].")
def import_(src, out, key, dtype, chunk_images):
    """Bring activations made elsewhere (.npy, .safetensors, zarr) into the store format."""
    from archsae.cache.importer import import_activations

    _print_info(import_activations(src, out, key=key, dtype=dtype, chunk_images=chunk_images).summary())


@main.command()
@click.argument("src", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store folder to create.")
@click.option("--dtype", type=click.Choice(DTYPES), default="int8", show_default=True,
              help="The new store's dtype (int8: per-feature affine, 1 byte per value).")
def convert(src, out, dtype):
    """Rewrite a complete store with another dtype (resumable); the original is left as it is."""
    from archsae.cache.convert import convert as run_convert

    _print_info(run_convert(src, out, dtype).summary())


@main.command("import-weights")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", required=True, help="The preset or timm:<name> the weights are for.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .safetensors file to write.")
def import_weights_(src, model, out):
    """Convert weights of another layout (lukemelas EfficientNet .pth, read as plain tensors)
    into a timm model's .safetensors, for --weights."""
    from archsae.extract.weights import import_weights

    click.echo(f"wrote {out} (sha256 {import_weights(src, out, model)})")


@main.command()
@click.argument("store", type=click.Path())
@KMEANS
@CENTROID_DATA
@click.option("--force", is_flag=True, help="Recompute even if this centroid set exists.")
def centroids(store, force, **options):
    """Faiss K-means on standardised training tokens; saved into the store for every later fit."""
    from archsae.cache import open_store
    from archsae.fit import centroid_set

    cfg = FitSettings(**CENTROID_DATA.values(options))
    name = centroid_set(store, CentroidSettings(**KMEANS.values(options)), cfg.tokens, cfg.split,
                        force=force)
    meta = open_store(store).load_centroids(name)[1]
    click.echo(f"centroids {name} in {store} (faiss {meta['faiss_version']} on "
               f"{'the GPU' if meta['gpu'] else 'the CPU'}, {meta['n_tokens_sampled']} tokens, "
               f"{meta['niter']} iterations)")
    import faiss
    import torch

    if torch.cuda.is_available() and faiss.get_num_gpus() == 0:
        click.echo("this faiss has no GPU support: `pip uninstall faiss-cpu && pip install faiss-gpu` "
                   "(the gpu extra) runs K-means on the GPU, minutes instead of hours at 32,000 centroids")


@main.command("fit")
@click.argument("store", type=click.Path())
@click.option("--sae", type=click.Choice(list(SAE_PRESETS)),
              help="A named SAE: sets the encoder, dictionary and delta [without it, those options "
                   "alone define the SAE; their defaults make an RA-SAE].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Fit directory.")
@click.option("--resume", is_flag=True, help="Accept a finished fit in --out as done (an unfinished one "
              "is always continued from its last checkpoint).")
@SAE_KIND
@SAE_SIZE
@N_CENTROIDS
@TRAINING
def fit_(store, sae, out, resume, **options):
    """Train an SAE on a store (A-SAE, RA-SAE, or a baseline)."""
    from archsae.cache import open_store
    from archsae.evaluate.run import evaluate_fit
    from archsae.fit import fit, sae_settings
    from archsae.fit.train import resumed_settings

    values = {**SAE_KIND.values(options), **SAE_SIZE.values(options)}
    if (Path(out) / "config.json").is_file():  # continue it: only the settings named may differ
        if sae:
            values = {**preset_values(sae), **values}
        settings, cfg = resumed_settings(out, values, TRAINING.values(options))
    else:
        settings = sae_settings(sae, open_store(store).d, **values)
        cfg = FitSettings(**TRAINING.values(options))
    fit(store, out, settings, cfg, resume=resume, centroids=CentroidSettings(**N_CENTROIDS.values(options)))
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return
    m = evaluate_fit(out, progress=False)["metrics"][cfg.tokens]
    click.echo(f"{out} ({settings.name}): held-out R^2 {m['r2']:.4f}, L0 {m['l0']:.1f}, dead "
               f"{m['dead']:.3f} ({m['tokens']} tokens); `archsae evaluate {out}` for every metric")


@main.command("export")
@click.argument("fitdir", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="A .safetensors file.")
def export_(fitdir, out):
    """Write the fit as plain tensors (encoder, decoder, threshold, standardisation)."""
    from archsae.fit import export

    click.echo(f"wrote {export(fitdir, out)}")


@main.command("evaluate")
@click.argument("fitdirs", nargs=-1, required=True, type=click.Path())
@click.option("--store", type=click.Path(), help="The store the fits were made from [as recorded].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write every number here.")
def evaluate_(fitdirs, store, json_out):
    """The paper's metrics for each fit, on the held-out split (and per token kind)."""
    from archsae.evaluate.run import evaluate_fit

    results = [evaluate_fit(f, store) for f in fitdirs]
    columns = ("r2", "l0", "dead", "ood", "stable_rank", "effective_rank", "coherence",
               "connectivity", "negative_interference")
    click.echo(f"{'fit':40s} {'tokens':8s} " + " ".join(f"{c[:10]:>10s}" for c in columns))
    for r in results:
        for kind, m in r["metrics"].items():
            click.echo(f"{r['fit'][-40:]:40s} {kind:8s} " + " ".join(f"{m[c]:10.4f}" for c in columns))
    if json_out:
        write_json(Path(json_out), results)


@main.command("stability")
@click.argument("fitdirs", nargs=-1, required=True, type=click.Path())
def stability_(fitdirs):
    """Pairwise signed-Hungarian stability of fits' dictionaries."""
    from archsae.evaluate.stability import compare_runs
    from archsae.fit import load

    if len(fitdirs) < 2:
        raise click.UsageError("give at least two fit directories")
    r = compare_runs([load(f).dictionary.weight().detach() for f in fitdirs])
    for (i, j), score, cos in zip(r["pair_runs"], r["pairs"], r["max_cosine_pairs"]):
        click.echo(f"{fitdirs[i]} ~ {fitdirs[j]}: {score:.4f} (max cosine {cos:.4f})")
    click.echo(f"stability {r['mean']:.4f} +- {r['sd'] or 0.0:.4f} over {len(r['pairs'])} pairs; "
               f"matching: {', '.join(r['matching'])}")


@main.command("baselines")
@click.argument("store", type=click.Path())
@click.option("--concepts", type=click.IntRange(min=1), required=True, help="Atoms per baseline (linear methods: at most d).")
@click.option("--methods", default="all", show_default=True,
              help="Comma-separated: pca, ica, sparse_pca, kmeans, semi_nmf, convex_nmf, or all.")
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True, help="Fits per method (stability across them).")
@click.option("--sample", type=click.IntRange(min=1), default=8192, show_default=True, help="Training tokens per fit.")
@CENTROID_DATA
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write every number here.")
def baselines_(store, concepts, methods, seeds, sample, json_out, **options):
    """PCA, FastICA, sparse PCA, K-means, Semi-NMF, Convex-NMF with the SAEs' metrics."""
    from archsae.evaluate.baselines import BASELINES, evaluate_baselines

    names = list(BASELINES) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise click.UsageError(f"unknown method {unknown[0]!r}: use {', '.join(BASELINES)} or all")
    cfg = FitSettings(**CENTROID_DATA.values(options))
    tokens = cfg.tokens
    result = evaluate_baselines(store, concepts, names, seeds, sample, tokens, cfg.split)
    click.echo(f"{'method':12s} {'atoms':>6s} {'R^2':>8s} {'L0':>8s} {'dead':>6s} {'stability':>9s}")
    for name, r in result["baselines"].items():
        m = r["metrics"][tokens]
        stab = r["stability"]["mean"]
        click.echo(f"{name:12s} {r['concepts']:6d} {m['r2']:8.4f} {m['l0']:8.1f} {m['dead']:6.3f} "
                   f"{stab if stab is not None else float('nan'):9.4f}")
    if json_out:
        write_json(Path(json_out), result)


@main.command("stability-study")
@click.argument("store", type=click.Path())
@click.option("--sae", default="ra", show_default=True,
              help=f"The SAE(s) to study, comma-separated among {', '.join(SAE_PRESETS)}.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for all the runs.")
@click.option("--seeds", type=click.IntRange(min=2), default=4, show_default=True, help="Runs per variant.")
@click.option("--vary", type=click.Choice(list(VARIES)), default="seed", show_default=True,
              help="What differs between runs: the seed; the training data (90% subsets, seed "
                   "fixed); or the centroids (K-means seeds) and the seed.")
@SAE_SIZE
@N_CENTROIDS
@TRAINING
def stability_study_(store, sae, out, seeds, vary, **options):
    """Train runs of SAEs and of their controls that differ in one thing; report their stability."""
    from archsae.evaluate.study import format_study
    from archsae.pipelines import run_stability_study

    names = [name.strip() for name in sae.split(",") if name.strip()]
    report = run_stability_study(store, out, names, FitSettings(**TRAINING.values(options)),
                                 CentroidSettings(**N_CENTROIDS.values(options)), seeds, vary,
                                 **SAE_SIZE.values(options))
    click.echo(format_study(report))


@main.group()
def bench():
    """The paper's two benchmarks: plausibility and soft identifiability."""


def _write_report(json_out, report) -> None:
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)  # only once there is a report
    write_json(Path(json_out), report)
    click.echo(f"wrote {json_out}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


@bench.command("plausibility")
@click.option("--model", required=True, help="A preset with an ImageNet head (vit, convnext, resnet50, efficientnet_lite0) or timm:<name>.")
@click.option("--weights", default="pretrained", show_default=True, help="pretrained, auto, random, or a .safetensors file.")
@click.option("--store", type=click.Path(), help="A store of this model's last layer [extract the demo data].")
@click.option("--fit", "fits", multiple=True, type=click.Path(file_okay=False),
              help="A finished fit of this model's last layer to score instead of fitting the sweep (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the fits and plausibility.json.")
@click.option("--sizes", help="Dictionary sizes, comma-separated [512,2048,8192, those the store's "
              "centroids allow].")
@click.option("--deltas", default="0,0.5,1,2", show_default=True, help="Relaxations of the archetypal SAE (0: A-SAE).")
@N_CENTROIDS
@TRAINING
def plausibility_(model, weights, store, fits, out, sizes, deltas, **options):
    """Best cosine between classifier-head rows and atoms, swept over size and delta (or of given fits)."""
    from archsae.evaluate.plausibility import format_plausibility
    from archsae.pipelines import run_plausibility

    if fits and (store or sizes):
        raise click.UsageError("--fit scores fits already made: leave out --store and --sizes")
    sizes = tuple(int(s) for s in _floats(sizes)) if sizes else None
    report = run_plausibility(model, weights, out, store, sizes, _floats(deltas),
                              FitSettings(**TRAINING.values(options)),
                              CentroidSettings(**N_CENTROIDS.values(options)), fits or None)
    click.echo(format_plausibility(report))
    _write_report(Path(out) / "plausibility.json", report)


@bench.command("identifiability")
@click.option("--model", required=True, help="Preset or timm:<name>.")
@click.option("--weights", default="pretrained", show_default=True, help="pretrained, auto, random, or a .safetensors file.")
@click.option("--collages", type=click.IntRange(min=20), default=4000, show_default=True, help="Collages per object set (half train, half test).")
@click.option("--objects", type=click.Path(), help="A folder with one image per object [the two bundled sets].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for collages, stores and identifiability.json.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Fits of each method (seeds 0..N-1), reported as mean and sd.")
@click.option("--epochs", type=click.IntRange(min=1), default=200, show_default=True, help="SAE epochs over the train collages.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per backbone batch.")
@click.option("--device", help="cpu, cuda ... [cuda when available].")
def identifiability_(model, weights, collages, objects, out, seeds, epochs, batch_size, device):
    """Collages of known objects: does one concept tell whether an object is present?"""
    from archsae.pipelines import run_identifiability
    from archsae.evaluate.identifiability import format_identifiability

    report = run_identifiability(model, weights, out, collages, objects, seeds=seeds, epochs=epochs,
                                 batch_size=batch_size, device=device)
    click.echo(format_identifiability(report))
    _write_report(Path(out) / "identifiability.json", report)


@main.command("report")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder (index.md, report.json, PNGs).")
@click.option("--study", "studies", multiple=True, type=click.Path(exists=True), help="A stability-study folder (repeatable).")
@click.option("--baselines", type=click.Path(exists=True, dir_okay=False), help="baselines.json from `archsae baselines --json`.")
@click.option("--identifiability", type=click.Path(exists=True, dir_okay=False), help="identifiability.json.")
@click.option("--plausibility", type=click.Path(exists=True, dir_okay=False), help="plausibility.json.")
@click.option("--browser", type=click.Path(exists=True, file_okay=False), help="The concept browser's folder, linked from the report.")
def report_(out, studies, baselines, identifiability, plausibility, browser):
    """Gather the evaluate stage's results into one report: markdown, PNG plots, JSON."""
    from archsae.evaluate.report import build_report

    if not (studies or baselines or identifiability or plausibility):
        raise click.UsageError("give at least one of --study, --baselines, --identifiability, --plausibility")
    build_report(out, studies=studies, baselines=baselines, identifiability=identifiability,
                 plausibility=plausibility, browser=browser)
    click.echo(f"wrote {Path(out) / 'index.md'} and {Path(out) / 'report.json'}")


@main.command("browse")
@click.argument("fitdir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Site folder (open OUT/index.html).")
@click.option("--top", type=click.IntRange(min=1), default=16, show_default=True, help="Images per concept.")
@click.option("--against", type=click.Path(exists=True, file_okay=False), help="Another fit (e.g. another seed): each concept's match score.")
@click.option("--data", help="Where the store's images are now, if they moved since extraction.")
@click.option("--part", type=click.Choice(["all", "heldout", "train"]), default="all", show_default=True,
              help="Which images of the fit's split to look at.")
def browse_(fitdir, out, top, against, data, part):
    """A static site of the concepts: top images with heatmaps, image pages, sortable index."""
    from archsae.evaluate.browser import build_site
    from archsae.extract.display import StoreImages
    from archsae.fit import open_fit_store

    images = StoreImages(open_fit_store(fitdir)[0], data)
    s = build_site(fitdir, out, images.thumbnail, top, against, part)
    click.echo(f"wrote {Path(out) / 'index.html'}: {s['live']} live and {s['dead']} dead concepts, "
               f"{s['images']} images, {s['bytes'] / 1e6:.1f} MB")
