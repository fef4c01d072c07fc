"""Settings declared once: checks on construction, the derived SAE name, the options the CLI
generates from them, and the held-out split shared by a fit and its centroids."""

import importlib
import json

import numpy as np
import pytest

from archsae.cache import Split
from archsae.cli import main
from archsae.errors import InvalidSetting, UserError
from archsae.fit import CentroidSettings, FitSettings, SAESettings, load, sae_settings
from archsae.fit.settings import SAE_PRESETS
from conftest import cli


def one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


@pytest.mark.parametrize("cls, values, named", [
    (FitSettings, {"lr": -1.0}, "lr"), (FitSettings, {"epochs": 0}, "epochs"),
    (FitSettings, {"heldout": -0.5}, "heldout"), (FitSettings, {"heldout": 1.0}, "heldout"),
    (FitSettings, {"tokens": "pixels"}, "tokens"), (FitSettings, {"batch_size": 2.5}, "batch_size"),
    (FitSettings, {"device": "bogus"}, "device"), (FitSettings, {"dictionary_eps": -1.0}, "dictionary_eps"),
    (SAESettings, {"delta": -1.0}, "delta"), (SAESettings, {"top_k": 0}, "top_k"),
    (SAESettings, {"concepts": 8, "top_k": 9}, "top_k"), (SAESettings, {"encoder": "gelu"}, "encoder"),
    (CentroidSettings, {"niter": 0}, "niter"), (CentroidSettings, {"n_centroids": 0}, "n_centroids"),
])
def test_out_of_range_settings_are_refused_naming_the_setting(cls, values, named):
    with pytest.raises(InvalidSetting) as exc:
        cls(**values)
    assert exc.value.setting == named and str(exc.value).startswith(named)
    assert exc.value.named("--x").startswith("--x")


def test_from_dict_round_trips_and_refuses_unknown_keys():
    sae = sae_settings("ra", 64, 32, 4)
    assert SAESettings.from_dict(sae.to_dict()) == sae
    with pytest.raises(UserError, match="unknown SAESettings key 'sae'"):
        SAESettings.from_dict({**sae.to_dict(), "sae": "ra"})
    with pytest.raises(InvalidSetting):
        FitSettings.from_dict({**FitSettings().to_dict(), "lr": "fast"})


def test_the_name_is_derived_from_what_the_sae_is():
    assert [sae_settings(name, 16).name for name in SAE_PRESETS] == list(SAE_PRESETS)
    assert sae_settings(None, 16, encoder="jumprelu", dictionary="archetypal", delta=0.5).name == "ra-jumprelu"
    assert sae_settings(None, 16, dictionary="archetypal", delta=0.0).name == "a"
    assert sae_settings("topk", 16, decoder_init="centroids").name == "topk-centroid-init"
    assert sae_settings("ra", 16, project=False).name == "ra-no-projection"
    assert sae_settings("topk", 16, encoder_init="random").name == "topk"  # its default
    assert sae_settings("topk", 16, encoder_init="tied").name == "topk-tied-encoder"
    assert sae_settings("ra", 16, encoder_init="random").name == "ra-random-encoder"
    assert sae_settings("ra", 16).concepts == 80 and sae_settings("ra", 16).top_k == 8
    for name, values in (("ra", {"dictionary": "free"}), ("topk", {"encoder": "relu"}),
                         ("ra", {"delta": 0.0}), ("a", {"delta": 1.0})):
        with pytest.raises(InvalidSetting):
            sae_settings(name, 16, **values)


def test_cli_refuses_contradictions_and_bad_numbers_in_one_line(fit_store, tmp_path):
    line = one_error_line(cli("fit", fit_store, "--sae", "ra", "--dictionary", "free", "--out", tmp_path / "f"))
    assert "--dictionary free contradicts the SAE 'ra'" in line
    line = one_error_line(cli("fit", fit_store, "--sae", "topk", "--lr", -1, "--out", tmp_path / "f"))
    assert line.startswith("Error: --lr -1.0 is out of range") and "> 0" in line
    line = one_error_line(cli("fit", fit_store, "--sae", "topk", "--heldout", -0.5, "--out", tmp_path / "f"))
    assert "--heldout" in line
    line = one_error_line(cli("centroids", fit_store, "--k", 0))
    assert "--n-centroids 0 is out of range" in line
    assert not (tmp_path / "f").exists()


