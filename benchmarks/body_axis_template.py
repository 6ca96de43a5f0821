"""Build the standard body's template for ``imaging/body_axis.py`` from real patients (tuning patients only).

1. Head-and-neck CTs of the *tuning* patients (``patient_split``): each is placed on a common axis by its organs.
   The centroids of the brainstem, both parotids, the larynx and the mandible get one standard level each (their
   mean over patients) and each patient a map ``level = slope * (offset - S)`` (least squares, slopes normalised to
   a mean of 1, so a standard mm is the average tuning patient's mm); the two are refined in turn. The spinal cord
   and the oesophagus are left out: their contoured length follows the treatment plan and the field of view; so
   is any organ the field of view cuts (its centroid is not the organ's).
2. The vertex is level 0: the mean level of the top of the head over the tuning patients whose head ends inside
   the field of view in a dome (not cut flat by the stored region).
3. The head CT (Debian invesalius-examples) is placed by aligning it to the template of step 1, then added: it
   holds the skull's vault, which many head-and-neck crops cut.
4. The abdominal CT (TotalSegmentator reference) is placed by its first lumbar vertebra (label centroid) at the
   standard level of L1, slope 1: that level is the larynx's (C5) plus the textbook column length from C5 to
   the centre of L1 (C5-C7 and T1-T12 heights plus discs, about 340 mm for an adult; Gray's Anatomy ratios).
5. For each 4 mm bin of level and each feature: the median over the volumes covering it and a robust spread
   (1.4826 MAD), floored at half the feature's median spread so a bin held by one volume is not over-trusted.

    python benchmarks/body_axis_template.py [--cache DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patient_split import part
from real_data import prepare, shared_data_dir

from CBIRSlicerLib.imaging import body_axis
from CBIRSlicerLib.imaging.readers import read_volume

HN = "real/head-neck-ct"
ORGANS = {1: "brainstem", 2: "spinal_cord", 3: "right_parotid", 4: "left_parotid", 5: "esophagus", 6: "larynx", 7: "mandible"}
ANCHORS = ("brainstem", "right_parotid", "left_parotid", "larynx", "mandible")
C5_TO_L1_MM = 340.0  # centre of C5 (the larynx's centroid) to the centre of L1 in an adult, textbook column heights
BIN_MM = 4.0
MIN_VOLUMES = 5  # bins of the head-and-neck part need this many patients


def hn_cases() -> list[str]:
    """The head-and-neck patient ids, in cases.csv order."""
    with open(shared_data_dir() / HN / "cases.csv", newline="") as handle:
        return [row["case"] for row in csv.DictReader(handle)]


def organ_levels_s(labels) -> dict[str, tuple[float, float, float]]:
    """Mean, lowest and highest superior coordinate (RAS S, mm) of each labelled organ of a label volume."""
    out = {}
    for value, name in ORGANS.items():
        kji = np.argwhere(labels.array == value)
        if kji.size:
            s = labels.ijk_to_ras_points(kji[:, ::-1].astype(float))[:, 2]
            out[name] = (float(s.mean()), float(s.min()), float(s.max()))
    return out


def hn_profiles(cache: Path, cases: list[str]) -> dict[str, dict]:
    """Profile and organ levels of each head-and-neck patient (computed once, kept in ``cache``)."""
    path = cache / f"hn_profiles_v{body_axis.PROFILE_VERSION}.pkl"
    stored = pickle.loads(path.read_bytes()) if path.exists() else {}
    folder = shared_data_dir() / HN
    missing = [c for c in cases if c not in stored]
    for n, case in enumerate(missing):
        volume = read_volume(folder / f"{case}_ct.nii.gz")
        stored[case] = {"profile": body_axis.profile(volume), "organs": organ_levels_s(read_volume(folder / f"{case}_labels.nii.gz"))}
        if n % 20 == 19 or n == len(missing) - 1:
            path.write_bytes(pickle.dumps(stored))
            print(f"  profiles: {n + 1}/{len(missing)}", flush=True)
    return {c: stored[c] for c in cases}


def whole_organs(item: dict) -> dict[str, tuple[float, float, float]]:
    """The organs of a patient that the field of view does not cut (a cut organ's centroid is not the organ's)."""
    prof = item["profile"]
    s = prof.s_mm[prof.body]
    if s.size == 0:
        return {}
    margin = body_axis.GRID_MM[2]
    return {o: v for o, v in item["organs"].items() if s.min() + margin <= v[1] and v[2] <= s.max() - margin}


def organ_fits(data: dict[str, dict], iterations: int = 30) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Standard organ levels and each patient's (slope, offset), alternately refined (level = slope * (offset - S))."""
    fits = {}
    for case, item in data.items():
        anchors = [item["organs"][o][0] for o in ANCHORS if o in item["organs"]]
        fits[case] = (1.0, float(np.mean(anchors)))
    standard: dict[str, float] = {}
    for _ in range(iterations):
        standard = {o: float(np.mean([fits[c][0] * (fits[c][1] - d["organs"][o][0]) for c, d in data.items() if o in d["organs"]]))
                    for o in ANCHORS}
        for case, item in data.items():
            present = [o for o in ANCHORS if o in item["organs"]]
            s = np.array([item["organs"][o][0] for o in present])
            target = np.array([standard[o] for o in present])
            slope = 1.0
            if len(present) >= 3 and np.ptp(s) > 30.0:  # a slope needs organs spread along the axis
                design = np.stack([-s, np.ones_like(s)], axis=1)
                slope = float(np.clip(np.linalg.lstsq(design, target, rcond=None)[0][0], 0.8, 1.25))
            fits[case] = (slope, float(np.mean(target / slope + s)))
        mean_slope = float(np.mean([f[0] for f in fits.values()]))
        fits = {c: (f[0] / mean_slope, f[1]) for c, f in fits.items()}
    return standard, fits


