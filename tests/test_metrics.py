"""Golden values of the evaluation metrics, and `archsae evaluate` / `archsae stability`."""

import json

import numpy as np
import pytest
import torch

from archsae.evaluate.metrics import CodeTally, coherence, effective_rank, stable_rank
from archsae.evaluate.stability import max_cosine
from conftest import cli


def tally_of(x, x_hat, z, atoms):
    t = CodeTally(atoms)
    t.update(x[:3], x_hat[:3], z[:3])  # in two batches: pooled, not averaged per batch
    t.update(x[3:], x_hat[3:], z[3:])
    return t


def test_r2_mean_predictor_is_zero_and_perfect_reconstruction_is_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + 5.0
    atoms, z = torch.eye(4), torch.zeros(10, 4)
    assert abs(tally_of(x, x.mean(0).expand_as(x), z, atoms).r2()) < 1e-12
    assert tally_of(x, x, z, atoms).r2() == 1.0
    # a scalar mean predictor is worse than the per-feature mean: R^2 < 0
    assert tally_of(x, torch.full_like(x, float(x.mean())), z, atoms).r2() < 0


def test_dictionary_metrics_hand_cases():
    eye = torch.eye(3, 5)
    assert stable_rank(eye) == pytest.approx(3.0)
    assert effective_rank(eye) == pytest.approx(3.0)
    assert coherence(eye) == 0.0
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    assert coherence(d) == pytest.approx(1 / np.sqrt(2))
    assert stable_rank(torch.tensor([[3.0, 0.0], [0.0, 1.0]])) == pytest.approx(10 / 9)
    assert effective_rank(torch.tensor([[3.0, 0.0], [0.0, 1.0]])) == pytest.approx(
        np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
    assert max_cosine(d, -d) == pytest.approx(1 / np.sqrt(2))


def test_code_statistics_hand_case():
    atoms = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 0.0], [2.0, 0.0]]) + 0.0
    m = tally_of(x, x, z, atoms).summary(atoms)
    assert m["l0"] == pytest.approx(5 / 5) and m["l0_histogram"] == [1, 3, 1]
    assert m["dead"] == 0.0
    # co-firing pairs: (0,0),(0,1),(1,0),(1,1),(2,2): 5 of 9 non-zero
    assert m["connectivity"] == pytest.approx(1 - 5 / 9)
    # atoms 0 and 1 fire together (1 x 2) and point in opposite directions: relu(-(2 * -1)) twice
    assert m["negative_interference"] == pytest.approx(np.sqrt(2 * 2.0 ** 2))
    assert m["negative_interference_cosine"] == pytest.approx(np.sqrt(2 * 2.0 ** 2))
    # atoms 0 and 2 equal some activation's direction; atom 1 (-x) is at best orthogonal
    assert m["ood"] == pytest.approx(1 - (1 + 0 + 1) / 3)


def test_negative_interference_uses_the_atoms_as_they_are():
    """The paper's ||relu(-(Z^T Z) o (D D^T))||: atoms of norms 2, 1 and 3 (unit atoms would give
    the cosine variant, kept under its own name)."""
    atoms = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
    z = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 3.0], [1.0, 0.0, 0.0]])
    x = z @ atoms
    m = tally_of(x, x, z, atoms).summary(atoms)
    # co-firing z0 z1 = 2 and <D0, D1> = -2: relu(-(2 * -2)) = 4 at (0, 1) and (1, 0); atom 2 is
    # orthogonal to both, and the diagonal is positive
    assert m["negative_interference"] == pytest.approx(np.sqrt(2 * 4.0 ** 2))
    assert m["negative_interference_cosine"] == pytest.approx(np.sqrt(2 * 2.0 ** 2))


def test_evaluate_and_stability_cli(tmp_path):
    from archsae.fit import sae_settings
    from archsae.fit import FitSettings, fit

    x = np.random.default_rng(0).normal(size=(600, 4, 16)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    assert cli("import", tmp_path / "a.npy", "--out", tmp_path / "s").exit_code == 0
    for seed in (0, 1):
        fit(tmp_path / "s", tmp_path / f"f{seed}", sae_settings("topk", 16, 8, 2),
            FitSettings(epochs=2, batch_size=64, lr=2e-3, seed=seed), progress=False)
    res = cli("evaluate", tmp_path / "f0", tmp_path / "f1", "--json", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "m.json").read_text())
    m = data[0]["metrics"]["all"]
    assert 0 < m["r2"] < 1 and m["l0"] <= 2 and 0 <= m["dead"] <= 1
    assert m["tokens"] == 4 * int(np.sum(np.random.default_rng(0).random(600) < 0.1))
    res = cli("stability", tmp_path / "f0", tmp_path / "f1")
    assert res.exit_code == 0 and "over 1 pairs" in res.output
    res = cli("stability", tmp_path / "f0", tmp_path / "f0")
    assert "stability 1.0000" in res.output


def test_one_pass_over_all_kinds_equals_a_pass_per_kind(fit_store):
    """The per-kind tallies of the single pass, and "all" as their sum, equal separate passes."""
    from archsae.cache import open_store
    from archsae.evaluate.run import evaluate_model

    store = open_store(fit_store)
    atoms = torch.randn(40, store.d, generator=torch.Generator().manual_seed(0))

    def predict(x):  # signed codes: connectivity then needs |Z|^T |Z|
        z = x @ atoms.T
        z = z * (z.abs() >= z.abs().topk(5, dim=-1).values[:, -1:])
        return z @ atoms * 0.1, z

    def standardise(x):
        return x / 3

    one = evaluate_model(store, predict, atoms, standardise, batch_size=37, progress=False)
    assert set(one) == {"all", "cls", "patch"}
    for kind in one:
        alone = evaluate_model(store, predict, atoms, standardise, tokens=kind, batch_size=37,
                               progress=False)[kind]
        assert one[kind].keys() == alone.keys()
        for key, value in alone.items():
            assert one[kind][key] == pytest.approx(value, rel=1e-5, abs=1e-9), (kind, key)


def test_mean_predictor_has_r2_zero_on_an_int8_store(fit_store, tmp_path):
    """Held-out tokens of an int8 store are decoded once (offset + scale q), then standardised:
    predicting their mean gives R^2 = 0."""
    from archsae.cache import open_store
    from archsae.cache.convert import convert
    from archsae.cache.split import Split
    from archsae.evaluate.run import evaluate_model

    store = convert(fit_store, tmp_path / "int8", "int8", progress=False)
    scale, offset = store.quantisation
    images = store.valid_images(store.done_units()) & Split().heldout_mask(store.n_images)
    x = (offset + scale * np.asarray(store.tokens[:], np.float32)[images]).reshape(-1, store.d)
    mean = torch.from_numpy((x.mean(0) - 1.0) / 2.0)
    atoms = torch.eye(store.d)

    def predict(x):
        return mean.expand_as(x), torch.zeros(len(x), store.d)

    got = evaluate_model(open_store(tmp_path / "int8"), predict, atoms, lambda x: (x - 1.0) / 2.0,
                         progress=False)
    assert got["all"]["r2"] == pytest.approx(0.0, abs=1e-5)
