"""Body region inferred from the image for every real volume of the shared data and slabs of them.

Volumes: the 170 head-and-neck CTs (``real/head-neck-ct``), the abdominal CT, the head CT and the brain MR
(``real_data.py``). Slabs: 40 and 60 mm of each, cut (real crops of the voxels) at known places.

What counts as right (the truth is the anatomy known in each volume, not the inference's own bands):
* a head-and-neck CT: HEAD or NECK (they hold both; the crop decides which holds more), never a trunk region;
  its slabs centred on the brainstem: HEAD; on a parotid or the mandible: HEAD or NECK (the jaw's angle is the
  border); on the larynx: NECK;
* the abdominal CT: ABDOMEN; its slabs at 85 % of its height (upper abdomen: liver, spleen, kidneys), 50 %
  (lumbar spine, bowel): ABDOMEN; at 15 % (the femoral heads and the bladder are in view): PELVIS;
* the head CT, the brain MR and every slab of them: HEAD;
* the abdominal CT seen with a T1-like contrast (a pseudo-MR: no real MR of the trunk is here), and its slabs: as
  the CT.

    python benchmarks/body_region.py [--out docs/benchmarks/body_region.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from body_axis_template import hn_cases, organ_levels_s
from real_anatomy import slab_around
from real_data import prepare, shared_data_dir

from CBIRSlicerLib.imaging import body_region
from CBIRSlicerLib.imaging.readers import read_volume

SLABS_MM = (40.0, 60.0)
HN_SLABS = {"brainstem": {"HEAD"}, "right_parotid": {"HEAD", "NECK"}, "mandible": {"HEAD", "NECK"}, "larynx": {"NECK"}}
FRACTIONS = {0.85: "upper", 0.5: "middle", 0.15: "lower"}


def at_s(volume, s: float, thickness: float):
    """A slab of ``thickness`` mm centred on the superior coordinate ``s``."""
    centre = volume.center_ras.copy()
    centre[2] = s
    return slab_around(volume, centre, thickness)


# A T1-like contrast for a CT (HU -> signal, piecewise linear): air and cortical bone dark, fat bright, soft tissue
# grey, marrow brighter: the abdominal CT's real anatomy seen the way an MR sees it (not a real MR; a check of the
# shape-only MR path on a trunk, which no real MR here covers).
PSEUDO_T1 = ((-1000.0, 0.0), (-500.0, 0.0), (-150.0, 900.0), (-50.0, 1000.0), (0.0, 300.0), (40.0, 450.0), (100.0, 500.0),
             (200.0, 650.0), (400.0, 200.0), (1000.0, 50.0))


def pseudo_mr(volume):
    """The volume with a T1-like contrast (PSEUDO_T1) and no modality: what the image shows decides."""
    import dataclasses

    hu, signal = zip(*PSEUDO_T1)
    array = np.interp(np.asarray(volume.array, float), hu, signal).astype(np.float32)
    return dataclasses.replace(volume, array=array, modality=None, extra=dict(volume.extra))


def judge(found: body_region.Inferred, right: set[str]) -> dict:
    """One record: what was found, and whether it is right."""
    return {"found": found.body_part, "regions": list(found.regions), "how": found.how, "right": found.body_part in right,
            "levels": list(found.levels) if found.levels else None, "lungs": found.lung_fraction, "width_mm": found.width_mm}


def run(hn_limit: int = 0) -> dict:
    """Every volume and slab, judged."""
    records = []
    folder = shared_data_dir() / "real" / "head-neck-ct"
    cases = hn_cases()
    cases = cases[:hn_limit] if hn_limit else cases
    for case in cases:
        volume = read_volume(folder / f"{case}_ct.nii.gz")
        records.append({"volume": case, "kind": "head-neck CT", **judge(body_region.infer(volume), {"HEAD", "NECK"})})
        organs = organ_levels_s(read_volume(folder / f"{case}_labels.nii.gz"))
        for name, right in HN_SLABS.items():
            if name in organs:
                for thick in SLABS_MM:
                    found = body_region.infer(at_s(volume, organs[name][0], thick))
                    records.append({"volume": case, "kind": f"head-neck CT slab {int(thick)} mm at {name}", **judge(found, right)})
    real = prepare()
    truths = {"abdomen_ct": ("ABDOMEN", {0.85: "ABDOMEN", 0.5: "ABDOMEN", 0.15: "PELVIS"}),
              "head_ct": ("HEAD", dict.fromkeys(FRACTIONS, "HEAD")), "brain_mr": ("HEAD", dict.fromkeys(FRACTIONS, "HEAD"))}
    volumes = {name: (read_volume(item.image), item.modality, item.body_region) for name, item in real.items()}
    volumes["abdomen_pseudo_mr"] = (pseudo_mr(volumes["abdomen_ct"][0]), "MR (T1-like contrast of the CT)", "abdomen")
    truths["abdomen_pseudo_mr"] = truths["abdomen_ct"]
    for name, (volume, modality, region) in volumes.items():
        whole, slabs = truths[name]
        records.append({"volume": name, "kind": f"{modality} {region}", **judge(body_region.infer(volume), {whole})})
        s = volume.corners_ras()[:, 2]
        for fraction, right in slabs.items():
            for thick in SLABS_MM:
                found = body_region.infer(at_s(volume, s.min() + fraction * np.ptp(s), thick))
                records.append({"volume": name, "kind": f"slab {int(thick)} mm, {FRACTIONS[fraction]}", **judge(found, {right})})
    by_kind: dict[str, Counter] = {}
    for record in records:
        key = f"{record['volume']}: {record['kind']}" if record["volume"] in volumes else record["kind"].replace(" CT slab", " slab")
        by_kind.setdefault(key, Counter())["right" if record["right"] else "wrong"] += 1
    wrong = [r for r in records if not r["right"]]
    return {"data": "real/head-neck-ct (OpenKBP, Babier et al. 2021), real/abdomen-ct, Debian head CT and brain MR",
            "volumes_and_slabs": len(records), "right": len(records) - len(wrong),
            "by_kind": {k: dict(v) for k, v in by_kind.items()},
            "found_regions": dict(Counter(r["found"] for r in records)), "wrong": wrong,
            "real_volumes": [r for r in records if r["volume"] in volumes]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hn", type=int, default=0, help="head-and-neck patients to use (0: all 170)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    started = time.process_time()
    report = run(args.hn)
    report["cpu_s"] = round(time.process_time() - started, 1)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
