"""`TokenStore`: shuffled, standardised batches of tokens streamed from an activation store.

An epoch is fixed by (seed, epoch) alone: the order of the units is permuted, consecutive units
are grouped into shuffle windows of about `shuffle_tokens` tokens, and each window's tokens are
permuted. Batches are consecutive slices of that stream, so batch `b` of an epoch can be
reached without reading what comes before it (exact resume). A window's chunks are read and
decompressed concurrently in zarr's event loop while the window before it is used, queued behind
that window's own reads, so the decode runs on through the windows' ends. For a CPU
fit, batches are gathered and standardised on the host in a thread of their own; for a GPU fit,
each window travels whole and its batches are gathered there (the host's share is the decode:
a gather cost the 2-core host as much CPU as half the decode).
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
from archsae.cache.chunks import read_chunks_into, read_limit
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
        self._idle_buffers: list[tuple[bool, list[np.ndarray]]] = []  # (pinned, buffers)
        self._idle_lock = threading.Lock()  # epochs of one loader may be read at once

    @property
    def _window_rows(self) -> int:
        """The most rows the buffer of a shuffle window of any epoch must hold, so that one set of
        buffers serves every epoch (sized by one epoch's largest window, a later epoch's larger
        one took fresh memory: 15% of that epoch's read). A window ends with the unit that brings
        its selected tokens to `shuffle_tokens`; the units before it select fewer, and hold at
        most the rows of the best fractional choice of units (most rows per selected token
        first) that selects that many, plus the largest unit."""
        used = self.unit_tokens > 0
        selected = self.unit_tokens[used]
        rows = (self._unit_rows if self._dense else self.unit_tokens)[used]
        order = np.argsort(-rows / selected, kind="stable")
        selected, rows = selected[order], rows[order]
        budget = max(self.shuffle_tokens - 1, 0)
        whole = int(np.searchsorted(np.cumsum(selected), budget, side="right"))
        bound = rows[:whole].sum() + rows.max()
        if whole < len(rows):
            bound += -(-rows[whole] * (budget - selected[:whole].sum()) // selected[whole])
        return int(min(bound, rows.sum()))

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

    def _decode(self, units: np.ndarray, out: np.ndarray, limit) -> None:
        """Decode whole units, concurrently (at most `limit`, a `read_limit()`), each straight
        into its slice of `out` (rows, d), one after the other."""
        ends = np.cumsum(self._unit_rows[units])
        views = np.split(out[: ends[-1]], ends[:-1])
        shapes = [(b - a, self.store.n_tokens, self.d) for a, b in map(self.store.unit_bounds, units)]
        read_chunks_into(self._tokens, [((u, 0, 0), v.reshape(shape)) for u, v, shape in zip(units, views, shapes)],
                         error=lambda coords, exc: self.store.damaged(coords[0], exc), limit=limit)

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

    def _load(self, window: np.ndarray, space: np.ndarray, scratch: np.ndarray | None,
              limit) -> tuple[np.ndarray, np.ndarray]:
        """The units of a window decoded: (the part of `space` they fill, rows of their selected
        tokens in it). When most stored tokens are selected (all tokens or patches; the train
        split leaves out only held-out images), whole units are decoded in place and the rows
        skip the rest: the batch gather is the only copy. Otherwise (CLS or register tokens), a
        few units at a time are decoded into a scratch buffer and their selected rows copied out."""
        if self._dense:
            self._decode(window, space, limit)
            return space[:self._unit_rows[window].sum()], self._selected_rows(window)
        got = 0
        for i in range(0, len(window), self._per_call):
            units = window[i:i + self._per_call]
            self._decode(units, scratch, limit)
            rows = self._selected_rows(units)
            np.take(scratch, rows, axis=0, out=space[got:got + len(rows)], mode="clip")
            got += len(rows)
        return space[:got], np.arange(got)

    def _window_buffers(self, pin: bool) -> tuple[bool, list[np.ndarray]]:
        """Two window buffers (one in use, one loading), in page-locked memory if `pin` (they are
        copied to a GPU), and a scratch buffer for each when windows are compacted: an idle set if
        there is one, else new."""
        with self._idle_lock:
            for i, (pinned, _) in enumerate(self._idle_buffers):
                if pinned == pin:
                    return self._idle_buffers.pop(i)
        scratch = [] if self._dense else [np.empty((self._per_call * self._unit_rows.max(), self.d),
                                                   self.store.attrs["dtype"]) for _ in range(2)]
        return pin, [torch.empty((self._window_rows, self.d), dtype=self.store.torch_dtype,
                                 pin_memory=pin).numpy() for _ in range(2)] + scratch

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

    def windows(self, seed: int = 0, epoch: int = 0, skip: int = 0, shuffle: bool = True,
                pin: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Epoch `epoch` as its shuffle windows, from its token `skip` on: (rows, order) per
        window, its decoded rows (stored dtype) and the rows of its tokens in epoch order. Window
        w+1 is decoded (in page-locked memory if `pin`) from the moment w is asked for, its reads
        queued behind w's; w's rows are valid until the next window is asked for."""
        units = np.flatnonzero(self.unit_tokens)
        rng = np.random.default_rng([seed, epoch])
        windows = self._windows(rng.permutation(units) if shuffle else units)
        ends = np.cumsum([self.unit_tokens[w].sum() for w in windows])
        if skip >= self.n_tokens:
            return
        first = int(np.searchsorted(ends, skip, side="right"))
        skip -= ends[first - 1] if first else 0
        buffers = self._window_buffers(pin)
        spaces, scratches = buffers[1][:2], buffers[1][2:] or [None, None]
        limit = read_limit()  # shared: the next window's reads queue behind this one's
        try:
            with ThreadPoolExecutor(2) as reader:
                def load(w):
                    return reader.submit(self._load, windows[w], spaces[w % 2], scratches[w % 2], limit)

                ahead = load(first)
                for w in range(first, len(windows)):
                    # w-1 is done with (w is asked for): its buffer takes w+1, read from now on
                    following = load(w + 1) if w + 1 < len(windows) else None
                    rows, selected = ahead.result()
                    order = selected[np.random.default_rng([seed, epoch, w]).permutation(len(selected))
                                     if shuffle else slice(None)]
                    yield rows, order[skip:] if w == first else order
                    ahead = following
        finally:
            with self._idle_lock:
                self._idle_buffers.append(buffers)

    def batches(self, batch_size: int, seed: int = 0, epoch: int = 0, start: int = 0,
                shuffle: bool = True, drop_last: bool = True, device: torch.device | None = None,
                part: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
        """Yield batches (batch_size, d) of epoch `epoch`, beginning at batch `start`: float32,
        standardised (or decoded only, if the loader does not standardise), assembled in a
        thread of their own.
        `device`: the stored values on that device instead (float16 or int8: a half or a quarter
        of the bytes to move), for it to `decode` and standardise: each window travels whole
        (page-locked, on a stream of its own on a GPU) and its batches are gathered there, so the
        host only decodes chunks.
        `part=(i, n)`: the i-th of n equal slices of each batch (data-parallel fits: the batch is
        the global one; every process decodes the same chunks and gathers only its slice)."""
        skip = start * batch_size
        if device is None:
            yield from _in_thread(self._host_batches(self.windows(seed, epoch, skip, shuffle), batch_size,
                                                     drop_last, part), self.prefetch)
            return
        pinned = device.type == "cuda"
        moved = _in_thread(_to_device(self.windows(seed, epoch, skip, shuffle, pin=pinned), device), 1)
        yield from _cut(_received(moved), batch_size, drop_last, part,
                        lambda rows, order, whole: rows.index_select(0, order))

    def _host_batches(self, windows, batch_size, drop_last, part) -> Iterator[torch.Tensor]:
        """Batches gathered on the host from `windows`, standardised."""
        # standardised = (decoded - mean) / std, with an int8 store's affine decode folded in
        q_scale, q_offset = self.quantisation or (torch.ones(self.d), torch.zeros(self.d))
        scale, shift = q_scale / self.std, (q_offset - self.mean) / self.std
        # when standardised, a whole batch's rows are gathered into one reused buffer
        # (standardising makes a new tensor): a fresh one per batch cost more page faults than
        # the gather itself
        reused, dtype = None, self.store.torch_dtype

        def take(rows: np.ndarray, order: np.ndarray, whole: bool) -> torch.Tensor:
            # numpy's single-threaded gather: with the cores busy (a CPU fit's step), torch's
            # parallel index_select of float16 / int8 rows ran 3-8x slower (as fast when idle);
            # mode="clip" writes straight into the buffer (rows are a permutation's: in range)
            nonlocal reused
            reuse = whole and self.standardize
            into = reused if reuse and reused is not None else torch.empty((len(order), self.d), dtype=dtype)
            if reuse:
                reused = into
            np.take(rows, order, axis=0, out=into.numpy(), mode="clip")
            return into

        for x in _cut(windows, batch_size, drop_last, part, take):
            yield torch.addcmul(shift, x, scale) if self.standardize else self.decode(x)


def _cut(windows: Iterator, batch_size: int, drop_last: bool, part: tuple[int, int],
         take) -> Iterator[torch.Tensor]:
    """The batches of a stream of windows (rows, order): consecutive `batch_size` entries of
    the orders, each gathered by `take(rows, order, whole)`: `whole` for a batch inside one
    window (only this process's slice of it is gathered; its memory may be reused once the next
    is asked for), else a piece of a batch that straddles windows, gathered at once because a
    window's rows are valid only until the next window is asked for."""
    index, parts = part

    def mine(rows):
        """This process's slice of a batch (of row indices, or of rows)."""
        size = len(rows) // parts
        return rows[index * size:(index + 1) * size] if parts > 1 else rows

    pending = None  # the rows of a batch that straddles windows
    for rows, order in windows:
        i = 0
        if pending is not None:
            need = batch_size - len(pending)
            pending = torch.cat([pending, take(rows, order[:need], False)])
            i = min(need, len(order))
            if len(pending) < batch_size:
                continue
            yield mine(pending)
            pending = None
        while i + batch_size <= len(order):
            yield take(rows, mine(order[i:i + batch_size]), True)
            i += batch_size
        if i < len(order):
            pending = take(rows, order[i:], False)
    if pending is not None and not drop_last:
        yield mine(pending)


def _to_device(windows: Iterator, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each window's rows and order copied to `device`; on a GPU on a stream of their own, and
    finished before the next window is asked for (its host memory is then decoded into again)."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    for rows, order in windows:
        with torch.cuda.stream(stream):  # None: no-op
            moved = (torch.from_numpy(rows).to(device, non_blocking=True, copy=True),
                     torch.from_numpy(order).to(device, non_blocking=True))
        if stream is not None:
            stream.synchronize()
        yield moved


def _received(windows: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows made on another GPU stream, marked as used by this one: their memory is not
    given to another window before this stream's gathers from them are done."""
    for rows, order in windows:
        if rows.is_cuda:
            stream = torch.cuda.current_stream(rows.device)
            rows.record_stream(stream)
            order.record_stream(stream)
        yield rows, order


def _in_thread(items: Iterator, ahead: int) -> Iterator:
    """The items of a generator made in a thread of its own, up to `ahead` of the caller; its
    error is raised in the caller, and a caller that stops early stops it."""
    out: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            out.put(done)
        except BaseException as exc:  # surfaced in the consumer thread
            out.put(exc)
        finally:
            items.close()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        while (item := out.get()) is not done:
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
