"""How well the body coordinate (``imaging/body_axis.py``) agrees across real patients: reporting patients only.

Head-and-neck CTs of the *reporting* patients (``patient_split``; none of them made the template):

* **Organ levels across patients**: for each pair (p, q) of different patients holding organ o whole (not cut by
  the field of view: a cut organ's centroid is not the organ's, and many crops here cut the brainstem), the centroid of o
  in p is given its level by p's axis, that level is put into q by q's axis (``s_at``), and the distance along S
  to o's centroid in q is the error, in q's millimetres. Per organ: median, 90th percentile, share within 10 mm.
  The brainstem, parotids, larynx and mandible were the template's anchors (in other patients); the spinal cord
  and the oesophagus were not, and their centroids move with the contoured length (plan and field of view), so
  their figures are an upper bound.
* **Shape only**: the same with the body's shape alone (area, width, depth), as MR volumes are aligned: what an MR
  of another patient can expect (no real MR of many patients is here).
* **Slabs across patients**: slabs of 40 and 60 mm are cut from p's CT (a real crop of the voxels), centred on an
  organ's centroid; the slab gets its own axis, its centre's level is put into every other patient q that holds
  the organ, and the error is the distance to o's centroid in q. A slab whose level does not fall inside q's body
  counts as "not in view" (right when q does not hold that level, which never happens for these organs).
* **Real volumes**: the head CT, the brain MR and the abdominal CT: their axes, their top's level (the vertex,
  0 when in view) and, for the abdominal CT, the levels of its labelled vertebrae against the standard's.

    python benchmarks/body_axis.py [--patients N] [--out docs/benchmarks/body_axis.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from body_axis_template import ORGANS, hn_cases, hn_profiles
from patient_split import part
from real_anatomy import slab_around
from real_data import prepare, shared_data_dir

from CBIRSlicerLib.imaging import body_axis
from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.imaging.volume import Volume

SLABS_MM = (40.0, 60.0)
SLAB_ORGANS = ("brainstem", "right_parotid", "mandible", "larynx", "esophagus")


def slab(volume: Volume, centre_s: float, thickness_mm: float) -> Volume:
    """A slab of the volume's planes, ``thickness_mm`` thick, centred on the superior coordinate ``centre_s``."""
    centre = volume.center_ras.copy()
    centre[2] = centre_s
    return slab_around(volume, centre, thickness_mm)


def summary(errors: list[float]) -> dict:
    """Median, 90th percentile and shares within 10 and 20 mm of absolute errors."""
    e = np.abs(np.array(errors, float))
    if e.size == 0:
        return {"n": 0}
    return {"n": int(e.size), "median_mm": round(float(np.median(e)), 1), "p90_mm": round(float(np.percentile(e, 90)), 1),
            "within_10mm": round(float(np.mean(e <= 10.0)), 3), "within_20mm": round(float(np.mean(e <= 20.0)), 3)}


def as_mr(prof: body_axis.Profile) -> body_axis.Profile:
    """A CT profile seen as an MR's: the body's shape only (area, width, depth), as MR volumes are aligned."""
    names = (*body_axis.SHAPE_FEATURES, body_axis.LUNG_FEATURE)
    return body_axis.Profile(prof.s_mm, prof.values[:, [prof.features.index(n) for n in names]], prof.body, names, "MR")


def whole(axis: body_axis.BodyAxis, organ: tuple[float, float, float]) -> bool:
    """Whether an organ (mean, lowest, highest S) lies inside the body's extent, not cut by the field of view (a cut
    organ's centroid is not the organ's)."""
    return axis.s_range[0] + body_axis.GRID_MM[2] <= organ[1] and organ[2] <= axis.s_range[1] - body_axis.GRID_MM[2]


def cross_patient(axes: dict[str, body_axis.BodyAxis], organs: dict[str, dict]) -> dict:
    """Organ centroid levels carried from each patient into every other one: errors along S per organ."""
    out = {}
    for name in ORGANS.values():
        errors, outside = [], 0
        holders = [c for c in axes if name in organs[c] and whole(axes[c], organs[c][name])]
        for p in holders:
            level = axes[p].level_at(organs[p][name][0], margin_mm=10.0)
            for q in holders:
                if q == p or level is None:
                    continue
                s = axes[q].s_at(level)
                if s is None:
                    outside += 1
                else:
                    errors.append(s - organs[q][name][0])
        out[name] = {**summary(errors), "not_in_view": outside, "_errors": errors}
    return out


def slab_queries(cases: list[str], axes: dict[str, body_axis.BodyAxis], organs: dict[str, dict]) -> dict:
    """Slabs centred on organs, their level put into every other patient holding the organ."""
    folder = shared_data_dir() / "real" / "head-neck-ct"
    results: dict[str, dict[str, list]] = {f"{int(t)}mm": {o: [] for o in SLAB_ORGANS} for t in SLABS_MM}
    missed: dict[str, int] = {k: 0 for k in results}
    own: dict[str, list] = {k: [] for k in results}
    for p in cases:
        volume = read_volume(folder / f"{p}_ct.nii.gz")
        for name in SLAB_ORGANS:
            if name not in organs[p] or not whole(axes[p], organs[p][name]):
                continue
            centre = organs[p][name][0]
            for thick in SLABS_MM:
                key = f"{int(thick)}mm"
                axis = body_axis.body_axis(slab(volume, centre, thick))
                if axis is None:
                    missed[key] += 1
                    continue
                level = axis.level_at(centre, margin_mm=10.0)
                own[key].append(level - axes[p].level_at(centre, margin_mm=10.0))
                for q in axes:
                    if q == p or name not in organs[q] or not whole(axes[q], organs[q][name]):
                        continue
                    s = axes[q].s_at(level)
                    results[key][name].append(np.nan if s is None else s - organs[q][name][0])
    out = {}
    for key, per_organ in results.items():
        everything = [e for errs in per_organ.values() for e in errs]
        out[key] = {"_errors": {o: [e for e in errs if np.isfinite(e)] for o, errs in per_organ.items()},
                    "all": {**summary([e for e in everything if np.isfinite(e)]),
                            "not_in_view": int(np.sum(~np.isfinite(everything)))},
                    "per_organ": {o: {**summary([e for e in errs if np.isfinite(e)]), "not_in_view": int(np.sum(~np.isfinite(errs)))}
                                  for o, errs in per_organ.items()},
                    "slab_vs_own_volume": summary(own[key]), "slabs_without_axis": missed[key]}
    return out


