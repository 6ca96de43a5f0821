"""What a query needs embedded, said once: phrases, images, regions pooled from dense grids, or a volume (3D models).

The searcher says which (:func:`retrieval.search.embedding_request`); whoever holds the model runs it: the searcher's
own embedder (:meth:`EmbeddingRequest.run`) or the background worker (:meth:`worker.EmbeddingService.submit`), which
runs the same request in its process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from ..imaging.roi import RoiBox
from ..imaging.volume import Volume


class EmbeddingKind(str, Enum):
    """The kinds of embedding a query may need (the worker's job kinds)."""

    TEXT = "text"
    IMAGES = "images"
    REGIONS = "regions"  # whole slices whose boxes' vectors are pooled from dense grids (a dense index)
    VOLUME = "volume"  # a 3D model's vector of an ROI of a volume, or of all of it


@dataclass
class EmbeddingRequest:
    """One embedding to run: its kind and what that kind needs."""

    kind: EmbeddingKind
    texts: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    boxes: list[tuple[int, int, int, int]] | None = None
    pixel_mm: list[float] | None = None
    cell_mm: float = 0.0
    pooling: str = "mean"
    passes: int | None = None  # regions: embed only as many slices as fit this many forward passes (None: all)
    volume: Volume | None = None
    roi: RoiBox | None = None

    @property
    def total(self) -> int:
        """How many inputs the request holds (its progress counts these)."""
        return {EmbeddingKind.TEXT: len(self.texts), EmbeddingKind.VOLUME: 1}.get(self.kind, len(self.images))

    def run(self, embedder) -> np.ndarray:
        """The vectors (N, dim), from an embedder in this process."""
        if self.kind is EmbeddingKind.TEXT:
            return embedder.embed_text(self.texts)
        if self.kind is EmbeddingKind.VOLUME:
            if self.roi is not None:
                return embedder.embed_region(self.volume, self.roi)[None]
            return embedder.embed_volume(self.volume).whole[None]
        if self.kind is EmbeddingKind.REGIONS:
            from .dense import region_vectors

            return region_vectors(embedder, self.images, self.pixel_mm, self.boxes, self.cell_mm, self.pooling, self.passes)[0]
        return embedder.embed_images(self.images)