def dome_top(prof: body_axis.Profile) -> float | None:
    """S of the top of the head when it ends in a dome inside the field of view; None when cut by the field of view
    or by the stored region (many head-and-neck crops end in a flat cut or a thin tube of stored tissue)."""
    area = 10 ** prof.values[:, 0]
    area = area * (area >= body_axis.MIN_AREA_MM2)  # the cap's small planes count here (the profile's body leaves them out)
    planes = np.nonzero(area)[0]
    if planes.size < 20:
        return None
    top = int(planes[-1])
    if top >= len(prof.s_mm) - 1:
        return None
    # a skull's cap grows smoothly: every 6 mm down by at most 6000 mm^2 (a flat cut or a tube of stored tissue jumps
    # by 10000 or more), to a head's section (12000 mm^2 or more) 36 mm down
    step = int(6.0 / body_axis.GRID_MM[2])
    cap = area[[max(0, top - n * step) for n in range(7)]]
    if cap[0] > 3000.0 or np.any(np.diff(cap) < -500.0) or np.any(np.diff(cap) > 6000.0) or cap[-1] < 12000.0:
        return None
    return float(prof.s_mm[top] + body_axis.GRID_MM[2] / 2)


def template_from(placed: list[tuple[np.ndarray, np.ndarray]], levels: np.ndarray, features: tuple[str, ...],
                  floor: np.ndarray | None = None) -> tuple[body_axis.Template, np.ndarray]:
    """Median and robust spread per bin of placed planes (bins held by fewer than MIN_VOLUMES volumes: their median
    with twice the typical spread, where nothing better holds them); also the number of volumes per bin."""
    bins = binned(placed, levels)
    counts = np.array([len(b) for b in bins])
    median = np.full((len(features), levels.size), np.nan)
    spread = np.full_like(median, np.nan)
    for b, rows in enumerate(bins):
        if len(rows) >= MIN_VOLUMES:
            rows_ = np.array(rows)
            median[:, b] = np.median(rows_, axis=0)
            spread[:, b] = 1.4826 * np.median(np.abs(rows_ - median[:, b]), axis=0)
    typical = np.nanmedian(spread, axis=1) if floor is None else 2.0 * floor
    typical = np.where(np.isfinite(typical), typical, 1.0)
    floor = 0.5 * typical if floor is None else floor
    spread = np.maximum(np.nan_to_num(spread, nan=0.0), floor[:, None])
    for b, rows in enumerate(bins):
        if 0 < len(rows) < MIN_VOLUMES:
            median[:, b] = np.median(np.array(rows), axis=0)
            spread[:, b] = 2.0 * typical
    # levels between known ones that no volume holds (the mid-chest): interpolated, and trusted little
    known = np.nonzero(np.isfinite(median[0]))[0]
    if known.size:
        gap = np.arange(known[0], known[-1] + 1)
        gap = gap[~np.isfinite(median[0, gap])]
        for f in range(len(features)):
            median[f, gap] = np.interp(levels[gap], levels[known], median[f, known])
        spread[:, gap] = 3.0 * typical[:, None]
    return body_axis.Template(levels, median, spread, features), counts


def template_values(prof: body_axis.Profile) -> np.ndarray:
    """A profile's body planes, in the template's feature order."""
    return prof.values[prof.body][:, [prof.features.index(f) for f in body_axis.FEATURES]]


def binned(placed: list[tuple[np.ndarray, np.ndarray]], levels: np.ndarray) -> list[list[np.ndarray]]:
    """Per bin, the list of feature rows of the planes placed in it (one mean row per volume and bin)."""
    bins: list[list[np.ndarray]] = [[] for _ in levels]
    for level, values in placed:
        index = np.rint((level - levels[0]) / BIN_MM).astype(int)
        for b in np.unique(index):
            if 0 <= b < levels.size:
                bins[b].append(values[index == b].mean(axis=0))
    return bins


