"""Thumbnails of search results for the results panel, straight from the index (no volume is loaded).

The index keeps one small grey thumbnail per indexed slice. A result's picture is the thumbnail
of its best-matching slice with the matching region outlined, as RGB (row 0 at the top, the way
Qt and PNG store images); the panel shows it from a PNG file.
"""

from __future__ import annotations

import os

import numpy as np

from ..imaging.png import write_png
from ..index.catalog import Catalog, ItemRecord
from ..retrieval.answers import BestMatch, CaseResult, SearchAnswer

OUTLINE_RGB = (255, 200, 0)  # the same yellow as the result view's label colour


def _best_item(catalog: Catalog, case_id: str, best_match: BestMatch) -> ItemRecord | None:
    """The catalog item of a result's best match (by id, else the nearest slice along its axis)."""
    item_id = best_match.item_id
    if item_id is not None:
        item = catalog.items([item_id]).get(int(item_id))
        if item is not None:
            return item
    case = catalog.case_by_id(case_id)
    if case is None:
        return None
    slices = [i for i in catalog.items_of_cases([case.row])[case.row] if i.kind == "slice" and i.axis == best_match.axis]
    return min(slices, key=lambda i: abs(i.slice_index - best_match.slice_index), default=None)


def _slice_shape(catalog: Catalog, item: ItemRecord) -> tuple[int, int]:
    """(rows, cols) of the whole slice an item belongs to, in the slice's own pixels."""
    if item.kind == "slice":
        return item.box[2], item.box[3]
    whole = next((i for i in catalog.items_of_cases([item.case_row])[item.case_row]
                  if i.kind == "slice" and i.axis == item.axis and i.plane == item.plane), None)
    return (whole.box[2], whole.box[3]) if whole is not None else (item.box[2], item.box[3])


def outline(rgb: np.ndarray, box: tuple[int, int, int, int], colour=OUTLINE_RGB) -> np.ndarray:
    """A copy of an RGB image with a one-pixel rectangle drawn on the edge of box (row0, col0, row1, col1; exclusive)."""
    out = rgb.copy()
    rows, cols = out.shape[:2]
    r0, c0 = max(0, box[0]), max(0, box[1])
    r1, c1 = min(rows, box[2]) - 1, min(cols, box[3]) - 1
    if r1 < r0 or c1 < c0:
        return out
    out[r0, c0:c1 + 1] = out[r1, c0:c1 + 1] = colour
    out[r0:r1 + 1, c0] = out[r0:r1 + 1, c1] = colour
    return out


def result_thumbnail(catalog: Catalog, result: CaseResult, mark_match: bool = True) -> np.ndarray | None:
    """RGB uint8 (rows, cols, 3) thumbnail of a result's best-matching slice, its matching tile outlined; None if absent."""
    item = _best_item(catalog, result.case_id, result.best_match)
    if item is None:
        return None
    grey = catalog.thumbnail(item.case_row, item.axis, item.plane)
    if grey is None:
        return None
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if mark_match and item.kind != "slice":
        rows, cols = _slice_shape(catalog, item)
        scale_r, scale_c = grey.shape[0] / rows, grey.shape[1] / cols
        r0, c0, r1, c1 = item.box
        rgb = outline(rgb, (int(np.floor(r0 * scale_r)), int(np.floor(c0 * scale_c)),
                            int(np.ceil(r1 * scale_r)), int(np.ceil(c1 * scale_c))))
    return rgb


def write_result_thumbnails(catalog: Catalog, answer: SearchAnswer, folder: str) -> dict[str, str]:
    """PNG files of every result's thumbnail in a folder, keyed by case id (cases without a thumbnail are left out)."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for result in answer.results:
        rgb = result_thumbnail(catalog, result)
        if rgb is not None:
            paths[result.case_id] = write_png(rgb, os.path.join(folder, f"{result.case_id}_{result.rank}.png"))
    return paths
