"""The demo's HTML report: each query slice beside its top neighbours at their best-matching slices, and the metrics.

Pictures are drawn from the volumes themselves (the slice through a point, windowed as the index
windows it), with the query ROI or the best-matching item outlined and the match's focus marked,
then written as PNGs next to the HTML file, which refers to them by relative path.
"""

from __future__ import annotations

import html
import os

import numpy as np

from .imaging.intensity import Window, to_uint8_rgb
from .imaging.png import write_png
from .imaging.slicing import SliceImage, extract_slices, nearest_slice
from .imaging.volume import Volume

PANEL_PX = 256
QUERY_COLOUR = (255, 70, 70)
MATCH_COLOUR = (80, 200, 255)
FOCUS_COLOUR = (255, 220, 0)


def _slice_through(volume: Volume, axis: str, ras) -> SliceImage:
    return nearest_slice(extract_slices(volume, axis), np.asarray(ras, float))


def _outline(rgb: np.ndarray, image: SliceImage, low_ras, high_ras, colour) -> None:
    """Draw the projection of a RAS box onto the image as a one-pixel rectangle (clipped to the image)."""
    corners = [image.ras_to_pixel((x, y, z)) for x in (low_ras[0], high_ras[0]) for y in (low_ras[1], high_ras[1])
               for z in (low_ras[2], high_ras[2])]
    rows, cols = rgb.shape[:2]
    r0, r1 = (int(np.clip(round(f([c[0] for c in corners])), 0, rows - 1)) for f in (min, max))
    c0, c1 = (int(np.clip(round(f([c[1] for c in corners])), 0, cols - 1)) for f in (min, max))
    rgb[r0, c0:c1 + 1] = rgb[r1, c0:c1 + 1] = colour
    rgb[r0:r1 + 1, c0] = rgb[r0:r1 + 1, c1] = colour


def _cross(rgb: np.ndarray, image: SliceImage, ras, colour, arm: int = 3) -> None:
    row, col = (int(round(v)) for v in image.ras_to_pixel(ras))
    rows, cols = rgb.shape[:2]
    if 0 <= row < rows and 0 <= col < cols:
        rgb[row, max(0, col - arm):col + arm + 1] = colour
        rgb[max(0, row - arm):row + arm + 1, col] = colour


def _enlarged(rgb: np.ndarray, size: int = PANEL_PX) -> np.ndarray:
    """Nearest-neighbour enlargement so that voxels stay visible as voxels."""
    factor = max(1, -(-size // max(rgb.shape[:2])))  # ceiling: a 96-pixel slice becomes 288 pixels
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def query_panel(volume: Volume, window: Window, axis: str, roi_center, roi_size) -> np.ndarray:
    """The query's slice through the ROI centre with the ROI outlined."""
    image = _slice_through(volume, axis, roi_center)
    rgb = to_uint8_rgb(image.pixels, window)
    half = np.asarray(roi_size, float) / 2
    _outline(rgb, image, np.asarray(roi_center) - half, np.asarray(roi_center) + half, QUERY_COLOUR)
    return _enlarged(rgb)


def match_panel(volume: Volume, window: Window, best_match: dict) -> np.ndarray:
    """A result's slice at its match focus, with the best-matching item outlined and the focus marked."""
    focus = best_match.get("focus_ras", best_match["ras"])
    image = _slice_through(volume, best_match["axis"], focus)
    rgb = to_uint8_rgb(image.pixels, window)
    low, high = best_match.get("bounds_ras", (best_match["ras"], best_match["ras"]))
    _outline(rgb, image, low, high, MATCH_COLOUR)
    _cross(rgb, image, focus, FOCUS_COLOUR)
    return _enlarged(rgb)


def save_panel(rgb: np.ndarray, folder: str, name: str) -> str:
    """Write a panel PNG into the report folder; returns its path relative to the folder."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    write_png(rgb, os.path.join(folder, "images", name))
    return f"images/{name}"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
table.metrics { border-collapse: collapse; margin: 8px 0 16px; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 3px 10px; text-align: right; }
.query { display: flex; gap: 10px; align-items: flex-start; margin: 14px 0; padding-bottom: 10px; border-bottom: 1px solid #eee; }
.query figure { margin: 0; font-size: 12px; text-align: center; }
.query figure img { display: block; image-rendering: pixelated; }
.hit { color: #0a7a2f; } .miss { color: #b3261e; }
code { background: #f3f3f3; padding: 1px 4px; }
"""


def _metrics_table(summary: dict, ks) -> str:
    rows = "".join(
        f"<tr><td>{k}</td><td>{summary[f'mP@{k}_micro']:.3f}</td><td>{summary[f'mP@{k}_macro']:.3f}</td>"
        f"<td>{summary[f'mAP@{k}']:.3f}</td><td>{summary[f'recall@{k}']:.3f}</td></tr>" for k in ks)
    return ("<table class='metrics'><tr><th>k</th><th>modified P@k micro</th><th>macro</th><th>mAP@k</th><th>recall@k</th></tr>"
            f"{rows}</table>")


def write_report(path: str, title: str, intro_html: str, summary: dict, ks, figure: str | None, queries: list[dict]) -> str:
    """Write the HTML report. Each query: {"title", "image", "results": [{"image", "caption", "relevant"}]}."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>", intro_html,
             "<h2>Evaluation</h2>", _metrics_table(summary, ks)]
    if summary.get("localised") is not None:
        parts.append(f"<p>Localised: <b>{summary['localised']:.3f}</b> ({summary['localised_count']}) of the best matches of "
                     "relevant results lie inside a lesion of the query's kind. Chance modified P@1: "
                     f"{summary['chance_mP@1']:.3f}.</p>")
    if figure:
        parts.append(f"<img src='{html.escape(figure)}' alt='modified precision at k'>")
    parts.append("<h2>Queries</h2><p>Left: the query slice with its ROI (red). Right: the top cases at their best-matching "
                 "slice, the best-matching indexed image outlined (blue) and the match focus marked (yellow). "
                 "Green captions hold a lesion of the query's kind.</p>")
    for query in queries:
        parts.append("<div class='query'>")
        parts.append(f"<figure><img src='{html.escape(query['image'])}' alt='query'><figcaption>{html.escape(query['title'])}"
                     "</figcaption></figure>")
        for result in query["results"]:
            style = "hit" if result["relevant"] else "miss"
            parts.append(f"<figure><img src='{html.escape(result['image'])}' alt='result'><figcaption class='{style}'>"
                         f"{html.escape(result['caption'])}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))
    return path
