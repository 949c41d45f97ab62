"""The registration methods compared, each wrapped to one signature and one output convention.

``method(fixed, moving, prompt) -> (u, seconds)`` where ``fixed``/``moving`` are nibabel images
(RAS affines, any grids) and ``u`` is the fixed -> moving mapping as a mm RAS displacement on the
fixed grid [X, Y, Z, 3]. ``seconds`` is the time of the call a user of that tool makes (the
conversion of its output into ``u`` is not counted). The optimisers run in this process (ConvexAdam
on the GPU with ``--device cuda``), with their documented defaults or the settings their tutorials use:

* ANTs SyN: ``ants.registration(type_of_transform="SyN")`` (antspyx; affine + SyN, MI/CC defaults);
* Greedy: affine (12 dof, image centres, NCC 2x2x2, 100x50x10) then deformable (NCC 2x2x2,
  100x50x10, ``-s 2.0vox 0.5vox``), as in the Greedy tutorial (picsl-greedy);
* ConvexAdam: ``convex_adam_pt`` with MIND-SSC features and its defaults (convexadam), on the
  moving scan resampled onto the fixed grid (ConvexAdam needs one grid and has no affine stage).

ITK-style tools write displacement fields with LPS vectors; they are flipped to RAS here.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from known_deformation import HU_AIR, grid_points, sample

_LPS = np.array([-1.0, -1.0, 1.0], dtype=np.float32)


def identity(fixed, moving, prompt=None):
    return np.zeros((*fixed.shape[:3], 3), np.float32), 0.0


# ------------------------------------------------------------------------------------------- UniReg
def pipeline_available(model) -> bool:
    """True when ``register`` has the full pipeline (``refine=`` / ``align=`` keywords)."""
    return "refine" in inspect.signature(model.register).parameters


def unireg_network(model):
    """The network alone: no pre-alignment, no instance optimisation."""
    def run(fixed, moving, prompt=None):
        kwargs = {"refine": False, "align": "none"} if pipeline_available(model) else {}
        result = model.register(fixed, moving, prompt=prompt, **kwargs)
        return result.displacement.astype(np.float32), result.seconds
    return run


def unireg_pipeline(model, **options):
    """``register`` with its defaults (pre-alignment + network + instance optimisation), or ``options``."""
    def run(fixed, moving, prompt=None):
        result = model.register(fixed, moving, prompt=prompt, **options)
        return result.displacement.astype(np.float32), result.seconds
    return run


def unireg_alignment(model):
    """``register``'s pre-alignment alone (``align="auto"``, network and refinement left out of the
    field): the share of the gain that the linear stage makes before the network. The network still
    runs inside the call, so its seconds are those of ``refine=False``."""
    def run(fixed, moving, prompt=None):
        result = model.register(fixed, moving, prompt=prompt, refine=False)
        points = grid_points(fixed.shape[:3], fixed.affine)
        moved = points @ result.affine_matrix[:3, :3].T + result.affine_matrix[:3, 3]
        return (moved - points).reshape(*fixed.shape[:3], 3).astype(np.float32), result.seconds
    return run


# ----------------------------------------------------------------------------------- ITK-style tools
def _itk_field_to_ras(path: Path, fixed: nib.Nifti1Image) -> np.ndarray:
    """An ITK displacement field file on the fixed grid (LPS vectors) -> mm RAS [X, Y, Z, 3]."""
    import SimpleITK as sitk
    img = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0, 3)).astype(np.float32)
    if arr.shape[:3] != fixed.shape[:3]:
        raise RuntimeError(f"field {path.name} has shape {arr.shape[:3]}, fixed grid {fixed.shape[:3]}")
    return arr * _LPS


def _save_float(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32), img.affine), str(path))
    return path


def ants_syn(fixed, moving, prompt=None):
    import ants
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f = ants.image_read(str(_save_float(fixed, tmp / "fixed.nii.gz")))
        m = ants.image_read(str(_save_float(moving, tmp / "moving.nii.gz")))
        start = time.perf_counter()
        reg = ants.registration(fixed=f, moving=m, type_of_transform="SyN")
        seconds = time.perf_counter() - start
        composed = ants.apply_transforms(fixed=f, moving=m, transformlist=reg["fwdtransforms"],
                                         compose=str(tmp / "total_"))
        return _itk_field_to_ras(Path(composed), fixed), seconds


@contextlib.contextmanager
def _quiet_stdout(path: Path):
    """Send what native code prints to fd 1 (Greedy's optimiser log) to a file."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        try:
            yield log
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def greedy(fixed, moving, prompt=None, threads: int = 2):
    from picsl_greedy import Greedy3D
    with tempfile.TemporaryDirectory() as tmp, _quiet_stdout(Path(tmp) / "log.txt") as quiet:
        tmp = Path(tmp)
        f, m = _save_float(fixed, tmp / "fixed.nii.gz"), _save_float(moving, tmp / "moving.nii.gz")
        g = Greedy3D()
        start = time.perf_counter()
        g.execute(f"-d 3 -threads {threads} -a -dof 12 -i {f} {m} -ia-image-centers -n 100x50x10 -m NCC 2x2x2 "
                  f"-o {tmp / 'affine.mat'}", out=quiet, err=quiet)
        g.execute(f"-d 3 -threads {threads} -i {f} {m} -it {tmp / 'affine.mat'} -n 100x50x10 -m NCC 2x2x2 "
                  f"-s 2.0vox 0.5vox -o {tmp / 'warp.nii.gz'}", out=quiet, err=quiet)
        seconds = time.perf_counter() - start
        g.execute(f"-d 3 -rf {f} -rc {tmp / 'total.nii.gz'} -r {tmp / 'warp.nii.gz'} {tmp / 'affine.mat'}",
                  out=quiet, err=quiet)
        return _itk_field_to_ras(tmp / "total.nii.gz", fixed), seconds


def convex_adam(fixed, moving, prompt=None, device: str = "cpu"):
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt
    start = time.perf_counter()
    points = grid_points(fixed.shape[:3], fixed.affine)
    moving_on_fixed = sample(np.asanyarray(moving.dataobj).astype(np.float32), moving.affine, points, 1, HU_AIR)
    disp = convex_adam_pt(np.asanyarray(fixed.dataobj).astype(np.float32),
                          moving_on_fixed.reshape(fixed.shape[:3]), device=torch.device(device),
                          dtype=torch.float32)
    seconds = time.perf_counter() - start
    return (disp.astype(np.float32) @ fixed.affine[:3, :3].T.astype(np.float32)), seconds


OPTIMISERS = {"ants_syn": ants_syn, "greedy": greedy, "convexadam": convex_adam}
