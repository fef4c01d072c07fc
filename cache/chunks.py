"""Whole chunks of a zarr array decoded straight into the caller's memory.

zarr-python 3's codecs take no output buffer (zarr-python#3060): a chunk read through zarr is
decompressed into fresh memory and then copied into the destination, and fresh memory costs a
page fault per page (Blosc took 8.2 ms per 8 MB chunk into fresh memory, 3.3 ms into reused).
Reading a whole store into a reused buffer (`benchmarks/loader.py`, 2 cores) ran at 0.95M
tokens/s through zarr and 1.24M chunk by chunk straight into it (int8: 1.46M and 1.76M). For
chunks that are native-endian bytes compressed by Blosc (our stores' `tokens`: bytes, blosc,
crc32c), the chunk is fetched and the codecs applied after Blosc (the checksum) are undone by
zarr itself, then numcodecs' Blosc decompresses into the destination. Anything else is read
through zarr.
"""

import asyncio
import sys
from typing import Callable, Sequence

import numcodecs.blosc
import numpy as np
import zarr
from zarr import AsyncArray
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.sync import sync


def blosc_bytes(array: AsyncArray) -> bool:
    """Whether `array`'s chunks are native-endian bytes compressed by Blosc (then any further
    bytes codecs): the chunks this module decompresses itself."""
    codecs = array.metadata.codecs
    return (len(codecs) >= 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], BloscCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder))


async def _read_chunk_into(array: AsyncArray, coords: tuple[int, ...], out: np.ndarray, direct: bool) -> None:
    """Decode chunk `coords` of `array` into `out`, an array of the chunk's dtype and of its
    shape (an edge chunk: of its part inside the array); `direct`: `blosc_bytes(array)`. A
    missing chunk is an error, not the fill value; a damaged one fails in its checksum or codec."""
    chunk = array.metadata.chunk_grid.chunk_shape
    if not (direct and out.shape == tuple(chunk) and out.flags.c_contiguous):
        selection = tuple(slice(c * s, c * s + n) for c, s, n in zip(coords, chunk, out.shape))
        await array.get_orthogonal_selection(selection, out=NDBuffer.from_numpy_array(out))
        return
    prototype = default_buffer_prototype()
    data = await (array.store_path / array.metadata.encode_chunk_key(coords)).get(prototype=prototype)
    if data is None:
        raise FileNotFoundError(f"chunk {coords} of {array.store_path} is missing")
    spec = array.metadata.get_chunk_spec(coords, array.config, prototype)
    for codec in reversed(array.metadata.codecs[2:]):
        (data,) = await codec.decode([(data, spec)])
    data = data.as_numpy_array()
    size = int.from_bytes(data[4:8].tobytes(), "little")  # Blosc's header: the decompressed size
    if size != out.nbytes:
        raise ValueError(f"chunk {coords} of {array.store_path} holds {size} bytes, not {out.nbytes}")
    await asyncio.to_thread(numcodecs.blosc.decompress, data, out)


def read_limit() -> asyncio.Semaphore:
    """zarr's own limit on concurrent chunk reads, for calls of `read_chunks_into` that run at
    once to share: the reads of one call then queue behind those of the call made before it."""
    return asyncio.Semaphore(zarr.config.get("async.concurrency"))


def read_chunks_into(array: zarr.Array, pieces: Sequence[tuple[tuple[int, ...], np.ndarray]],
                     error: Callable[[tuple[int, ...], Exception], Exception] | None = None,
                     limit: asyncio.Semaphore | None = None) -> None:
    """Decode chunk `coords` into `destination` for each (coords, destination) of `pieces`,
    concurrently (at most `limit`, a `read_limit()` of this call's own if None) in one call into
    zarr's event loop: a call per chunk from a thread pool ran at 60% of that rate.
    `error(coords, exc)` is what a chunk that fails raises instead of `exc`."""
    limit = limit or read_limit()
    inner = array.async_array
    direct = blosc_bytes(inner)

    async def one(coords, out):
        async with limit:
            try:
                await _read_chunk_into(inner, coords, out, direct)
            except Exception as exc:
                if error is None:
                    raise
                raise error(coords, exc) from None

    async def every():
        await asyncio.gather(*(one(*piece) for piece in pieces))

    sync(every())
