"""Which body regions a DICOM Body Part Examined (0018,0015) value names, and whether it names any.

The defined terms are those of DICOM PS3.16 Annex L (Correspondence of Anatomic Region Codes and Body Part Examined
Defined Terms, CID 4031 Common Anatomic Regions). Each is mapped here to the coarse regions a search compares:
HEAD, NECK, CHEST, ABDOMEN, PELVIS, ARM, LEG. A term counts only when it names such a region; ``PARTIALBODY`` (what
some scanners write), ``WHOLEBODY``, ``SPINE``, ``EXTREMITY``, empty values and free text do not, and the image
decides (:mod:`body_region`). Values are compared in upper case without spaces, hyphens or underscores, so
``Head-Neck`` and ``CHEST_ABDOMEN`` read as the terms they spell.
"""

from __future__ import annotations

import re

REGIONS = ("HEAD", "NECK", "CHEST", "ABDOMEN", "PELVIS", "ARM", "LEG")  # head to feet, then the limbs
TRUNK_ORDER = ("HEAD", "NECK", "CHEST", "ABDOMEN", "PELVIS", "LEG")  # neighbours along the body axis

_H, _N, _C, _A, _P, _ARM, _LEG = REGIONS
# Annex L defined terms (and the common spellings of its combined regions) -> the coarse regions they lie in.
TERMS: dict[str, tuple[str, ...]] = {
    # head
    "HEAD": (_H,), "BRAIN": (_H,), "SKULL": (_H,), "CEREBELLUM": (_H,), "CIRCLEOFWILLIS": (_H,), "EAR": (_H,),
    "EYE": (_H,), "EYELID": (_H,), "ORBIT": (_H,), "CORNEA": (_H,), "FACE": (_H,), "NOSE": (_H,), "SINUS": (_H,),
    "MAXILLA": (_H,), "ZYGOMA": (_H,), "SELLA": (_H,), "IAC": (_H,), "TMJ": (_H,), "CHEEK": (_H,), "MOUTH": (_H,),
    "TONGUE": (_H,), "JAW": (_H,), "MANDIBLE": (_H,), "PAROTID": (_H,), "PITUITARY": (_H,),
    # neck
    "NECK": (_N,), "LARYNX": (_N,), "PHARYNX": (_N,), "THYROID": (_N,), "CAROTID": (_N,), "CSPINE": (_N,),
    "SUBMANDIBULAR": (_N,), "TRACHEA": (_N, _C),
    # chest
    "CHEST": (_C,), "THORAX": (_C,), "LUNG": (_C,), "HEART": (_C,), "MEDIASTINUM": (_C,), "BREAST": (_C,),
    "AXILLA": (_C,), "RIB": (_C,), "STERNUM": (_C,), "CLAVICLE": (_C,), "SCAPULA": (_C,), "BRONCHUS": (_C,),
    "CORONARYARTERY": (_C,), "THYMUS": (_C,), "TSPINE": (_C,), "ESOPHAGUS": (_N, _C), "AORTICARCH": (_C,),
    "PULMONARYARTERY": (_C,),
    # abdomen
    "ABDOMEN": (_A,), "LIVER": (_A,), "GALLBLADDER": (_A,), "BILEDUCT": (_A,), "PANCREAS": (_A,), "SPLEEN": (_A,),
    "STOMACH": (_A,), "KIDNEY": (_A,), "ADRENAL": (_A,), "DUODENUM": (_A,), "JEJUNUM": (_A,), "ILEUM": (_A,),
    "COLON": (_A, _P), "LSPINE": (_A,), "TLSPINE": (_C, _A), "ABDOMINALAORTA": (_A,), "RENALARTERY": (_A,),
    "AORTA": (_C, _A), "URETER": (_A, _P), "BACK": (_C, _A),
    # pelvis
    "PELVIS": (_P,), "BLADDER": (_P,), "PROSTATE": (_P,), "RECTUM": (_P,), "UTERUS": (_P,), "CERVIX": (_P,),
    "OVARY": (_P,), "VAGINA": (_P,), "VULVA": (_P,), "PENIS": (_P,), "TESTIS": (_P,), "SCROTUM": (_P,),
    "URETHRA": (_P,), "SACRUM": (_P,), "COCCYX": (_P,), "SSPINE": (_P,), "LSSPINE": (_A, _P), "ILIUM": (_P,),
    "HIP": (_P, _LEG), "BUTTOCK": (_P,), "SIJOINT": (_P,),
    # limbs
    "ARM": (_ARM,), "UPPERARM": (_ARM,), "HUMERUS": (_ARM,), "ELBOW": (_ARM,), "FOREARM": (_ARM,), "WRIST": (_ARM,),
    "HAND": (_ARM,), "FINGER": (_ARM,), "THUMB": (_ARM,), "SHOULDER": (_C, _ARM), "ACJOINT": (_C, _ARM),
    "LEG": (_LEG,), "LOWERLEG": (_LEG,), "THIGH": (_LEG,), "FEMUR": (_LEG,), "KNEE": (_LEG,), "PATELLA": (_LEG,),
    "CALF": (_LEG,), "TIBIA": (_LEG,), "FIBULA": (_LEG,), "ANKLE": (_LEG,), "FOOT": (_LEG,), "CALCANEUS": (_LEG,),
    "TOE": (_LEG,),
    # combined regions
    "HEADNECK": (_H, _N), "HEADANDNECK": (_H, _N), "NECKCHEST": (_N, _C), "CTSPINE": (_N, _C),
    "NECKCHESTABDOMEN": (_N, _C, _A), "NECKCHESTABDPELV": (_N, _C, _A, _P), "NECKCHESTABDPELVIS": (_N, _C, _A, _P),
    "CHESTABDOMEN": (_C, _A), "CHESTABD": (_C, _A), "CHESTABDPELVIS": (_C, _A, _P), "CHESTABDOMENPELVIS": (_C, _A, _P),
    "ABDOMENPELVIS": (_A, _P), "ABDPELVIS": (_A, _P), "ABDPELV": (_A, _P),
}
# Terms that are DICOM's but name no region a search can compare: the image decides.
UNINFORMATIVE = frozenset({"PARTIALBODY", "WHOLEBODY", "ENTIREBODY", "BODY", "SPINE", "EXTREMITY", "UNKNOWN", "OTHER"})