def build(cache: Path, cases: list[str] | None = None) -> tuple[body_axis.Template, dict]:
    """The template (from the tuning patients, or the head-and-neck ``cases`` given) and a report of how it was made."""
    cases = cases if cases is not None else [c for c in hn_cases() if part(c) == "tuning"]
    data = {c: {**d, "organs": whole_organs(d)} for c, d in hn_profiles(cache, cases).items()}
    data = {c: d for c, d in data.items() if any(o in d["organs"] for o in ANCHORS)}
    standard, fits = organ_fits(data)
    levels = np.arange(-40.0, 1000.0 + BIN_MM / 2, BIN_MM)
    shift = float(np.mean(list(standard.values()))) - 150.0  # provisional origin, replaced by the vertex below
    fits = {c: (a, b - shift / a) for c, (a, b) in fits.items()}
    standard = {o: v - shift for o, v in standard.items()}
    placed = {c: (fits[c][0] * (fits[c][1] - d["profile"].s_mm[d["profile"].body]), template_values(d["profile"]))
              for c, d in data.items()}
    hn_template, _ = template_from(list(placed.values()), levels - 150.0, body_axis.FEATURES)

    real = prepare(names=("head_ct", "brain_mr", "abdomen_ct"))
    heads = {n: body_axis.profile(read_volume(real[n].image)) for n in ("head_ct", "brain_mr")}
    head_axes = {n: body_axis.align(p, hn_template) for n, p in heads.items()}
    tops = {c: fits[c][0] * (fits[c][1] - top) for c, d in data.items() if (top := dome_top(d["profile"])) is not None}
    tops.update({n: head_axes[n]._level(top) for n, p in heads.items() if (top := dome_top(p)) is not None})
    vertex = float(np.mean(list(tops.values())))
    standard = {o: v - vertex for o, v in standard.items()}
    fits = {c: (a, b - vertex / a) for c, (a, b) in fits.items()}
    head_levels = {n: np.array([a._level(v) for v in heads[n].s_mm[heads[n].body]]) - vertex for n, a in head_axes.items()}
    residual = {o: float(np.std([fits[c][0] * (fits[c][1] - d["organs"][o][0]) - standard[o] for c, d in data.items()
                                 if o in d["organs"]])) for o in ANCHORS}
    placed = [(fits[c][0] * (fits[c][1] - d["profile"].s_mm[d["profile"].body]), template_values(d["profile"]))
              for c, d in data.items()]
    _, counts = template_from(placed, levels, body_axis.FEATURES)
    floor = 0.5 * np.nanmedian(template_from(placed, levels, body_axis.FEATURES)[0].spread, axis=1)

    landmarks = {"vertex": 0.0, **{o: round(v, 1) for o, v in standard.items()}}
    landmarks["L1"] = round(standard["larynx"] + C5_TO_L1_MM, 1)
    head = heads["head_ct"]
    abdomen_prof = body_axis.profile(read_volume(real["abdomen_ct"].image))
    labels = read_volume(real["abdomen_ct"].labels)
    names = {v: k for k, v in real["abdomen_ct"].names.items()}
    kji = np.argwhere(labels.array == names["vertebrae_L1"])
    l1_s = float(labels.ijk_to_ras_points(kji[:, ::-1].astype(float))[:, 2].mean())
    extra = [(head_levels["head_ct"], template_values(head)),
             (landmarks["L1"] + (l1_s - abdomen_prof.s_mm[abdomen_prof.body]), template_values(abdomen_prof))]
    template, _ = template_from(placed + extra, levels, body_axis.FEATURES, floor)
    source = (f"benchmarks/body_axis_template.py: {len(data)} tuning head-and-neck patients placed by their organs; "
              "head CT (invesalius Cranium) by alignment; abdominal CT (TotalSegmentator reference) by its L1")
    template = body_axis.Template(template.levels, template.median, template.spread, template.features, landmarks, source)
    report = {"tuning_patients": len(data), "vertex_from": {k: round(v - vertex, 1) for k, v in tops.items()},
              "standard_levels_mm": landmarks, "organ_residual_sd_mm": {k: round(v, 2) for k, v in residual.items()},
              "slopes_p5_p50_p95": [round(float(v), 3) for v in np.percentile([f[0] for f in fits.values()], [5, 50, 95])],
              "head_levels": {n: [round(float(v.min()), 1), round(float(v.max()), 1)] for n, v in head_levels.items()},
              "abdomen_L1_s_mm": round(l1_s, 1),
              "levels_covered_by_5_patients": [float(levels[counts >= MIN_VOLUMES].min()), float(levels[counts >= MIN_VOLUMES].max())]}
    return template, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "cbirslicer" / "body_axis"), help="folder for profiles")
    parser.add_argument("--out", default=str(body_axis.TEMPLATE_FILE), help="template JSON to write")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.process_time()
    template, report = build(cache)
    Path(args.out).write_text(body_axis.template_to_json(template) + "\n")
    report["cpu_s"] = round(time.process_time() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
