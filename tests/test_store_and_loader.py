"""The store's unit maths, import, info, and the TokenStore loader."""

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import ZstdCodec
from hypothesis import given, settings, strategies as st

from archsae.cache import TOKEN_KINDS, Split, StoreSpec, TokenStore, create_or_open, open_store
from archsae.cache import chunks
from archsae.cache.chunks import read_chunks_into
from archsae.cache.store import DATA_CODECS, DATA_CONFIG, unit_bounds
from archsae.extract.run import unit_batches
from conftest import cli, info_json


def make_store(path, n=37, kinds=("cls", "register", "patch", "patch", "patch"), d=6, chunk=5,
               seed=0, errors=()):
    """A store of Gaussian tokens with a different mean per token kind; returns (store, tokens)."""
    rng = np.random.default_rng(seed)
    codes = np.array([TOKEN_KINDS.index(k) for k in kinds])
    tokens = rng.normal(size=(n, len(kinds), d)) + codes[None, :, None] * 3.0
    spec = StoreSpec(n_images=n, token_kind=codes, d=d, chunk_images=chunk, dtype="float32",
                     provenance={"model": "test", "source_hash": f"h{seed}"})
    store = create_or_open(path, spec)
    for u in range(store.n_units):
        a, b = store.unit_bounds(u)
        errs = ["bad" if i in errors else "" for i in range(a, b)]
        store.write_unit(u, tokens[a:b], keys=[f"k{i}" for i in range(a, b)], errors=errs)
    return store, tokens.astype(np.float32)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 500), st.integers(1, 64), st.integers(1, 40))
