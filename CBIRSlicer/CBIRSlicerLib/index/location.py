"""Where an index lives, and opening or creating it there: an index folder (the default: FAISS + SQLite on this machine)
or Milvus (``milvus://HOST:PORT/COLLECTION``, or a milvus-lite ``.db`` file; :mod:`milvus_connection`).

Every command, the Slicer module and saved searches open indexes through :func:`open_index`, so a location typed
anywhere a folder was asked for may name a server instead. The Milvus modules (and pymilvus) are imported only when a
Milvus location is opened.
"""

from __future__ import annotations

import os
from typing import Any

from ..models.base import Embedder
from .files import MANIFEST
from .items import IndexSettings
from .milvus_connection import is_milvus_location, parse_location

# open_index and create_index return an Index or a MilvusIndex (Any to their callers): both are writers and searchable
# indexes, but the folder's VectorStore.search takes item ids only where searchable.VectorView also allows a CaseFilter
# (the folder's allowed_items never makes one), which the union would make every caller's error.


def is_server_location(location: str | os.PathLike[str] | None) -> bool:
    """Whether a location names a Milvus-backed index (a milvus:// URI or a milvus-lite .db path) rather than a folder."""
    return is_milvus_location(location)


def location_key(location: str) -> str:
    """The canonical form of a location (an absolute folder, or the Milvus location as it displays), to compare two."""
    return parse_location(location).display if is_milvus_location(location) else os.path.abspath(location)


def index_exists(location: str) -> bool:
    """Whether an index is there (a folder's manifest; a Milvus location's collections, which asks the server)."""
    if not is_milvus_location(location):
        return os.path.isfile(os.path.join(location, MANIFEST))
    from .milvus_collections import CollectionNames, MilvusCollections
    from .milvus_connection import MilvusConnection

    place = parse_location(location)
    if place.local_path is not None and not os.path.exists(place.local_path):
        return False
    collections = MilvusCollections(MilvusConnection(place), CollectionNames(place.collection), 0)
    try:
        return collections.exists()
    finally:
        collections.connection.close()


def open_index(location: str, writable: bool = False, strict: bool = True) -> Any:
    """Open an existing index, a folder or a Milvus one (see :meth:`folder.Index.open`, :meth:`milvus_index.MilvusIndex.open`)."""
    if is_milvus_location(location):
        from .milvus_index import MilvusIndex

        return MilvusIndex.open(location, writable=writable, strict=strict)
    from .folder import Index

    return Index.open(location, writable=writable, strict=strict)


def create_index(location: str, embedder: Embedder, settings: IndexSettings, index_type: str = "auto",
                 keep_patient_ids: bool = False) -> Any:
    """A new, empty index at a location (a folder, or Milvus collections that do not exist yet)."""
    if is_milvus_location(location):
        from .milvus_index import MilvusIndex

        return MilvusIndex.create(location, embedder, settings, index_type, keep_patient_ids)
    from .folder import Index

    return Index.create(location, embedder, settings, index_type, keep_patient_ids)

