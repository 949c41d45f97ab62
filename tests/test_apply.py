"""A saved registration read back (`load_registration`) and applied to other files (`unireg apply`)."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synthetic import blob_volume
from unireg import load_registration
from unireg.cli import main
from unireg.io import InputError
from unireg.pipeline.grids import working_grid
from unireg.pipeline.mapping import total_displacement
from unireg.result import RegistrationResult
from unireg.saved import read_itk_affine
from unireg.errors import UserError

FIXED_AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
MOVING_AFFINE = np.array([[4.5, 0, 0, -6.0], [0, 4.5, 0, 3.0], [0, 0, 4.5, 5.0], [0, 0, 0, 1]])


def _rotation(degrees: float, translation) -> np.ndarray:
    a = np.deg2rad(degrees)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    m[:3, 3] = translation
    return m


@pytest.fixture(scope="module")
def registration(tmp_path_factory):
    """A result whose total mapping is a rotation + shift (its pre-alignment) and a smooth deformation, between
    scans on different grids, saved with its inverse; and the folder it was saved to."""
    f_hu, f_lab = blob_volume((32, 32, 32), seed=0)
    m_hu, m_lab = blob_volume((30, 34, 28), shift=(1, -2, 1), seed=1)
    fixed = nib.Nifti1Image(f_hu, FIXED_AFFINE)
    moving = nib.Nifti1Image(m_hu, MOVING_AFFINE)
    from unireg.config import UniRegConfig
    grid = working_grid(fixed, UniRegConfig.from_preset("tiny"))
    torch.manual_seed(0)
    voxels = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, 4), size=tuple(grid.shape[::-1]),
                                             mode="trilinear", align_corners=True) * 0.6
    matrix = _rotation(5.0, (3.0, -2.0, 1.5))
    result = RegistrationResult(fixed, moving, total_displacement(voxels, grid, fixed, matrix), "inter",
                                {"nonpositive_jacobian_pct": 0.0}, 0.0, affine_matrix=matrix,
                                fixed_labels=nib.Nifti1Image(f_lab, FIXED_AFFINE))
    folder = tmp_path_factory.mktemp("apply") / "reg"
    result.save(folder, inverse=True)
    nib.save(moving, folder.parent / "moving.nii.gz")
    nib.save(nib.Nifti1Image(m_lab, MOVING_AFFINE), folder.parent / "moving_labels.nii.gz")
    nib.save(nib.Nifti1Image(f_lab, FIXED_AFFINE), folder.parent / "fixed_labels.nii.gz")
    return result, folder


def _points(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(20, 100, size=(n, 3))


def _write_points(path, points, names=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "X", "y", "z"])
        for i, p in enumerate(points):
            w.writerow([names[i] if names else f"p{i}", *p])
    return path


def _read_points(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, np.array([[float(r["X"]), float(r["y"]), float(r["z"])] for r in rows])


def test_a_saved_registration_maps_as_the_result_did(registration):
    result, folder = registration
    saved = load_registration(folder)
    assert np.abs(saved.displacement - result.displacement).max() < 1e-5
    assert np.allclose(saved.affine_matrix, result.affine_matrix, atol=1e-6)
    assert saved.fixed_grid.shape == (32, 32, 32) and saved.moving_grid.shape == (30, 34, 28)
    points = _points()
    assert np.abs(saved.warp_points(points) - result.warp_points(points)).max() < 1e-4
    assert np.abs(saved.warp_points(points) - points).max() > 3.0                       # it does move them
    moving_points = result.warp_points(points)
    assert np.abs(saved.moving_points_to_fixed(moving_points) - points).max() < 0.05
    warped = np.asanyarray(saved.warp(folder.parent / "moving.nii.gz").dataobj)
    assert np.abs(warped - np.asanyarray(result.warped.dataobj)).max() < 1e-3
    labels = saved.warp(folder.parent / "moving_labels.nii.gz")
    assert np.array_equal(np.asanyarray(labels.dataobj),
                          np.asanyarray(result.warp(folder.parent / "moving_labels.nii.gz").dataobj))
    # the inverse read from the folder carries fixed labels as the fresh result's solved inverse does
    back = saved.warp_to_moving(folder.parent / "fixed_labels.nii.gz")
    fresh = result.warp_to_moving(result.fixed_labels)
    assert back.shape == (30, 34, 28)
    assert np.mean(np.asanyarray(back.dataobj) == np.asanyarray(fresh.dataobj)) > 0.995


def test_unireg_apply_warps_images_and_labels_onto_the_fixed_grid(registration, tmp_path, capsys):
    result, folder = registration
    out = tmp_path / "pet_on_fixed.nii.gz"
    assert main(["apply", str(folder), "--image", str(folder.parent / "moving.nii.gz"), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["interpolation"] == "linear" and summary["grid"] == "fixed"
    img = nib.load(out)
    assert img.get_data_dtype() == np.int16                             # the CT keeps its stored type
    assert np.allclose(img.affine, FIXED_AFFINE)
    assert np.abs(np.asanyarray(img.dataobj) - np.asanyarray(result.warped.dataobj)).max() <= 0.5
    labels_out = tmp_path / "labels.nii.gz"
    assert main(["apply", str(folder), "--image", str(folder.parent / "moving_labels.nii.gz"),
                 "--out", str(labels_out)]) == 0
    assert json.loads(capsys.readouterr().out)["interpolation"] == "nearest"
    ids = np.asanyarray(nib.load(labels_out).dataobj)
    moving_ids = np.asanyarray(nib.load(folder.parent / "moving_labels.nii.gz").dataobj)
    assert set(np.unique(ids)) <= set(np.unique(moving_ids)) and len(np.unique(ids)) == 3
    # the other direction: fixed labels onto the moving grid
    inverse_out = tmp_path / "fixed_labels_on_moving.nii.gz"
    assert main(["apply", str(folder), "--inverse", "--image", str(folder.parent / "fixed_labels.nii.gz"),
                 "--out", str(inverse_out)]) == 0
    assert nib.load(inverse_out).shape == (30, 34, 28)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]     # no temporary left behind


def test_unireg_apply_carries_points_and_scores_them_against_their_matches(registration, tmp_path, capsys):
    result, folder = registration
    points = _points()
    truth = result.warp_points(points) + np.random.default_rng(1).normal(0, 0.5, size=points.shape)
    source = _write_points(tmp_path / "fixed_points.csv", points)
    target = _write_points(tmp_path / "moving_points.csv", truth)
    out = tmp_path / "mapped.csv"
    assert main(["apply", str(folder), "--points", str(source), "--target", str(target), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows, mapped = _read_points(out)
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(len(points))]           # other columns kept
    assert np.abs(mapped - result.warp_points(points)).max() < 1e-3
    errors = np.array([float(r["error_mm"]) for r in rows])
    assert np.allclose(errors, np.linalg.norm(mapped - truth, axis=1), atol=2e-3)
    assert summary["error_mm"]["median"] < 1.2 < summary["error_before_mm"]["median"]
    # back again with --inverse, and in LPS
    lps = tmp_path / "moving_points_lps.csv"
    _write_points(lps, result.warp_points(points) * [-1, -1, 1])
    back = tmp_path / "back_lps.csv"
    assert main(["apply", str(folder), "--inverse", "--lps", "--points", str(lps), "--out", str(back)]) == 0
    assert json.loads(capsys.readouterr().out)["direction"] == "moving -> fixed"
    assert np.abs(_read_points(back)[1] * [-1, -1, 1] - points).max() < 0.05


def test_unireg_apply_refuses_what_it_cannot_apply(registration, tmp_path, capsys):
    result, folder = registration
    points = _write_points(tmp_path / "p.csv", _points(5))

    def error(*args) -> str:
        assert main(["apply", *map(str, args)]) == 2
        return capsys.readouterr().err

    assert "is not a UniReg registration folder: it has no displacement_itk.nii.gz" in error(
        tmp_path, "--points", points, "--out", tmp_path / "o.csv")
    (tmp_path / "summary.csv").write_text("name,status\n")
    assert "give one pair's folder" in error(tmp_path, "--points", points, "--out", tmp_path / "o.csv")
    assert "must lie on the moving image's grid" in error(
        folder, "--image", folder.parent / "fixed_labels.nii.gz", "--out", tmp_path / "o.nii.gz")
    assert "must name an image (.nii or .nii.gz)" in error(
        folder, "--image", folder.parent / "moving.nii.gz", "--out", tmp_path / "o.png")
    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,3\n")
    assert "needs columns x, y and z" in error(folder, "--points", tmp_path / "bad.csv", "--out", tmp_path / "o.csv")
    (tmp_path / "nan.csv").write_text("x,y,z\n1,2,3\n4,five,6\n")
    assert "row 3: y is 'five', not a number" in error(folder, "--points", tmp_path / "nan.csv",
                                                        "--out", tmp_path / "o.csv")
    short = _write_points(tmp_path / "short.csv", _points(3))
    assert "the target file must list each point's true match" in error(
        folder, "--points", points, "--target", short, "--out", tmp_path / "o.csv")
    (tmp_path / "exists.csv").write_text("keep me\n")
    assert "exists; pass --overwrite" in error(folder, "--points", points, "--out", tmp_path / "exists.csv")
    assert (tmp_path / "exists.csv").read_text() == "keep me\n"
    assert "--target scores points" in error(folder, "--image", folder.parent / "moving.nii.gz", "--target", points,
                                             "--out", tmp_path / "o.nii.gz")


def test_a_damaged_or_mixed_folder_is_named(registration, tmp_path):
    import shutil
    result, folder = registration
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "displacement_itk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="cannot be read as a NIfTI displacement field"):
        load_registration(copy)
    whole = (folder / "displacement_itk.nii.gz").read_bytes()
    (copy / "displacement_itk.nii.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="cannot be read as a NIfTI displacement field"):
        load_registration(copy)
    shutil.copy(folder / "displacement_itk.nii.gz", copy / "displacement_itk.nii.gz")
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["grids"]["fixed"]["shape"] = [31, 32, 32]
    (copy / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(InputError, match="mixes files of different registrations"):
        load_registration(copy)


def test_a_field_written_by_simpleitk_reads_the_same(registration, tmp_path):
    """The field as another ITK program would write it (float64 vectors, SimpleITK's own header) maps alike."""
    import shutil
    result, folder = registration
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    field = sitk.ReadImage(str(folder / "displacement_itk.nii.gz"), sitk.sitkVectorFloat64)
    sitk.WriteImage(field, str(other / "displacement_itk.nii.gz"))
    saved = load_registration(other)
    assert np.abs(saved.displacement - result.displacement).max() < 1e-5
    points = _points()
    assert np.abs(saved.warp_points(points) - result.warp_points(points)).max() < 1e-4


def test_a_folder_without_recorded_grids_still_warps_but_names_what_it_lacks(registration, tmp_path):
    """Folders saved before metrics.json recorded the grids: warping and points work; the inverse needs the moving
    grid, which the saved inverse field gives, and without it the error says so."""
    import shutil
    result, folder = registration
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["grids"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    assert load_registration(old).moving_grid.shape == (30, 34, 28)      # from the saved inverse field
    (old / "inverse_displacement_itk.nii.gz").unlink()
    saved = load_registration(old)
    assert saved.moving_grid is None
    warped = saved.warp(folder.parent / "moving.nii.gz")
    assert np.abs(np.asanyarray(warped.dataobj) - np.asanyarray(result.warped.dataobj)).max() < 1e-3
    with pytest.raises(UserError, match="does not record it"):
        saved.warp_to_moving(folder.parent / "fixed_labels.nii.gz")


def test_itk_affine_files_with_a_centre_read_as_itk_applies_them(tmp_path):
    """ITK writes affines about a centre; the matrix read back maps points as SimpleITK does (LPS <-> RAS)."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((0.98, -0.17, 0.02, 0.17, 0.98, 0.05, -0.03, -0.04, 1.1))
    transform.SetTranslation((4.0, -7.5, 2.0))
    transform.SetCenter((10.0, 20.0, -30.0))
    sitk.WriteTransform(transform, str(tmp_path / "t.mat"))
    matrix = read_itk_affine(tmp_path / "t.mat")
    for ras in ([0.0, 0.0, 0.0], [35.0, -12.0, 60.0]):
        lps = np.array(ras) * [-1, -1, 1]
        expected = np.array(transform.TransformPoint(tuple(lps))) * [-1, -1, 1]
        assert np.allclose(matrix[:3, :3] @ ras + matrix[:3, 3], expected, atol=1e-9)
    (tmp_path / "bad.mat").write_text("garbage")
    with pytest.raises(InputError, match="cannot be read as an ITK transform"):
        read_itk_affine(tmp_path / "bad.mat")


def test_an_empty_label_map_warps_to_an_empty_one(registration):
    """A segmentation with nothing in it (a lesion absent at one time point) is carried, not refused."""
    result, folder = registration
    empty = nib.Nifti1Image(np.zeros((30, 34, 28), np.uint8), MOVING_AFFINE)
    for mapping in (result, load_registration(folder)):
        warped = mapping.warp(empty, labels=True)
        assert warped.shape == (32, 32, 32) and not np.asanyarray(warped.dataobj).any()


SLICER_HEADER = ("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                 "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")


def _write_fcsv(path, points_ras):
    rows = "".join(f"vtkMRMLMarkupsFiducialNode_{i},{-p[0]},{-p[1]},{p[2]},0,0,0,1,1,1,0,F-{i + 1},,\n"
                   for i, p in enumerate(points_ras))
    path.write_text(SLICER_HEADER + rows)
    return path


def test_slicer_markups_files_are_read_and_written_as_slicer_writes_them(registration, tmp_path, capsys):
    result, folder = registration
    points = _points(6)
    truth = result.warp_points(points)
    source, target = _write_fcsv(tmp_path / "F.fcsv", points), _write_fcsv(tmp_path / "T.fcsv", truth)
    out = tmp_path / "mapped.fcsv"
    assert main(["apply", str(folder), "--points", str(source), "--target", str(target), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["error_mm"]["max"] < 0.01
    text = out.read_text()
    assert text.startswith(SLICER_HEADER)                                    # Slicer's header, LPS kept
    rows = [line.split(",") for line in text.splitlines() if not line.startswith("#")]
    mapped_lps = np.array([[float(r[1]), float(r[2]), float(r[3])] for r in rows])
    assert np.abs(mapped_lps * [-1, -1, 1] - truth).max() < 1e-3
    assert [r[11] for r in rows] == [f"F-{i + 1}" for i in range(6)] and rows[0][12].startswith("error_mm ")
    assert main(["apply", str(folder), "--points", str(source), "--out", str(tmp_path / "mapped.csv")]) == 2
    assert "must be a .fcsv file like F.fcsv" in capsys.readouterr().err
    (tmp_path / "bad.fcsv").write_text("# CoordinateSystem = LPS\n1,2,3\n")
    assert main(["apply", str(folder), "--points", str(tmp_path / "bad.fcsv"), "--out", str(tmp_path / "o.fcsv")]) == 2
    assert "no '# columns = ...' line" in capsys.readouterr().err
