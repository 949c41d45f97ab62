"""What `register` hands back and writes: stages, points, strict JSON, ITK files, other file formats."""
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synthetic import blob_volume
from unireg import UniReg
from unireg.errors import UserError
from unireg.io import InputError, field_on_grid, tensor_field_to_world
from unireg.pipeline.grids import scan_tensor, working_grid
from unireg.result import RegistrationResult

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = UniReg.from_config("tiny")
    with torch.no_grad():  # a non-trivial untrained network: controllers emit non-zero heads
        for c in m.controllers:
            c.out.weight.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def scans():
    f_hu, f_lab = blob_volume((32, 32, 32), seed=0)
    m_hu, m_lab = blob_volume((32, 32, 32), shift=(2, -2, 1), seed=1)
    return {k: (v, AFFINE) for k, v in dict(fixed=f_hu, moving=m_hu, fixed_labels=f_lab, moving_labels=m_lab).items()}


@pytest.fixture(scope="module")
def network_only(model, scans):
    return model.register(scans["fixed"], scans["moving"], "inter | liver", moving_labels=scans["moving_labels"],
                          fixed_labels=scans["fixed_labels"], refine=False, align="none")


def test_refine_false_is_the_network_field(model, scans, network_only):
    fixed = nib.Nifti1Image(scans["fixed"][0], AFFINE)
    grid = working_grid(fixed, model.config)
    f = scan_tensor(fixed, grid, model.config, "cpu")
    m = scan_tensor(nib.Nifti1Image(scans["moving"][0], AFFINE), grid, model.config, "cpu")
    with torch.no_grad():
        disp = model(f, m, "inter | liver").displacement[0].numpy()
    expected = field_on_grid(tensor_field_to_world(disp, grid.affine), grid.affine, fixed.shape, AFFINE)
    assert np.abs(expected).max() > 0.1
    assert np.allclose(network_only.displacement, expected, atol=1e-5)
    assert [s["stage"] for s in network_only.metrics["stages"]] == ["load", "network", "mapping", "labels"]


def test_bad_refine_align_and_rigid_values(model, scans):
    f, m = scans["fixed"], scans["moving"]
    for bad in ("lots", -3, 2.5):
        with pytest.raises(UserError, match="refine must be 'auto', 'fast', 'accurate', False or a number of steps"):
            model.register(f, m, refine=bad)
    with pytest.raises(UserError, match="align must be one of auto, none, rigid, affine"):
        model.register(f, m, align="similarity")
    with pytest.raises(UserError, match="rigid=liver needs a label map"):
        model.register(f, m, "inter | liver | rigid=liver")
    with pytest.raises(UserError, match="rigid= acts during instance optimisation"):
        model.register(f, m, "inter | rigid=liver", fixed_labels=scans["fixed_labels"], refine=False)
    with pytest.raises(UserError, match="contain no pancreas"):
        model.register(f, m, "inter | rigid=pancreas", fixed_labels=scans["fixed_labels"], refine=5, align="none")
    with pytest.raises(UserError, match="unknown organ 'livr'"):
        model.register(f, m, "inter | rigid=livr")


def test_warp_points_takes_n_by_3_only(network_only):
    pts = np.array([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0], [70.0, 80.0, 90.0]])
    moved = network_only.warp_points(pts)
    assert moved.shape == (3, 3)
    assert np.allclose(network_only.warp_points(pts[1]), moved[1])
    for bad, message in ((pts.T[:, :2], r"shape \(N, 3\)"), (np.zeros((5, 4)), "got shape"),
                         (np.zeros((5, 2)), "got shape"), ("10,20,30", "points must be numbers"),
                         ([[1, 2, np.nan]], "NaN")):
        with pytest.raises(InputError, match=message):
            network_only.warp_points(bad)


def test_metrics_json_is_strict_and_explains_missing_organs(model, scans, tmp_path):
    result = model.register(scans["fixed"], scans["moving"], "inter | liver, pancreas",
                            moving_labels=scans["moving_labels"], fixed_labels=scans["fixed_labels"],
                            refine=False, align="none")
    paths = result.save(tmp_path / "out")
    text = paths["metrics"].read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert set(metrics["dice_after"]) == {"liver"}
    assert metrics["dice_missing"] == {"pancreas": "absent from the fixed and moving labels"}
    assert metrics["jacobian"]["sd_log_jacobian"] >= 0 and metrics["max_displacement_mm"] > 0
    assert {s["stage"] for s in metrics["stages"]} >= {"network", "mapping"}
    assert all(s["seconds"] >= 0 for s in metrics["stages"])
    empty = RegistrationResult(result.fixed, result.moving, result.displacement, result.prompt,
                               {"sd_log_jacobian": float("nan"), "nonpositive_jacobian_pct": 0.0}, 0.0, metrics={"mean_dice_after": float("nan")})
    assert json.loads(empty.save(tmp_path / "nan")["metrics"].read_text())["mean_dice_after"] is None


