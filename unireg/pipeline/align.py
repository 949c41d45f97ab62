"""Pre-alignment: centre of mass -> rigid -> affine, by intensity optimisation in torch.

The network and the instance optimisation model deformations of a few centimetres; scans from
different sessions, scanners or patients can be offset by more, so a linear transform is found
first. It is a world-space matrix ``M`` (4x4, mm, RAS) that maps a point of the FIXED scan to the
corresponding point of the MOVING scan, ``fixed(x) ~ moving(M x)``: the same direction as the
displacement fields (``warped(x) = moving(x + u(x))``), so the total mapping composes as
``x -> M (x + u(x))``, and ITK's fixed-to-moving convention for a written transform.

Conventions
    Tensors are [1,1,D,H,W] in [0, 1] (normalised CT: 0 = air), each on its own grid. The grid
    affines map TENSOR index order (d, h, w, 1) to world mm. ``sampling_grid`` is the one place
    where world matrices become the normalised (x=w, y=h, z=d), ``align_corners=True`` coordinates
    of ``affine_grid``/``grid_sample``.

Method
    1. moments: translation between the intensity centres of mass of the body (voxels above air);
       kept only if it beats the identity (a partial field of view shifts the centre of mass).
    2. rigid (6 dof) then affine (12 dof): Adam on ``x_m = R(w) (I + S) (x_f - c) + c + t`` with
       ``c`` the fixed body centre, so rotation and translation are decoupled; rotation by the
       matrix exponential of a skew matrix. Learning rates are physical: a translation step and a
       rotation/shear step move body points by about the same number of mm, a fraction of the level
       spacing, and decay to zero (cosine) within each pyramid level.
    Pyramid levels are average-pooled copies of both scans near ``levels_mm`` (default 8, 4 mm),
    coarsened further when a level would exceed ``max_voxels`` (speed on a 2-core CPU).
    The similarity is LNCC (box filter, same modality) or global mutual information (contrast
    changes); fixed voxels that map outside the moving scan are left out of it.

Rule of ``mode="auto"``
    Run moments + rigid. If the rigid result moves no fixed body voxel by more than
    ``tolerance_mm`` or improves the similarity by less than ``min_gain`` (relative) over the
    identity, the scans are already aligned: return the identity and ``mode="none"``. Otherwise go
    on to the affine step, and keep whichever of rigid/affine has the better similarity.

    Scans of one patient (``same_subject=True``, the pipeline's intra-subject prompts) stop at rigid:
    anything beyond it is deformation, for the later stages. And the rigid motion is kept only if the
    skeleton agrees: the fixed scan's bone voxels (above ``BONE_THRESHOLD``, +250 HU) must land on
    the moving scan's bone more often than at the identity, by ``min_bone_gain`` (relative), on the
    grid passed in (not a pooled pyramid level: there sparse bone fades into its surroundings).
    Breathing moves the lungs and abdomen centimetres while spine and ribs stay; a rigid motion
    fitted to the whole body follows the organs and shifts the skeleton, which the deformable
    stages could not undo next to sliding organs (phantom breathing pair: vertebra Dice 0.95 ->
    0.50, rib Dice 0.85 -> 0.07, mean Dice below no registration). A patient who moved moves the
    skeleton too. Bone overlap after / before the rigid motion, three seeds each at the pipeline's
    6 mm: real chest CT, 3 deg + 4 mm, 1.08-1.13; 10 deg + 15 mm, 1.72-1.82; real abdomen CT
    (2 % of the body is bone), 3 deg + 4 mm, 1.05-1.66; breathing phantoms 0.59-0.73. The check it
    replaces compared the LNCC of bone-only images at the coarsest pyramid level (12 mm): it
    refused two of the abdomen's three real motions (bone LNCC -0.003 -> -0.001, noise).
    Scans with too little bone (under ``MIN_BONE_FRACTION`` of the body) skip the check.

    When the skeleton is already in place (at least ``BONE_IN_PLACE`` of the fixed bone on moving bone at
    the identity) there is no patient motion to find: "none" at once, without the rigid optimisation
    (0.3-0.45 s on a 2-core CPU). Bone overlap at the identity: real chest and abdomen under a smooth
    field alone 0.78-0.84, under 1 deg + 1 mm 0.77-0.78, breathing phantoms 0.88-0.92; patients moved
    3 deg + 4 mm 0.29-0.62, 10 deg + 15 mm 0.37-0.39. Every one of the first group ends "none" by the
    full rule too, so the shortcut changes no decision there, only the time.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..io import InputError
from ..sampling import grid_sample
from ..similarity import box_filter, lncc_loss, lncc_map, mutual_information_loss

ALIGN_MODES = ("auto", "none", "moments", "rigid", "affine")
SIMILARITIES = ("lncc", "mi")
#: Normalised intensity above which a voxel is body, not air (-500 HU in the default window).
BODY_THRESHOLD = 0.25
#: Bone for the skeleton check of same-subject pairs: +250 HU in the default window
#: (cortical and most trabecular bone; above soft tissue, fat and venous-phase contrast blood).
BONE_THRESHOLD = 0.625
#: Least share of the fixed body voxels that must be bone for the skeleton check to be made.
MIN_BONE_FRACTION = 0.005
#: Bone overlap (``bone_overlap``) at the identity from which a same-subject pair counts as unmoved.
BONE_IN_PLACE = 0.75


@dataclass
class AlignResult:
    matrix: np.ndarray      # 4x4, maps FIXED world coordinates (mm, RAS) -> MOVING world coordinates
    mode: str               # "none" | "moments" | "rigid" | "affine": what was actually done
    loss_before: float      # similarity loss at the identity (finest level, whole body; lower is better)
    loss_after: float       # similarity loss at ``matrix``
    seconds: float
    bone_check: str = "not made"  # same-subject "auto": "agrees" | "disagrees" | "in place" | "too little bone"
    #                               | "not made"


# ------------------------------------------------------------------------------------- geometry
def _index_to_unit(shape, device) -> torch.Tensor:
    """(d, h, w, 1) -> grid_sample's (x, y, z, 1) in [-1, 1], align_corners=True."""
    m = torch.zeros(4, 4, dtype=torch.float64, device=device)
    for row, axis in enumerate((2, 1, 0)):
        m[row, axis] = 2.0 / max(shape[axis] - 1, 1)
        m[row, 3] = -1.0
    m[3, 3] = 1.0
    return m


