"""PeXR-mini: a seeded generator of synthetic pediatric X-ray studies, to train and test PedCLIP fully offline.

PeXR (the paper's private set) pairs X-rays of several body parts with ONE free-text report per study. PeXR-mini
mimics that. A patient has 1-3 studies; a study images one or more body parts (hand + wrist, knee + hip, chest
alone, ...), one image each; its report has clinical history, then findings and impression sentences about each
imaged part in varied wording. Each dataset row is one image with its ground-truth body-part text: exactly the report
sentences about that image's part.

Images are rendered from simple anatomy: tubular bones with cortex, metaphyseal flares and growth plates, round bones
(carpals, tarsals, patella, epiphyses), soft tissue and lungs, under a random pose, exposure and low-dose noise.
Findings are drawn on the anatomy: consolidation (patchy lung opacity), cardiomegaly (wide heart), pleural effusion
(basal opacity with a meniscus), fracture (lucent line with displacement), periosteal reaction (thin bright layer along
a shaft), joint effusion (soft-tissue bulge at the joint), slipped capital femoral epiphysis and Perthes disease.

Geometry lives in anatomy coordinates (u to the image right, v down; the image spans [-1, 1] at zoom 1). A pose maps
them to pixels and each primitive is evaluated only in its pixel window, so an image takes a few milliseconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image as PILImage

from configuration_pedclip import DEFAULT_BODY_PARTS

# ------------------------------------------------------------------------------------------------ vocabulary

FINDINGS_BY_BODY_PART: dict[str, tuple[str, ...]] = {
    "chest": ("consolidation", "cardiomegaly", "pleural effusion"),
    "wrist": ("fracture", "periosteal reaction"),
    "hand": ("fracture", "periosteal reaction"),
    "forearm": ("fracture", "periosteal reaction"),
    "elbow": ("fracture", "periosteal reaction", "joint effusion"),
    "knee": ("fracture", "periosteal reaction", "joint effusion"),
    "hip": ("slipped capital femoral epiphysis", "perthes disease"),
    "foot": ("fracture", "periosteal reaction"),
}
# The body parts PeXR-mini renders, named and ordered as in the config (expert order).
RENDERED_BODY_PARTS = tuple(part for part in DEFAULT_BODY_PARTS if part in FINDINGS_BY_BODY_PART)

# Words by which a findings/impression sentence names its part (whole words, case-insensitive). Every such sentence
# names its own part through one of these and no other rendered part's; history sentences may name any part.
BODY_PART_SYNONYMS: dict[str, tuple[str, ...]] = {
    "chest": ("chest", "lung", "lungs", "heart", "cardiac", "cardiomediastinal", "cardiopulmonary", "pleural",
              "lobe", "costophrenic", "hemithorax", "pulmonary"),
    "wrist": ("wrist", "wrists", "carpal", "carpus", "distal radius", "distal radial", "distal ulna", "scaphoid"),
    "hand": ("hand", "hands", "metacarpal", "metacarpals", "phalanx", "phalanges", "finger", "fingers", "thumb"),
    "forearm": ("forearm", "forearms", "radial shaft", "ulnar shaft", "radial and ulnar shafts"),
    "elbow": ("elbow", "elbows", "supracondylar", "distal humerus", "radial head", "radial neck", "olecranon",
              "capitellum", "fat pad", "fat pads"),
    "knee": ("knee", "knees", "patella", "patellar", "suprapatellar", "distal femur", "distal femoral",
             "proximal tibia", "proximal tibial", "tibial plateau", "proximal fibula"),
    "hip": ("hip", "hips", "femoral head", "femoral heads", "femoral neck", "acetabulum", "acetabular",
            "capital femoral"),
    "foot": ("foot", "feet", "metatarsal", "metatarsals", "tarsal", "tarsals", "toe", "toes", "great toe",
             "forefoot", "midfoot"),
}  # fmt: skip

_SYNONYM_PATTERNS = {
    part: re.compile(r"\b(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b", re.I)
    for part, words in BODY_PART_SYNONYMS.items()
}


def body_parts_mentioned(sentence: str, parts: Sequence[str] = RENDERED_BODY_PARTS) -> set[str]:
    """The parts (among `parts`) that `sentence` names through a `BODY_PART_SYNONYMS` entry."""
    return {part for part in parts if _SYNONYM_PATTERNS[part].search(sentence)}


class Site(NamedTuple):
    """Where a finding sits: what the renderer draws it on and how the report names it."""

    key: str  # a bone name, a lung lobe ("right_lower"), a side, "heart", "joint" or "head"
    phrase: str  # the report's words for it; always contains a synonym of the part
    span: tuple[float, float] = (0.0, 1.0)  # bones: the stretch along the bone (0 = p0, 1 = p1)


@dataclass(frozen=True)
class Finding:
    """One finding of one image: its name (a `FINDINGS_BY_BODY_PART` entry), site and severity in [0, 1]."""

    name: str
    site: Site
    severity: float


_LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")
_SITES: dict[str, dict[str, tuple[Site, ...]]] = {
    "chest": {
        "consolidation": tuple(Site(lobe.rsplit(" ", 1)[0].replace(" ", "_"), lobe) for lobe in _LOBES),
        "cardiomegaly": (Site("heart", "heart"),),
        "pleural effusion": (Site("right", "right"), Site("left", "left")),
    },
    "wrist": {
        "fracture": (Site("radius", "distal radius", (0.84, 0.92)), Site("radius", "distal radial metaphysis",
                     (0.84, 0.91)), Site("ulna", "distal ulna", (0.85, 0.92))),
        "periosteal reaction": (Site("radius", "distal radius", (0.62, 0.9)), Site("ulna", "distal ulna", (0.62, 0.9))),
    },
    "hand": {
        "fracture": (Site("mc5", "fifth metacarpal", (0.55, 0.85)), Site("mc4", "fourth metacarpal", (0.3, 0.8)),
                     Site("mc1", "thumb metacarpal", (0.25, 0.65)),
                     Site("pp2", "proximal phalanx of the index finger", (0.3, 0.7)),
                     Site("pp5", "proximal phalanx of the little finger", (0.3, 0.7))),
        "periosteal reaction": (Site("mc2", "second metacarpal", (0.15, 0.85)),
                                Site("mc3", "third metacarpal", (0.15, 0.85)),
                                Site("mc4", "fourth metacarpal", (0.15, 0.85))),
    },
    "forearm": {
        "fracture": (Site("radius", "radial shaft", (0.3, 0.7)), Site("ulna", "ulnar shaft", (0.3, 0.7))),
        "periosteal reaction": (Site("radius", "radial shaft", (0.2, 0.8)), Site("ulna", "ulnar shaft", (0.2, 0.8))),
    },
    "elbow": {
        "fracture": (Site("humerus", "supracondylar humerus", (0.8, 0.9)), Site("radius", "radial neck", (0.06, 0.13))),
        "periosteal reaction": (Site("humerus", "distal humerus", (0.45, 0.86)),),
        "joint effusion": (Site("joint", "anterior and posterior fat pads"),),
    },
    "knee": {
        "fracture": (Site("femur", "distal femur", (0.78, 0.88)), Site("tibia", "proximal tibia", (0.78, 0.88)),
                     Site("fibula", "proximal fibula", (0.72, 0.86))),
        "periosteal reaction": (Site("femur", "distal femur", (0.5, 0.86)),
                                Site("tibia", "proximal tibia", (0.5, 0.86))),
        "joint effusion": (Site("joint", "suprapatellar recess"),),
    },
    "hip": {
        "slipped capital femoral epiphysis": (Site("head", "femoral head"),),
        "perthes disease": (Site("head", "femoral head"),),
    },
    "foot": {
        "fracture": (Site("mt5", "fifth metatarsal", (0.1, 0.5)), Site("mt2", "second metatarsal", (0.4, 0.75)),
                     Site("pp1", "great toe", (0.3, 0.7))),
        "periosteal reaction": (Site("mt2", "second metatarsal", (0.25, 0.8)),
                                Site("mt3", "third metatarsal", (0.25, 0.8))),
    },
}  # fmt: skip

# (body parts imaged together, relative frequency): chest, wrist and forearm dominate as in PeXR.
_STUDY_TYPES = (
    (("chest",), 24), (("wrist",), 10), (("hand",), 6), (("hand", "wrist"), 6), (("forearm", "wrist"), 6),
    (("forearm",), 4), (("elbow",), 7), (("elbow", "forearm"), 5), (("hand", "wrist", "forearm"), 2),
    (("knee",), 8), (("hip",), 10), (("knee", "hip"), 4), (("foot",), 12),
)  # fmt: skip
_NORMAL_FRACTION = 0.45

# ------------------------------------------------------------------------------------------------ report wording

_POSITIVE = {  # finding -> (findings-section templates, impression templates)
    "fracture": (
        ("There is a {kind}fracture of the {side} {site}.", "A {kind}fracture line crosses the {site}.",
         "Cortical break through the {site}, in keeping with a {kind}fracture.",
         "{kind}fracture of the {site} of the {part}."),
        ("{side} {site} fracture.", "Acute {kind}fracture of the {site}.", "Fracture of the {site} as described."),
    ),
    "periosteal reaction": (
        ("There is periosteal reaction along the {site}.", "Smooth periosteal reaction along the {side} {site}.",
         "A thin layer of periosteal reaction is seen along the {site} of the {part}."),
        ("Periosteal reaction of the {side} {site}, possibly a healing stress injury.",
         "Periosteal reaction along the {site}; correlate clinically for infection."),
    ),
    "joint effusion": (
        ("There is a {size} joint effusion of the {part}.",
         "{size} {part} joint effusion with distension of the {site}.",
         "Soft tissue fullness of the {site} in keeping with a {size} joint effusion."),
        ("{size} joint effusion of the {part}.", "Joint effusion of the {part}."),
    ),
    "consolidation": (
        ("There is consolidation in the {site}.", "Patchy airspace consolidation in the {site}.",
         "{site} consolidation with air bronchograms.", "Focal consolidation is seen in the {site}."),
        ("{site} consolidation, in keeping with pneumonia.", "Consolidation of the {site}, likely infective."),
    ),
    "cardiomegaly": (
        ("The cardiac silhouette is enlarged, in keeping with {size} cardiomegaly.",
         "{size} cardiomegaly, with an enlarged heart shadow.", "The heart is enlarged ({size} cardiomegaly)."),
        ("Cardiomegaly with an enlarged cardiac silhouette.", "Enlarged heart ({size} cardiomegaly)."),
    ),
    "pleural effusion": (
        ("There is a {size} {site} pleural effusion with a meniscus at the lung base.",
         "Blunting of the {site} costophrenic angle, consistent with a {size} pleural effusion.",
         "{size} {site} pleural effusion layering in the hemithorax."),
        ("{size} {site} pleural effusion.", "{site} pleural effusion."),
    ),
    "slipped capital femoral epiphysis": (
        ("The {side} capital femoral epiphysis is displaced inferomedially, in keeping with slipped capital "
         "femoral epiphysis.",
         "Widened physis with slippage of the {side} femoral head, consistent with slipped capital femoral epiphysis."),
        ("{side} slipped capital femoral epiphysis.", "Slipped capital femoral epiphysis of the {side} hip."),
    ),
    "perthes disease": (
        ("Flattening, sclerosis and fragmentation of the {side} femoral head, consistent with Perthes disease.",
         "The {side} femoral head is small, flat and dense, in keeping with Legg-Calve-Perthes disease."),
        ("Perthes disease of the {side} hip.", "{side} hip: Legg-Calve-Perthes disease."),
    ),
}  # fmt: skip

_NEGATIVE = {  # finding -> sentences stating its absence
    "fracture": ("No fracture of the {part}.", "No acute fracture or dislocation of the {part}.",
                 "Bony alignment of the {part} is normal, without fracture."),
    "periosteal reaction": ("No periosteal reaction about the {part}.",
                            "No aggressive bone lesion or periosteal reaction in the {part}."),
    "joint effusion": ("No joint effusion of the {part}.", "No {part} joint effusion."),
    "consolidation": ("The lungs are clear.", "No focal consolidation in the lungs.",
                      "The lungs are well expanded and clear."),
    "cardiomegaly": ("Heart size is normal.", "The cardiomediastinal silhouette is within normal limits.",
                     "Normal cardiac size."),
    "pleural effusion": ("No pleural effusion.", "No pleural effusion or pneumothorax.",
                         "The costophrenic angles are sharp."),
    "slipped capital femoral epiphysis": ("The capital femoral epiphyses are normally aligned.",
                                          "No slipped capital femoral epiphysis."),
    "perthes disease": ("The femoral heads are normal in size and density.",
                        "Normal femoral head contours, no Perthes disease."),
}  # fmt: skip

_NORMAL_EXTRA = {
    "chest": ("Normal pulmonary vascularity.", "No pneumothorax in either hemithorax.", "The chest wall is normal."),
    "bone": ("Soft tissues of the {part} are unremarkable.", "Normal bone mineralisation of the {part}.",
             "The growth plates of the {part} are open and normal."),
}
_NORMAL_IMPRESSION = {
    "chest": ("Normal chest radiograph.", "No acute cardiopulmonary abnormality.",
              "Clear lungs and normal heart size."),
    "bone": ("Normal {part}.", "No acute bony abnormality of the {part}.", "Normal radiographs of the {part}.",
             "{part}: no acute findings."),
}
_FRACTURE_KINDS = (("", "minimally displaced ", "transverse ", "oblique "), ("", "displaced ", "angulated ",
                                                                          "displaced and angulated "))
_SIZES = {"cardiomegaly": ("mild", "moderate", "marked"), "default": ("small", "moderate", "large")}

_HISTORY_HEADERS = ("Clinical history:", "History:", "Indication:", "Clinical information:", "Reason for exam:")
_HISTORY_REASONS = {
    "chest": ("Cough and fever.", "Fever for three days, query pneumonia.", "Shortness of breath.",
              "Heart murmur on examination.", "Persistent wheeze.", "Chest pain."),
    "arm": ("Fell on outstretched hand.", "Fall from a trampoline.", "Fall from the monkey bars.",
            "Pain and swelling after a fall.", "Injury during football.", "Painful {word} for two weeks.",
            "Swelling of the {word}, query infection.", "Reduced range of movement."),
    "leg": ("Limping, refusing to bear weight.", "Twisting injury during football.", "Fall from a bicycle.",
            "Painful {word} for two weeks.", "Swelling of the {word}, query infection."),
    "hip": ("Limp and {word} pain.", "Knee pain, query hip pathology.", "Painful {word} for a month.",
            "Limping, refusing to bear weight."),
}  # fmt: skip
_REGION = {"chest": "chest", "hand": "arm", "wrist": "arm", "forearm": "arm", "elbow": "arm", "knee": "leg",
           "foot": "leg", "hip": "hip"}  # fmt: skip
_COMPARISONS = ("Comparison: None.", "Comparison: No prior studies.", "No previous imaging for comparison.")

# ------------------------------------------------------------------------------------------------ canvas and primitives


class _Pose(NamedTuple):
    angle: float  # radians
    scale: float
    shift: tuple[float, float]  # fraction of the half image
    mirror: bool  # left limbs are mirrored right limbs


@dataclass
class _Canvas:
    """The density image being drawn and the affine map from anatomy coordinates to its pixels."""

    size: int
    matrix: np.ndarray  # 2 x 2, anatomy -> pixel (x, y)
    offset: np.ndarray  # pixel position of the anatomy origin
    u: np.ndarray  # anatomy coordinates of every pixel centre
    v: np.ndarray
    pixel: float  # anatomy units per pixel
    density: np.ndarray


def _make_canvas(size: int, pose: _Pose, center=(0.0, 0.0), zoom: float = 1.0) -> _Canvas:
    half = size / 2.0
    scale = half * pose.scale * zoom
    cos, sin = math.cos(pose.angle), math.sin(pose.angle)
    matrix = scale * np.array([[cos, -sin], [sin, cos]]) @ np.diag([-1.0 if pose.mirror else 1.0, 1.0])
    offset = half * (1.0 + np.asarray(pose.shift)) - matrix @ np.asarray(center, dtype=float)
    inverse = np.linalg.inv(matrix)
    y, x = np.mgrid[0:size, 0:size].astype(float) + 0.5
    x, y = x - offset[0], y - offset[1]
    u, v = inverse[0, 0] * x + inverse[0, 1] * y, inverse[1, 0] * x + inverse[1, 1] * y
    return _Canvas(size, matrix, offset, u, v, 1.0 / scale, np.zeros((size, size)))


def _window(cv: _Canvas, points, margin: float):
    """Pixel slices covering the anatomy box around `points` grown by `margin`; None when off the image."""
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    lo, hi = points.min(0) - margin, points.max(0) + margin
    corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [lo[0], hi[1]], [hi[0], hi[1]]]) @ cv.matrix.T + cv.offset
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 1, cv.size)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _ellipse_rho(u, v, center, rx, ry, angle):
    """Normalised elliptic radius: 1 on the ellipse."""
    cos, sin = math.cos(angle), math.sin(angle)
    du, dv = u - center[0], v - center[1]
    return np.hypot((cos * du + sin * dv) / rx, (cos * dv - sin * du) / ry)


def _blob(cv, center, rx, ry, value, angle=0.0, soft=2.0):
    """Soft-tissue ellipse of uniform density whose edge fades over `soft` pixels."""
    win = _window(cv, [center], max(rx, ry) + 2 * soft * cv.pixel)
    if win is not None:
        rho = _ellipse_rho(cv.u[win], cv.v[win], center, rx, ry, angle)
        cv.density[win] += value * np.clip((1.0 - rho) * min(rx, ry) / (soft * cv.pixel) + 0.5, 0.0, 1.0)


def _tube(cv, p0, p1, radius, value, soft=2.0):
    """Soft-tissue capsule of uniform density around the segment p0-p1 (a finger, a thigh)."""
    win = _window(cv, [p0, p1], radius + 2 * soft * cv.pixel)
    if win is None:
        return
    u, v = cv.u[win] - p0[0], cv.v[win] - p0[1]
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip((u * dx + v * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    distance = np.hypot(u - t * dx, v - t * dy)
    cv.density[win] += value * np.clip((radius - distance) / (soft * cv.pixel) + 0.5, 0.0, 1.0)


def _ring(cv, center, rx, ry, width, value, angle=0.0):
    """A thin bony ring (pelvic brim; pubic and ischial rami around an obturator foramen)."""
    win = _window(cv, [center], max(rx, ry) + width + 2 * cv.pixel)
    if win is not None:
        distance = np.abs(_ellipse_rho(cv.u[win], cv.v[win], center, rx, ry, angle) - 1.0) * min(rx, ry)
        cv.density[win] += value * np.clip((0.5 * width - distance) / cv.pixel + 0.5, 0.0, 1.0)


def _cortical(rho, radius_px):
    """Density across a bone at normalised radius rho (1 = surface): marrow plus a brighter cortex."""
    inside = np.clip((1.0 - rho) * radius_px + 0.5, 0.0, 1.0)
    return inside * (0.55 + 0.45 * np.clip((rho - 0.68) * 6.0, 0.0, 1.0))


def _ossicle(cv, center, rx, ry, value, angle=0.0):
    """A round bone (carpal, tarsal, patella, epiphysis) with a bright rim."""
    win = _window(cv, [center], max(rx, ry) + 2 * cv.pixel)
    if win is not None:
        rho = _ellipse_rho(cv.u[win], cv.v[win], center, rx, ry, angle)
        cv.density[win] += value * _cortical(rho, min(rx, ry) / cv.pixel)


# ------------------------------------------------------------------------------------------------ tubular bones


@dataclass(frozen=True)
class _Bone:
    """A tubular bone from p0 to p1: shaft radius, metaphyseal flares and end caps at each end, growth plates."""

    p0: tuple[float, float]
    p1: tuple[float, float]
    r: float
    flare: tuple[float, float] = (0.2, 0.2)  # extra radius (fraction of r) at the p0 and p1 ends
    flare_len: float = 0.15  # how far along the bone (fraction of its length) a flare reaches
    cap: tuple[float, float] = (1.0, 1.0)  # end-cap length as a fraction of the local radius
    physes: tuple[float, ...] = ()  # growth-plate positions along the bone (0 = p0, 1 = p1)
    value: float = 1.0
    fracture: tuple[float, float, float, float] | None = None  # position, obliquity, shift (in r), angulation
    periosteal: tuple[float, float, float] | None = None  # start, end (along the bone), thickness (in r)


def _draw_bone(cv: _Canvas, bone: _Bone, physis_depth: float) -> None:
    (x0, y0), (x1, y1) = bone.p0, bone.p1
    length = math.hypot(x1 - x0, y1 - y0)
    ax, ay = (x1 - x0) / length, (y1 - y0) / length
    win = _window(cv, [bone.p0, bone.p1], 2.0 * bone.r * (1.0 + max(bone.flare)) + 3 * cv.pixel)
    if win is None:
        return
    du, dv = cv.u[win] - x0, cv.v[win] - y0
    t, w = (du * ax + dv * ay) / length, dv * ax - du * ay
    lucency = 1.0
    if bone.fracture is not None:
        w, lucency = _fracture_geometry(t, w, bone, length, cv.pixel)
    ends = np.exp(-((t / bone.flare_len) ** 2)), np.exp(-(((1.0 - t) / bone.flare_len) ** 2))
    r = bone.r * (1.0 + bone.flare[0] * ends[0] + bone.flare[1] * ends[1])
    over = np.maximum(-t, 0.0) / bone.cap[0] + np.maximum(t - 1.0, 0.0) / bone.cap[1]
    density = _cortical(np.hypot(w / r, over * length / r), r / cv.pixel)
    plate = max(0.16 * bone.r, 1.1 * cv.pixel)
    for position in bone.physes:
        density = density * (1.0 - physis_depth * np.exp(-((((t - position) * length) / plate) ** 2)))
    density = density * lucency
    if bone.periosteal is not None:
        density = density + _periosteal_layer(t, w, r, bone, cv.pixel)
    cv.density[win] += bone.value * density


def _fracture_geometry(t, w, bone: _Bone, length: float, pixel: float):
    """Shift and angulate the shorter fragment; return the new offsets and the lucent fracture line (a multiplier)."""
    position, obliquity, shift, angulation = bone.fracture
    s = t + obliquity * w / length
    moved = s > position if position >= 0.5 else s < position  # the shorter fragment is the one displaced
    w = w - moved * (shift * bone.r + angulation * (t - position) * length)
    gap = max(0.3 * bone.r, 1.5 * pixel)
    return w, 1.0 - 0.9 * np.exp(-((((s - position) * length) / gap) ** 2))


def _periosteal_layer(t, w, r, bone: _Bone, pixel: float):
    """A thin bright layer of new bone just outside the cortex, tapering at both ends of its stretch."""
    start, end, thickness = bone.periosteal
    along = np.clip(np.minimum(t - start, end - t) / (0.2 * (end - start)), 0.0, 1.0)
    thick = max(thickness * bone.r, 2.0 * pixel)
    offset = np.abs(w) - r - max(0.15 * bone.r, 1.0 * pixel) - 0.5 * thick
    return 0.95 * along * np.clip((0.5 * thick - np.abs(offset)) / pixel + 0.5, 0.0, 1.0)


def _fractured(bone: _Bone, finding: Finding, rng: np.random.Generator) -> _Bone:
    lo, hi = finding.site.span
    shift = (0.5 + 0.6 * finding.severity) * rng.choice((-1.0, 1.0))
    angulation = (0.05 + 0.15 * finding.severity) * rng.choice((-1.0, 1.0))
    return replace(bone, fracture=(rng.uniform(lo, hi), rng.uniform(-0.6, 0.6), shift, angulation))


def _with_periosteal_reaction(bone: _Bone, finding: Finding, rng: np.random.Generator) -> _Bone:
    lo, hi = finding.site.span
    stretch = rng.uniform(0.5, 0.85) * (hi - lo)
    start = rng.uniform(lo, hi - stretch)
    return replace(bone, periosteal=(start, start + stretch, 0.45 + 0.4 * finding.severity))


def _injure_bones(bones: dict, findings: Sequence[Finding], rng: np.random.Generator) -> dict:
    """The bones with each fracture or periosteal reaction applied to its site's bone."""
    bones = dict(bones)
    for finding in findings:
        if finding.name == "fracture":
            bones[finding.site.key] = _fractured(bones[finding.site.key], finding, rng)
        elif finding.name == "periosteal reaction":
            bones[finding.site.key] = _with_periosteal_reaction(bones[finding.site.key], finding, rng)
    return bones


