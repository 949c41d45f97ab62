"""Procedural head-and-neck CT phantom: the body region above the torso phantom.

The torso phantom (``data_tools.phantom``) stops at the thoracic inlet, so a head CT was out of
distribution for everything trained on it. This module renders a head and neck with the same
conventions and the same ``Subject`` type: skull shell (cortical bone ~1200 HU), brain (grey
~38 / white ~28 HU) with CSF ventricles (~5 HU), eyes in orbital fat, air in the nasal cavity,
maxillary and frontal sinuses and the airway, mandible, cervical vertebrae C1-C7 around the
spinal cord, trachea, esophagus, thyroid (iodine-rich, ~110 HU), carotid arteries and jugular
veins, neck muscle and subcutaneous fat.

Labels are TotalSegmentator ids where the class exists: brain, skull (the mandible included, as
TotalSegmentator's skull class has it), vertebrae_C1..C7, spinal_cord, trachea, esophagus,
thyroid_gland, common_carotid_artery_left/right. Eyes, sinuses, airway above the trachea,
jugular veins, muscle and fat have no class and stay 0; the ventricles are part of the brain.

World axes are RAS+ in mm (+x the patient's right... as in the torso phantom: structures at x > 0
lie on the patient's right; +y anterior, +z superior); arrays are [D, H, W] = (z, y, x).
Anatomy is laid out for a 256 mm field of view from the vertex to C7 and scaled to the actual
one. Subjects differ in head size and shape, organ sizes and positions and a smooth random warp
(organ surfaces are lobulated by it); ``make_head_intra_pair`` re-renders a subject after a nod
and turn of the head on the cervical spine, returning the true field like the torso phantom's
breathing pairs.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from unireg.organs import ORGAN_TO_ID
from unireg.preprocessing import to_stored_hu

from .phantom import Subject, _smooth_field, _texture

HEAD_FOV_MM = 256.0
FOV_CENTRE_Z_MM = -20.0        # the field of view is centred between the vertex (+105) and C7 (-140)

# Cervical vertebrae: (name, centre z mm); C1 (atlas) is a ring without a body.
_CERVICAL = [("vertebrae_C1", -35.0), ("vertebrae_C2", -52.0), ("vertebrae_C3", -70.0), ("vertebrae_C4", -87.0),
             ("vertebrae_C5", -104.0), ("vertebrae_C6", -121.0), ("vertebrae_C7", -138.0)]
SKULL_BASE_Z = -15.0


def _sample_params(rng: np.random.Generator) -> dict:
    """Per-subject sizes and positions around the reference anatomy."""
    jitter = lambda sd, n=1: rng.normal(0, sd, n).clip(-2 * sd, 2 * sd)  # noqa: E731
    return {
        "head": tuple(np.array([75.0, 95.0, 85.0]) * rng.uniform(0.9, 1.08, 3)),   # scalp semi-axes (x, y, z)
        "skull_mm": float(rng.uniform(5.0, 9.0)),                                  # bone thickness
        "neck": tuple(np.array([55.0, 50.0]) * rng.uniform(0.88, 1.12, 2)),
        "ventricles": float(rng.uniform(0.7, 1.5)),                               # size (atrophy widens them)
        "eyes": tuple(np.array([32.0, 70.0, -10.0]) + jitter(2.0, 3)),
        "thyroid": float(rng.uniform(0.8, 1.25)),
        "spine_y": float(-20.0 + jitter(3.0)[0]),
        "hu": {"brain": 38.0 + jitter(2.0)[0], "white": 28.0 + jitter(2.0)[0], "bone": 1200.0 + jitter(80.0)[0],
               "thyroid": 110.0 + jitter(10.0)[0], "vessel": 180.0 + jitter(30.0)[0]},
        "warp_seed": int(rng.integers(1 << 31)),
        "texture_seed": int(rng.integers(1 << 31)),
    }


def _ellipsoid(x, y, z, centre, semi) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipsoid."""
    (cx, cy, cz), (ax, ay, az) = centre, semi
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2


