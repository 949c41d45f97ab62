"""Physical space: other orientation/spacing/size, results on the fixed grid, ITK field export."""
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nibabel.processing import resample_from_to

from synthetic import blob_volume, dice
from unireg import UniReg, UniRegConfig
from unireg.io import to_sitk
from unireg.organs import ORGAN_TO_ID

LIVER = ORGAN_TO_ID["liver"]


def _reoriented(img: nib.Nifti1Image, spacing, shape, labels=False) -> nib.Nifti1Image:
    """Same world content on an LPI-like permuted grid with other spacing and size."""
    # axes permuted (k, i, j) and the first two flipped
    direction = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], dtype=float).T
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(spacing)
    centre = img.affine @ np.append((np.array(img.shape) - 1) / 2, 1)
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    out = resample_from_to(img, (shape, affine), order=0 if labels else 1, cval=0 if labels else -1024)
    data = np.asanyarray(out.dataobj)
    return nib.Nifti1Image(data.astype(np.int16 if labels else np.float32), affine)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("phys")
    fixed_affine = np.diag([3.0, 3.0, 4.0, 1.0])
    fixed_affine[:3, 3] = [-60.0, -50.0, -40.0]
    f_hu, f_lab = blob_volume((40, 36, 24), seed=0)
    m_hu, m_lab = blob_volume((40, 36, 24), shift=(3.0, -2.0, 1.0), scale=0.85, seed=1)
    moving_ras = nib.Nifti1Image(m_hu.astype(np.float32), fixed_affine)
    moving_lab_ras = nib.Nifti1Image(m_lab.astype(np.int16), fixed_affine)
    moving = _reoriented(moving_ras, (2.5, 3.5, 3.0), (44, 30, 38))
    moving_lab = _reoriented(moving_lab_ras, (2.5, 3.5, 3.0), (44, 30, 38), labels=True)
    paths = {"fixed": d / "fixed.nii.gz", "moving": d / "moving.nii.gz",
             "fixed_lab": d / "fixed_labels.nii.gz", "moving_lab": d / "moving_labels.nii.gz"}
    nib.save(nib.Nifti1Image(f_hu, fixed_affine), paths["fixed"])
    nib.save(nib.Nifti1Image(f_lab.astype(np.int16), fixed_affine), paths["fixed_lab"])
    nib.save(moving, paths["moving"])
    nib.save(moving_lab, paths["moving_lab"])
    model = UniReg(UniRegConfig.from_preset("tiny", working_spacing_mm=2.0))
    result = model.register(paths["fixed"], paths["moving"], "inter | liver, spleen | smooth=0.2",
                            moving_labels=paths["moving_lab"], fixed_labels=paths["fixed_lab"], refine=60)
    return paths, result, d


def test_result_lives_on_the_fixed_grid(pair):
    paths, result, _ = pair
    fixed = nib.load(paths["fixed"])
    assert result.warped.shape == fixed.shape
    assert np.allclose(result.warped.affine, fixed.affine)
    assert result.displacement.shape == (*fixed.shape, 3)
    assert result.warped_labels.shape == fixed.shape


def test_reoriented_moving_is_related_through_world_coordinates(pair):
    paths, result, _ = pair
    f_lab = np.asanyarray(nib.load(paths["fixed_lab"]).dataobj)
    # Undeformed moving labels, brought to the fixed grid: the analytic shift only (no flip / transpose).
    _, m_lab = blob_volume((40, 36, 24), shift=(3.0, -2.0, 1.0), scale=0.85, seed=1)
    zero = result.warp(paths["moving_lab"], labels=True)  # with the field, for completeness below
    identity = np.asanyarray(type(result)(result.fixed, nib.load(paths["moving_lab"]), np.zeros_like(result.displacement),
                                          result.prompt, result.jacobian, 0.0).warp(paths["moving_lab"], labels=True).dataobj)
    assert dice(identity, m_lab, LIVER) > 0.9      # reorientation + resampling preserved the anatomy in place
    assert dice(np.asanyarray(zero.dataobj), f_lab, LIVER) > dice(identity, f_lab, LIVER) + 0.05


def test_test_time_optimisation_raises_dice(pair):
    _, result, _ = pair
    assert result.metrics["mean_dice_after"] > result.metrics["mean_dice_before"] + 0.05
    assert result.jacobian["nonpositive_jacobian_pct"] < 1.0


def test_exported_field_applied_by_simpleitk_reproduces_warped(pair):
    paths, result, d = pair
    saved = result.save(d / "out")
    field = sitk.ReadImage(str(saved["displacement"]), sitk.sitkVectorFloat64)
    fixed = sitk.ReadImage(str(paths["fixed"]))
    assert np.allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    assert np.allclose(field.GetDirection(), fixed.GetDirection(), atol=1e-6)
    transform = sitk.DisplacementFieldTransform(field)
    moving = sitk.Cast(sitk.ReadImage(str(paths["moving"])), sitk.sitkFloat32)
    resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    ours = np.transpose(np.asanyarray(result.warped.dataobj), (2, 1, 0))
    theirs = sitk.GetArrayFromImage(resampled)
    assert np.abs(ours - theirs).max() < 1.0      # HU, on a [-1024, 60] image
    assert np.abs(result.displacement).max() > 1.0  # the field is not trivial
    # and the written warped image equals the in-memory one (a float32 moving scan: written as float32)
    written = nib.load(saved["warped"])
    assert written.get_data_dtype() == np.float32
    assert np.array_equal(np.asanyarray(written.dataobj), np.asanyarray(result.warped.dataobj))


def test_to_sitk_keeps_geometry(pair):
    paths, _, _ = pair
    img = nib.load(paths["moving"])
    ours = to_sitk(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine))
    theirs = sitk.ReadImage(str(paths["moving"]))
    assert np.allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-4)
    assert np.allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-6)
    assert np.allclose(ours.GetSpacing(), theirs.GetSpacing(), atol=1e-6)


def test_warp_points_follow_the_field(pair):
    _, result, d = pair
    saved = result.save(d / "points_out")
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(saved["displacement"]), sitk.sitkVectorFloat64))
    fixed = result.fixed
    rng = np.random.default_rng(0)
    idx = rng.uniform(1.0, np.array(fixed.shape) - 2.0, size=(20, 3))   # between voxel centres
    world = (fixed.affine[:3, :3] @ idx.T + fixed.affine[:3, 3:4]).T
    mapped = result.warp_points(world)
    to_lps = np.array([-1.0, -1.0, 1.0])
    itk = np.array([transform.TransformPoint(tuple(p * to_lps)) for p in world]) * to_lps
    assert np.abs(mapped - world).max() > 0.5        # the points do move
    assert np.allclose(mapped, itk, atol=1e-3)       # as ITK moves them with the exported field