def _physis_depth(age: float) -> float:
    """How dark growth plates are: wide open in infants, nearly closed in late teens."""
    return float(np.clip((17.5 - age) / 6.0, 0.15, 0.85))


def _unit(angle: float) -> tuple[float, float]:
    """Direction `angle` radians from straight up (towards +u for positive angles)."""
    return math.sin(angle), -math.cos(angle)


def _ray(bones: dict, names, start, direction, lengths, radii, physes, gap=0.03):
    """A chain of tubular bones (metacarpal + phalanges, metatarsal + toe); returns the tip of the last one."""
    x, y = start
    for name, length, radius, plates in zip(names, lengths, radii, physes):
        end = (x + direction[0] * length, y + direction[1] * length)
        bones[name] = _Bone((x, y), end, radius, flare=(0.35, 0.3), flare_len=0.14, cap=(0.7, 0.7), physes=plates)
        x, y = end[0] + direction[0] * gap, end[1] + direction[1] * gap
    return end


# ------------------------------------------------------------------------------------------------ limb views


@dataclass(frozen=True)
class _Scene:
    """What a renderer needs for one image; the three generators keep anatomy independent of the findings."""

    size: int
    age: float
    side: str
    pose: _Pose
    findings: tuple[Finding, ...]
    anatomy_rng: np.random.Generator
    finding_rng: np.random.Generator