def _render(points: np.ndarray, params: dict, shape) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate the head phantom at reference-frame points [3, D, H, W] (x, y, z mm) -> HU, labels."""
    x, y, z = points
    hu = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.uint8)

    def paint(mask, value, name=None):
        """Later structures win; one without a TotalSegmentator class leaves background labels."""
        hu[mask] = value
        labels[mask] = ORGAN_TO_ID[name] if name else 0

    hx, hy, hz = params["head"]
    nx, ny = params["neck"]
    head_centre = (0.0, 0.0, 20.0)
    head = _ellipsoid(x, y, z, head_centre, (hx, hy, hz)) < 1
    face = _ellipsoid(x, y, z, (0.0, 0.45 * hy, -35.0), (0.7 * hx, 0.6 * hy, 0.62 * hz)) < 1
    neck = ((x / nx) ** 2 + ((y + 5.0) / ny) ** 2 < 1) & (z < -20.0)
    body = head | face | neck
    paint(body, -100.0)                                                       # subcutaneous fat
    inner_neck = ((x / (nx - 7)) ** 2 + ((y + 5.0) / (ny - 7)) ** 2 < 1) & (z < -25.0)
    paint(inner_neck | face & (_ellipsoid(x, y, z, (0.0, 0.45 * hy, -35.0), (0.62 * hx, 0.52 * hy, 0.55 * hz)) < 1),
          45.0)                                                               # muscle and soft tissue

    # Skull: a shell inside the scalp, closed below by the skull base; mandible as part of it.
    t = params["skull_mm"]
    outer = _ellipsoid(x, y, z, head_centre, (hx - 5, hy - 5, hz - 5)) < 1
    inner = _ellipsoid(x, y, z, head_centre, (hx - 5 - t, hy - 5 - t, hz - 5 - t)) < 1
    base = SKULL_BASE_Z + 0.25 * y                                            # posterior fossa lies deeper
    cranium = outer & (z > base - t)
    cavity = inner & (z > base)
    paint(cranium & ~cavity, params["hu"]["bone"], "skull")
    ring = np.sqrt(x ** 2 + (y - 30.0) ** 2)
    mandible = (np.abs(ring - 0.55 * hx) < 5.0) & (y > 25.0) & (np.abs(z + 70.0) < 12.0)
    mandible |= (np.abs(np.abs(x) - 0.55 * hx) < 5.0) & (y > 0.0) & (y < 35.0) & (z > -80.0) & (z < -30.0)
    paint(mandible & body, params["hu"]["bone"] * 0.9, "skull")

    # Brain: grey matter, deep white matter, lateral ventricles (all labelled brain); brainstem to C1.
    paint(cavity, params["hu"]["brain"], "brain")
    white = _ellipsoid(x, y, z, (0.0, 0.0, 40.0), (0.62 * hx, 0.62 * hy, 0.45 * hz)) < 1
    paint(cavity & white, params["hu"]["white"], "brain")
    v = params["ventricles"]
    for side in (-1.0, 1.0):
        paint(cavity & (_ellipsoid(x, y, z, (side * 9.0, 5.0, 38.0), (5.0 * v, 26.0, 9.0 * v)) < 1), 5.0, "brain")
    paint(cavity & (_ellipsoid(x, y, z, (0.0, 0.0, 22.0), (2.5 * v, 12.0, 8.0)) < 1), 5.0, "brain")
    spine_y = params["spine_y"]
    brainstem = ((x / 12.0) ** 2 + ((y - spine_y - 5.0) / 11.0) ** 2 < 1) & (z > -30.0) & (z <= base + 15.0) & head
    paint(brainstem, params["hu"]["brain"], "brain")

    # Face: eyes in orbital fat, nasal cavity and sinuses (air, inside bone walls).
    ex, ey, ez = params["eyes"]
    for side in (-1.0, 1.0):
        paint(_ellipsoid(x, y, z, (side * ex, ey, ez), (17.0, 17.0, 14.0)) < 1, -80.0)
        paint(_ellipsoid(x, y, z, (side * ex, ey, ez), (12.0, 12.0, 12.0)) < 1, 10.0)
        paint(_ellipsoid(x, y, z, (side * ex, ey + 9.0, ez), (4.0, 2.0, 4.0)) < 1, 100.0)     # lens
        paint(_ellipsoid(x, y, z, (side * 25.0, 45.0, -35.0), (15.0, 18.0, 17.0)) < 1, -1000.0)  # maxillary
    frontal = (0.0, 0.88 * hy - 4.0, 12.0)                                     # in thickened frontal bone
    paint((_ellipsoid(x, y, z, frontal, (17.0, 10.0, 13.0)) < 1) & head, params["hu"]["bone"], "skull")
    paint(_ellipsoid(x, y, z, frontal, (12.0, 5.0, 8.0)) < 1, -1000.0)                          # frontal sinus
    paint(_ellipsoid(x, y, z, (0.0, 55.0, -25.0), (8.0, 28.0, 22.0)) < 1, -1000.0)              # nasal cavity

    # Neck: airway, esophagus, thyroid, vessels, cervical spine with the cord.
    pharynx = ((x / 10.0) ** 2 + ((y - 20.0) / 8.0) ** 2 < 1) & (z > -100.0) & (z < -30.0)
    paint(pharynx, -1000.0)
    paint((x ** 2 + (y - 25.0) ** 2 < 8.0 ** 2) & (z <= -100.0) & neck, -1000.0, "trachea")
    paint((x ** 2 + (y - 8.0) ** 2 < 6.0 ** 2) & (z <= -100.0) & neck, 35.0, "esophagus")
    th = params["thyroid"]
    thyroid = np.zeros(shape, bool)
    for side in (-1.0, 1.0):
        thyroid |= _ellipsoid(x, y, z, (side * 16.0, 24.0, -118.0), (8.0 * th, 9.0 * th, 20.0 * th)) < 1
    thyroid |= _ellipsoid(x, y, z, (0.0, 35.0, -122.0), (12.0, 4.0, 6.0)) < 1
    paint(thyroid & (labels != ORGAN_TO_ID["trachea"]) & neck, params["hu"]["thyroid"], "thyroid_gland")
    for side, name in ((1.0, "common_carotid_artery_right"), (-1.0, "common_carotid_artery_left")):
        paint(((x - side * 24.0) ** 2 + (y - 12.0) ** 2 < 4.5 ** 2) & (z < -45.0) & neck, params["hu"]["vessel"], name)
        paint(((x - side * 36.0) ** 2 + (y - 6.0) ** 2 < 6.0 ** 2) & (z < -45.0) & neck, 160.0)   # jugular vein

    canal = x ** 2 + (y - spine_y + 12.0) ** 2
    for name, cz in _CERVICAL:
        slab = np.abs(z - cz) < 7.0
        vbody = (x ** 2 + (y - spine_y) ** 2 < 9.0 ** 2) & slab & (name != "vertebrae_C1")
        arch = (canal < 15.0 ** 2) & (canal > 8.0 ** 2) & (y < spine_y - 4.0) & slab
        spinous = (np.abs(x) < 3.5) & (y < spine_y - 24.0) & (y > spine_y - 42.0) & (np.abs(z - cz) < 5.0)
        lateral = (np.abs(np.abs(x) - 17.0) < 5.0) & (np.abs(y - spine_y + 6.0) < 6.0) & slab
        paint((vbody | arch | spinous | lateral) & (neck | head), 700.0 if name == "vertebrae_C1" else 600.0, name)
        if name == "vertebrae_C2":                                               # the dens reaches into C1
            paint((x ** 2 + (y - spine_y) ** 2 < 5.0 ** 2) & (z > cz) & (z < cz + 18.0), 600.0, name)
        disc = (x ** 2 + (y - spine_y) ** 2 < 9.0 ** 2) & (np.abs(z - cz + 8.5) < 1.5) & (name != "vertebrae_C7")
        paint(disc & (labels == 0) & neck, 80.0)
    paint((canal < 5.5 ** 2) & (z < -30.0) & (neck | head), 30.0, "spinal_cord")
    return hu, labels


def _grid_mm(shape, spacing) -> np.ndarray:
    """Reference-frame coordinates (x, y, z) mm of every voxel [3, D, H, W], FOV scaled to HEAD_FOV_MM."""
    scale = HEAD_FOV_MM / max(n * s for n, s in zip(shape, spacing))
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s * scale for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return np.stack([x, y, z + FOV_CENTRE_Z_MM])


def make_head_subject(seed: int, shape=(64, 64, 64), spacing_mm=(4.0, 4.0, 4.0), warp_mm: float = 5.0,
                      noise_hu: float = 10.0) -> Subject:
    """One head-and-neck subject (``Subject`` as ``phantom.make_subject``); same seed, same subject."""
    shape, spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing_mm)
    if len(shape) != 3 or min(shape) < 8 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"head phantom shape must be three sizes >= 8 with positive spacing, got {shape}, {spacing}")
    params = _sample_params(np.random.default_rng(seed))
    params.update(shape=shape, spacing=spacing, warp_mm=warp_mm, noise_hu=noise_hu, region="head_neck")
    return _render_subject(params, None)


def _subject_warp(params: dict) -> np.ndarray:
    """The smooth warp [3, D, H, W] (x, y, z mm, reference frame) that makes this subject's shapes."""
    return _smooth_field(params["shape"], params["spacing"], params["warp_mm"], 40.0, params["warp_seed"])[[2, 1, 0]]