def normalise(value: str | None) -> str:
    """Upper case without spaces, hyphens, underscores, slashes or dots ('Head-Neck' -> 'HEADNECK')."""
    return re.sub(r"[\s\-_/.^]+", "", (value or "").upper())


def regions_of(value: str | None) -> tuple[str, ...]:
    """The coarse regions a Body Part Examined value names, head to feet; () when it names none (the image decides)."""
    term = normalise(value)
    if term in TERMS:
        return TERMS[term]
    if term in REGIONS:
        return (term,)
    return ()


def names_region(value: str | None) -> bool:
    """Whether a Body Part Examined value names a region (so it is trusted over the image)."""
    return bool(regions_of(value))


def overlap(a: str | None, b: str | None) -> bool:
    """Whether two body part values share a region."""
    return bool(set(regions_of(a)) & set(regions_of(b)))


def adjacent(a: str | None, b: str | None) -> bool:
    """Whether two body part values name regions next to each other along the body (head-neck, neck-chest,
    chest-abdomen, abdomen-pelvis, pelvis-leg; the arm beside the chest) without sharing one."""
    ra, rb = set(regions_of(a)), set(regions_of(b))
    if not ra or not rb or ra & rb:
        return False
    pairs = {frozenset(TRUNK_ORDER[i:i + 2]) for i in range(len(TRUNK_ORDER) - 1)} | {frozenset((_C, _ARM))}
    return any(frozenset((x, y)) in pairs for x in ra for y in rb)


def passes(told: str | None, wanted: str | None) -> bool:
    """Whether a series whose header says ``told`` passes a body-part filter ``wanted``: a header naming a region passes
    when it shares one with ``wanted`` ('HEADNECK' passes 'head'); a filter that names no region compares the words."""
    if not wanted:
        return True
    if not names_region(wanted):
        return normalise(told) == normalise(wanted)
    return overlap(told, wanted)
