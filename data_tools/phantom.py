"""Procedural CT-like torso phantom: the embedded default data set.

No real CT can be downloaded here, so UniReg ships a generator of torso volumes with realistic
Hounsfield units and TotalSegmentator-labelled organs. Anatomy is a set of implicit shapes in
millimetres (RAS: +x patient right... see below), rendered at any size and spacing:

* world axes follow RAS+: +x towards the patient's left is *negative* (liver at x > 0 is on the
  patient's right), +y anterior, +z superior;
* arrays are in torch order [D, H, W] = (z, y, x); NIfTI files store them in (i, j, k) = (x, y, z)
  order (``unireg.io.ijk_to_tensor_order``, a transposition that is its own inverse) with
  ``affine = diag(sx, sy, sz)`` and the origin centring the field of view.

Subjects differ in body habitus, organ size and position and by a smooth random warp of space.
An intra-subject pair re-renders the subject at another breathing phase (cranio-caudal motion,
largest at the diaphragm, sliding against a still body wall and spine) with a small extra warp,
noise and an intensity change; the true displacement is returned.

``write_phantom_dataset`` (``unireg prepare phantom``) saves subjects and phases as NIfTI with a
``pairs.json`` in the format of ``unireg prepare dataset``, so ``unireg prepare shards
--from-pairs <out>/pairs.json --split train|val`` turns them into training and validation shards.
Seeds derive from one run seed (``subject_seed``, ``phase_seed``), so the same run seed gives the
same subjects whether they are written as NIfTI or straight into shards.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from unireg.io import ijk_to_tensor_order
from unireg.organs import ID_TO_ORGAN, ORGAN_TO_ID
from unireg.preprocessing import to_stored_hu

REFERENCE_FOV_MM = 384.0  # anatomy below is laid out for this field of view and scaled to the actual one


@dataclass
class Subject:
    image: np.ndarray             # int16 HU [D, H, W]
    labels: np.ndarray            # uint8 TotalSegmentator ids [D, H, W]
    spacing: tuple                # (sz, sy, sx) mm
    params: dict = field(default_factory=dict, repr=False)

    @property
    def affine(self) -> np.ndarray:
        """RAS affine of the NIfTI array (i, j, k) = (x, y, z), origin centring the volume."""
        sz, sy, sx = self.spacing
        d, h, w = self.image.shape
        affine = np.diag([sx, sy, sz, 1.0])
        affine[:3, 3] = -np.array([sx * (w - 1), sy * (h - 1), sz * (d - 1)]) / 2
        return affine

    @property
    def organs(self) -> list[str]:
        return [ID_TO_ORGAN[int(i)] for i in np.unique(self.labels) if i]


# ---------------------------------------------------------------------------------- anatomy
# name: (kind, centre (x, y, z) mm, semi-axes mm, HU, extra)  — painted in this order, later wins.
_ANATOMY = [
    ("lung_upper_lobe_right", "lung", (70, -5, 95), (62, 70, 85), -850, {"side": 1}),
    ("lung_upper_lobe_left", "lung", (-70, -5, 95), (58, 70, 85), -850, {"side": -1}),
    ("liver", "ellipsoid", (65, 5, -20), (80, 82, 62), 95, {}),
    ("spleen", "ellipsoid", (-85, -35, -10), (30, 42, 48), 85, {}),
    ("stomach", "ellipsoid", (-45, 40, -10), (48, 32, 42), 25, {}),
    ("small_bowel", "ellipsoid", (0, 45, -125), (85, 40, 38), 35, {}),
    ("colon", "ellipsoid", (0, 75, -80), (105, 18, 16), -250, {}),
    ("urinary_bladder", "ellipsoid", (0, 40, -172), (38, 30, 22), 10, {}),
    ("heart", "ellipsoid", (-20, 35, 55), (55, 48, 52), 140, {}),
    ("kidney_right", "ellipsoid", (62, -55, -65), (27, 24, 48), 160, {}),
    ("kidney_left", "ellipsoid", (-62, -55, -55), (27, 24, 48), 160, {}),
    ("pancreas", "ellipsoid", (-15, 5, -45), (58, 12, 12), 45, {"yaw": 0.25}),
    ("duodenum", "ellipsoid", (38, 12, -68), (13, 13, 28), 35, {}),
    ("gallbladder", "ellipsoid", (50, 50, -50), (14, 18, 26), 10, {}),
    ("adrenal_gland_right", "ellipsoid", (50, -45, -5), (9, 6, 13), 40, {}),
    ("adrenal_gland_left", "ellipsoid", (-50, -45, 0), (9, 6, 13), 40, {}),
    ("iliopsoas_right", "cylinder", (48, -62, -160), (18, 18, 60), 55, {"in_body": True}),
    ("iliopsoas_left", "cylinder", (-48, -62, -160), (18, 18, 60), 55, {"in_body": True}),
    ("autochthon_right", "cylinder", (33, -112, -20), (22, 17, 170), 55, {"in_body": True}),
    ("autochthon_left", "cylinder", (-33, -112, -20), (22, 17, 170), 55, {"in_body": True}),
    ("aorta", "cylinder", (-18, -45, 0), (12, 12, 150), 220, {}),
    ("inferior_vena_cava", "cylinder", (24, -40, -40), (11, 13, 110), 170, {}),
    ("esophagus", "cylinder", (-5, -55, 80), (7, 7, 90), 30, {}),
    ("trachea", "cylinder", (0, -25, 160), (9, 9, 30), -1000, {}),
    ("spinal_cord", "cylinder", (0, -103, 0), (6, 6, 190), 30, {"in_body": True}),
    ("sternum", "cylinder", (0, 108, 60), (15, 7, 70), 450, {"in_body": True}),
]
# Vertebrae T8..L5 stacked along z: (name, centre z)
_VERTEBRAE = [("vertebrae_T8", 150), ("vertebrae_T9", 118), ("vertebrae_T10", 86), ("vertebrae_T11", 54),
              ("vertebrae_T12", 22), ("vertebrae_L1", -10), ("vertebrae_L2", -42), ("vertebrae_L3", -74),
              ("vertebrae_L4", -106), ("vertebrae_L5", -138)]
_RIBS = [(f"rib_{side}_{n}", n) for n in range(5, 11) for side in ("left", "right")]
DIAPHRAGM_Z = 20.0


def _sample_params(rng: np.random.Generator) -> dict:
    params = {"body": (rng.uniform(0.88, 1.12), rng.uniform(0.88, 1.12)), "organs": {}}
    for name, kind, centre, semi, hu, extra in _ANATOMY:
        jitter = 8.0 if kind == "ellipsoid" else 3.0
        params["organs"][name] = {
            "centre": tuple(np.array(centre, float) + rng.normal(0, jitter / 2, 3).clip(-jitter, jitter)),
            "semi": tuple(np.array(semi, float) * rng.uniform(0.88, 1.12, 3)),
            "hu": hu + rng.normal(0, 8),
        }
    params["warp_seed"] = int(rng.integers(1 << 31))
    params["texture_seed"] = int(rng.integers(1 << 31))
    return params


def _render(points: np.ndarray, params: dict, shape) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate the phantom at reference-frame points [3, D, H, W] (x, y, z mm) -> HU, labels."""
    x, y, z = points
    bx, by = params["body"]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    body_r = (x / (150 * bx)) ** 2 + (y / (115 * by)) ** 2
    body = (body_r < 1) & (np.abs(z) < 200)
    hu[body] = -100.0                                                   # subcutaneous fat
    inner = (x / (132 * bx)) ** 2 + (y / (98 * by)) ** 2 < 1
    hu[body & ~inner & ((x / (141 * bx)) ** 2 + (y / (106 * by)) ** 2 < 1) & (z < DIAPHRAGM_Z + 10)] = 50.0  # muscle wall
    cavity = body & inner
    hu[cavity] = np.where(cavity, -80.0, hu)[cavity]                    # visceral fat
    hu[cavity & (z > DIAPHRAGM_Z + 5)] = -60.0                          # mediastinal fat

    def paint(name, mask, value, region=cavity):
        mask = mask & region
        hu[mask] = value
        labels[mask] = ORGAN_TO_ID[name]

    for name, kind, _, _, _, extra in _ANATOMY:
        o = params["organs"][name]
        (cx, cy, cz), (ax, ay, az) = o["centre"], o["semi"]
        dx, dy, dz = x - cx, y - cy, z - cz
        if "yaw" in extra:
            c, s = np.cos(extra["yaw"]), np.sin(extra["yaw"])
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        if kind == "cylinder":
            mask = ((dx / ax) ** 2 + (dy / ay) ** 2 < 1) & (np.abs(dz) < az)
        else:
            mask = (dx / ax) ** 2 + (dy / ay) ** 2 + (dz / az) ** 2 < 1
        if kind == "lung":
            mask &= z > DIAPHRAGM_Z + 8 * np.cos(dx / 40)               # domed diaphragm
            if extra["side"] > 0:  # right lung: upper / middle / lower lobes
                lower = dz - 0.6 * dy < -10
                middle = ~lower & (dy > 10) & (dz < 20)
                paint("lung_lower_lobe_right", mask & lower, o["hu"])
                paint("lung_middle_lobe_right", mask & middle, o["hu"])
                paint(name, mask & ~lower & ~middle, o["hu"])
            else:
                lower = dz - 0.7 * dy < 0
                paint("lung_lower_lobe_left", mask & lower, o["hu"])
                paint(name, mask & ~lower, o["hu"])
            continue
        if name == "liver":
            mask &= z < DIAPHRAGM_Z + 8 * np.cos(dx / 40)
        paint(name, mask, o["hu"], body if extra.get("in_body") else cavity)

    spine_x, spine_y = 0.0, -75.0
    for name, cz in _VERTEBRAE:
        body_mask = ((x - spine_x) ** 2 + (y - spine_y) ** 2 < 19 ** 2) & (np.abs(z - cz) < 13.5)
        ring = ((x ** 2 + (y + 103) ** 2) < 15 ** 2) & ((x ** 2 + (y + 103) ** 2) > 7 ** 2) & (np.abs(z - cz) < 12)
        spinous = (np.abs(x) < 5) & (y < -112) & (y > -135) & (np.abs(z - cz) < 10)
        mask = (body_mask | ring | spinous) & body
        hu[mask] = 420.0
        labels[mask] = ORGAN_TO_ID[name]
        disc = ((x - spine_x) ** 2 + (y - spine_y) ** 2 < 19 ** 2) & (np.abs(np.abs(z - cz) - 16) < 2.5)
        hu[disc & body & (labels == 0)] = 90.0

    for name, n in _RIBS:
        side = 1.0 if name.startswith("rib_right") else -1.0
        rz = 150 - (n - 5) * 26 - 0.25 * (y + 100)                      # ribs slope down anteriorly
        r = (x / (138 * bx)) ** 2 + (y / (104 * by)) ** 2
        mask = (np.abs(r - 1) < 0.07) & (np.abs(z - rz) < 6) & (side * x > 8) & (y > -100) & (z > -60)
        hu[mask] = 650.0
        labels[mask] = ORGAN_TO_ID[name]
    return hu, labels


