"""The activation store: on-disk format (docs/cache-format.md), writer, reader, held-out split,
streaming loader, feature statistics."""

from archsae.cache.loader import TokenStore
from archsae.cache.split import Split
from archsae.cache.store import (DTYPES, TOKEN_KINDS, ActivationStore, StoreSpec, create_or_open,
                                 default_chunk_images, is_store, open_store, resumable_units)

__all__ = ["DTYPES", "TOKEN_KINDS", "ActivationStore", "Split", "StoreSpec", "TokenStore",
           "create_or_open", "default_chunk_images", "is_store", "open_store", "resumable_units"]