def _render_subject(params: dict, displacement_mm, intensity=(1.0, 0.0), noise_seed=None) -> Subject:
    shape, spacing = params["shape"], params["spacing"]
    points = _grid_mm(shape, spacing) + _subject_warp(params)
    if displacement_mm is not None:
        points = points + displacement_mm
    hu, labels = _render(points, params, shape)
    hu = _texture(hu, labels, params["texture_seed"] if noise_seed is None else noise_seed, params["noise_hu"])
    return Subject(image=to_stored_hu(hu * intensity[0] + intensity[1]), labels=labels, spacing=spacing, params=params)


def head_motion(subject: Subject, nod_deg: float, turn_deg: float, seed: int, extra_warp_mm: float = 1.5) -> np.ndarray:
    """Displacement [3, D, H, W] (x, y, z mm, reference frame) of a nod (about x) and a turn (about z)
    of the head on the upper cervical spine, fading to nothing at C7, plus a small smooth warp."""
    shape, spacing = subject.params["shape"], subject.params["spacing"]
    x, y, z = _grid_mm(shape, spacing)
    pivot = np.array([0.0, subject.params["spine_y"], -45.0])
    weight = np.clip((z + 140.0) / 95.0, 0.0, 1.0)                             # 0 at C7 -> 1 above C1
    px, py, pz = x - pivot[0], y - pivot[1], z - pivot[2]
    a, b = np.deg2rad(nod_deg) * weight, np.deg2rad(turn_deg) * weight
    ry, rz = np.cos(a) * py - np.sin(a) * pz, np.sin(a) * py + np.cos(a) * pz   # nod
    rx, ry = np.cos(b) * px - np.sin(b) * ry, np.sin(b) * px + np.cos(b) * ry   # turn
    motion = np.stack([rx - px, ry - py, rz - pz]).astype(np.float32)
    return motion + _smooth_field(shape, spacing, extra_warp_mm, 40.0, seed)[[2, 1, 0]]