def _smooth_field(shape, spacing, amplitude_mm: float, sigma_mm: float, seed: int) -> np.ndarray:
    """Smooth random field [3, D, H, W] in mm, made on a coarse grid and upsampled (fast)."""
    rng = np.random.default_rng(seed)
    step = max(1, int(sigma_mm / max(spacing) / 2))
    coarse_shape = [max(2, n // step) for n in shape]
    sig = [sigma_mm / (s * step) for s in spacing]
    comps = []
    for _ in range(3):
        c = ndimage.gaussian_filter(rng.normal(size=coarse_shape), sig, mode="wrap")
        c *= amplitude_mm / (np.abs(c).max() + 1e-9)
        comps.append(ndimage.zoom(c, [n / m for n, m in zip(shape, coarse_shape)], order=1))
    return np.stack(comps).astype(np.float32)


def _grid_mm(shape, spacing) -> np.ndarray:
    """Reference-frame coordinates (x, y, z) in mm of every voxel, [3, D, H, W]."""
    scale = REFERENCE_FOV_MM / max(n * s for n, s in zip(shape, spacing))
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s * scale for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return np.stack([x, y, z])


def _texture(hu: np.ndarray, labels: np.ndarray, seed: int, noise_hu: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = ndimage.zoom(rng.normal(size=[max(2, n // 8) for n in hu.shape]), [n / max(2, n // 8) for n in hu.shape], order=1)
    soft = (hu > -200) & (hu < 300)
    hu = hu + soft * 12.0 * low[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    hu = ndimage.gaussian_filter(hu, 0.6)                               # partial-volume blur
    return hu + rng.normal(0, noise_hu, hu.shape).astype(np.float32)


def subject_seed(run_seed: int, index: int) -> int:
    """Seed of subject ``index`` of a run: distinct subjects for distinct run seeds (below 500 subjects)."""
    return run_seed * 1000 + index


def phase_seed(run_seed: int, index: int, phase: int) -> int:
    """Seed of breathing phase ``phase`` of subject ``index`` of a run."""
    return run_seed * 1000 + 500 + index * 10 + phase


def make_subject(seed: int, shape=(96, 96, 96), spacing_mm=(4.0, 4.0, 4.0), warp_mm: float = 8.0,
                 noise_hu: float = 12.0) -> Subject:
    """One phantom subject; the same seed gives the same subject."""
    shape, spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing_mm)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be three sizes >= 8, got {shape}")
    params = _sample_params(np.random.default_rng(seed))
    params.update(shape=shape, spacing=spacing, warp_mm=warp_mm, noise_hu=noise_hu, motion=None)
    return _render_subject(params, displacement_mm=None)


def _render_subject(params: dict, displacement_mm: np.ndarray | None, intensity=(1.0, 0.0), noise_seed=None) -> Subject:
    shape, spacing = params["shape"], params["spacing"]
    grid = _grid_mm(shape, spacing)
    points = grid + _smooth_field(shape, spacing, params["warp_mm"], 60.0, params["warp_seed"])[[2, 1, 0]]
    if displacement_mm is not None:
        points = points + displacement_mm
    hu, labels = _render(points, params, shape)
    hu = _texture(hu, labels, noise_seed if noise_seed is not None else params["texture_seed"], params["noise_hu"])
    hu = hu * intensity[0] + intensity[1]
    image = to_stored_hu(hu)
    return Subject(image=image, labels=labels, spacing=spacing, params=params)


def breathing_motion(subject: Subject, amplitude_mm: float, seed: int, extra_warp_mm: float = 2.0) -> np.ndarray:
    """Displacement [3, D, H, W] (x, y, z mm, reference frame) of another breathing phase."""
    shape, spacing = subject.params["shape"], subject.params["spacing"]
    x, y, z = _grid_mm(shape, spacing)
    bx, by = subject.params["body"]
    inside = (x / (128 * bx)) ** 2 + (y / (94 * by)) ** 2 < 1                 # sliding interface: wall stays
    inside &= ~((x ** 2 + (y + 85) ** 2) < 40 ** 2)                            # spine stays
    lung_w = np.clip((200 - z) / (200 - DIAPHRAGM_Z), 0, 1)                   # 0 at apex -> 1 at diaphragm
    abd_w = np.exp(-np.clip(DIAPHRAGM_Z - z, 0, None) / 120.0)                # decays caudally
    weight = np.where(z > DIAPHRAGM_Z, lung_w, abd_w) * inside
    weight = ndimage.gaussian_filter(weight.astype(np.float32), 0.7)
    motion = np.zeros((3, *shape), np.float32)
    motion[2] = amplitude_mm * weight                                          # cranio-caudal
    motion[1] = -0.25 * amplitude_mm * weight * (y > -60)                      # mild antero-posterior
    motion += _smooth_field(shape, spacing, extra_warp_mm, 40.0, seed)[[2, 1, 0]]
    return motion


def make_intra_pair(subject: Subject, seed: int, amplitude_mm: float | None = None) -> tuple[Subject, np.ndarray]:
    """Another breathing phase of ``subject`` and the true field ``d`` (voxels, (dz, dy, dx)) with
    ``subject(x) ≈ moving(x + d(x))``: the field that warps the moving scan onto the fixed one."""
    rng = np.random.default_rng(seed)
    amplitude = float(amplitude_mm if amplitude_mm is not None else rng.uniform(8.0, 20.0)) * rng.choice([-1, 1])
    u = breathing_motion(subject, amplitude, seed)             # moving(p) = phantom(p + u(p))
    params = dict(subject.params)
    moving = _render_subject(params, u, intensity=(rng.uniform(0.95, 1.05), rng.uniform(-15, 15)),
                             noise_seed=int(rng.integers(1 << 31)))
    # fixed(x) = phantom(x) = moving(x + d(x)) needs d(x) = -u(x + d(x)): fixed-point iteration.
    spacing = np.array(subject.spacing)[::-1]                 # (sx, sy, sz) voxel size of x, y, z components
    scale = REFERENCE_FOV_MM / max(n * s for n, s in zip(subject.params["shape"], subject.spacing))
    u_vox = u / (spacing[:, None, None, None] * scale)       # mm of the reference frame -> voxels
    u_vox = u_vox[[2, 1, 0]]                                  # (x, y, z) -> (dz, dy, dx)
    grid = np.indices(subject.image.shape, dtype=np.float32)
    d = -u_vox.copy()
    for _ in range(8):
        d = -np.stack([ndimage.map_coordinates(u_vox[c], grid + d, order=1, mode="nearest") for c in range(3)])
    moving.params = {**params, "motion_amplitude_mm": amplitude}
    return moving, d.astype(np.float32)


def save_subject(subject: Subject, out_dir: "str | Path", name: str, montage: bool = True) -> dict[str, Path]:
    """``<name>_ct.nii.gz``, ``<name>_labels.nii.gz``, ``<name>_labels.json`` (+ ``<name>.png``)."""
    import nibabel as nib
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"ct": out / f"{name}_ct.nii.gz", "labels": out / f"{name}_labels.nii.gz", "json": out / f"{name}_labels.json"}
    nib.save(nib.Nifti1Image(ijk_to_tensor_order(subject.image), subject.affine), paths["ct"])
    nib.save(nib.Nifti1Image(ijk_to_tensor_order(subject.labels), subject.affine), paths["labels"])
    paths["json"].write_text(json.dumps({str(ORGAN_TO_ID[o]): o for o in subject.organs}, indent=1))
    if montage:
        paths["png"] = out / f"{name}.png"
        save_montage(subject, paths["png"])
    return paths


def save_displacement(displacement: np.ndarray, subject: Subject, path: "str | Path") -> Path:
    """True field (voxels, (dz, dy, dx)) as a NIfTI [X, Y, Z, 3] in voxel units, (dx, dy, dz) order."""
    import nibabel as nib
    data = np.transpose(displacement[::-1], (3, 2, 1, 0)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, subject.affine), str(path))
    return Path(path)


def load_displacement(path: "str | Path") -> np.ndarray:
    import nibabel as nib
    data = np.asanyarray(nib.load(str(path)).dataobj)
    return np.ascontiguousarray(np.transpose(data, (3, 2, 1, 0))[::-1]).astype(np.float32)


def write_phantom_dataset(out_dir: "str | Path", n_subjects: int = 4, shape=(96, 96, 96), spacing=(4.0, 4.0, 4.0),
                          intra_per_subject: int = 1, seed: int = 0, montage: bool = True,
                          max_inter_per_subject: int = 4) -> dict:
    """Phantom subjects (+ breathing phases and their true fields) as NIfTI and a ``pairs.json``.

    Subjects are split 80/10/10 into train/val/test like a real data set (at least 3 subjects give
    a validation subject); pairs are intra (a subject and its phases, the subject -> phase pair
    carrying the true field) and inter (subjects of one split). Returns the pairs.json content."""
    from .prepare import PreparationError, make_pairs, no_pairs_message, split_subjects, write_pairs_json
    if n_subjects < 1 or intra_per_subject < 0:
        raise PreparationError(f"need --subjects >= 1 and --intra-per-subject >= 0, got {n_subjects}, {intra_per_subject}")
    out = Path(out_dir)
    scans, true_fields = {}, {}
    for i in range(n_subjects):
        subject_id = f"subject_{i:03d}"
        subject = make_subject(subject_seed(seed, i), shape=shape, spacing_mm=spacing)
        paths = save_subject(subject, out, subject_id, montage=montage)
        scans[subject_id] = {"subject": subject_id, "session": "ref", "image": paths["ct"].name,
                             "labels": paths["labels"].name}
        for j in range(intra_per_subject):
            name = f"{subject_id}_phase{j}"
            moving, disp = make_intra_pair(subject, phase_seed(seed, i, j))
            paths = save_subject(moving, out, name, montage=False)
            field_path = save_displacement(disp, subject, out / f"{name}_true_displacement.nii.gz")
            scans[name] = {"subject": subject_id, "session": f"phase{j}", "image": paths["ct"].name,
                           "labels": paths["labels"].name}
            true_fields[(subject_id, name)] = field_path.name
    splits = split_subjects([f"subject_{i:03d}" for i in range(n_subjects)], seed=seed)
    pairs = make_pairs(scans, splits, seed, max_inter_per_subject, source="phantom")
    for pair in pairs:
        if (pair["fixed_id"], pair["moving_id"]) in true_fields:
            pair["displacement"] = true_fields[(pair["fixed_id"], pair["moving_id"])]
    if not pairs:
        raise PreparationError(no_pairs_message(len(scans), n_subjects, []))
    result = {"layout": "phantom", "spacing": [float(s) for s in spacing], "scans": scans, "skipped": [],
              "pairs": pairs, "splits": splits}
    write_pairs_json(out, result)
    return result


def save_montage(subject: Subject, path: "str | Path") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d, h, w = subject.image.shape
    views = [subject.image[d // 2][::-1], subject.image[:, h // 2][::-1], subject.image[:, :, w // 2][::-1]]
    lab = [subject.labels[d // 2][::-1], subject.labels[:, h // 2][::-1], subject.labels[:, :, w // 2][::-1]]
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    for i in range(3):
        axes[0, i].imshow(views[i], cmap="gray", vmin=-400, vmax=400)
        axes[1, i].imshow(np.ma.masked_equal(lab[i], 0), cmap="tab20", interpolation="nearest")
        axes[0, i].set_axis_off()
        axes[1, i].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
