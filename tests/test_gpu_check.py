"""`make gpu-check`: refuses on a CPU host in one line; its parts run at small size on a CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check


def test_refuses_on_a_machine_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "GPU" in done.stderr


def test_store_kmeans_and_fits_at_small_size(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "PAPER_CENTROIDS", 64)
    monkeypatch.setattr(gpu_check, "PAPER_CONCEPTS", 32)
    monkeypatch.setattr(gpu_check, "PAPER_BATCH", 128)
    monkeypatch.setattr(gpu_check, "SIZES", (32, 64))
    store = gpu_check.paper_store(tmp_path / "store", 8)
    assert store.n_tokens == 261 and store.d == gpu_check.PAPER_D and store.complete
    km = gpu_check.kmeans(tmp_path / "store", niter=2)
    assert km["tokens"] > 0 and km["s_per_iter"] > 0 and not km["gpu"]
    feed = gpu_check.loader_on_device(tmp_path / "store", "cpu", compared=4)
    assert feed["tokens_per_s"] > 0 and feed["difference"] < 1e-5
    args = type("Args", (), {"device": "cpu"})
    for sae in ("topk", "ra"):
        assert gpu_check.steps_per_s(tmp_path / "store", tmp_path, sae, km["name"], args) > 0
    ev = gpu_check.evaluation(tmp_path / "store", "cpu")
    assert ev["concepts"] == 64 and ev["tokens"] > 0 and ev["minutes_paper"] > 0 and ev["peak_gb"] > 0