def make_head_intra_pair(subject: Subject, seed: int) -> tuple[Subject, np.ndarray]:
    """The subject after a random nod/turn, and the true field ``d`` (voxels, (dz, dy, dx)) with
    ``subject(x) ≈ moving(x + d(x))``, as ``phantom.make_intra_pair`` returns it."""
    rng = np.random.default_rng(seed)
    u = head_motion(subject, rng.uniform(-12.0, 12.0), rng.uniform(-15.0, 15.0), seed)
    moving = _render_subject(subject.params, u, intensity=(rng.uniform(0.97, 1.03), rng.uniform(-10, 10)),
                             noise_seed=int(rng.integers(1 << 31)))
    # fixed(x) = A(x + w(x)) and moving(y) = A(y + w(y) + u(y)) for the anatomy A and the subject's
    # warp w, so fixed(x) = moving(x + d(x)) needs d(x) = w(x) - (w + u)(x + d(x)): fixed-point
    # iteration (w kept in: with rotations of several voxels its gradient is not negligible).
    shape, spacing = subject.params["shape"], subject.spacing
    scale = HEAD_FOV_MM / max(n * s for n, s in zip(shape, spacing))
    to_vox = lambda f: (f / (np.array(spacing)[::-1, None, None, None] * scale))[[2, 1, 0]]  # noqa: E731
    w, total = to_vox(_subject_warp(subject.params)), to_vox(_subject_warp(subject.params) + u)
    grid = np.indices(shape, dtype=np.float32)
    d = -to_vox(u)
    for _ in range(10):
        d = w - np.stack([ndimage.map_coordinates(total[c], grid + d, order=1, mode="nearest") for c in range(3)])
    return moving, d.astype(np.float32)


def head_phantom_pairs(n_subjects: int, shape=(64, 64, 64), spacing=(4.0, 4.0, 4.0), seed: int = 0,
                       intra_per_subject: int = 1, inter_pairs: int | None = None):
    """(key, pair) items of head-and-neck phantoms for ``write_shards``, as ``shards.phantom_pairs``."""
    rng = np.random.default_rng([seed, 7])
    subjects = [make_head_subject(seed * 1000 + i, shape, spacing) for i in range(n_subjects)]
    base = {"spacing": [float(s) for s in spacing], "source": "head_phantom"}
    for i, s in enumerate(subjects):
        for j in range(intra_per_subject):
            moving, disp = make_head_intra_pair(s, seed * 1000 + 500 + i * 10 + j)
            yield f"head-s{seed}-{i:04d}-intra{j}", {
                "fixed": s.image, "moving": moving.image, "fixed_seg": s.labels, "moving_seg": moving.labels,
                "displacement": disp,
                "meta": {**base, "type": "intra", "fixed_id": f"head-s{seed}-{i}",
                         "moving_id": f"head-s{seed}-{i}-pose{j}"}}
    if n_subjects > 1:
        for k in range(n_subjects if inter_pairs is None else inter_pairs):
            a, b = rng.choice(n_subjects, size=2, replace=False)
            yield f"head-s{seed}-inter{k:04d}", {
                "fixed": subjects[a].image, "moving": subjects[b].image,
                "fixed_seg": subjects[a].labels, "moving_seg": subjects[b].labels,
                "meta": {**base, "type": "inter", "fixed_id": f"head-s{seed}-{a}", "moving_id": f"head-s{seed}-{b}"}}


__all__ = ["HEAD_FOV_MM", "make_head_subject", "make_head_intra_pair", "head_motion", "head_phantom_pairs"]
