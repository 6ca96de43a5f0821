"""An index folder's files and format: their names, the format versions, the manifest's states, the recovery hint."""

from __future__ import annotations

from . import vector_transform

FORMAT = "cbirslicer-index"
FORMAT_VERSION = 3  # the newest read and written; 3: an 'ivfpq' store (codes + vectors.f16), written only by such indexes
BASE_VERSION = 2  # 2: sealed manifest with file checksums, rollback-journal catalog, patient IDs hashed (what flat/HNSW write)
MANIFEST, VECTORS, CATALOG, LOCK = "manifest.json", "vectors.faiss", "catalog.sqlite", ".lock"
ROWS = "vectors.f16"  # an owned file of 'ivfpq' indexes: compressed.rows_path_of(VECTORS)
CLEAN, WRITING = "clean", "writing"
TRANSFORM = vector_transform.TRANSFORM_FILE  # an owned file: the learned vector transform the manifest pins


def recovery_hint(folder: str) -> str:
    """How to recover a damaged index, for the end of an error."""
    return (f"the index is damaged: see 'cbir index verify --index {folder}', then 'cbir index repair --index {folder}' "
            "re-embeds its cases from their source volumes (or rebuild it with 'cbir index build')")
