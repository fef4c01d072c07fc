"""The paper's two benchmarks: soft identifiability (collages) and plausibility (head rows)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from archsae.evaluate.identifiability import identifiability_scores
from archsae.extract.collages import (OBJECT_SETS, PER_COLLAGE, TILE, bundled_objects,
                                      collage_objects, presence, render_collage)
from archsae.evaluate.plausibility import head_rows, plausibility, random_plausibility
from conftest import TINY, cli


def test_collages_hold_four_distinct_objects_and_bundled_sets_are_large_enough():
    layout = collage_objects(500, 10, seed=3)
    assert all(len(set(row)) == PER_COLLAGE for row in layout)
    assert (presence(layout, 10).sum(1) == PER_COLLAGE).all()
    assert np.unique(layout).tolist() == list(range(10))  # every object appears
    assert len(OBJECT_SETS) >= 2 and all(9 <= len(s) <= 12 for s in OBJECT_SETS.values())
    assert not set(OBJECT_SETS["objects"]) & set(OBJECT_SETS["textures"])
    for name in OBJECT_SETS:  # shipped with scikit-image / scikit-learn: nothing downloaded
        photos = bundled_objects(name)
        assert all(p.ndim == 3 and p.shape[2] == 3 and p.dtype == np.uint8 for _, p in photos)
    collage = render_collage([p for _, p in photos[:4]], np.random.default_rng(0))
    assert collage.size == (2 * TILE, 2 * TILE)


def test_identifiability_golden_values():
    n_objects = 8
    p = presence(collage_objects(400, n_objects, seed=0), n_objects)
    train, test = p[:200], p[200:]
    perfect = identifiability_scores(train.astype(float), train, test.astype(float), test)
    assert perfect["score"] == 1.0 and perfect["score_best_on_test"] == 1.0
    # a code that never varies can only answer "absent" everywhere: exactly the chance level,
    # 1 - 4/10, since every collage holds 4 of the 10 objects
    p10 = presence(collage_objects(400, 10, seed=0), 10)
    flat = identifiability_scores(np.ones((200, 3)), p10[:200], np.ones((200, 3)), p10[200:])
    assert flat["score"] == pytest.approx(0.6, abs=1e-12)
    # a negated code works as well as the code (PCA/ICA signs are arbitrary)
    assert identifiability_scores(-train.astype(float), train, -test.astype(float), test)["score"] == 1.0


def test_identifiability_cli_on_user_objects(tmp_path):
    rng = np.random.default_rng(0)
    objects = tmp_path / "objects"
    objects.mkdir()
    for i in range(6):  # distinct flat colours with noise
        colour = rng.integers(0, 255, 3)
        img = np.clip(colour + rng.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(objects / f"object{i}.png")
    res = cli("bench", "identifiability", "--model", TINY, "--weights", "random", "--collages", 60,
              "--objects", objects, "--out", tmp_path / "out", "--epochs", 20, "--seeds", 2)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "identifiability.json").read_text())
    entry = report["sets"]["objects"]
    assert entry["chance"] == pytest.approx(1 - 4 / 6) and len(entry["objects"]) == 6
    for score in entry["methods"].values():
        assert 0 < score["score"] <= 1 and len(score["scores"]) == 2
        assert score["score"] == pytest.approx(np.mean(score["scores"]))
        assert score["score_sd"] == pytest.approx(np.std(score["scores"], ddof=1))
    # flat colours are told apart even by a random backbone: K-means finds the objects
    assert entry["methods"]["kmeans"]["score"] >= entry["chance"] + 0.3
    assert report["weights"] == "random:seed0" and "chance" in res.output
    for i in range(6, 12):  # 12 archetypes need 12 train collages
        Image.fromarray(np.full((64, 64, 3), 20 * i, np.uint8)).save(objects / f"object{i}.png")
    res = cli("bench", "identifiability", "--model", TINY, "--weights", "random", "--collages", 20,
              "--objects", objects, "--out", tmp_path / "out3")
    assert res.exit_code == 2 and "at least 24" in res.output and not (tmp_path / "out3").exists()
    for i in range(1, 12):
        (objects / f"object{i}.png").unlink()
    res = cli("bench", "identifiability", "--model", TINY, "--weights", "random", "--objects", objects,
              "--out", tmp_path / "out2")
    assert res.exit_code == 2 and "more than 4 objects" in res.output


class NormHead(torch.nn.Module):
    """A ConvNeXt-like head: LayerNorm then a linear classifier."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Module()
        self.head.norm = torch.nn.LayerNorm(4)
        self.head.fc = torch.nn.Linear(4, 3)
        torch.nn.init.uniform_(self.head.norm.weight, 0.5, 2.0)

    def get_classifier(self):
        return self.head.fc