@dataclass
class _Limb:
    """One skeletal view: field of view, layers drawn first (soft tissue, rings), bones, round bones, effusions."""

    center: tuple[float, float]
    zoom: float
    layers: list  # (primitive, args)
    bones: dict  # name -> _Bone
    ossicles: dict  # name -> (center, rx, ry, value, angle)
    effusion: tuple = ()  # (center, rx, ry, angle) soft-tissue bulges of a joint effusion


def _render_limb(scene: _Scene, limb: _Limb) -> _Canvas:
    cv = _make_canvas(scene.size, scene.pose, limb.center, limb.zoom)
    for draw, args in limb.layers:
        draw(cv, *args)
    for finding in scene.findings:
        if finding.name == "joint effusion":
            _draw_joint_effusion(cv, limb.effusion, finding)
    bones = _injure_bones(limb.bones, scene.findings, scene.finding_rng)
    for bone in bones.values():
        if bone.fracture is not None:
            _draw_fracture_swelling(cv, bone)
    depth = _physis_depth(scene.age)
    for bone in bones.values():
        _draw_bone(cv, bone, depth)
    for args in limb.ossicles.values():
        _ossicle(cv, *args)
    return cv


def _draw_joint_effusion(cv: _Canvas, bulges, finding: Finding) -> None:
    grow = 0.85 + 0.45 * finding.severity
    for center, rx, ry, angle in bulges:
        _blob(cv, center, rx * grow, ry * grow, 0.26 + 0.14 * finding.severity, angle, soft=3.0)