def test_unit_batches_tile_each_unit_from_its_start(n, chunk, batch):
    bounds = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    batches = unit_batches(bounds, batch)
    assert [i for b in batches for i in b] == list(range(n))
    for b in batches:
        assert 1 <= len(b) <= batch and b == list(range(b[0], b[0] + len(b)))
        assert b[0] // chunk == b[-1] // chunk  # never crosses a unit boundary
        assert (b[0] % chunk) % batch == 0  # starts at the unit start plus a multiple of batch


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 50))
def test_unit_bounds_partition_the_images(n, chunk):
    bounds = [unit_bounds(u, chunk, n) for u in range(-(-n // chunk))]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
    assert all(0 < b - a <= chunk for a, b in bounds)


def test_feature_stats_match_numpy_per_kind(tmp_path):
    store, tokens = make_store(tmp_path / "s", errors={3, 11})
    keep = np.ones(len(tokens), bool)
    keep[[3, 11]] = False
    for kinds, cols in (("all", slice(None)), ("patch", slice(2, None)), ("cls", slice(0, 1))):
        n, mean, std = store.feature_stats(kinds)
        rows = tokens[keep][:, cols].reshape(-1, tokens.shape[-1]).astype(np.float64)
        assert n == len(rows)
        np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(std, rows.std(0), rtol=1e-6)


def test_stats_do_not_depend_on_write_order(tmp_path):
    a, tokens = make_store(tmp_path / "a")
    spec = StoreSpec(n_images=len(tokens), token_kind=a.token_kind, d=a.d, chunk_images=5,
                     dtype="float32", provenance={"model": "test", "source_hash": "h0"})
    b = create_or_open(tmp_path / "b", spec)
    for u in reversed(range(b.n_units)):
        s, e = b.unit_bounds(u)
        b.write_unit(u, tokens[s:e], keys=[f"k{i}" for i in range(s, e)])
    for x, y in zip(a.feature_stats(), b.feature_stats()):
        np.testing.assert_array_equal(x, y)


def test_loader_is_deterministic_and_resumes_exactly(tmp_path):
    store, _ = make_store(tmp_path / "s", n=60)
    loader = TokenStore(store, part="all", shuffle_tokens=40)
    full = list(loader.batches(16, seed=3, epoch=1))
    assert len(full) == loader.num_batches(16)
    again = list(loader.batches(16, seed=3, epoch=1))
    assert all(torch.equal(x, y) for x, y in zip(full, again))
    for start in (1, 5, len(full) - 1):
        tail = list(loader.batches(16, seed=3, epoch=1, start=start))
        assert len(tail) == len(full) - start
        assert all(torch.equal(x, y) for x, y in zip(full[start:], tail))
    other = torch.cat(list(loader.batches(16, seed=4, epoch=1)))
    assert not torch.equal(torch.cat(full), other)


def test_loader_epoch_is_a_permutation_of_standardised_tokens(tmp_path):
    store, tokens = make_store(tmp_path / "s", n=23, errors={4})
    loader = TokenStore(store, tokens="patch", part="all", shuffle_tokens=10)
    got = torch.cat(list(loader.batches(7, seed=0, drop_last=False))).numpy().astype(np.float64)
    rows = np.delete(tokens, 4, axis=0)[:, 2:].reshape(-1, tokens.shape[-1]).astype(np.float64)
    expected = (rows - rows.mean(0)) / rows.std(0)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.sort(got, axis=0), np.sort(expected, axis=0), atol=1e-4)
    np.testing.assert_allclose(got.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(got.std(0), 1, atol=1e-4)


@pytest.mark.parametrize("tokens", ["all", "patch", "cls"])
def test_train_epoch_is_the_train_images_tokens(tmp_path, tokens):
    """Units decoded whole with the held-out images' rows skipped (most tokens selected) or
    compacted a few units at a time (CLS, register): the same stream, every selected token once."""
    store, x = make_store(tmp_path / "s", n=47, errors={9})
    expected = None
    for dense in (True, False):
        loader = TokenStore(store, tokens=tokens, part="train", split=Split(0.3), standardize=False,
                            shuffle_tokens=30)
        loader._dense = dense
        if expected is None:
            images = loader.image_mask & (np.arange(47) != 9)
            expected = x[images][:, store.positions(tokens)].reshape(-1, x.shape[-1])
        epochs = [torch.cat(list(loader.batches(8, seed=1, epoch=e, drop_last=False))).numpy()
                  for e in (0, 1, 0)]  # the later epochs reuse the first one's buffers
        np.testing.assert_array_equal(epochs[0], epochs[2])
        for got in epochs[:2]:
            assert len(got) == len(expected) == loader.n_tokens
            np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(expected, axis=0))
        if dense:
            stream = epochs[0]
        else:
            np.testing.assert_array_equal(epochs[0], stream)
    assert TokenStore(store, tokens="all", part="train")._dense
    assert not TokenStore(store, tokens="cls", part="train")._dense


@pytest.mark.parametrize("tokens", ["all", "cls"])
@pytest.mark.parametrize("shuffle_tokens", [1, 23, 60, 10_000])
def test_one_set_of_window_buffers_serves_every_epoch(tmp_path, tokens, shuffle_tokens):
    """Window buffers are sized for the largest window any epoch can have: every epoch reads
    into the first one's memory (a larger window in a later epoch took fresh memory)."""
    store, _ = make_store(tmp_path / "s", n=47, chunk=4)
    loader = TokenStore(store, tokens=tokens, part="train", split=Split(0.4), shuffle_tokens=shuffle_tokens)
    first = None
    for epoch in range(40):
        for rows, _ in loader.windows(seed=3, epoch=epoch):
            assert len(rows) <= loader._window_rows
        [(_, buffers)] = loader._idle_buffers
        first = first or [id(b) for b in buffers]
        assert [id(b) for b in buffers] == first


@pytest.mark.parametrize("tokens, shuffle_tokens", [("all", 60), ("cls", 12)])
def test_next_window_is_read_while_this_one_finishes(tmp_path, monkeypatch, tokens, shuffle_tokens):
    """The next window's chunks are read from the moment the window before the current one is done
    with, not once the current one is whole (the decode drained at each window's end: 5% of an
    epoch on 2 cores), under one limit that both windows' reads share: zarr's own."""
    store, _ = make_store(tmp_path / "s", n=95, chunk=4)
    loader = TokenStore(store, tokens=tokens, part="train", shuffle_tokens=shuffle_tokens)
    expected = [rows[order].copy() for rows, order in loader.windows(seed=1)]
    assert len(expected) > 3
    started, alone = [], []
    load = loader._load

    def odd_windows_wait_for_the_next(*args):
        """Windows 1, 3, ... are read only once the next one has begun: both are then read at once."""
        started.append(len(started))
        mine = len(started)
        deadline = time.monotonic() + 0.5
        while mine % 2 and len(started) == mine and time.monotonic() < deadline:
            time.sleep(0.005)
        if mine % 2 and len(started) == mine:
            alone.append(mine)
        return load(*args)

    in_flight, most = 0, 0
    read = chunks._read_chunk_into

    async def counted(*args):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.002)
            return await read(*args)
        finally:
            in_flight -= 1

    monkeypatch.setattr(loader, "_load", odd_windows_wait_for_the_next)
    monkeypatch.setattr(chunks, "_read_chunk_into", counted)
    with zarr.config.set({"async.concurrency": 2}):
        got = [rows[order].copy() for rows, order in loader.windows(seed=1)]
    assert alone == ([len(expected)] if len(expected) % 2 else [])  # only the last has no next one
    assert most == 2
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 60)), min_size=1, max_size=30),
       st.integers(1, 300), st.booleans(), st.integers(0, 2**32 - 1))
