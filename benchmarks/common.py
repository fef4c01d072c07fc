"""Shared by the benchmarks: a store of real activations, the RESULT line, and the check of
their counts. Benchmarks work in `tempfile.TemporaryDirectory()` folders, so nothing is left
behind."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).resolve().parent.parent / ".bench" / "reference"


def result(name: str, value: float, op: str, target: float, digits: int = 3) -> None:
    """The one line per figure that `make bench` collects."""
    print(f"RESULT {name} {value:.{digits}f} target {op} {target}")


def count(low: int = 1, even: bool = False):
    """An argparse `type`: a whole number of at least `low` (and even, if `even`), checked where
    the option is declared, so that a bad one is a one-line error (exit 2) before any work."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < low or (even and n % 2):
            raise argparse.ArgumentTypeError(f"{n}: use {'an even number' if even else 'a whole number'}"
                                             f" of at least {low}")
        return n
    return parse


def run_reference(module: str, argv: list[str]) -> dict:
    """Run `python -m <module> --reference <argv>` with the reference library (overcomplete
    0.3.0, installed by `make bench` into .bench/reference, outside our venv) on its path;
    return the JSON object it prints last."""
    if not (REFERENCE / "overcomplete").is_dir():
        sys.exit(f"the reference library is not installed in {REFERENCE}: run `make bench` "
                 "(it installs overcomplete==0.3.0 there, outside the venv)")
    done = subprocess.run([sys.executable, "-m", module, "--reference", *argv],
                          env={**os.environ, "PYTHONPATH": f"{REFERENCE}{os.pathsep}{os.getcwd()}"},
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


PAPER_D = 768  # DINOv2 ViT-B's width
PAPER_CONCEPTS = 5 * PAPER_D  # its dictionaries (3,840), against PAPER_CENTROIDS K-means centroids
PAPER_TOKENS_PER_IMAGE = 261  # its 1 CLS + 4 registers + 256 patches
PAPER_TOKENS = 1_281_167 * PAPER_TOKENS_PER_IMAGE  # over ImageNet-1k train: 334M


def paper_store(path: Path, n_images: int, seed: int = 0):
    """A float16 store of n_images x 261 tokens x 768 in DINOv2's layout (CLS, 4 registers,
    patches): tokens drawn around 200 random cluster centres, so K-means has structure to find.
    For speed and memory figures only."""
    from archsae.cache import TOKEN_KINDS, StoreSpec, create_or_open

    kinds = np.array([TOKEN_KINDS.index("cls")] + [TOKEN_KINDS.index("register")] * 4 +
                     [TOKEN_KINDS.index("patch")] * (PAPER_TOKENS_PER_IMAGE - 5))
    spec = StoreSpec(n_images=n_images, token_kind=kinds, d=PAPER_D, chunk_images=16,
                     provenance={"model": "synthetic", "source": {"kind": "synthetic", "n_images": n_images},
                                 "source_hash": f"paper-layout-{n_images}-{seed}"})
    store = create_or_open(path, spec)
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (200, PAPER_D)).astype(np.float32)
    for u in range(store.n_units):
        start, stop = store.unit_bounds(u)
        shape = (stop - start, len(kinds))
        tokens = centres[rng.integers(0, len(centres), shape)] + rng.normal(0, 0.5, (*shape, PAPER_D))
        store.write_unit(u, tokens.astype(np.float16), keys=[str(i) for i in range(start, stop)])
    return store


def real_activation_store(n_images: int, workdir, model: str = "vit"):
    """A store of `n_images` x 197 x 768 float16 tokens of a ViT-B over the demo photos, in
    `workdir` (a temporary folder of the caller's).

    32 images are really extracted (pretrained weights when cached, else random); the rest
    repeat them with a small per-image perturbation, so chunks compress like real data.
    """
    from archsae.cache import StoreSpec, create_or_open, open_store
    from archsae.extract.run import extract

    workdir = Path(workdir)
    seed_store = extract(model, "demo", workdir / "seed", weights="auto", limit=32,
                         progress=False, demo_images=32)
    real = np.asarray(seed_store.tokens[:]).astype(np.float32)
    src = open_store(workdir / "seed")
    spec = StoreSpec(n_images=n_images, token_kind=src.token_kind, d=src.d,
                     chunk_images=src.chunk_images, provenance={
                         **{k: src.attrs[k] for k in ("model", "timm_name", "weights", "layer",
                                                      "preprocessing", "patch_grid")},
                         "source": {"kind": "benchmark", "n_images": n_images},
                         "source_hash": f"bench-{n_images}"})
    store = create_or_open(workdir / "bench", spec)
    rng = np.random.default_rng(0)
    for u in range(store.n_units):
        start, stop = store.unit_bounds(u)
        idx = np.arange(start, stop) % len(real)
        tokens = real[idx] + rng.normal(0, 0.02, size=(stop - start, 1, src.d)).astype(np.float32)
        store.write_unit(u, tokens, keys=[str(i) for i in range(start, stop)])
    return store