def _draw_fracture_swelling(cv: _Canvas, bone: _Bone) -> None:
    """Soft-tissue swelling around a fracture."""
    t = bone.fracture[0]
    center = (bone.p0[0] + t * (bone.p1[0] - bone.p0[0]), bone.p0[1] + t * (bone.p1[1] - bone.p0[1]))
    angle = math.atan2(bone.p1[1] - bone.p0[1], bone.p1[0] - bone.p0[0])
    rx, ry = max(min(6.0 * bone.r, 0.3), 8.0 * cv.pixel), max(min(3.5 * bone.r, 0.18), 5.0 * cv.pixel)
    _blob(cv, center, rx, ry, 0.2, angle, soft=4.0)


def _ossification(age: float, onset: float) -> float:
    """Relative size of an ossification centre `age - onset` years after it appears."""
    return float(np.clip(0.35 + (age - onset) / 4.0, 0.35, 1.0))


_FINGERS = (  # metacarpal base, angle from straight up, metacarpal and phalanx lengths (index to little finger)
    ((-0.15, 0.27), -0.14, (0.41, 0.26, 0.16, 0.1)),
    ((-0.05, 0.25), -0.04, (0.41, 0.29, 0.18, 0.11)),
    ((0.05, 0.26), 0.07, (0.38, 0.27, 0.17, 0.11)),
    ((0.14, 0.29), 0.18, (0.34, 0.21, 0.13, 0.09)),
)
_CARPALS = (  # centre, rx, ry, angle, ossification age in years (capitate, hamate, triquetrum, lunate, trapezium,
    # trapezoid, scaphoid, pisiform)
    ((0.0, 0.39), 0.07, 0.1, 0.0, 0.2), ((0.11, 0.4), 0.06, 0.085, 0.2, 0.3), ((0.15, 0.51), 0.05, 0.05, 0.0, 2.5),
    ((0.03, 0.51), 0.055, 0.05, 0.0, 3.5), ((-0.16, 0.4), 0.05, 0.055, 0.3, 5.0),
    ((-0.08, 0.36), 0.045, 0.05, 0.0, 5.5),
    ((-0.1, 0.49), 0.045, 0.075, 0.6, 5.5), ((0.17, 0.46), 0.03, 0.03, 0.0, 10.0),
)  # fmt: skip


def _hand_limb(age: float, rng: np.random.Generator, center, zoom: float) -> _Limb:
    """PA right hand (thumb towards -u) with the distal forearm; the wrist view zooms in on the carpus."""
    spread, size = rng.uniform(0.7, 1.4), rng.uniform(0.94, 1.06)
    layers = [(_blob, ((0.0, 0.2), 0.35, 0.33, 0.3)), (_tube, ((0.02, 1.8), (0.02, 0.5), 0.31, 0.3))]
    bones = {}
    for i, (base, angle, lengths) in enumerate(_FINGERS, start=2):
        names = (f"mc{i}", f"pp{i}", f"mp{i}", f"dp{i}")
        radii, plates = (0.034, 0.03, 0.026, 0.022), ((0.9,), (0.1,), (0.12,), (0.15,))
        tip = _ray(bones, names, base, _unit(angle * spread), np.multiply(lengths, size), radii, plates)
        layers.append((_tube, (bones[f"pp{i}"].p0, tip, 0.062, 0.3)))
    thumb = _unit(-rng.uniform(0.6, 0.9))
    lengths, radii, plates = np.multiply((0.27, 0.2, 0.14), size), (0.038, 0.032, 0.026), ((0.1,), (0.1,), (0.15,))
    tip = _ray(bones, ("mc1", "pp1", "dp1"), (-0.19, 0.36), thumb, lengths, radii, plates)
    layers.append((_tube, (bones["mc1"].p0, tip, 0.07, 0.3)))
    bones["radius"] = _Bone((-0.09, 1.8), (-0.08, 0.62), 0.08, (0.0, 0.9), 0.12, (1.0, 0.35), (0.955,))
    bones["ulna"] = _Bone((0.14, 1.8), (0.13, 0.66), 0.058, (0.0, 0.45), 0.12, (1.0, 0.5), (0.96,))
    ossicles = {}
    for i, (middle, rx, ry, angle, onset) in enumerate(_CARPALS):
        if age >= onset:
            grow = _ossification(age, onset)
            ossicles[f"carpal{i}"] = (middle, rx * grow, ry * grow, 0.9, angle)
    return _Limb(center, zoom, layers, bones, ossicles)


def _forearm_limb(age: float, rng: np.random.Generator) -> _Limb:
    """AP right forearm: radius and ulna from the elbow (bottom) to the wrist (top)."""
    bow = rng.uniform(-0.04, 0.04)
    layers = [(_tube, ((0.0, -1.4), (0.0, 1.4), rng.uniform(0.32, 0.36), 0.3)), (_blob, ((0.0, 1.0), 0.45, 0.3, 0.08))]
    bones = {
        "radius": _Bone((-0.08, 0.95), (-0.17 + bow, -0.95), 0.052, (0.35, 1.0), 0.07, (0.8, 0.35), (0.03, 0.975)),
        "ulna": _Bone((0.13, 1.06), (0.1 + bow, -0.9), 0.05, (0.9, 0.35), 0.08, (0.8, 0.5), (0.975,)),
        "humerus": _Bone((0.02, 1.9), (0.02, 1.03), 0.1, (0.0, 1.6), 0.15, (1.0, 0.3), (0.96,)),
    }
    ossicles = {f"carpal{i}": ((-0.14 + 0.1 * i, -1.1), 0.045, 0.05, 0.8, 0.0) for i in range(int(min(4, 1 + age / 2)))}
    return _Limb((0.0, 0.0), 0.95, layers, bones, ossicles)


