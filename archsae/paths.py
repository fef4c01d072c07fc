"""Where archsae keeps things by default: everything under one runs folder."""

import os
from pathlib import Path


def runs_dir() -> Path:
    """`$ARCHSAE_RUNS`, else `./runs`: stores, demo data and fits live below it."""
    return Path(os.environ.get("ARCHSAE_RUNS", "runs"))


def default_store_dir(dataset: str, model: str) -> Path:
    return runs_dir() / dataset / model.replace(":", "_").replace("/", "_")