def test_affine_file_and_total_field_reproduce_warped_in_simpleitk(model, scans, tmp_path):
    """The saved field is the total mapping; affine.mat is the pre-alignment alone, as ITK reads it."""
    fixed = nib.Nifti1Image(scans["fixed"][0].astype(np.float32), AFFINE)
    moving = nib.Nifti1Image(scans["moving"][0].astype(np.float32), AFFINE)
    result = model.register(fixed, moving, refine=False, align="none")
    angle = np.deg2rad(4.0)
    matrix = np.eye(4)
    matrix[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix[:3, 3] = [3.0, -2.0, 1.5]
    from unireg.pipeline.mapping import total_displacement
    from unireg.pipeline.grids import working_grid as wg
    grid = wg(fixed, model.config)
    zero = torch.zeros(1, 3, *grid.shape[::-1])
    combined = RegistrationResult(fixed, moving, total_displacement(zero, grid, fixed, matrix), result.prompt,
                                  result.jacobian, 0.0, affine_matrix=matrix)
    paths = combined.save(tmp_path / "aff")
    nib.save(fixed, tmp_path / "fixed.nii.gz")
    nib.save(moving, tmp_path / "moving.nii.gz")
    ref = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"))
    mov = sitk.ReadImage(str(tmp_path / "moving.nii.gz"), sitk.sitkFloat32)
    ours = np.transpose(np.asanyarray(combined.warped.dataobj), (2, 1, 0))
    by_affine = sitk.GetArrayFromImage(sitk.Resample(mov, ref, sitk.ReadTransform(str(paths["affine"])),
                                                     sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(str(paths["displacement"]), sitk.sitkVectorFloat64))
    by_field = sitk.GetArrayFromImage(sitk.Resample(mov, ref, field, sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    inside = (ours > -1000) & (by_affine > -1000)
    assert inside.mean() > 0.3
    assert np.abs(ours - by_affine)[inside].max() < 1.0
    assert np.abs(ours - by_field)[inside].max() < 1.0


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_file_formats_register_like_nifti(model, scans, network_only, tmp_path, suffix):
    from unireg.io import to_sitk
    paths = {}
    for name in ("fixed", "moving"):
        paths[name] = tmp_path / f"{name}{suffix}"
        sitk.WriteImage(to_sitk(nib.Nifti1Image(scans[name][0], AFFINE)), str(paths[name]))
    result = model.register(paths["fixed"], paths["moving"], "inter | liver", refine=False, align="none")
    assert np.allclose(result.fixed.affine, AFFINE)
    assert np.allclose(result.displacement, network_only.displacement, atol=1e-4)


def test_warped_scans_are_written_in_the_scans_stored_type(model, scans, tmp_path):
    """An int16 CT is written back as int16 (rounded, within the type's range), the fixed scan carried onto
    the moving grid likewise; scaled integers and floating-point scans as float32."""
    from unireg.io import stored_like
    fixed_hu, moving_hu = (np.rint(scans[k][0]).astype(np.int16) for k in ("fixed", "moving"))
    result = model.register((fixed_hu, AFFINE), (moving_hu, AFFINE), "inter", refine=False, align="none")
    paths = result.save(tmp_path / "out", inverse=True)
    for key in ("warped", "inverse_warped"):
        written = nib.load(paths[key])
        assert written.get_data_dtype() == np.int16, key
    warped = np.asanyarray(nib.load(paths["warped"]).dataobj)
    assert np.array_equal(warped, np.rint(np.asanyarray(result.warped.dataobj)))

    values = np.array([[[-40000.4, -1.5, 0.49, 2.5, 40000.0]]], dtype=np.float32)
    as_int16 = stored_like(values, nib.Nifti1Image(np.zeros((1, 1, 5), np.int16), AFFINE))
    assert as_int16.dtype == np.int16 and as_int16.tolist() == [[[-32768, -2, 0, 2, 32767]]]
    path = tmp_path / "scaled.nii.gz"
    scaled = nib.Nifti1Image(np.zeros((1, 1, 5), np.int16), AFFINE)
    scaled.header.set_slope_inter(0.5, -1024.0)
    nib.save(scaled, path)
    for source in (nib.load(path), nib.Nifti1Image(np.zeros((1, 1, 5), np.float32), AFFINE)):
        kept = stored_like(values, source)
        assert kept.dtype == np.float32 and np.array_equal(kept, values)
