"""Pre-alignment recovers known linear transforms between phantom scans on different grids.

The moving scans are made here with scipy (map_coordinates on the world coordinates), not with the
code under test, so a convention error in ``sampling_grid`` cannot cancel itself out.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from data_tools.phantom import make_subject
from unireg.io import InputError
from unireg.pipeline.align import align_pair, bone_overlap, resample_moving
from unireg.preprocessing import normalize_ct


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.lru_cache(maxsize=1)
def _source():
    """A phantom on a 288 mm grid, larger than the scans cut from it; (HU [D,H,W], tensor affine)."""
    subject = make_subject(3, shape=(96, 96, 96), spacing_mm=(3.0, 3.0, 3.0), noise_hu=6.0)
    affine_ijk = subject.affine
    return subject.image.astype(np.float32), affine_ijk[:, [2, 1, 0, 3]]


def _grid_affine(shape, spacing, centre, rotation=np.eye(3)):
    """Tensor-order affine of a grid of ``shape``/``spacing`` whose centre voxel sits at ``centre``."""
    a = np.eye(4)
    a[:3, :3] = rotation @ np.diag(spacing)
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return a


def _scan(world_to_source, shape, affine):
    """Normalised tensor of the source phantom seen through ``world_to_source`` on a grid."""
    hu, source_affine = _source()
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    src = world @ world_to_source[:3, :3].T + world_to_source[:3, 3]
    src_idx = (src - source_affine[:3, 3]) @ np.linalg.inv(source_affine[:3, :3]).T
    values = ndimage.map_coordinates(hu, np.moveaxis(src_idx, -1, 0), order=1, cval=-1024.0)
    return torch.from_numpy(normalize_ct(values))[None, None]


def _pair(true_matrix, moving_shape=(56, 56, 56), moving_spacing=(3.5, 3.5, 3.5), moving_rotation=np.eye(3)):
    """Fixed: 64^3 at 3 mm from the source; moving(y) = source(T^-1 y) on its own grid around T(0)."""
    fixed_affine = _grid_affine((64, 64, 64), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0))
    fixed = _scan(np.eye(4), (64, 64, 64), fixed_affine)
    moving_affine = _grid_affine(moving_shape, moving_spacing, true_matrix[:3, 3], moving_rotation)
    moving = _scan(np.linalg.inv(true_matrix), moving_shape, moving_affine)
    return fixed, fixed_affine, moving, moving_affine


def _rigid(degrees, axis, translation):
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(np.deg2rad(degrees) * np.asarray(axis) / np.linalg.norm(axis)).as_matrix()
    m[:3, 3] = translation
    return m


def _max_point_error(estimate, truth, fixed, fixed_affine):
    """Largest distance (mm) between the estimated and true images of the fixed body voxels."""
    idx = np.argwhere(fixed[0, 0].numpy() > 0.25).astype(np.float64)
    world = idx @ fixed_affine[:3, :3].T + fixed_affine[:3, 3]
    return float(np.linalg.norm(world @ (estimate - truth)[:3, :3].T + (estimate - truth)[:3, 3], axis=1).max())


def _rotation_error_deg(estimate, truth):
    u, _, vt = np.linalg.svd(estimate[:3, :3])     # nearest rotation of the estimate
    relative = (u @ vt).T @ truth[:3, :3]
    return float(np.rad2deg(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1))))


def test_rigid_10_degrees_15_mm_is_recovered():
    truth = _rigid(10.0, (1.0, 0.4, -0.3), (9.0, -10.0, 6.7))  # |t| = 15 mm
    fixed, fa, moving, ma = _pair(truth)
    result = align_pair(fixed, fa, moving, ma, mode="rigid")
    assert result.mode == "rigid"
    assert _max_point_error(result.matrix, truth, fixed, fa) < 1.0
    assert _rotation_error_deg(result.matrix, truth) < 0.5
    assert result.loss_after < result.loss_before


def test_affine_with_scaling_on_a_rotated_anisotropic_grid():
    truth = _rigid(6.0, (0.2, 1.0, 0.1), (-8.0, 5.0, 4.0))
    truth[:3, :3] = truth[:3, :3] @ np.diag([1.1, 0.92, 1.05])
    flip_rotate = Rotation.from_euler("z", 90, degrees=True).as_matrix() @ np.diag([1.0, -1.0, 1.0])
    fixed, fa, moving, ma = _pair(truth, moving_shape=(48, 90, 70), moving_spacing=(5.0, 2.5, 3.2),
                                  moving_rotation=flip_rotate)
    result = align_pair(fixed, fa, moving, ma, mode="affine")
    assert result.mode == "affine"
    assert _max_point_error(result.matrix, truth, fixed, fa) < 1.0
    rigid_only = align_pair(fixed, fa, moving, ma, mode="rigid")
    assert result.loss_after < rigid_only.loss_after
    assert _max_point_error(rigid_only.matrix, truth, fixed, fa) > 5.0


def test_resample_moving_puts_the_moving_scan_on_the_fixed_grid():
    truth = _rigid(10.0, (0.0, 0.0, 1.0), (5.0, 0.0, -5.0))
    fixed, fa, moving, ma = _pair(truth)
    aligned = resample_moving(moving, ma, truth, fixed.shape, fa)
    unaligned = resample_moving(moving, ma, np.eye(4), fixed.shape, fa)
    inside = (aligned > 0.05) & (unaligned > 0.05)
    assert (aligned - fixed)[inside].abs().mean() < 0.25 * (unaligned - fixed)[inside].abs().mean()


def test_auto_leaves_an_aligned_pair_alone_and_aligns_a_shifted_one():
    fixed, fa, moving, ma = _pair(np.eye(4), moving_shape=(64, 64, 64), moving_spacing=(3.0, 3.0, 3.0))
    moving = moving + 0.01 * torch.randn(moving.shape, generator=torch.Generator().manual_seed(0))
    result = align_pair(fixed, fa, moving, ma, mode="auto")
    assert result.mode == "none"
    np.testing.assert_array_equal(result.matrix, np.eye(4))
    truth = _rigid(4.0, (0.0, 1.0, 0.0), (0.0, 12.0, 0.0))
    fixed, fa, moving, ma = _pair(truth)
    shifted = align_pair(fixed, fa, moving, ma, mode="auto")
    assert shifted.mode in ("rigid", "affine")
    assert _max_point_error(shifted.matrix, truth, fixed, fa) < 2.0


def test_moments_and_none_modes():
    truth = _rigid(0.0, (0.0, 0.0, 1.0), (10.0, -6.0, 3.0))
    fixed, fa, moving, ma = _pair(truth)
    none = align_pair(fixed, fa, moving, ma, mode="none")
    assert none.mode == "none" and np.array_equal(none.matrix, np.eye(4))
    moments = align_pair(fixed, fa, moving, ma, mode="moments")
    assert moments.mode == "moments"
    assert np.linalg.norm(moments.matrix[:3, 3] - truth[:3, 3]) < 3.0
    assert moments.loss_after < moments.loss_before


def test_bad_mode_and_similarity_are_named():
    fixed, fa, moving, ma = torch.rand(1, 1, 16, 16, 16), np.eye(4), torch.rand(1, 1, 16, 16, 16), np.eye(4)
    with pytest.raises(InputError, match="auto, none, moments, rigid, affine"):
        align_pair(fixed, fa, moving, ma, mode="similarity")
    with pytest.raises(InputError, match="lncc, mi"):
        align_pair(fixed, fa, moving, ma, similarity="ssd")
    with pytest.raises(InputError, match="affine"):
        align_pair(fixed, np.zeros((4, 4)), moving, ma)


def test_mutual_information_aligns_a_contrast_inverted_scan():
    truth = _rigid(5.0, (1.0, 0.0, 0.0), (6.0, 0.0, -4.0))
    fixed, fa, moving, ma = _pair(truth)
    inverted = (1.0 - moving) * (moving > 0.05)       # tissue dark, air stays air
    result = align_pair(fixed, fa, inverted, ma, mode="rigid", similarity="mi")
    assert _max_point_error(result.matrix, truth, fixed, fa) < 2.0


def test_same_subject_auto_keeps_a_moved_patient_and_leaves_breathing_to_the_deformable_stages(monkeypatch):
    """Breathing moves organs, not the skeleton: the bone is found in place at once, and a whole-body
    rigid fit to the breathing (the full rule) is refused by the bone; a patient who moved moves the
    bone too, and that rigid motion is kept (and not made affine)."""
    import unireg.pipeline.align as align_module
    from data_tools.phantom import make_intra_pair, make_subject
    subject = make_subject(11, shape=(64, 64, 64), spacing_mm=(6.0, 6.0, 6.0))
    breathing, _ = make_intra_pair(subject, seed=5, amplitude_mm=18.0)
    affine = subject.affine[:, [2, 1, 0, 3]]                    # (i, j, k) -> tensor order (d, h, w)
    fixed, moving = (torch.from_numpy(normalize_ct(s.image))[None, None] for s in (subject, breathing))
    whole_body = align_pair(fixed, affine, moving, affine, mode="rigid")
    assert _max_point_error(whole_body.matrix, np.eye(4), fixed, affine) > 2.0   # the organs pull it along
    result = align_pair(fixed, affine, moving, affine, mode="auto", same_subject=True)
    assert (result.mode, result.bone_check) == ("none", "in place")
    np.testing.assert_array_equal(result.matrix, np.eye(4))
    monkeypatch.setattr(align_module, "BONE_IN_PLACE", 1.01)          # no shortcut: the rigid fit, then the check
    full_rule = align_pair(fixed, affine, moving, affine, mode="auto", same_subject=True)
    assert (full_rule.mode, full_rule.bone_check) == ("none", "disagrees")
    np.testing.assert_array_equal(full_rule.matrix, np.eye(4))
    monkeypatch.undo()

    truth = _rigid(4.0, (0.0, 1.0, 0.0), (0.0, 12.0, 0.0))
    fixed, fa, moving, ma = _pair(truth)
    moved = align_pair(fixed, fa, moving, ma, mode="auto", same_subject=True)
    assert (moved.mode, moved.bone_check) == ("rigid", "agrees")
    assert _max_point_error(moved.matrix, truth, fixed, fa) < 2.0


def test_bone_overlap_measures_where_the_fixed_skeleton_lands():
    """The skeleton check's measure: a scan's bone lands all on itself; another scan of the patient moved
    by 3 deg + 4 mm (resampled, so thin bone is partly lost) has more of it under the true motion than
    at the identity (0.74 vs 0.49), and none when it is read a body-width away."""
    assert bone_overlap(*_pair(np.eye(4))[:2], *_pair(np.eye(4))[:2], np.eye(4)) > 0.999
    truth = _rigid(3.0, (0.3, 1.0, 0.2), (4.0, 0.0, 0.0))
    fixed, fa, moving, ma = _pair(truth, moving_shape=(64, 64, 64), moving_spacing=(3.0, 3.0, 3.0))
    at_truth = bone_overlap(fixed, fa, moving, ma, truth)
    assert at_truth > 0.6
    assert bone_overlap(fixed, fa, moving, ma, np.eye(4)) < at_truth - 0.15
    assert bone_overlap(fixed, fa, moving, ma, _rigid(0.0, (1.0, 0.0, 0.0), (400.0, 0.0, 0.0))) == 0.0