def _as_matrix(a, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64) if not torch.is_tensor(a) else a,
                           dtype=torch.float64, device=device)


def sampling_grid(matrix, fixed_shape, fixed_affine, moving_shape, moving_affine) -> torch.Tensor:
    """``grid_sample`` grid [1,D,H,W,3] that reads the moving tensor at ``matrix @ world(fixed voxel)``.

    ``matrix`` may be a torch tensor with gradient (the optimisation differentiates through it);
    the affines map tensor index order (d, h, w, 1) to world mm.
    """
    device = matrix.device if torch.is_tensor(matrix) else torch.device("cpu")
    fixed_shape, moving_shape = tuple(fixed_shape)[-3:], tuple(moving_shape)[-3:]
    theta = (_index_to_unit(moving_shape, device) @ torch.linalg.inv(_as_matrix(moving_affine, device))
             @ _as_matrix(matrix, device) @ _as_matrix(fixed_affine, device)
             @ torch.linalg.inv(_index_to_unit(fixed_shape, device)))
    return F.affine_grid(theta[:3].unsqueeze(0).float(), [1, 1, *fixed_shape], align_corners=True)


def resample_moving(moving: torch.Tensor, moving_affine, matrix, fixed_shape, fixed_affine,
                    mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """The moving tensor [1,C,...] on the fixed grid through ``matrix`` (fixed world -> moving world).

    ``mode="nearest"`` for label maps; outside the moving scan is 0 (air after normalisation).
    """
    matrix = _as_matrix(matrix, moving.device)
    grid = sampling_grid(matrix, fixed_shape, fixed_affine, moving.shape, moving_affine)
    return grid_sample(moving.float(), grid, mode=mode, padding_mode=padding_mode,
                         align_corners=True).to(moving.dtype)


def voxel_spacing(affine) -> np.ndarray:
    """Voxel size (mm) along the tensor axes (d, h, w) of a grid affine."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _world_points(shape, affine, device) -> torch.Tensor:
    """World coordinates [D,H,W,3] of every voxel of a grid."""
    idx = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float64) for n in shape], indexing="ij")
    idx = torch.stack(idx, dim=-1)
    a = _as_matrix(affine, device)
    return idx @ a[:3, :3].T + a[:3, 3]


def body_centre(image: torch.Tensor, affine, threshold: float = BODY_THRESHOLD,
                region: torch.Tensor | None = None) -> np.ndarray:
    """Intensity centre of mass (world mm) of the voxels above air (within ``region``, [1,1,...], when given):
    where the anatomy is."""
    weight = image[0, 0].double() * (image[0, 0] > threshold)
    if region is not None:
        weight = weight * (region[0, 0] != 0)
    if float(weight.sum()) <= 0:
        raise InputError("an image has no voxel above air; cannot pre-align it (is it normalised CT?)")
    points = _world_points(image.shape[2:], affine, image.device)
    return ((points * weight[..., None]).sum((0, 1, 2)) / weight.sum()).cpu().numpy()


# ------------------------------------------------------------------------------------- pyramid
@dataclass
class _Level:
    spacing_mm: float
    fixed: torch.Tensor
    fixed_affine: np.ndarray
    moving: torch.Tensor
    moving_affine: np.ndarray
    body: torch.Tensor  # bool [D,H,W] of the fixed level
    fixed_mask: torch.Tensor | None = None    # [1,1,...] 0/1 on the fixed level: where the similarity may look
    moving_mask: torch.Tensor | None = None   # [1,1,...] 0/1 on the moving level, read through the transform


def _pool(image: torch.Tensor, affine: np.ndarray, factors) -> tuple[torch.Tensor, np.ndarray]:
    """Average-pool by integer factors; voxel j of the result sits at old index f*j + (f-1)/2."""
    factors = [int(f) for f in factors]
    if max(factors) == 1:
        return image, np.asarray(affine, dtype=np.float64)
    pooled = F.avg_pool3d(image, kernel_size=factors, stride=factors)
    step = np.eye(4)
    step[:3, :3] = np.diag(factors)
    step[:3, 3] = [(f - 1) / 2 for f in factors]
    return pooled, np.asarray(affine, dtype=np.float64) @ step


def _factors(shape, spacing, target_mm: float) -> list[int]:
    return [int(min(max(1, round(target_mm / s)), max(1, n // 4))) for n, s in zip(shape, spacing)]


def _pool_mask(mask: torch.Tensor | None, affine, factors) -> torch.Tensor | None:
    """A 0/1 mask on a pyramid level: the cells at least half inside."""
    return None if mask is None else (_pool(mask.float(), affine, factors)[0] >= 0.5).float()


def _pyramid(fixed, fixed_affine, moving, moving_affine, levels_mm, max_voxels, threshold,
             fixed_mask=None, moving_mask=None) -> list[_Level]:
    fixed_spacing, moving_spacing = voxel_spacing(fixed_affine), voxel_spacing(moving_affine)
    levels, seen = [], set()
    for target in levels_mm:
        target = float(target)
        factors = _factors(fixed.shape[2:], fixed_spacing, target)
        for _ in range(30):  # coarsen until the level fits the voxel budget (factors stop at size/4)
            if math.prod(n // f for n, f in zip(fixed.shape[2:], factors)) <= max_voxels:
                break
            target *= 1.25
            factors = _factors(fixed.shape[2:], fixed_spacing, target)
        if tuple(factors) in seen:
            continue
        seen.add(tuple(factors))
        moving_factors = _factors(moving.shape[2:], moving_spacing, target)
        f, fa = _pool(fixed, fixed_affine, factors)
        m, ma = _pool(moving, moving_affine, moving_factors)
        levels.append(_Level(float(np.max(voxel_spacing(fa))), f, fa, m, ma, f[0, 0] > threshold,
                             _pool_mask(fixed_mask, fixed_affine, factors),
                             _pool_mask(moving_mask, moving_affine, moving_factors)))
    return levels


# ---------------------------------------------------------------------------------- optimisation
def _skew(w: torch.Tensor) -> torch.Tensor:
    z = torch.zeros((), dtype=w.dtype, device=w.device)
    return torch.stack([torch.stack([z, -w[2], w[1]]), torch.stack([w[2], z, -w[0]]),
                        torch.stack([-w[1], w[0], z])])


class _LinearTransform:
    """x_m = R(w) (I + S) (x_f - c) + c + t around the fixed body centre c, as a 4x4 world matrix."""

    def __init__(self, centre: np.ndarray, translation: np.ndarray, device):
        kw = dict(dtype=torch.float64, device=device)
        self.centre = torch.as_tensor(centre, **kw)
        self.rotation = torch.zeros(3, **kw, requires_grad=True)
        self.translation = torch.as_tensor(np.asarray(translation, dtype=np.float64), **kw).requires_grad_(True)
        self.linear = torch.zeros(3, 3, **kw, requires_grad=True)

    def matrix(self) -> torch.Tensor:
        eye = torch.eye(3, dtype=torch.float64, device=self.centre.device)
        lin = torch.linalg.matrix_exp(_skew(self.rotation)) @ (eye + self.linear)
        top = torch.cat([lin, (self.centre + self.translation - lin @ self.centre)[:, None]], dim=1)
        bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64, device=self.centre.device)
        return torch.cat([top, bottom], dim=0)


def _loss(level: _Level, matrix: torch.Tensor, similarity: str, kernel: int) -> torch.Tensor:
    grid = sampling_grid(matrix, level.fixed.shape, level.fixed_affine, level.moving.shape, level.moving_affine)
    # Border padding and a mask shrunk by the window: the edge of a partial field of view must not
    # look like anatomy to the similarity.
    warped = grid_sample(level.moving, grid, mode="bilinear", padding_mode="border", align_corners=True)
    inside = (grid.detach().abs() <= 1.0).all(dim=-1)[:, None].float()
    inside = (box_filter(inside, kernel) > 0.999).float()
    if level.fixed_mask is not None:      # the user's masks count voxel by voxel (a body mask keeps its contour)
        inside = inside * level.fixed_mask
    if similarity == "mi":
        return mutual_information_loss(level.fixed, warped, mask=inside)
    if level.moving_mask is None:
        return lncc_loss(level.fixed, warped, kernel=kernel, mask=inside)
    # A fixed voxel the transform puts outside the moving mask scores nothing, and still counts in the mean: were
    # it left out of the mean, the optimiser could lower the loss by moving badly matching voxels out of the mask
    # (a test pair ran 40 mm away so).
    landed = grid_sample(level.moving_mask, grid.detach(), mode="nearest", padding_mode="zeros", align_corners=True)
    return -(lncc_map(level.fixed, warped, kernel) * inside * landed).sum() / inside.sum().clamp(min=1.0)


def _optimise(levels, transform: _LinearTransform, affine: bool, similarity: str, kernel: int,
              steps: tuple[int, ...], radius_mm: float, lr_scale: float = 1.0) -> None:
    for level, n_steps in zip(levels, steps):
        lr_t = 0.2 * level.spacing_mm * lr_scale                  # mm per Adam step at the start of the level
        groups = [{"params": [transform.translation], "lr": lr_t},
                  {"params": [transform.rotation], "lr": lr_t / radius_mm}]
        if affine:
            groups.append({"params": [transform.linear], "lr": lr_t / radius_mm})
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(n_steps, 1))
        for _ in range(n_steps):
            optimizer.zero_grad()
            _loss(level, transform.matrix(), similarity, kernel).backward()
            optimizer.step()
            schedule.step()


def _check_inputs(fixed, fixed_affine, moving, moving_affine, mode, similarity) -> None:
    if mode not in ALIGN_MODES:
        raise InputError(f"align mode must be one of {', '.join(ALIGN_MODES)}; got {mode!r}")
    if similarity not in SIMILARITIES:
        raise InputError(f"align similarity must be one of {', '.join(SIMILARITIES)}; got {similarity!r}")
    for name, image, affine in (("fixed", fixed, fixed_affine), ("moving", moving, moving_affine)):
        if not torch.is_tensor(image) or image.dim() != 5 or image.shape[:2] != (1, 1):
            raise InputError(f"{name} image must be a [1,1,D,H,W] tensor, got "
                             f"{tuple(image.shape) if torch.is_tensor(image) else type(image).__name__}")
        a = np.asarray(affine, dtype=np.float64)
        if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-9:
            raise InputError(f"{name} affine must be an invertible 4x4 matrix")
    if fixed.device != moving.device:
        raise InputError(f"fixed and moving images are on different devices ({fixed.device}, {moving.device})")


def align_pair(fixed: torch.Tensor, fixed_affine: np.ndarray, moving: torch.Tensor, moving_affine: np.ndarray,
               mode: str = "auto", similarity: str = "lncc", *, same_subject: bool = False,
               levels_mm=(8.0, 4.0), steps=(60, 30), max_voxels: int = 48 ** 3, kernel: int = 5,
               tolerance_mm: float = 1.0, min_gain: float = 0.01, min_bone_gain: float = 0.02,
               body_threshold: float = BODY_THRESHOLD, fixed_mask: torch.Tensor | None = None,
               moving_mask: torch.Tensor | None = None) -> AlignResult:
    """Linear transform from the fixed to the moving scan; see the module docstring for the rule of "auto"
    (and its skeleton check for ``same_subject`` pairs).

    ``steps`` are Adam steps per pyramid level of each stage (rigid, then affine); ``kernel`` the
    LNCC window in voxels of each level. ``fixed_mask`` / ``moving_mask`` ([1,1,...] like their images,
    non-zero inside) keep the similarity to the fixed voxels inside the one that land inside the other (an
    artefact, a table or a lesion that changed between the scans left out).
    """
    start = time.perf_counter()
    _check_inputs(fixed, fixed_affine, moving, moving_affine, mode, similarity)
    if moving_mask is not None and similarity == "mi":
        raise InputError("a moving mask needs the LNCC similarity (with mutual information, give a fixed mask)")
    for name, mask, image in (("fixed_mask", fixed_mask, fixed), ("moving_mask", moving_mask, moving)):
        if mask is not None and tuple(mask.shape) != tuple(image.shape):
            raise InputError(f"{name} must be [1,1,D,H,W] like its image {tuple(image.shape)}, got {tuple(mask.shape)}")
    device = fixed.device
    fixed, moving = fixed.float(), moving.float()
    fixed_affine = np.asarray(fixed_affine, dtype=np.float64)
    moving_affine = np.asarray(moving_affine, dtype=np.float64)
    levels = _pyramid(fixed, fixed_affine, moving, moving_affine, levels_mm, max_voxels, body_threshold,
                      None if fixed_mask is None else (fixed_mask != 0).float(),
                      None if moving_mask is None else (moving_mask != 0).float())
    coarse, fine = levels[0], levels[-1]
    steps = tuple(steps) + (steps[-1],) * max(0, len(levels) - len(steps))

    def loss_at(level, matrix) -> float:
        with torch.no_grad():
            return float(_loss(level, _as_matrix(matrix, device), similarity, kernel))

    identity = np.eye(4)
    loss_identity = loss_at(fine, identity)
    bone_check = "not made"

    def finish(matrix, done) -> AlignResult:
        return AlignResult(np.asarray(matrix, dtype=np.float64), done, loss_identity, loss_at(fine, matrix),
                           time.perf_counter() - start, bone_check)

    if mode == "none":
        return finish(identity, "none")
    # The skeleton check's measure at the identity (None: not a same-subject "auto" pair with bone)
    bone_before = bone_overlap(fixed, fixed_affine, moving, moving_affine, identity) \
        if mode == "auto" and same_subject and _enough_bone(fixed, body_threshold) else None
    if bone_before is not None and bone_before >= BONE_IN_PLACE:
        bone_check = "in place"
        return finish(identity, "none")
    # With masks, the rotation turns about the masked anatomy's centre (a half-body mask rotated about the whole
    # body's centre swings out of place), and the moments compare masked anatomy with masked anatomy.
    centre_f = body_centre(fixed, fixed_affine, body_threshold, fixed_mask)
    shift = np.zeros(3) if fixed_mask is not None and moving_mask is None else \
        body_centre(moving, moving_affine, body_threshold, moving_mask) - centre_f
    moments = np.eye(4)
    moments[:3, 3] = shift
    if mode == "moments":
        return finish(moments, "moments")
    if loss_at(coarse, moments) > loss_at(coarse, identity):
        shift = np.zeros(3)

    body = fine.body if fine.fixed_mask is None else fine.body & (fine.fixed_mask[0, 0] > 0)
    body_points = _world_points(fine.fixed.shape[2:], fine.fixed_affine, device)[body]
    radius = float((body_points - torch.as_tensor(centre_f, device=device)).norm(dim=-1).pow(2).mean().sqrt())
    radius = max(radius, 10.0)
    transform = _LinearTransform(centre_f, shift, device)
    _optimise(levels, transform, affine=False, similarity=similarity, kernel=kernel, steps=steps, radius_mm=radius)
    rigid = transform.matrix().detach()
    if mode == "auto":
        moved = (body_points @ (rigid[:3, :3] - torch.eye(3, dtype=torch.float64, device=device)).T
                 + rigid[:3, 3]).norm(dim=-1)
        max_motion = float(moved.max()) if len(moved) else 0.0
        gain = (loss_identity - loss_at(fine, rigid)) / max(abs(loss_identity), 1e-12)
        if max_motion < tolerance_mm or gain < min_gain:
            return finish(identity, "none")
        if same_subject:
            bone_check = _skeleton_check(fixed, fixed_affine, moving, moving_affine, rigid, bone_before, min_bone_gain)
            if bone_check == "disagrees":
                return finish(identity, "none")
    if mode == "rigid" or (mode == "auto" and same_subject):
        return finish(rigid.cpu().numpy(), "rigid")
    # Half the rigid step sizes: the affine stage starts near the optimum and mainly fits scale/shear.
    _optimise(levels, transform, affine=True, similarity=similarity, kernel=kernel, steps=steps, radius_mm=radius,
              lr_scale=0.5)
    affine = transform.matrix().detach()
    if mode == "auto" and loss_at(fine, affine) >= loss_at(fine, rigid):
        return finish(rigid.cpu().numpy(), "rigid")
    return finish(affine.cpu().numpy(), "affine")


def bone_overlap(fixed, fixed_affine, moving, moving_affine, matrix) -> float:
    """Share of the fixed scan's bone voxels that ``matrix`` maps onto the moving scan's bone (the moving
    bone mask read linearly, so partly covered voxels count in part)."""
    fixed_bone = fixed[0, 0] > BONE_THRESHOLD
    with torch.no_grad():
        moved = resample_moving((moving > BONE_THRESHOLD).float(), moving_affine, matrix, fixed.shape, fixed_affine)
    return float(moved[0, 0][fixed_bone].mean()) if bool(fixed_bone.any()) else 0.0


def _enough_bone(fixed, body_threshold) -> bool:
    return float((fixed > BONE_THRESHOLD).sum()) >= MIN_BONE_FRACTION * max(float((fixed > body_threshold).sum()), 1.0)


def _skeleton_check(fixed, fixed_affine, moving, moving_affine, rigid, before: float | None,
                    min_bone_gain: float) -> str:
    """Whether a rigid motion found on the whole body also brings the bone closer (see the module docstring);
    ``before``: the bone overlap at the identity, None when the fixed scan has too little bone."""
    if before is None:
        return "too little bone"
    after = bone_overlap(fixed, fixed_affine, moving, moving_affine, rigid)
    return "agrees" if after >= (1.0 + min_bone_gain) * before else "disagrees"
