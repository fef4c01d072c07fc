"""The report: index.md's tables are report.json's numbers; plots are written; nothing is left
half-written."""

import json

from archsae.evaluate.report import HEADLINE
from archsae.evaluate.study import stability_study
from archsae.fit import sae_settings
from archsae.fit import FitSettings
from conftest import cli


def table_rows(md: str, heading: str) -> list[list[str]]:
    lines = md.split(heading, 1)[1].split("\n\n", 2)[1].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_report_tables_match_report_json(fit_store, tmp_path):
    saes = [sae_settings(s, 64, 32, 4, centroids="k64-seed0-all-heldout0.1s0") for s in ("ra", "a")]
    stability_study(fit_store, tmp_path / "study", saes, FitSettings(epochs=1, batch_size=256),
                    seeds=2, progress=False)
    res = cli("baselines", fit_store, "--concepts", 8, "--methods", "pca,semi_nmf", "--sample", 512,
              "--json", tmp_path / "baselines.json")
    assert res.exit_code == 0, res.output
    (tmp_path / "browser").mkdir()
    res = cli("report", "--out", tmp_path / "report", "--study", tmp_path / "study",
              "--baselines", tmp_path / "baselines.json", "--browser", tmp_path / "browser")
    assert res.exit_code == 0, res.output
    out = tmp_path / "report"
    report = json.loads((out / "report.json").read_text())
    md = (out / "index.md").read_text()
    names = [m["method"] for m in report["methods"]]
    assert names == ["ra", "a", "topk", "topk-centroid-init", "ra-no-projection", "pca",
                     "semi_nmf"]
    rows = table_rows(md, "## Headline")
    assert len(rows) == len(names)
    assert "one pair of runs: no standard deviation" in md and "deviations across pairs" not in md
    for row, method in zip(rows, report["methods"]):
        for cell, key in zip(row[2:], HEADLINE):
            value = method[key]
            assert cell == ("-" if value is None else f"{value:.4f}"), (method["method"], key)
    assert all((out / p).stat().st_size > 0 for p in ("r2_vs_l0.png", "stability.png",
                                                      "code_frequency.png", "training_curves.png"))
    assert "(../browser/index.html)" in md
    assert not list(tmp_path.glob(".report.tmp-*"))
    assert cli("report", "--out", tmp_path / "r2").exit_code == 2
