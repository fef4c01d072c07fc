"""The stability study with its controls, across seeds, data subsets and centroid sets."""

import json

import numpy as np

from archsae.cache import TokenStore
from archsae.evaluate.study import stability_study, study_variants
from archsae.fit import sae_settings
from archsae.fit import FitSettings
from conftest import cli


def test_subsets_are_fixed_parts_of_the_training_images(fit_store):
    full = TokenStore(fit_store)
    a = TokenStore(fit_store, subset=0.9, subset_seed=0)
    b = TokenStore(fit_store, subset=0.9, subset_seed=1)
    assert not (a.image_mask & ~full.image_mask).any()  # never a held-out image
    assert a.image_mask.sum() < full.image_mask.sum() and (a.image_mask != b.image_mask).any()
    np.testing.assert_array_equal(a.image_mask, TokenStore(fit_store, subset=0.9).image_mask)


def test_study_has_the_controls_and_reports_every_pair(fit_store, tmp_path):
    sae = sae_settings("ra", 64, 32, 4, centroids="k64-seed0-all-heldout0.1s0")
    assert set(study_variants([sae])) == {"ra", "topk", "topk-centroid-init", "ra-no-projection"}
    assert set(study_variants([sae_settings("topk", 64, 32, 4)])) == {"topk", "topk-centroid-init"}
    assert set(study_variants([sae, sae_settings("a", 64, 32, 4)])) == {
        "ra", "a", "topk", "topk-centroid-init", "ra-no-projection"}
    report = stability_study(fit_store, tmp_path, [sae], FitSettings(epochs=1, batch_size=256),
                             seeds=3, progress=False)
    for name, r in report["variants"].items():
        assert len(r["pairs"]) == 3 and 0 < r["mean"] <= 1 + 1e-9
    assert report["variants"]["topk-centroid-init"]["mean"] > report["variants"]["topk"]["mean"]
    saved = json.loads((tmp_path / "stability-seed.json").read_text())
    assert saved["variants"].keys() == report["variants"].keys()
    res = cli("stability-study", fit_store, "--sae", "ra", "--out", tmp_path, "--seeds", 3,
              "--concepts", 32, "--top-k", 4, "--centroids", "k64-seed0-all-heldout0.1s0", "--epochs", 1,
              "--batch-size", 256)  # reuses the finished runs
    assert res.exit_code == 0 and "topk-centroid-init" in res.output and "+-" in res.output


def test_topk_study_finds_centroids_for_its_control(fit_store, tmp_path):
    res = cli("stability-study", fit_store, "--sae", "topk", "--out", tmp_path, "--seeds", 2,
              "--concepts", 32, "--top-k", 4, "--n-centroids", 64, "--epochs", 1, "--batch-size", 256)
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "topk-centroid-init" / "run0" / "config.json").read_text())
    assert config["centroids"]["name"] == "k64-seed0-all-heldout0.1s0"


def test_study_across_centroid_sets_gives_each_run_its_own_kmeans(fit_store, tmp_path):
    res = cli("stability-study", fit_store, "--sae", "ra", "--out", tmp_path, "--seeds", 2, "--vary",
              "centroids", "--concepts", 32, "--top-k", 4, "--n-centroids", 64, "--epochs", 1,
              "--batch-size", 256)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "stability-centroids.json").read_text())
    assert report["varies"] == "centroids"
    # TopK with a random init has no centroids: its runs are those of a seed study
    assert set(report["variants"]) == {"ra", "topk-centroid-init", "ra-no-projection"}
    for variant in report["variants"]:
        assert report["variants"][variant]["runs"] == ["run0", "run1-centroids1"]
        names = [json.loads((tmp_path / variant / run / "config.json").read_text())["centroids"]["name"]
                 for run in ("run0", "run1-centroids1")]
        assert names == ["k64-seed0-all-heldout0.1s0", "k64-seed1-all-heldout0.1s0"]
    res = cli("stability-study", fit_store, "--sae", "ra", "--out", tmp_path / "b", "--vary", "centroids",
              "--centroids", "k64-seed0-all-heldout0.1s0", "--concepts", 32)
    assert res.exit_code == 2 and "leave --centroids out" in res.output


def test_studies_in_one_folder_share_their_identical_runs(fit_store, tmp_path):
    args = ["--sae", "ra", "--out", tmp_path, "--seeds", 2, "--concepts", 32, "--top-k", 4,
            "--n-centroids", 64, "--epochs", 1, "--batch-size", 256]
    assert cli("stability-study", fit_store, *args).exit_code == 0
    first = {v: (tmp_path / v / "run0" / "model.safetensors").stat().st_mtime_ns
             for v in ("ra", "topk-centroid-init", "ra-no-projection")}
    res = cli("stability-study", fit_store, *args, "--vary", "centroids")
    assert res.exit_code == 0, res.output
    # run 0 across centroid sets is run 0 across seeds: reused, not fitted again
    assert first == {v: (tmp_path / v / "run0" / "model.safetensors").stat().st_mtime_ns for v in first}
    seeds = json.loads((tmp_path / "stability-seed.json").read_text())["variants"]
    sets = json.loads((tmp_path / "stability-centroids.json").read_text())["variants"]
    assert seeds["ra"]["heldout_r2"][0] == sets["ra"]["heldout_r2"][0]
    assert seeds["ra"]["heldout_r2"][1] != sets["ra"]["heldout_r2"][1]
    res = cli("report", "--out", tmp_path / "report", "--study", tmp_path)
    assert res.exit_code == 0, res.output
    methods = {m["method"]: m for m in json.loads((tmp_path / "report" / "report.json").read_text())["methods"]}
    assert "stability_seeds" in methods["ra"] and "stability_centroids" in methods["ra"]
    assert methods["topk"].get("stability_centroids") is None
