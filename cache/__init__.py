"""The activation store: on-disk format, writer, reader, streaming loader, feature statistics."""

from archsae.cache.store import (TOKEN_KINDS, ActivationStore, StoreSpec, create_or_open,
                                 default_chunk_images, is_store, open_store)
from archsae.cache.loader import TokenStore

__all__ = ["TOKEN_KINDS", "ActivationStore", "StoreSpec", "TokenStore", "create_or_open",
           "default_chunk_images", "is_store", "open_store"]