def real_volumes() -> dict:
    """Axes of the head CT, brain MR and abdominal CT, with the levels of what is known in them."""
    real = prepare()
    out = {}
    standard = body_axis.load_template().landmarks
    for name, item in real.items():
        volume = read_volume(item.image)
        axis = body_axis.body_axis(volume)
        entry = {"axis": axis.to_dict(), "level_range": [round(v, 1) for v in axis.level_range]}
        if name == "abdomen_ct":
            labels = read_volume(item.labels)
            names = {v: k for k, v in item.names.items()}
            for vertebra in ("vertebrae_T12", "vertebrae_L1", "vertebrae_L2"):
                kji = np.argwhere(labels.array == names[vertebra])
                s = float(labels.ijk_to_ras_points(kji[:, ::-1].astype(float))[:, 2].mean())
                entry[f"{vertebra}_level"] = round(axis.level_at(s), 1)
            entry["standard_L1"] = standard.get("L1")
            entry["note"] = "the template's abdominal part is this volume (placed by its L1): a check of the fit, not of transfer"
        out[name] = entry
    return out


def figure(report: dict, path: str) -> None:
    """Cumulative share of (query patient, other patient) pairs within an error, per organ: whole volumes, 60 mm slabs,
    whole volumes by shape only (as MR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("whole CT volumes", {o: v["_errors"] for o, v in report["organ_levels_across_patients"].items()}),
              ("60 mm CT slabs into whole volumes", report["slabs"]["60mm"]["_errors"]),
              ("whole volumes, body shape only (as MR)",
               {o: v["_errors"] for o, v in report["organ_levels_across_patients_shape_only"].items()})]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    grid = np.linspace(0, 60, 121)
    for ax, (title, errors) in zip(axes, panels):
        for organ, values in errors.items():
            values = np.abs(np.array(values, float))
            if values.size:
                ax.plot(grid, [np.mean(values <= g) for g in grid], label=f"{organ} (n={values.size}, median {np.median(values):.1f})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("error along S in the other patient (mm)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower right")
    axes[0].set_ylabel("share of pairs within")
    fig.suptitle(f"Body coordinate across {report['patients']} reporting head-and-neck patients (OpenKBP)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=0, help="reporting patients to use (0: all)")
    parser.add_argument("--slab-patients", type=int, default=24, help="reporting patients whose slabs are queried")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "cbirslicer" / "body_axis"))
    parser.add_argument("--out", default="")
    parser.add_argument("--figure", default="", help="PNG of the error distributions per organ (whole volumes, slabs)")
    args = parser.parse_args()
    started = time.process_time()
    cases = [c for c in hn_cases() if part(c) == "reporting"]
    cases = cases[:args.patients] if args.patients else cases
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = hn_profiles(cache, cases)
    template = body_axis.load_template()
    axes = {c: body_axis.align(d["profile"], template) for c, d in data.items()}
    axes = {c: a for c, a in axes.items() if a is not None}
    organs = {c: data[c]["organs"] for c in axes}
    fit_s = time.process_time() - started
    shape_axes = {c: body_axis.align(as_mr(data[c]["profile"]), template) for c in axes}
    shape_axes = {c: a for c, a in shape_axes.items() if a is not None}
    report = {"data": "real/head-neck-ct reporting patients (benchmarks/patient_split.py); OpenKBP (Babier et al. 2021)",
              "patients": len(axes), "template": template.source,
              "organ_levels_across_patients": cross_patient(axes, organs),
              "organ_levels_across_patients_shape_only": cross_patient(shape_axes, {c: organs[c] for c in shape_axes}),
              "slopes_p5_p50_p95": [round(float(v), 3) for v in np.percentile([a.slope for a in axes.values()], [5, 50, 95])],
              "cost_p50_p95": [round(float(v), 3) for v in np.percentile([a.cost for a in axes.values()], [50, 95])]}
    slab_cases = cases[:args.slab_patients]
    report["slabs"] = slab_queries([c for c in slab_cases if c in axes], axes, organs)
    report["slab_patients"] = len(slab_cases)
    report["real_volumes"] = real_volumes()
    report["cpu_s"] = {"profiles_and_fits": round(fit_s, 1), "total": round(time.process_time() - started, 1)}
    if args.figure:
        figure(report, args.figure)
    for block in (report["organ_levels_across_patients"], report["organ_levels_across_patients_shape_only"]):
        for entry in block.values():
            entry.pop("_errors", None)
    for entry in report["slabs"].values():
        entry.pop("_errors", None)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