def test_window_bound_holds_for_any_units(units, shuffle_tokens, dense, seed):
    """No window of any unit order holds more rows than `_window_rows`, whatever the units'
    sizes and selected tokens."""
    rows = np.array([r for r, _ in units])
    selected = np.array([min(s, r) for r, s in units])
    if not selected.any():
        return
    loader = SimpleNamespace(unit_tokens=selected, _unit_rows=rows, _dense=dense, shuffle_tokens=shuffle_tokens)
    bound = TokenStore._window_rows.fget(loader)
    held = rows if dense else selected
    rng = np.random.default_rng(seed)
    for _ in range(20):
        for window in TokenStore._windows(loader, rng.permutation(np.flatnonzero(selected))):
            assert held[window].sum() <= bound


def test_device_batches_are_the_stored_values_of_the_same_stream(tmp_path):
    """Batches gathered on a device from whole windows (a GPU fit's) are the host's batches
    before standardisation: for every start (resume), part and end."""
    store, _ = make_store(tmp_path / "s", n=30)
    loader = TokenStore(store, part="train", shuffle_tokens=40)
    cpu = torch.device("cpu")
    threads = threading.active_count()
    for device in (None, cpu):  # a reader stopped early ends its threads and gives its buffers back
        stopped = loader.batches(16, seed=2, device=device)
        next(stopped)
        stopped.close()
        assert threading.active_count() == threads
    for drop_last in (True, False):
        ours = list(loader.batches(16, seed=2, drop_last=drop_last))
        moved = list(loader.batches(16, seed=2, drop_last=drop_last, device=cpu))
        assert len(moved) == len(ours) and all(r.dtype == torch.float32 for r in moved)  # stored dtype
        for x, r in zip(ours, moved):
            torch.testing.assert_close(x, (r - loader.mean) / loader.std)
    for start, part in ((3, (0, 1)), (0, (1, 2)), (5, (0, 2))):
        ours = list(loader.batches(16, seed=2, start=start, part=part))
        moved = list(loader.batches(16, seed=2, start=start, part=part, device=cpu))
        assert len(moved) == len(ours)
        for x, r in zip(ours, moved):
            torch.testing.assert_close(x, (r - loader.mean) / loader.std)


def test_windows_are_the_epoch_stream(tmp_path):
    """An epoch's windows, their orders laid end to end, are its batches' rows, from any token on."""
    store, _ = make_store(tmp_path / "s", n=30)
    loader = TokenStore(store, part="train", shuffle_tokens=40, standardize=False)
    stream = torch.cat(list(loader.batches(7, seed=1, epoch=2, drop_last=False))).numpy()
    for skip in (0, 7, 45):
        rows = np.concatenate([rows[order] for rows, order in loader.windows(seed=1, epoch=2, skip=skip)])
        np.testing.assert_array_equal(rows, stream[skip:])
    assert list(loader.windows(seed=1, skip=loader.n_tokens)) == []


def test_parts_of_a_batch_tile_it(tmp_path):
    """Data-parallel fits: process i of n gets the i-th slice of each global batch."""
    store, _ = make_store(tmp_path / "s", n=30)
    loader = TokenStore(store, part="train", shuffle_tokens=40)
    whole = list(loader.batches(16, seed=5))
    halves = [list(loader.batches(16, seed=5, part=(i, 2))) for i in range(2)]
    assert all(len(h) == len(whole) for h in halves)
    for x, a, b in zip(whole, *halves):
        torch.testing.assert_close(torch.cat([a, b]), x)


def test_loader_without_shuffle_reads_in_store_order(tmp_path):
    store, tokens = make_store(tmp_path / "s", n=12)
    loader = TokenStore(store, tokens="cls", part="all", standardize=False)
    got = torch.cat(list(loader.batches(5, shuffle=False, drop_last=False))).numpy()
    np.testing.assert_array_equal(got, tokens[:, 0])