def _option_names(command: str, group=None) -> set[str]:
    cmd = (group or main).commands[command]
    return {opt for p in cmd.params for opt in p.opts}


def test_every_training_command_offers_the_same_training_options():
    fit = _option_names("fit")
    study = _option_names("stability-study")
    plausibility = _option_names("plausibility", main.commands["bench"])
    training = {"--" + f.replace("_", "-") for f in FitSettings().to_dict()} | {"--n-centroids"}
    assert training <= fit and training <= study and training <= plausibility
    variant = {"--sae", "--out", "--resume", "--encoder", "--dictionary", "--delta", "--project",
               "--decoder-init"}
    assert fit - variant <= study, fit - variant - study


def test_centroids_of_a_fit_never_see_its_heldout_images(tmp_path):
    """Held-out images of split (0.2, 0) carry a far-away feature: a centroid set computed on
    that split's train part must have no centroid out there, one on split (0.1, 0), whose train
    part holds some of those images, must."""
    n, t, d = 200, 4, 8
    x = np.random.default_rng(0).normal(size=(n, t, d)).astype(np.float32)
    far = Split(0.2).heldout_mask(n)
    x[far, :, 0] += 50.0
    assert (far & ~Split(0.1).heldout_mask(n)).any()  # in the train part of the other split
    np.save(tmp_path / "a.npy", x)
    assert cli("import", tmp_path / "a.npy", "--out", tmp_path / "s").exit_code == 0
    res = cli("fit", tmp_path / "s", "--sae", "a", "--concepts", 16, "--top-k", 2, "--n-centroids", 16,
              "--heldout", 0.2, "--epochs", 1, "--batch-size", 64, "--out", tmp_path / "f")
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["centroids"]["name"] == "k16-seed0-all-heldout0.2s0"
    assert config["centroids"]["split"] == {"heldout": 0.2, "seed": 0}
    model = load(tmp_path / "f")
    mean, std = model.input_mean[0], model.input_std[0]
    boundary = (25.0 - mean) / std  # halfway to the far images, standardised
    assert (model.dictionary.points[:, 0] < boundary).all()
    res = cli("centroids", tmp_path / "s", "--k", 16, "--heldout", 0.1)
    assert res.exit_code == 0 and "k16-seed0-all-heldout0.1s0" in res.output
    from archsae.cache import open_store
    control, attrs = open_store(tmp_path / "s").load_centroids("k16-seed0-all-heldout0.1s0")
    assert (control[:, 0] > float(boundary)).any() and attrs["split"] == {"heldout": 0.1, "seed": 0}


@pytest.mark.parametrize("given, named", [(["--epochs", "0"], "--epochs 0 is out of range"),
                                          (["--n-centroids", "0"], "--n-centroids 0 is out of range"),
                                          (["--topk-lr", "-1"], "--topk-lr -1.0 is out of range"),
                                          (["--top-k", "2000"], "--top-k 2000 must not exceed"),
                                          (["--seeds", "1"], "--seeds 1")])
def test_real_features_benchmark_checks_its_numbers_when_parsed(monkeypatch, capsys, given, named):
    """By the settings that take them, before the reference's fits (minutes) start."""
    from benchmarks.real_features import parse_args

    monkeypatch.setattr("sys.argv", ["real_features", "--store", "nowhere", *given])
    with pytest.raises(SystemExit) as exit:
        parse_args()
    assert exit.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("module, given, named", [
    ("loader", ["--repeat", "3"], "--repeat: 3: use an even number of at least 2"),
    ("loader", ["--images", "0"], "--images: 0: use a whole number of at least 1"),
    ("loader", ["--batch-size", "x"], "--batch-size: 'x' is not a whole number"),
    ("ra_step", ["--concepts", "0"], "--concepts: 0: use a whole number of at least 1")])
def test_benchmark_counts_are_checked_where_declared(monkeypatch, capsys, module, given, named):
    """A bad count ends a benchmark in one line, exit 2, before any store is written."""
    main = importlib.import_module(f"benchmarks.{module}").main
    monkeypatch.setattr("sys.argv", [module, *given])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 2 and named in capsys.readouterr().err