def _elbow_limb(age: float, rng: np.random.Generator) -> _Limb:
    """Lateral right elbow flexed about 90 degrees: humerus from the left, forearm pointing up."""
    forearm = _unit(rng.uniform(1.35, 1.8) - math.pi / 2)

    def along(point, length):
        return point[0] + forearm[0] * length, point[1] + forearm[1] * length

    radius0, ulna0 = (0.02, -0.05), (0.14, 0.12)
    layers = [(_tube, ((-1.8, 0.32), (0.05, 0.05), 0.33, 0.3)), (_tube, ((0.08, 0.05), along((0.08, 0.05), 1.9), 0.29,
              0.3)), (_blob, ((0.03, 0.02), 0.36, 0.34, 0.1))]  # fmt: skip
    bones = {
        "humerus": _Bone((-1.7, 0.3), (0.0, 0.06), 0.105, (0.0, 0.8), 0.1, (1.0, 0.5), (0.965,)),
        "radius": _Bone(radius0, along(radius0, 1.8), 0.05, (0.6, 0.3), 0.05, (0.6, 1.0), (0.04,)),
        "ulna": _Bone(ulna0, along(ulna0, 1.9), 0.055, (1.3, 0.3), 0.07, (0.7, 1.0)),
    }
    ossicles = {}
    if age >= 1.0:
        grow = _ossification(age, 1.0)
        ossicles["capitellum"] = ((0.04, 0.05), 0.085 * grow, 0.08 * grow, 0.85, 0.0)
    if age >= 5.0:
        ossicles["epicondyle"] = ((-0.04, 0.17), 0.035, 0.04, 0.8, 0.0)
    effusion = (((-0.2, -0.17), 0.22, 0.1, -0.35), ((-0.24, 0.25), 0.22, 0.09, 0.25))
    return _Limb((-0.15, -0.3), 1.35, layers, bones, ossicles, effusion)


def _knee_limb(age: float, rng: np.random.Generator) -> _Limb:
    """AP right knee: distal femur, proximal tibia and fibula with growth plates, patella over the femur."""
    width = rng.uniform(0.92, 1.08)
    layers = [(_tube, ((0.0, -1.8), (0.0, 1.8), 0.56 * width, 0.3)), (_blob, ((0.0, -0.05), 0.62, 0.45, 0.08))]
    bones = {
        "femur": _Bone((0.02, -1.7), (0.0, -0.05), 0.15 * width, (0.0, 1.5), 0.12, (1.0, 0.42), (0.925,)),
        "tibia": _Bone((0.0, 1.7), (0.0, 0.06), 0.135 * width, (0.0, 1.6), 0.1, (1.0, 0.3), (0.935,)),
        "fibula": _Bone((0.31, 1.7), (0.3, 0.28), 0.045 * width, (0.0, 0.8), 0.1, (1.0, 0.7), (0.95,)),
    }
    ossicles = {}
    if age >= 3.0:
        grow = _ossification(age, 3.0)
        ossicles["patella"] = ((0.0, -0.15), 0.13 * grow, 0.16 * grow, 0.5, 0.0)
    effusion = (((0.0, -0.42), 0.33, 0.22, 0.0), ((-0.56, -0.2), 0.12, 0.3, 0.0), ((0.56, -0.2), 0.12, 0.3, 0.0))
    return _Limb((0.0, 0.0), 1.0, layers, bones, ossicles, effusion)


_TOES = (  # metatarsal base, angle, metatarsal and phalanx lengths and radii (great toe to little toe)
    ((-0.17, 0.24), -0.1, (0.42, 0.2, 0.13), (0.055, 0.045, 0.04)),
    ((-0.07, 0.22), -0.04, (0.5, 0.15, 0.06, 0.05), (0.035, 0.026, 0.022, 0.02)),
    ((0.01, 0.23), 0.02, (0.47, 0.14, 0.06, 0.05), (0.033, 0.025, 0.021, 0.02)),
    ((0.09, 0.25), 0.08, (0.44, 0.12, 0.05, 0.05), (0.032, 0.024, 0.02, 0.019)),
    ((0.17, 0.28), 0.15, (0.4, 0.1, 0.05, 0.045), (0.034, 0.023, 0.02, 0.018)),
)
_TARSALS = (  # centre, rx, ry, angle, ossification age (talus, calcaneus, navicular, cuboid, three cuneiforms)
    ((0.0, 0.8), 0.2, 0.16, 0.2, 0.0), ((0.12, 0.97), 0.2, 0.2, 0.0, 0.0), ((-0.1, 0.53), 0.15, 0.07, -0.2, 3.0),
    ((0.15, 0.48), 0.1, 0.11, 0.3, 0.0), ((-0.16, 0.34), 0.065, 0.09, 0.0, 2.0), ((-0.06, 0.34), 0.05, 0.075, 0.0, 3.0),
    ((0.04, 0.35), 0.055, 0.08, 0.0, 1.0),
)  # fmt: skip


def _foot_limb(age: float, rng: np.random.Generator) -> _Limb:
    """AP right foot, toes up (great toe towards -u), tarsals at the bottom."""
    spread = rng.uniform(0.7, 1.3)
    layers = [(_blob, ((0.0, -0.1), 0.33, 0.55, 0.3, 0.0, 3.0)), (_blob, ((0.04, 0.62), 0.3, 0.55, 0.3, 0.0, 3.0))]
    bones = {}
    for i, (base, angle, lengths, radii) in enumerate(_TOES, start=1):
        names = (f"mt{i}", f"pp{i}", f"dp{i}") if i == 1 else (f"mt{i}", f"pp{i}", f"mp{i}", f"dp{i}")
        plates = ((0.08,) if i == 1 else (0.92,),) + ((0.12,),) * (len(names) - 1)
        tip = _ray(bones, names, base, _unit(angle * spread), lengths, radii, plates, gap=0.025)
        layers.append((_tube, (bones[f"pp{i}"].p0, tip, 1.6 * radii[1] + 0.02, 0.3)))
    bones["mt5"] = replace(bones["mt5"], flare=(0.9, 0.3))  # the tuberosity at its base
    ossicles = {}
    for i, (middle, rx, ry, angle, onset) in enumerate(_TARSALS):
        if age >= onset:
            grow = _ossification(age, onset - 1.5)
            ossicles[f"tarsal{i}"] = (middle, rx * grow, ry * grow, 0.75, angle)
    return _Limb((0.0, 0.2), 1.2, layers, bones, ossicles)


def _hip_limb(age: float, rng: np.random.Generator) -> _Limb:
    """AP pelvis with both hips; the patient's right hip is on the image left."""
    grow = float(np.clip(0.45 + age / 12.0, 0.45, 1.0))
    layers = [(_blob, ((0.0, 0.1), 1.15, 0.95, 0.36, 0.0, 5.0)), (_ring, ((0.0, -0.15), 0.42, 0.33, 0.035, 0.35))]
    for _ in range(3):  # bowel gas
        gas = (rng.uniform(-0.3, 0.3), rng.uniform(-0.75, -0.2))
        layers.append((_blob, (gas, rng.uniform(0.05, 0.1), rng.uniform(0.03, 0.06), -0.15)))
    ossicles = {"sacrum": ((0.0, -0.45), 0.17, 0.3, 0.35, 0.0), "l5": ((0.0, -0.92), 0.15, 0.08, 0.6, 0.0)}
    bones = {}
    for side, s in (("right", -1.0), ("left", 1.0)):
        layers.append((_tube, ((s * 0.62, 0.5), (s * 0.64, 1.8), 0.36, 0.12)))
        layers.append((_ring, ((s * 0.27, 0.34), 0.17, 0.12, 0.045, 0.55)))
        ossicles[f"ilium_{side}"] = ((s * 0.52, -0.52), 0.38, 0.25, 0.24, -s * 0.55)
        ossicles[f"roof_{side}"] = ((s * 0.43, -0.08), 0.18, 0.06, 0.45, -s * 0.15)
        ossicles[f"head_{side}"] = ((s * 0.45, 0.03), 0.13 * grow, 0.105 * grow, 0.85, 0.0)
        if age >= 3.0:
            ossicles[f"trochanter_{side}"] = ((s * 0.74, 0.2), 0.07, 0.1, 0.5, 0.0)
        bones[f"neck_{side}"] = _Bone((s * 0.7, 0.36), (s * 0.53, 0.2), 0.08, (0.0, 0.6), 0.15, (1.0, 0.4))
        bones[f"shaft_{side}"] = _Bone((s * 0.66, 1.8), (s * 0.68, 0.24), 0.1, (0.0, 0.6), 0.15, (1.0, 0.8))
    return _Limb((0.0, 0.0), 1.0, layers, bones, ossicles)


