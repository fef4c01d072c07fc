"""The concept browser: a static site, opened from disk in headless Chromium (Debian's
`chromium` and `chromium-driver`, installed by `make test`), driven by Selenium."""

import json
import os
import shutil

import numpy as np
import pytest

from archsae.evaluate.top_activations import top_activations
from archsae.fit import sae_settings
from archsae.fit import FitSettings, fit
from conftest import cli

TOP = 4


@pytest.fixture(scope="module")
def fits(fit_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("browse")
    for seed in (0, 1):
        fit(fit_store, root / f"ra{seed}", sae_settings("ra", 64, 32, 4, centroids="k64-seed0-all-heldout0.1s0"),
            FitSettings(epochs=1, batch_size=256, seed=seed), progress=False)
    return root


def test_top_activations_match_a_dense_computation(fit_store, fits):
    import torch

    from archsae.cache import TokenStore, open_store
    from archsae.fit import load

    tops = top_activations(fits / "ra0", top=TOP, progress=False, max_tokens=300)  # many small batches
    model = load(fits / "ra0")
    store = open_store(fit_store)
    loader = TokenStore(store, tokens="all", part="all", standardize=False)
    x = torch.from_numpy(np.asarray(store.tokens[:], np.float32))  # small: the dense reference
    valid = np.flatnonzero(loader.image_mask)
    with torch.no_grad():
        z = model.encode(((x[valid] - model.input_mean) / model.input_std).reshape(-1, 64)).dense
    per_image = z.reshape(len(valid), store.n_tokens, -1).amax(1)  # (images, k)
    for c in range(per_image.shape[1]):
        ref = per_image[:, c].sort(descending=True).values[:TOP].numpy()
        np.testing.assert_allclose(tops.values[c], np.where(ref > 0, ref, 0), rtol=1e-5, atol=1e-6)
        first = tops.images[c, 0]
        if first >= 0:
            assert per_image[list(valid).index(first), c] == pytest.approx(tops.values[c, 0], rel=1e-5)
            assert tops.heatmaps[(first, c)].max() == pytest.approx(tops.values[c, 0], rel=1e-5)
    np.testing.assert_allclose(tops.frequency, (z > 0).double().mean(0).numpy(), rtol=1e-6)


@pytest.fixture(scope="module")
def site(fits, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "site"
    res = cli("browse", fits / "ra0", "--out", out, "--top", TOP, "--against", fits / "ra1")
    assert res.exit_code == 0, res.output
    return out


def test_site_files_and_errors(site, fits, tmp_path):
    summary = json.loads((site / "site.json").read_text())
    assert summary["live"] + summary["dead"] == 32
    assert len(list((site / "concepts").glob("*.html"))) == summary["live"]
    assert len(list((site / "img").glob("*.jpg"))) == summary["images"]
    text = (site / "index.html").read_text()
    assert "http://" not in text and "https://" not in text  # offline: nothing fetched
    assert cli("browse", fits / "ra0", "--out", tmp_path / "x", "--data", tmp_path).exit_code == 2
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium whose temporary files (its shared memory, kept in TMPDIR with
    --disable-dev-shm-usage, and left there on quit) go to pytest's folder, not /tmp."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "Debian's chromium and chromium-driver: `make test` installs them"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    scratch = tmp_path_factory.mktemp("chromium")
    service = Service(driver_path, env={**os.environ, "TMPDIR": str(scratch)})
    driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_site_in_headless_chromium(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get((site / "index.html").as_uri())
    assert "concepts" in browser.title
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    def column(i):
        return [float(td.get_attribute("data-v")) for td in
                browser.find_elements(By.CSS_SELECTOR, f"#concepts tbody tr td:nth-child({i})")]

    header = browser.find_elements(By.CSS_SELECTOR, "#concepts th")[1]  # frequency
    header.click()
    assert column(2) == sorted(column(2), reverse=True)
    header.click()
    assert column(2) == sorted(column(2))
    box = browser.find_element(By.ID, "filter")  # filter by concept id
    first_id = browser.find_element(By.CSS_SELECTOR, "#concepts tbody tr td a").text
    box.send_keys(first_id)
    visible = [r for r in browser.find_elements(By.CSS_SELECTOR, "#concepts tbody tr") if r.is_displayed()]
    assert 1 <= len(visible) < len(column(2))
    # the most frequent concept's page: TOP images, each with a heatmap over the 10 x 10 grid
    top_concept = max(range(len(column(2))), key=lambda i: column(2)[i])
    link = browser.find_elements(By.CSS_SELECTOR, "#concepts tbody tr td a")[top_concept]
    browser.get(link.get_attribute("href"))
    figures = browser.find_elements(By.CSS_SELECTOR, "figure")
    assert len(figures) == TOP
    for f in figures:
        heat = f.find_element(By.CSS_SELECTOR, "img.heat")  # one pixel per patch of the 10 x 10 grid
        assert heat.get_property("naturalWidth") == 10 and heat.get_property("naturalHeight") == 10
        assert heat.size["width"] == 224  # stretched over the picture
        assert f.find_element(By.CSS_SELECTOR, "img:not(.heat)").get_property("naturalWidth") == 224
        assert "max" in f.text
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    shot = tmp_path / "concept.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    figures[0].find_element(By.TAG_NAME, "a").click()  # to the image page
    assert browser.find_elements(By.CSS_SELECTOR, "figure") and "Image" in browser.page_source


def test_imported_store_has_no_images_to_browse(tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(300, 4, 16)).astype(np.float32))
    assert cli("import", tmp_path / "a.npy", "--out", tmp_path / "s").exit_code == 0
    fit(tmp_path / "s", tmp_path / "f", sae_settings("topk", 16, 8, 2), FitSettings(epochs=1, batch_size=64),
        progress=False)
    res = cli("browse", tmp_path / "f", "--out", tmp_path / "site")
    assert res.exit_code == 2 and "no images" in res.output and not (tmp_path / "site").exists()


def test_heatmap_covers_a_conv_grid_with_alpha_proportional_to_activation():
    import base64
    import io
    import re

    from PIL import Image

    from archsae.cache import TOKEN_KINDS
    from archsae.evaluate.browser import _heat

    values = np.linspace(0, 2, 49)  # a 7 x 7 feature map: every token is a patch
    kinds = np.full(49, TOKEN_KINDS.index("patch"))
    tag = _heat(values, kinds, [7, 7], scale=2.0)
    data = re.search(r"base64,([^']+)", tag).group(1)
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert img.size == (7, 7)
    alpha = np.asarray(img)[..., 3].reshape(-1)
    np.testing.assert_allclose(alpha, np.round(values / 2 * 0.75 * 255), atol=1)
    assert _heat(values, kinds, None, 2.0) == ""  # no grid (imported tokens): no heatmap
