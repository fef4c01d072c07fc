"""`TokenStore`: shuffled, standardised batches of tokens streamed from an activation store.

An epoch is fixed by (seed, epoch) alone: the order of the units is permuted, consecutive units
are grouped into shuffle windows of about `shuffle_tokens` tokens, and each window's tokens are
permuted. Batches are consecutive slices of that stream, so batch `b` of an epoch can be
reached without reading what comes before it (exact resume). A window's chunks are read and
decompressed concurrently in zarr's event loop while the window before it is served; batch
assembly and standardisation run in a producer thread; the caller only takes finished tensors
off a queue.
"""

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import zarr
from tqdm import tqdm

from archsae.errors import UserError
from archsae.cache.chunks import read_chunks_into
from archsae.cache.quantise import dequantise
from archsae.cache.split import Split
from archsae.cache.store import ActivationStore, open_store

PARTS = ("train", "heldout", "all")


class TokenStore:
    """Token rows (n, d) of one store, restricted to a token kind and a part ("train",
    "heldout" or "all") of a `Split`, standardised.

    `subset` < 1 keeps that fraction of the training images, drawn with `subset_seed`."""

    def __init__(self, store, tokens: str = "all", part: str = "train", split: Split = Split(),
                 standardize: bool = True, shuffle_tokens: int = 1 << 18,
                 prefetch: int = 8, subset: float = 1.0, subset_seed: int = 0):
        self.store: ActivationStore = store if isinstance(store, ActivationStore) else open_store(store)
        if part not in PARTS:
            raise UserError(f"unknown part {part!r} of the split: use one of {', '.join(PARTS)}")
        done = self.store.done_units()
        if not done.all():
            raise UserError(f"{self.store.path} is incomplete: rerun the same `archsae extract` "
                            "command to finish it")
        self.tokens, self.part, self.split = tokens, part, split
        self.positions = self.store.positions(tokens)
        self.d = self.store.d
        images = self.store.valid_images(done)
        held = split.heldout_mask(self.store.n_images)
        if part == "train":
            images &= ~held
            if subset < 1.0:  # a random part of the training images (data-perturbation studies)
                images &= np.random.default_rng([split.seed, subset_seed]).random(len(images)) < subset
        elif part == "heldout":
            images &= held
        self.image_mask = images
        self.unit_images = [np.flatnonzero(images[slice(*self.store.unit_bounds(u))])
                            for u in range(self.store.n_units)]
        self.unit_tokens = np.array([len(i) * len(self.positions) for i in self.unit_images])
        self.n_tokens = int(self.unit_tokens.sum())
        if self.n_tokens == 0:
            raise UserError(f"{self.store.path} has no {tokens} tokens in the {part} part of its "
                            "split: extract more images or choose other tokens")
        _, mean, std = self.store.feature_stats(tokens)
        self.standardize = standardize
        self.mean = torch.from_numpy(mean).float()
        self.std = torch.from_numpy(std).float()
        quant = self.store.quantisation  # int8 stores: stored q reads back as offset + scale q
        self.quantisation = None if quant is None else tuple(torch.from_numpy(a) for a in quant)
        self.shuffle_tokens, self.prefetch = shuffle_tokens, prefetch
        self._tokens = self.store.tokens
        self._unit_rows = np.array([b - a for a, b in map(self.store.unit_bounds, range(self.store.n_units))]
                                   ) * self.store.n_tokens  # stored rows of each unit
        # decode whole units in place when at least half of their stored rows are selected
        self._dense = 2 * self.n_tokens >= self._unit_rows[self.unit_tokens > 0].sum()
        # window buffers of finished epochs, for the next: fresh memory costs a page fault per
        # page, which on these machines took 0.06-1.4 s per 400 MB window
        self._idle_buffers: list[list[np.ndarray]] = []

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Stored values (a raw batch, on any device) -> float32 activations, not standardised."""
        return raw.float() if self.quantisation is None else dequantise(raw, *self.quantisation)

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        return self.n_tokens // batch_size if drop_last else -(-self.n_tokens // batch_size)

    def read_unit(self, unit: int) -> np.ndarray:
        """The selected tokens of one unit as rows (n, d), in the stored dtype; a chunk that
        fails to read (damaged since it was written) is one error that says how to mend it."""
        start, stop = self.store.unit_bounds(unit)
        try:
            chunk = self._tokens[start:stop]
        except Exception as exc:
            raise self.store.damaged(unit, exc) from None
        return chunk[self.unit_images[unit]][:, self.positions].reshape(-1, self.d)

    def _decode(self, units: np.ndarray, out: np.ndarray) -> None:
        """Decode whole units, concurrently, each straight into its slice of `out` (rows, d),
        one after the other."""
        ends = np.cumsum(self._unit_rows[units])
        views = np.split(out[: ends[-1]], ends[:-1])
        shapes = [(b - a, self.store.n_tokens, self.d) for a, b in map(self.store.unit_bounds, units)]
        read_chunks_into(self._tokens, [((u, 0, 0), v.reshape(shape)) for u, v, shape in zip(units, views, shapes)],
                         error=lambda coords, exc: self.store.damaged(coords[0], exc))

    @property
    def _per_call(self) -> int:
        """Units decoded at once: zarr's own limit on concurrent chunk reads."""
        return zarr.config.get("async.concurrency")

    def _selected_rows(self, units: np.ndarray) -> np.ndarray:
        """Where the selected tokens of `units` lie among their stored rows, decoded one after
        the other: image-major, in stored order."""
        offsets = np.cumsum(self._unit_rows[units]) - self._unit_rows[units]
        t = self.store.n_tokens
        return np.concatenate([(offset + self.unit_images[u][:, None] * t + self.positions).ravel()
                               for u, offset in zip(units, offsets)])

    def _load(self, window: np.ndarray, space: np.ndarray,
              scratch: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The units of a window decoded: (buffer, rows of its selected tokens in the buffer).
        When most stored tokens are selected (all tokens or patches; the train split leaves
        out only held-out images), whole units are decoded in place and the rows skip the rest:
        the batch gather is the only copy. Otherwise (CLS or register tokens), a few units at a
        time are decoded into a scratch buffer and their selected rows copied out."""
        if self._dense:
            self._decode(window, space)
            return space, self._selected_rows(window)
        got = 0
        for i in range(0, len(window), self._per_call):
            units = window[i:i + self._per_call]
            self._decode(units, scratch)
            rows = self._selected_rows(units)
            np.take(scratch, rows, axis=0, out=space[got:got + len(rows)], mode="clip")
            got += len(rows)
        return space, np.arange(got)

    def _window_buffers(self, rows: int) -> list[np.ndarray]:
        """Two window buffers of at least `rows` rows (one served, one loading), and a scratch
        buffer when windows are compacted: an idle set if one is large enough, else new."""
        while self._idle_buffers:
            buffers = self._idle_buffers.pop()
            if len(buffers[0]) >= rows:
                return buffers
        stored = self.store.attrs["dtype"]
        scratch = [] if self._dense else [np.empty((self._per_call * self._unit_rows.max(), self.d), stored)]
        return [np.empty((rows, self.d), stored) for _ in range(2)] + scratch

    def sample(self, n: int, seed: int = 0, progress: bool = False) -> np.ndarray:
        """A uniform sample of min(n, n_tokens) rows (float32, standardised if the loader is):
        the head of one shuffled epoch, so memory holds the sample only."""
        n = min(n, self.n_tokens)
        x = np.empty((n, self.d), np.float32)
        got = 0
        with tqdm(total=n, unit="tok", unit_scale=True, desc="sample tokens", disable=not progress) as bar:
            for batch in self.batches(min(65536, n), seed=seed, drop_last=False):
                take = min(len(batch), n - got)
                x[got:got + take] = batch[:take].numpy()
                got += take
                bar.update(take)
                if got == n:
                    break
        return x

    def _windows(self, order: np.ndarray) -> list[np.ndarray]:
        windows, current, size = [], [], 0
        for u in order:
            current.append(u)
            size += self.unit_tokens[u]
            if size >= self.shuffle_tokens:
                windows.append(np.array(current))
                current, size = [], 0
        if current:
            windows.append(np.array(current))
        return windows

    def batches(self, batch_size: int, seed: int = 0, epoch: int = 0, start: int = 0,
                shuffle: bool = True, drop_last: bool = True, raw: bool = False,
                part: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
        """Yield float32 batches (batch_size, d) of epoch `epoch`, beginning at batch `start`.
        `raw`: the stored values instead (float16 or int8: a half or a quarter of the bytes to
        move), in pinned memory when CUDA is there, for the device to `decode` and standardise.
        `part=(i, n)`: the i-th of n equal slices of each batch (data-parallel fits: the batch is
        the global one; every process decodes the same chunks and gathers only its slice)."""
        units = np.flatnonzero(self.unit_tokens)
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(units) if shuffle else units
        windows = self._windows(order)
        sizes = np.array([self.unit_tokens[w].sum() for w in windows])
        ends = np.cumsum(sizes)
        offset = start * batch_size
        if offset >= self.n_tokens:
            return
        first = int(np.searchsorted(ends, offset, side="right"))
        skip = offset - (ends[first] - sizes[first])
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, daemon=True,
            args=(windows, first, skip, batch_size, seed, epoch, shuffle, drop_last, raw, part, out, stop))
        producer.start()
        try:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while producer.is_alive():
                try:
                    out.get_nowait()
                except queue.Empty:
                    producer.join(0.05)

    def _produce(self, windows, first, skip, batch_size, seed, epoch, shuffle, drop_last, raw, part,
                 out, stop):
        pin = raw and torch.cuda.is_available()
        index, parts = part

        def take(buf: np.ndarray, rows: np.ndarray, into: torch.Tensor | None = None) -> torch.Tensor:
            # numpy's single-threaded gather: with the cores busy (a CPU fit's step), torch's
            # parallel index_select of float16 / int8 rows ran 3-8x slower (as fast when idle);
            # mode="clip" writes straight into `into` (rows are a permutation's: in range)
            into = (torch.empty((len(rows), self.d), dtype=dtype, pin_memory=pin) if into is None
                    else into[:len(rows)])
            np.take(buf, rows, axis=0, out=into.numpy(), mode="clip")
            return into

        def mine(rows):
            """This process's slice of a batch (of row indices, or of rows)."""
            size = len(rows) // parts
            return rows[index * size:(index + 1) * size] if parts > 1 else rows

        def emit(rows: torch.Tensor) -> bool:
            if raw:
                x = rows.pin_memory() if pin and not rows.is_pinned() else rows
            else:
                x = torch.addcmul(shift, rows, scale) if self.standardize else self.decode(rows)
            while not stop.is_set():
                try:
                    out.put(x, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        # standardised = (decoded - mean) / std, with an int8 store's affine decode folded in
        q_scale, q_offset = self.quantisation or (torch.ones(self.d), torch.zeros(self.d))
        scale = q_scale / self.std
        shift = (q_offset - self.mean) / self.std
        largest = max((self._unit_rows if self._dense else self.unit_tokens)[w].sum() for w in windows)
        buffers = self._window_buffers(largest)
        spaces, scratch = buffers[:2], buffers[2] if len(buffers) > 2 else None
        dtype = torch.from_numpy(spaces[0][:0]).dtype
        # standardising makes a new tensor of a batch at once, so its rows are gathered into one
        # reused buffer: a fresh one per batch cost more page faults than the gather itself
        gathered = torch.empty((batch_size, self.d), dtype=dtype) if self.standardize and not raw else None
        try:
            with ThreadPoolExecutor(1) as reader:
                pending = None  # the rows of a batch that straddles two windows
                ahead = reader.submit(self._load, windows[first], spaces[first % 2], scratch)
                for w in range(first, len(windows)):  # window w+1 loads while w is served
                    buf, selected = ahead.result()
                    if w + 1 < len(windows):
                        ahead = reader.submit(self._load, windows[w + 1], spaces[(w + 1) % 2], scratch)
                    order = selected[np.random.default_rng([seed, epoch, w]).permutation(len(selected))
                                     if shuffle else slice(None)]
                    if w == first:
                        order = order[skip:]
                    i = 0
                    if pending is not None:
                        need = batch_size - len(pending)
                        pending = torch.cat([pending, take(buf, order[:need])])
                        i = min(need, len(order))
                        if len(pending) == batch_size:
                            if not emit(mine(pending)):
                                return
                            pending = None
                    while i + batch_size <= len(order):  # only this process's rows are gathered
                        if not emit(take(buf, mine(order[i:i + batch_size]), gathered)):
                            return
                        i += batch_size
                    if i < len(order):
                        rest = take(buf, order[i:])
                        pending = rest if pending is None else torch.cat([pending, rest])
                if pending is not None and not drop_last:
                    emit(mine(pending))
            out.put(None)
        except BaseException as exc:  # surfaced in the consumer thread
            out.put(exc)
        finally:
            self._idle_buffers.append(buffers)