def _slipped_head(head, side_sign: float, finding: Finding) -> dict:
    """Slipped capital femoral epiphysis: the epiphysis slides inferomedially off the neck and tilts."""
    (x, y), rx, ry, value, _ = head
    slip = 0.05 + 0.05 * finding.severity
    return {"head": ((x - side_sign * 0.7 * slip, y + 1.2 * slip), rx, 0.8 * ry, value, side_sign * 0.5)}


def _perthes_head(head, finding: Finding) -> dict:
    """Perthes disease: a collapsed (flat), dense, fragmented femoral head."""
    (x, y), rx, ry, value, _ = head
    flat = ry * (0.55 - 0.25 * finding.severity)
    y = y + ry - flat
    return {"head_a": ((x - 0.45 * rx, y), 0.5 * rx, flat, 1.9 * value, 0.1),
            "head_b": ((x + 0.45 * rx, y), 0.45 * rx, 0.9 * flat, 1.9 * value, -0.1)}  # fmt: skip


def _render_hip(scene: _Scene) -> _Canvas:
    limb = _hip_limb(scene.age, scene.anatomy_rng)
    side_sign = -1.0 if scene.side == "right" else 1.0
    head = limb.ossicles.pop(f"head_{scene.side}")
    pieces = {"head": head}
    for finding in scene.findings:
        if finding.name == "slipped capital femoral epiphysis":
            pieces = _slipped_head(head, side_sign, finding)
        elif finding.name == "perthes disease":
            pieces = _perthes_head(head, finding)
    limb.ossicles.update({f"{name}_{scene.side}": piece for name, piece in pieces.items()})
    return _render_limb(scene, limb)


def _render_hand(scene: _Scene) -> _Canvas:
    return _render_limb(scene, _hand_limb(scene.age, scene.anatomy_rng, (0.0, 0.08), 0.95))


def _render_wrist(scene: _Scene) -> _Canvas:
    return _render_limb(scene, _hand_limb(scene.age, scene.anatomy_rng, (0.0, 0.5), 2.0))


def _render_forearm(scene: _Scene) -> _Canvas:
    return _render_limb(scene, _forearm_limb(scene.age, scene.anatomy_rng))


def _render_elbow(scene: _Scene) -> _Canvas:
    return _render_limb(scene, _elbow_limb(scene.age, scene.anatomy_rng))


def _render_knee(scene: _Scene) -> _Canvas:
    return _render_limb(scene, _knee_limb(scene.age, scene.anatomy_rng))


def _render_foot(scene: _Scene) -> _Canvas:
    return _render_limb(scene, _foot_limb(scene.age, scene.anatomy_rng))


# ------------------------------------------------------------------------------------------------ chest


class _Lungs(NamedTuple):
    cx: float  # distance of each lung's axis from the midline
    half_width: float
    apex: float
    dome: float  # height of the diaphragm domes


def _lung_field(cv: _Canvas, lungs: _Lungs, side: int):
    """Mask (0..1) of one lung (side -1: the patient's right, on the image left) and each pixel's lateral position."""
    cx = side * lungs.cx
    lateral = side * (cv.u - cx) / lungs.half_width
    depth = np.clip((cv.v - lungs.apex) / (lungs.dome - lungs.apex), 0.0, 1.25)
    half = lungs.half_width * np.where(lateral > 0, 1.0, 0.7) * np.sqrt(depth) * (0.8 + 0.3 * depth)
    dome = lungs.dome - (0.04 if side < 0 else 0.0) + 0.1 * (lateral + 0.2) ** 2
    soft = 1.5 * cv.pixel
    mask = np.clip((half - np.abs(cv.u - cx)) / soft + 0.5, 0.0, 1.0) * np.clip((dome - cv.v) / soft + 0.5, 0.0, 1.0)
    return mask * np.clip((cv.v - lungs.apex) / soft + 0.5, 0.0, 1.0), lateral


def _chest_wall(cv: _Canvas, lungs: _Lungs, rng: np.random.Generator) -> None:
    """Trunk, neck, shoulders, arms, spine, mediastinum, clavicles and the gastric bubble."""
    _blob(cv, (0.0, 0.25), rng.uniform(0.88, 0.98), 1.2, 0.42, soft=4.0)
    _blob(cv, (0.0, -1.05), 0.22, 0.3, 0.3)
    for s in (-1.0, 1.0):
        _blob(cv, (s * 0.8, -0.82), 0.34, 0.2, 0.3)
        _tube(cv, (s * 0.98, -0.75), (s * 1.04, 0.7), 0.15, 0.3)
        _ossicle(cv, (s * 0.86, -0.8), 0.1, 0.12, 0.7)
        _draw_bone(cv, _Bone((s * 0.06, -0.74), (s * 0.6, -0.86), 0.03, value=0.8), 0.0)
    _tube(cv, (0.0, -1.3), (0.0, 1.3), 0.075, 0.3)
    _blob(cv, (0.0, -0.38), 0.12, 0.42, 0.12)
    _blob(cv, (0.3, lungs.dome + 0.2), 0.09, 0.05, -0.18)


def _ribs(cv: _Canvas, lungs: _Lungs, rng: np.random.Generator) -> None:
    """Posterior ribs: curved bands rising from the spine and falling laterally, over the thorax."""
    u, v = cv.u, cv.v
    spacing, tilt = rng.uniform(0.12, 0.14), rng.uniform(0.4, 0.5)
    phase = (v + tilt * np.abs(u) - 1.0 * u * u - lungs.apex) / spacing
    band = np.exp(-(((phase - np.round(phase)) / 0.16) ** 2))
    reach = lungs.cx + 1.35 * lungs.half_width
    region = np.clip((reach - np.abs(u)) / 0.05, 0.0, 1.0) * np.clip((np.abs(u) - 0.06) / 0.03, 0.0, 1.0)
    region *= np.clip((lungs.dome + 0.2 - v) / 0.05, 0.0, 1.0) * np.clip((v - lungs.apex + 0.12) / 0.05, 0.0, 1.0)
    cv.density += 0.11 * band * region


def _draw_heart(cv: _Canvas, lungs: _Lungs, air: np.ndarray, rng: np.random.Generator, cardiomegaly) -> None:
    """The heart displaces lung: its silhouette shows where it overlaps the air of the lung fields."""
    rx, ry = rng.uniform(0.35, 0.39), rng.uniform(0.21, 0.24)
    x, y = rng.uniform(0.08, 0.12), lungs.dome - rng.uniform(0.08, 0.12)
    if cardiomegaly is not None:
        grow = 1.3 + 0.25 * cardiomegaly.severity
        rx, ry, x, y = rx * grow, ry * (0.4 + 0.6 * grow), x + 0.12 * (grow - 1.0), y + 0.02
    heart = np.clip((1.0 - _ellipse_rho(cv.u, cv.v, (x, y), rx, ry, -0.3)) * ry / (2.5 * cv.pixel) + 0.5, 0.0, 1.0)
    cv.density += heart * (0.3 * air + 0.05)


def _lung_markings(cv: _Canvas, lungs: _Lungs, rng: np.random.Generator) -> None:
    """Hila and vessels branching out from them."""
    for side in (-1, 1):
        hilum = (side * 0.15, lungs.apex + 0.62 * (lungs.dome - lungs.apex))
        _blob(cv, hilum, 0.05, 0.09, 0.1)
        for angle in rng.uniform(-1.2, 1.2, 7):
            length = rng.uniform(0.2, 0.4)
            end = (hilum[0] + side * math.cos(angle) * length, hilum[1] + math.sin(angle) * length)
            _tube(cv, hilum, end, max(0.008, 0.6 * cv.pixel), 0.04, soft=1.0)