def test_head_rows_fold_the_layernorm_and_match_the_head_without_one():
    import timm

    vit = timm.create_model("test_vit", pretrained=False)
    rows, how = head_rows(vit)
    torch.testing.assert_close(rows, vit.head.weight.double())
    m = NormHead()
    rows, how = head_rows(m)
    expected = m.head.fc.weight.double() * m.head.norm.weight.double()
    torch.testing.assert_close(rows, expected - expected.mean(1, keepdim=True))
    assert "LayerNorm" in how and rows.sum(1).abs().max() < 1e-12
    # r is the image-independent part of the gradient of the logits: orthogonal to the
    # LayerNorm's constant direction, so a constant shift of the pooled vector changes nothing
    x = torch.randn(4)
    shift = torch.ones(4)
    assert torch.allclose(m.head.fc(m.head.norm(x)), m.head.fc(m.head.norm(x + shift)), atol=1e-5)


def test_plausibility_golden_values():
    rows = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    std = torch.rand(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    assert plausibility(rows, rows / std, std) == pytest.approx(1.0)  # atoms = the class rows
    assert plausibility(rows, -rows / std, std) < 1.0
    assert random_plausibility(rows, 4, std) < 0.9


def test_plausibility_cli(fit_store, tmp_path):
    res = cli("bench", "plausibility", "--model", TINY, "--weights", "random", "--store", fit_store,
              "--out", tmp_path, "--sizes", "16,32", "--deltas", "0,1", "--epochs", 1,
              "--n-centroids", 64)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "plausibility.json").read_text())
    kinds = {(r["sae"], r["concepts"]) for r in report["rows"]}
    assert {("topk", 16), ("a", 32), ("ra", 32), ("random atoms", 16)} <= kinds
    assert all(-1 <= r["plausibility"] <= 1 for r in report["rows"])
    from archsae.extract.presets import build_backbone
    from archsae.fit import load
    rows, _ = head_rows(build_backbone(TINY, "random").model)
    for row in report["rows"][:3]:  # recomputed from the fit and the head, raw space by hand
        model = load(row["fit"])
        raw = model.dictionary.weight().detach().double() * model.input_std.double()
        cos = (rows / rows.norm(dim=1, keepdim=True)) @ (raw / raw.norm(dim=1, keepdim=True)).T
        assert row["plausibility"] == pytest.approx(float(cos.max(1).values.mean()), abs=1e-9)
    sweep = {r["fit"]: r["plausibility"] for r in report["rows"] if r["fit"]}
    given = [str(tmp_path / "topk-k16"), str(tmp_path / "ra-k32-delta1")]
    res = cli("bench", "plausibility", "--model", TINY, "--weights", "random", "--fit", given[0],
              "--fit", given[1], "--out", tmp_path / "given")
    assert res.exit_code == 0, res.output  # fits already made are scored, not fitted again
    scored = json.loads((tmp_path / "given" / "plausibility.json").read_text())["rows"]
    assert [(r["sae"], r["delta"]) for r in scored[:2]] == [("topk", None), ("ra", 1.0)]
    assert [r["plausibility"] for r in scored[:2]] == [sweep[f] for f in given]
    assert {(r["sae"], r["concepts"]) for r in scored[2:]} == {("random atoms", 16), ("random atoms", 32)}
    res = cli("bench", "plausibility", "--model", TINY, "--weights", "random", "--fit", given[0],
              "--store", fit_store, "--out", tmp_path / "both")
    assert res.exit_code == 2 and "leave out --store" in res.output
    res = cli("bench", "plausibility", "--model", TINY, "--weights", "random", "--fit", tmp_path / "none",
              "--out", tmp_path / "none-out")
    assert res.exit_code == 2 and not (tmp_path / "none-out").exists()
    res = cli("bench", "plausibility", "--model", TINY, "--weights", "random", "--store", fit_store,
              "--out", tmp_path / "d", "--deltas", "1", "--epochs", 1, "--n-centroids", 64)
    assert res.exit_code == 0, res.output  # default sizes fit the store: 64 centroids, size 64
    assert {r["concepts"] for r in json.loads((tmp_path / "d" / "plausibility.json").read_text())["rows"]} == {64}
    res = cli("bench", "plausibility", "--model", TINY, "--weights", "random", "--store", fit_store,
              "--out", tmp_path / "x", "--sizes", "16,big")
    assert res.exit_code == 2
    res = cli("bench", "plausibility", "--model", TINY, "--weights", "random", "--store", fit_store,
              "--out", tmp_path / "y", "--sizes", "16,128", "--n-centroids", 64)
    assert res.exit_code == 2 and "compute more centroids" in res.output and not (tmp_path / "y").exists()
