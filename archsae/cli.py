"""The `archsae` command line: one sub-command per stage."""

import json
import os
from pathlib import Path

import click

from archsae.paths import default_store_dir


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="archsae")
def main():
    """Concept extraction with Archetypal and Relaxed-Archetypal sparse autoencoders."""


def _dataset_name(data: str) -> str:
    return "demo" if data == "demo" else Path(data.split("{")[0]).name.split(".")[0] or "data"


@main.command()
@click.option("--model", required=True, help="Preset (dinov2, siglip, vit, convnext, resnet50) or timm:<name>.")
@click.option("--data", default="demo", show_default=True,
              help="demo, an image folder, a .tar shard or a brace pattern of shards.")
@click.option("--out", type=click.Path(file_okay=False), help="Store folder [runs/<data>/<model>].")
@click.option("--weights", default="pretrained", show_default=True,
              help="pretrained, auto (pretrained if cached, else random), random, or a .safetensors file.")
@click.option("--limit", type=int, help="Only the first N images.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--layer", type=int, help="Block index (timm's forward_intermediates) instead of forward_features.")
@click.option("--rank", type=int, help="This process's rank when splitting by hand (default: torchrun's).")
@click.option("--world", type=int, help="Number of processes splitting the work.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="What an unreadable image does: skipped and recorded, or stops the run.")
@click.option("--chunk-images", type=int, help="Images per chunk (one unit of work) [about 8 MiB of tokens].")
@click.option("--workers", type=int, help="Image decoding processes [cores - 1].")
@click.option("--device", help="cpu, cuda, cuda:1 ... [cuda when available].")
@click.option("--demo-images", type=int, default=256, show_default=True, help="Size of the demo set.")
def extract(model, data, out, weights, limit, batch_size, layer, rank, world, dtype, on_error,
            chunk_images, workers, device, demo_images):
    """Run a backbone over images once and store every token's activation."""
    from archsae.extract.run import extract as run_extract

    out = out or default_store_dir(_dataset_name(data), model)
    store = run_extract(model, data, out, weights=weights, limit=limit, batch_size=batch_size,
                        layer=layer, rank=rank, world=world, dtype=dtype, on_error=on_error,
                        chunk_images=chunk_images, workers=workers, device=device,
                        demo_images=demo_images)
    if store.complete and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports
        _print_info(store.summary())


@main.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def info(store, as_json):
    """Describe a store: provenance, shape, token kinds, completeness, size on disk."""
    from archsae.cache import open_store

    summary = open_store(store).summary()
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
        f"shape        {n} images x {t} tokens x {d} features ({s['dtype']})",
        f"tokens       {kinds} per image" + (f"; patch grid {s['patch_grid']}" if s["patch_grid"] else ""),
        f"complete     {'yes' if s['complete'] else 'no'} ({s['units_done']}/{s['units']} units)",
        f"skipped      {s['images_skipped']} images" + "".join(
            f"\n               {k}: {v}" for k, v in list(s["skipped"].items())[:10]),
        f"on disk      {s['bytes_on_disk'] / 1e6:.1f} MB, {bpv} bytes per stored value",
    ]
    click.echo("\n".join(lines))


@main.command("import")
@click.argument("src", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store folder to create.")
@click.option("--key", help="Tensor name in a .safetensors file, or array in a zarr group.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--chunk-images", type=int, help="Rows (items) per chunk [about 8 MiB].")
def import_(src, out, key, dtype, chunk_images):
    """Bring activations made elsewhere (.npy, .safetensors, zarr) into the store format."""
    from archsae.cache.importer import import_activations

    _print_info(import_activations(src, out, key=key, dtype=dtype, chunk_images=chunk_images).summary())
