"""The classical baselines: golden cases of the NMF solvers, and every baseline through the
same metrics as the SAEs."""

import json

import pytest
import torch

from archsae.evaluate.baselines import (BASELINES, convex_nmf, evaluate_baselines, fit_baseline,
                                        nonnegative_codes, semi_nmf)
from archsae.cache import TokenStore
from conftest import cli


def r2(x, x_hat):
    return 1 - float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_nonnegative_codes_recover_the_true_codes():
    g = torch.Generator().manual_seed(0)
    atoms = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))[0].T  # (6, 12)
    z = torch.relu(torch.randn(40, 6, generator=g, dtype=torch.float64))
    torch.testing.assert_close(nonnegative_codes(z @ atoms, atoms, iters=500).double(), z, atol=1e-5, rtol=0)


def test_semi_and_convex_nmf_factor_non_negative_mixtures():
    g = torch.Generator().manual_seed(1)
    parts = torch.randn(5, 16, generator=g, dtype=torch.float64)
    codes = torch.relu(torch.randn(300, 5, generator=g, dtype=torch.float64))
    x = codes @ parts
    atoms, z = semi_nmf(x, 5, iters=100)
    assert (z >= 0).all() and r2(x, z @ atoms) > 0.99
    atoms, z = convex_nmf(x, 5, iters=50)
    assert (z >= 0).all() and r2(x, z @ atoms) > 0.8


def test_pca_with_d_components_reconstructs_exactly_and_kmeans_codes_are_one_hot():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(2))
    x_hat, _ = fit_baseline("pca", x, 20)(x)  # capped at d = 8 components
    assert r2(x.double(), x_hat) == pytest.approx(1.0, abs=1e-6)
    _, z = fit_baseline("kmeans", x, 4)(x)
    assert ((z != 0).sum(1) == 1).all()


def test_every_baseline_gets_the_sae_metrics(fit_store, tmp_path):
    report = evaluate_baselines(fit_store, 8, seeds=2, sample=1024, progress=False)
    assert set(report["baselines"]) == set(BASELINES)
    for name, b in report["baselines"].items():
        m = b["metrics"]["all"]
        assert {"cls", "patch"} <= set(b["metrics"])
        assert -1 < m["r2"] <= 1 and 0 <= m["dead"] <= 1, name
        assert 0 < b["stability"]["mean"] <= 1 + 1e-9 and len(b["stability"]["pairs"]) == 1
    assert report["baselines"]["kmeans"]["metrics"]["all"]["l0"] == 1.0
    assert report["baselines"]["pca"]["metrics"]["all"]["l0"] == 8.0
    # PCA's held-out R^2 recomputed densely: the same sample refitted, every held-out token at once
    train = TokenStore(fit_store, part="train")
    pca = fit_baseline("pca", torch.from_numpy(train.sample(1024, seed=1000)), 8, 0)
    held = torch.cat(list(TokenStore(fit_store, part="heldout").batches(4096, shuffle=False, drop_last=False)))
    assert report["baselines"]["pca"]["metrics"]["all"]["r2"] == pytest.approx(r2(held.double(), pca(held)[0]), abs=1e-6)
    res = cli("baselines", fit_store, "--concepts", 4, "--methods", "pca,kmeans", "--sample", 512,
              "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    assert set(json.loads((tmp_path / "b.json").read_text())["baselines"]) == {"pca", "kmeans"}
    assert cli("baselines", fit_store, "--concepts", 4, "--methods", "nmf").exit_code == 2