@pytest.mark.parametrize("codecs", ["store", "zstd", "none"])
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_chunks_decoded_into_memory_are_what_zarr_reads(tmp_path, codecs, dtype):
    """Our stores' chunks are decompressed straight into the destination; other codecs and edge
    chunks go through zarr: either way the values are zarr's own, and damage is an error."""
    compressors = {"store": DATA_CODECS, "zstd": [ZstdCodec()], "none": None}[codecs]
    array = zarr.create_array(tmp_path / "a", shape=(10, 3, 4), chunks=(4, 3, 4), dtype=dtype,
                              compressors=compressors, config=DATA_CONFIG)
    array[:] = np.random.default_rng(0).normal(0, 30, (10, 3, 4)).astype(dtype)
    out = np.full((10, 3, 4), 7, dtype)
    read_chunks_into(array, [((u, 0, 0), out[4 * u:4 * u + 4]) for u in range(3)])
    np.testing.assert_array_equal(out, array[:])
    if codecs == "store":
        chunk = tmp_path / "a" / "c" / "1" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
        with pytest.raises(ValueError, match="checksum"):
            read_chunks_into(array, [((1, 0, 0), out[4:8])])
        chunk.unlink()
        with pytest.raises(RuntimeError, match=r"\(1, 0, 0\).*missing"):
            read_chunks_into(array, [((1, 0, 0), out[4:8])], error=lambda c, e: RuntimeError(f"{c} {e}"))


def test_heldout_split_is_by_image_disjoint_and_fixed(tmp_path):
    store, _ = make_store(tmp_path / "s", n=200)
    train = TokenStore(store, part="train", split=Split(0.2))
    held = TokenStore(store, part="heldout", split=Split(0.2))
    assert not (train.image_mask & held.image_mask).any()
    assert (train.image_mask | held.image_mask).all()
    assert 20 < held.image_mask.sum() < 60
    np.testing.assert_array_equal(held.image_mask, Split(0.2).heldout_mask(200))


def test_loader_errors_are_one_line(tmp_path):
    store, _ = make_store(tmp_path / "s", kinds=("patch", "patch"))
    with pytest.raises(Exception, match="no cls tokens"):
        TokenStore(store, tokens="cls")
    with pytest.raises(Exception, match="unknown token kind"):
        TokenStore(store, tokens="cls_token")


def test_a_unit_of_zeros_is_written_and_done(tmp_path):
    """Every chunk is written, all-zero ones too (a unit whose images all failed): reopened, the
    store is complete, not missing a chunk (which would read as damage and be redone forever)."""
    spec = StoreSpec(n_images=10, token_kind=np.zeros(2, int), d=3, chunk_images=5, d_pooled=4,
                     provenance={"model": "test", "source_hash": "x"})
    store = create_or_open(tmp_path / "s", spec)
    store.write_unit(0, np.zeros((5, 2, 3)), keys=list("abcde"), errors=["unreadable"] * 5,
                     pooled=np.zeros((5, 4)))
    store.write_unit(1, np.ones((5, 2, 3)), keys=list("fghij"), pooled=np.ones((5, 4)))
    again = open_store(tmp_path / "s")
    assert again.done_units().all() and again.complete
    for name in ("tokens", "pooled"):
        assert (tmp_path / "s" / name / "c" / "0").exists()


def test_incomplete_store_is_refused_by_the_loader(tmp_path):
    spec = StoreSpec(n_images=10, token_kind=np.zeros(2, int), d=3, chunk_images=5,
                     provenance={"model": "test", "source_hash": "x"})
    store = create_or_open(tmp_path / "s", spec)
    store.write_unit(0, np.zeros((5, 2, 3)), keys=list("abcde"))
    with pytest.raises(Exception, match="incomplete"):
        TokenStore(store)


