import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from archsae.cli import main
from archsae.extract.demo_data import write_demo_shards

TINY = "timm:test_vit"  # 160 x 160 input, 1 CLS + 100 patches, d = 64: fast on a CPU


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> str:
    """Brace pattern of a 24-image demo set (shards of 64: a single tar)."""
    return write_demo_shards(24, out=tmp_path_factory.mktemp("demo") / "shards")


def cli(*args: str):
    """Run the CLI in-process; returns click's Result (exit_code, output)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def cli_process(*args: str, env: dict | None = None) -> subprocess.Popen:
    """Start the CLI as a separate process (for kills and multi-process runs). Its output goes
    to a file (a pipe nobody reads would block it); `output(proc)` returns it."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "archsae", *map(str, args)], env=full_env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def torchrun(*args, tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m archsae ARGS`; its scratch folders go to
    `tmp` (a test's tmp_path), not the system's temporary folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "archsae", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def info_json(path) -> dict:
    res = cli("info", path, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="session")
def fit_store(tmp_path_factory):
    """48 demo images through the tiny ViT: 4,848 tokens of d = 64, with 64 centroids."""
    from archsae.extract.run import extract
    from archsae.fit import CentroidSettings, centroid_set

    root = tmp_path_factory.mktemp("fitstore")
    data = write_demo_shards(48, out=root / "shards")
    path = root / "store"
    extract(TINY, data, path, weights="random", progress=False, workers=0, demo_images=48)
    centroid_set(path, CentroidSettings(n_centroids=64, niter=5), progress=False)
    return path