def _coarse_noise(size: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth multiplicative texture in [0.6, 1]: a random grid of `cells` x `cells`, bilinearly upsampled."""
    grid = rng.uniform(0.6, 1.0, (cells + 1, cells + 1))
    position = np.linspace(0.0, cells, size)
    lo = np.minimum(position.astype(int), cells - 1)
    weights = np.zeros((size, cells + 1))
    weights[np.arange(size), lo] = 1.0 - (position - lo)
    weights[np.arange(size), lo + 1] = position - lo
    return weights @ grid @ weights.T


_LOBE_POSITIONS = {"upper": (0.15, 0.35), "middle": (-0.35, 0.72), "lower": (0.45, 0.88)}  # (lateral, depth)


def _draw_consolidation(cv: _Canvas, fields, lungs: _Lungs, finding: Finding, rng: np.random.Generator) -> None:
    """Patchy, mottled airspace opacity in one lobe, confined to its lung."""
    side_name, lobe = finding.site.key.split("_")
    side = -1 if side_name == "right" else 1
    lateral, depth = _LOBE_POSITIONS[lobe]
    cu, cy = side * (lungs.cx + lateral * lungs.half_width), lungs.apex + depth * (lungs.dome - lungs.apex)
    spread = 0.05 + 0.06 * finding.severity
    opacity = np.zeros_like(cv.density)
    for _ in range(int(rng.integers(4, 8))):
        x, y = cu + rng.normal(0.0, spread), cy + rng.normal(0.0, spread)
        sigma = rng.uniform(0.06, 0.1) * (0.8 + 0.6 * finding.severity)
        opacity += rng.uniform(0.6, 1.0) * np.exp(-((cv.u - x) ** 2 + (cv.v - y) ** 2) / (2.0 * sigma * sigma))
    texture = _coarse_noise(cv.size, rng, cells=12)
    cv.density += 0.32 * np.clip(1.5 * opacity, 0.0, 1.0) * texture * fields[side][0]


def _draw_pleural_effusion(cv: _Canvas, fields, lungs: _Lungs, finding: Finding) -> None:
    """Fluid at a lung base whose surface (meniscus) climbs the lateral chest wall, blunting the costophrenic angle."""
    mask, lateral = fields[-1 if finding.site.key == "right" else 1]
    height = 0.1 + 0.25 * finding.severity
    level = lungs.dome + 0.1 - height - 0.15 * ((np.clip(lateral, -1.0, 1.3) + 1.0) / 2.0) ** 2
    cv.density += 0.3 * np.clip((cv.v - level) / (2.0 * cv.pixel) + 0.5, 0.0, 1.0) * mask


def _render_chest(scene: _Scene) -> _Canvas:
    """PA chest: the patient's right on the image left."""
    rng = scene.anatomy_rng
    cv = _make_canvas(scene.size, scene.pose, zoom=0.92)
    lungs = _Lungs(rng.uniform(0.33, 0.38), rng.uniform(0.26, 0.3), rng.uniform(-0.8, -0.7), rng.uniform(0.3, 0.4))
    _chest_wall(cv, lungs, rng)
    fields = {side: _lung_field(cv, lungs, side) for side in (-1, 1)}
    air = fields[-1][0] + fields[1][0]
    cv.density -= 0.3 * air
    _ribs(cv, lungs, rng)
    findings = {finding.name: finding for finding in scene.findings}
    _draw_heart(cv, lungs, air, rng, findings.get("cardiomegaly"))
    _lung_markings(cv, lungs, rng)
    if "consolidation" in findings:
        _draw_consolidation(cv, fields, lungs, findings["consolidation"], scene.finding_rng)
    if "pleural effusion" in findings:
        _draw_pleural_effusion(cv, fields, lungs, findings["pleural effusion"])
    return cv


_RENDERERS: dict[str, Callable[[_Scene], _Canvas]] = {
    "chest": _render_chest, "wrist": _render_wrist, "hand": _render_hand, "forearm": _render_forearm,
    "elbow": _render_elbow, "knee": _render_knee, "hip": _render_hip, "foot": _render_foot,
}  # fmt: skip

# ------------------------------------------------------------------------------------------------ exposure

_MARKER_GLYPHS = {
    "L": ("1....", "1....", "1....", "1....", "1....", "1....", "11111"),
    "R": ("1111.", "1...1", "1...1", "1111.", "1.1..", "1..1.", "1...1"),
}


def _draw_marker(density: np.ndarray, part: str, side: str, rng: np.random.Generator) -> None:
    """A lead side marker: 'R' or 'L' in a top corner (for chest and pelvis, on the patient's side it names)."""
    size = density.shape[0]
    if part in ("chest", "hip"):
        letter = "R" if rng.random() < 0.5 else "L"
        on_left = letter == "R"
    else:
        letter, on_left = side[0].upper(), bool(rng.random() < 0.5)
    glyph = np.array([[c == "1" for c in row] for row in _MARKER_GLYPHS[letter]], dtype=float)
    mark = np.kron(glyph, np.ones((max(1, size // 48),) * 2))
    height, width = mark.shape
    margin = int(rng.integers(2, max(3, size // 12)))
    x = margin if on_left else size - margin - width
    region = density[margin : margin + height, x : x + width]
    region[...] = np.maximum(region, 3.0 * mark)


def _expose(density: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Attenuation to an 8-bit image: saturating exposure, fog, gamma and signal-dependent (quantum) plus read noise."""
    k = rng.uniform(1.0, 1.5)
    image = (1.0 - np.exp(-k * np.maximum(density, 0.0))) / (1.0 - math.exp(-2.2 * k))
    fog = rng.uniform(0.0, 0.08)
    image = (fog + (1.0 - fog) * np.clip(image, 0.0, 1.0)) ** rng.uniform(0.75, 1.3)
    photons = rng.uniform(400.0, 2500.0)
    image = image + rng.standard_normal(image.shape) * np.sqrt((image + 0.02) / photons)
    image = image + rng.normal(0.0, 0.006, image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _render_image(part: str, findings, rng: np.random.Generator, size: int, age: float, side: str) -> np.ndarray:
    """One radiograph; pose, anatomy, findings and noise draw from separate child generators of `rng`."""
    pose_rng, anatomy_rng, finding_rng, noise_rng = rng.spawn(4)
    angle, scale = float(pose_rng.uniform(-0.2, 0.2)), float(pose_rng.uniform(0.9, 1.1))
    shift = tuple(float(x) for x in pose_rng.uniform(-0.07, 0.07, 2))
    pose = _Pose(angle, scale, shift, side == "left" and part not in ("chest", "hip"))
    scene = _Scene(size, age, side, pose, tuple(findings), anatomy_rng, finding_rng)
    density = _RENDERERS[part](scene).density
    if pose_rng.random() < 0.75:
        _draw_marker(density, part, side, pose_rng)
    return _expose(density, noise_rng)


def render_xray(
    body_part: str,
    findings: Sequence[str] = (),
    seed: int = 0,
    image_size: int = 128,
    age_years: float = 8.0,
    side: str = "right",
) -> np.ndarray:
    """Render one synthetic radiograph as a `[image_size, image_size]` uint8 array.

    The same seed with and without findings gives the same anatomy, pose and noise, so the two differ only by the
    findings (their sites and severities are drawn from the seed too).
    """
    if body_part not in _RENDERERS:
        raise ValueError(f"body_part={body_part!r}; rendered parts are {RENDERED_BODY_PARTS}")
    unknown = set(findings) - set(FINDINGS_BY_BODY_PART[body_part])
    if unknown or side not in ("left", "right"):
        raise ValueError(f"findings {sorted(unknown)} / side {side!r} do not fit {body_part!r}")
    site_rng, image_rng = np.random.default_rng(seed).spawn(2)
    chosen = tuple(_make_finding(body_part, name, site_rng) for name in findings)
    return _render_image(body_part, chosen, image_rng, image_size, float(age_years), side)


# ------------------------------------------------------------------------------------------------ reports


def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def _make_finding(part: str, name: str, rng: np.random.Generator) -> Finding:
    return Finding(name, _pick(_SITES[part][name], rng), float(rng.uniform(0.0, 1.0)))


def _sample_findings(part: str, rng: np.random.Generator) -> tuple[Finding, ...]:
    """About 45% normal; otherwise one finding of the part, sometimes two where the part has three kinds."""
    if rng.random() < _NORMAL_FRACTION:
        return ()
    names = FINDINGS_BY_BODY_PART[part]
    count = 2 if len(names) >= 3 and rng.random() < 0.25 else 1
    return tuple(_make_finding(part, names[i], rng) for i in sorted(rng.choice(len(names), count, replace=False)))


def _tidy(sentence: str) -> str:
    sentence = re.sub(r"\s+", " ", sentence).strip()
    return sentence[:1].upper() + sentence[1:]


def _finding_fields(finding: Finding, part_fields: dict, rng: np.random.Generator) -> dict:
    sizes = _SIZES.get(finding.name, _SIZES["default"])
    return {
        **part_fields,
        "site": finding.site.phrase,
        "size": sizes[min(int(finding.severity * 3), 2)],
        "kind": _pick(_FRACTURE_KINDS[int(finding.severity >= 0.4)], rng),
    }


def _part_sentences(part: str, findings, side: str, age: float, rng: np.random.Generator):
    """(findings-section sentences, impression sentences) about one imaged part; each one names the part."""
    kind = "chest" if part == "chest" else "bone"
    fields = {"part": f"{side} {part}" if kind == "bone" and rng.random() < 0.75 else part, "side": side}
    seen, impression = [], []
    for finding in findings:
        detail = _finding_fields(finding, fields, rng)
        seen_templates, impression_templates = _POSITIVE[finding.name]
        seen.append(_tidy(_pick(seen_templates, rng).format(**detail)))
        impression.append(_tidy(_pick(impression_templates, rng).format(**detail)))
    present = {finding.name for finding in findings}
    absent = [name for name in FINDINGS_BY_BODY_PART[part] if name not in present]
    negatives = [_tidy(_pick(_NEGATIVE[name], rng).format(**fields)) for name in absent if rng.random() < 0.6]
    if not findings:
        extras = [text for text in _NORMAL_EXTRA[kind] if age < 15.0 or "growth plates" not in text]
        if not negatives or rng.random() < 0.5:
            negatives.append(_tidy(_pick(extras, rng).format(**fields)))
        impression.append(_tidy(_pick(_NORMAL_IMPRESSION[kind], rng).format(**fields)))
    return seen + negatives, impression


def _age_phrase(age: float) -> str:
    return f"{int(age)}-year-old" if age >= 2.0 else f"{max(1, int(round(age * 12)))}-month-old"


def _history(parts, side: str, age: float, sex: str, rng: np.random.Generator) -> list[str]:
    """Clinical history sentences: age and sex, then one or two reasons (which may name an imaged part)."""
    part = _pick(parts, rng)
    reasons = _HISTORY_REASONS[_REGION[part]]
    word = part if part == "chest" else f"{side} {part}"
    chosen = rng.choice(len(reasons), int(rng.integers(1, 3)), replace=False)
    opening = f"{_pick(_HISTORY_HEADERS, rng)} {_age_phrase(age)} {sex}."
    return [opening] + [reasons[i].format(word=word) for i in chosen]


def _compose_report(history, comparison, sections, rng: np.random.Generator) -> str:
    """One report: history (and comparison), then every part's findings, then every part's impression."""
    seen = " ".join(sentence for found, _ in sections for sentence in found)
    impression = " ".join(sentence for _, said in sections for sentence in said)
    blocks = [" ".join(history + comparison)]
    style = int(rng.integers(4))
    if style == 0:
        return "\n".join(blocks + [f"FINDINGS: {seen}", f"IMPRESSION: {impression}"])
    if style == 1:
        return " ".join(blocks + [f"Findings: {seen}", f"Impression: {impression}"])
    if style == 2:
        return " ".join(blocks + [seen, impression])
    return "\n\n".join(blocks + [seen, f"IMPRESSION:\n{impression}"])


# ------------------------------------------------------------------------------------------------ patients and splits

SPLITS = ("train", "validation", "test")


def _study_rows(study_id: str, patient_id: str, sex: str, age: float, rng: np.random.Generator, size: int):
    """Rows (one per imaged part) of one study; all share the study's single report."""
    kinds, weights = zip(*_STUDY_TYPES)
    parts = kinds[int(rng.choice(len(kinds), p=np.divide(weights, sum(weights))))]
    parts = tuple(parts[i] for i in rng.permutation(len(parts)))  # the order the report takes them in
    side = _pick(("left", "right"), rng)
    findings = {part: _sample_findings(part, rng) for part in parts}
    sections = {part: _part_sentences(part, findings[part], side, age, rng) for part in parts}
    history = _history(parts, side, age, sex, rng)
    comparison = [_pick(_COMPARISONS, rng)] if rng.random() < 0.35 else []
    report = _compose_report(history, comparison, [sections[part] for part in parts], rng)
    rows = []
    for part, image_rng in zip(parts, rng.spawn(len(parts))):
        pixels = _render_image(part, findings[part], image_rng, size, age, side)
        seen, impression = sections[part]
        rows.append({
            "image": PILImage.fromarray(pixels), "text": " ".join(seen + impression), "body_part": part,
            "findings": [finding.name for finding in findings[part]], "report": report, "history": " ".join(history),
            "study_id": study_id, "patient_id": patient_id, "age_years": round(age, 2),
        })  # fmt: skip
    return rows


def _patient_rows(index: int, rng: np.random.Generator, size: int) -> list[dict]:
    patient_id = f"P{index:05d}"
    sex = _pick(("boy", "girl"), rng)
    age = float(rng.uniform(0.1, 16.0))
    rows = []
    for number, study_rng in enumerate(rng.spawn(int(rng.choice((1, 2, 3), p=(0.35, 0.35, 0.3)))), start=1):
        rows += _study_rows(f"{patient_id}-S{number}", patient_id, sex, age, study_rng, size)
        age = min(age + float(rng.uniform(0.05, 2.0)), 17.0)
    return rows


def _assign_splits(num_patients: int, fractions, rng: np.random.Generator) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) of each patient."""
    order = rng.permutation(num_patients)
    train = int(round(fractions[0] * num_patients))
    validation = min(int(round(fractions[1] * num_patients)), num_patients - train)
    split = np.full(num_patients, 2)
    split[order[:train]] = 0
    split[order[train : train + validation]] = 1
    return split


def _features():
    from datasets import Features, Image, List, Value

    text = Value("string")
    return Features({
        "image": Image(), "text": text, "body_part": text, "findings": List(text), "report": text, "history": text,
        "study_id": text, "patient_id": text, "age_years": Value("float64"),
    })  # fmt: skip


def generate_pexr_mini(num_patients: int = 300, seed: int = 0, image_size: int = 128, split_fractions=(0.8, 0.1, 0.1)):
    """Generate PeXR-mini as a `datasets.DatasetDict` with splits "train", "validation" and "test".

    One row per image: `image` (8-bit grayscale, `image_size` square), `text` (the report's findings and impression
    sentences about this image's body part, in report order), `body_part`, `findings` (empty = normal), `report`
    (the study's one report over all its parts), `history` (its clinical history sentences), `study_id`,
    `patient_id`, `age_years`. Patients go whole to one split. The same arguments give the same data, bit for bit;
    each patient draws from its own child of `np.random.SeedSequence(seed)`.
    """
    from datasets import Dataset, DatasetDict

    fractions = np.asarray(split_fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or abs(fractions.sum() - 1.0) > 1e-6:
        raise ValueError(f"split_fractions={split_fractions!r}: three non-negative numbers summing to 1")
    if num_patients < 1 or image_size < 16 or seed < 0:
        raise ValueError(f"need num_patients >= 1, image_size >= 16, seed >= 0: {num_patients}, {image_size}, {seed}")
    split_seed, *patient_seeds = np.random.SeedSequence(seed).spawn(num_patients + 1)
    split = _assign_splits(num_patients, fractions, np.random.default_rng(split_seed))
    rows = {name: [] for name in SPLITS}
    for index, patient_seed in enumerate(patient_seeds):
        rows[SPLITS[split[index]]] += _patient_rows(index, np.random.default_rng(patient_seed), image_size)
    features = _features()
    return DatasetDict({
        name: Dataset.from_dict({column: [row[column] for row in split_rows] for column in features}, features=features)
        for name, split_rows in rows.items()
    })  # fmt: skip


__all__ = [
    "BODY_PART_SYNONYMS", "FINDINGS_BY_BODY_PART", "RENDERED_BODY_PARTS", "SPLITS", "Finding", "Site",
    "body_parts_mentioned", "generate_pexr_mini", "render_xray",
]  # fmt: skip