@pytest.mark.parametrize("shape", [(50, 8), (20, 3, 8)])
def test_import_npy(tmp_path, shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    res = cli("import", tmp_path / "a.npy", "--out", tmp_path / "s", "--dtype", "float32",
              "--chunk-images", 7)
    assert res.exit_code == 0, res.output
    info = info_json(tmp_path / "s")
    t = 1 if len(shape) == 2 else shape[1]
    assert info["shape"] == [shape[0], t, shape[-1]] and info["token_kinds"] == {"token": t}
    assert info["complete"] and info["model"] == "imported"
    np.testing.assert_array_equal(np.asarray(open_store(tmp_path / "s").tokens[:]).reshape(shape), x)
    loader = TokenStore(tmp_path / "s", part="all")
    assert loader.n_tokens == shape[0] * t


def test_import_safetensors_and_zarr(tmp_path):
    from safetensors.numpy import save_file

    x = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    save_file({"acts": x, "other": x[:2]}, str(tmp_path / "a.safetensors"))
    res = cli("import", tmp_path / "a.safetensors", "--out", tmp_path / "s1")
    assert res.exit_code == 2 and "--key" in res.output and not (tmp_path / "s1").exists()
    res = cli("import", tmp_path / "a.safetensors", "--key", "acts", "--out", tmp_path / "s1")
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.asarray(open_store(tmp_path / "s1").tokens[:])[:, 0], x, atol=1e-2)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=x.shape, chunks=(8, 4), dtype="float32")
    z[:] = x
    res = cli("import", tmp_path / "a.zarr", "--out", tmp_path / "s2", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(np.asarray(open_store(tmp_path / "s2").tokens[:])[:, 0], x)


def test_import_errors(tmp_path):
    res = cli("import", tmp_path / "missing.npy", "--out", tmp_path / "s")
    assert res.exit_code == 2 and "does not exist" in res.output
    np.save(tmp_path / "ints.npy", np.arange(10))
    res = cli("import", tmp_path / "ints.npy", "--out", tmp_path / "s")
    assert res.exit_code == 2 and "shape" in res.output
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    res = cli("import", tmp_path / "obj.npy", "--out", tmp_path / "s")
    assert res.exit_code == 2 and "never unpickles" in res.output
    assert not (tmp_path / "s").exists()


def test_info_json_and_text(tmp_path):
    make_store(tmp_path / "s", n=12, errors={2})
    info = info_json(tmp_path / "s")
    for key in ("model", "timm_name", "weights", "shape", "token_kinds", "complete",
                "bytes_on_disk"):
        assert key in info
    assert info["token_kinds"] == {"cls": 1, "register": 1, "patch": 3}
    assert info["skipped"] == {"k2": "bad"} and info["bytes_per_value"] > 0
    res = cli("info", tmp_path / "s")
    assert res.exit_code == 0 and "complete     yes" in res.output and "k2" in res.output
    res = cli("info", tmp_path)
    assert res.exit_code == 2 and "not an archsae activation store" in res.output


def test_convert_to_int8_reads_back_within_half_a_step(tmp_path):
    store, tokens = make_store(tmp_path / "s", n=37, errors={4})
    res = cli("convert", tmp_path / "s", "--out", tmp_path / "q")
    assert res.exit_code == 0, res.output
    q = open_store(tmp_path / "q")
    assert q.attrs["dtype"] == "int8" and q.tokens.dtype == np.int8
    assert q.attrs["converted_from"] == store.id and q.attrs["source_hash"] == store.attrs["source_hash"]
    scale, offset = q.quantisation
    back = offset + scale * np.asarray(q.tokens[:], np.float32)
    valid = np.ones(37, bool)
    valid[4] = False
    err = np.abs(back - tokens)[valid]
    assert (err <= scale / 2 + 1e-5).all()
    centred = tokens[valid] - tokens[valid].mean((0, 1))
    assert 1 - np.square(err).sum() / np.square(centred).sum() >= 0.9995
    # the loader decodes and standardises with the store's own statistics (of what reads back)
    raw = TokenStore(q, part="train", shuffle_tokens=40)
    batches = list(raw.batches(16, seed=1))
    assert all(b.dtype == torch.float32 for b in batches)
    for x, r in zip(batches, raw.batches(16, seed=1, device=torch.device("cpu"))):
        assert r.dtype == torch.int8
        torch.testing.assert_close(x, (raw.decode(r) - raw.mean) / raw.std)
    ref = torch.cat(list(TokenStore(store, part="train", shuffle_tokens=40).batches(16, seed=1)))
    torch.testing.assert_close(torch.cat(batches), ref, atol=0.05, rtol=0)
    assert info_json(tmp_path / "q")["bytes_on_disk"] <= tokens.size + 100_000
    # a rerun finds the conversion done; bad requests are one line with exit code 2
    assert cli("convert", tmp_path / "s", "--out", tmp_path / "q").exit_code == 0
    for args in (("convert", tmp_path / "q", "--out", tmp_path / "q2"),  # already int8
                 ("import", tmp_path / "x.npy", "--out", tmp_path / "i", "--dtype", "int8")):
        if args[0] == "import":
            np.save(tmp_path / "x.npy", np.ones((4, 3), np.float32))
        res = cli(*args)
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
