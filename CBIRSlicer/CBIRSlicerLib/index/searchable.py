"""What the search, and everything above it, needs of an index, wherever its vectors and catalog live.

Two kinds of index answer this interface: the index folder (:class:`folder.Index`: FAISS + SQLite on one machine, the
default) and a Milvus collection (:class:`milvus_index.MilvusIndex`: a server, or a milvus-lite file). Retrieval, placement,
feedback, suggestions, saved searches, the Slicer module and the CLI speak only through these methods; they are the
read side of the folder's own :class:`catalog.Catalog` and :class:`faiss_store.VectorStore`, so the folder needed no
change to answer it. Open either kind by location with :func:`location.open_index`.

One addition a server store needs: :meth:`SearchableIndex.allowed_items` turns the search's filters into what the vector
store filters by. The folder answers with the allowed item ids (a FAISS id selector); Milvus answers with a
:class:`CaseFilter`, which its store turns into a boolean expression over the items' scalar fields, so the filter runs
inside the approximate search on the server instead of shipping millions of ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

import numpy as np

from ..models.base import Embedder
from .catalog import CaseRecord, ItemArrays, ItemRecord
from .items import IndexSettings


@dataclass(frozen=True)
class CaseFilter:
    """The cases a search may return, as the filters say, for a store that filters inside its own search (Milvus).

    ``expression`` is the store's own condition on an item's fields; ``matching`` how many items pass it (0: none, so a
    search returns nothing), counted when it was made."""

    filters: dict[str, str]
    expression: str
    matching: int = 0
    rows: tuple[int, ...] = field(default=())

    def __len__(self) -> int:
        return self.matching


# What a vector store's search may be restricted to: item ids (the folder), a case filter (Milvus), or anything (None).
Allowed = Union[np.ndarray, CaseFilter, None]


class CatalogView(Protocol):
    """The catalog as searches read it: cases, items and their places, thumbnails, the index's own records."""

    path: str

    def case_by_id(self, case_id: str) -> CaseRecord | None: ...
    def case_by_row(self, row_id: int) -> CaseRecord: ...
    def cases(self, status: str | None = "complete") -> list[CaseRecord]: ...
    def case_rows_of_items(self, ids: Iterable[int]) -> dict[int, int]: ...
    def case_rows_of_sources(self, sources: Iterable[str]) -> list[int]: ...
    def case_rows_of_series(self, series_uid: str) -> list[int]: ...
    def case_rows_with_content(self, shape: Sequence[int], digest_of: Callable[[], str]) -> list[int]: ...
    def case_rows_matching(self, filters: dict[str, str]) -> list[int]: ...
    def filter_fields(self) -> list[str]: ...
    def items(self, ids: Iterable[int]) -> dict[int, ItemRecord]: ...
    def items_of_cases(self, case_rows: Iterable[int]) -> dict[int, list[ItemRecord]]: ...
    def item_ids(self, case_rows: Iterable[int] | None = None) -> np.ndarray: ...
    def item_arrays(self, case_rows: Iterable[int]) -> ItemArrays: ...
    def item_ids_of_kinds(self, kinds: Iterable[str], negate: bool = False) -> np.ndarray: ...
    def thumbnail(self, case_row: int, axis: str, plane: int) -> np.ndarray | None: ...
    def meta(self, key: str) -> dict[str, Any] | None: ...
    def set_meta(self, key: str, value: dict[str, Any]) -> None: ...
    def transaction(self) -> Any: ...
    def count(self, table: str) -> int: ...


class VectorView(Protocol):
    """The vector store as searches read it: nearest items (filtered inside the search), and stored vectors by id."""

    dim: int
    kind: str

    @property
    def count(self) -> int: ...

    def search(self, queries: np.ndarray, k: int, allowed: Allowed = None, excluded: np.ndarray | None = None,
               ef_search: int | None = None, raw: bool = False) -> tuple[np.ndarray, np.ndarray]: ...
    def vectors_of(self, ids: np.ndarray) -> np.ndarray: ...
    def reconstruct(self, ids: np.ndarray) -> np.ndarray: ...


class SearchableIndex(Protocol):
    """An open index as the search and the layers above it use it (a folder or a Milvus collection)."""

    folder: str  # where it lives, for messages and saved searches: a folder path or a milvus:// location
    manifest: dict[str, Any]

    # Read-only in the protocol (properties), so an index whose catalog and store are richer classes (the folder's
    # Catalog and VectorStore, the server's MilvusCatalog and MilvusVectors) is one.
    @property
    def catalog(self) -> CatalogView: ...
    @property
    def store(self) -> VectorView: ...
    transform: Any  # vector_transform.VectorTransform | None: what MaxSim compares

    @property
    def settings(self) -> IndexSettings: ...
    @property
    def fingerprint(self) -> dict[str, Any]: ...

    def model_name(self) -> str: ...
    def check_model(self, embedder: Embedder) -> None: ...
    def excluded_ids(self) -> np.ndarray: ...
    def allowed_items(self, filters: dict[str, str]) -> Allowed: ...
    def state_note(self) -> str | None: ...
    def info(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
