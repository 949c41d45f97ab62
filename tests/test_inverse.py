"""The inverse direction: moving-space points and grids carried back to the fixed scan (unireg.inverse)."""
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from unireg import UniReg
from unireg.cli import main
from unireg.errors import UserError
from unireg.inverse import _inverse_on_grid, inverse_field
from unireg.io import InputError
from unireg.prompt import parse_prompt
from unireg.result import RegistrationResult


def _rotation(degrees):
    out = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(degrees)):
        c, s = np.cos(angle), np.sin(angle)
        turn = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        turn[[i, i, j, j], [i, j, i, j]] = [c, -s, s, c]
        out = turn @ out
    return out


#: A patient who moved (10 deg, 15 mm) and deformed smoothly (up to 6 mm): T(x) = M (x + u(x)).
MATRIX = np.eye(4)
MATRIX[:3, :3] = _rotation([10.0, -5.0, 8.0])
MATRIX[:3, 3] = [15.0, -10.0, 5.0]


def _u(p):
    return 6.0 * np.stack([np.sin(p[:, 1] / 25), np.cos(p[:, 2] / 30) * np.sin(p[:, 0] / 40),
                           np.sin((p[:, 0] + p[:, 1]) / 35)], axis=1)


def _mapping(p, u=_u, matrix=MATRIX):
    return (p + u(p)) @ matrix[:3, :3].T + matrix[:3, 3]


def _grid(shape, spacing, origin):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return affine, ijk @ affine[:3, :3].T + affine[:3, 3]


def _result(shape, spacing, origin, u=_u, matrix=MATRIX, moving_shape=None):
    """A result whose field is the known mapping sampled on the fixed grid (moving grid: the fixed one's)."""
    affine, x = _grid(shape, spacing, origin)
    field = (_mapping(x, u, matrix) - x).reshape(*shape, 3).astype(np.float32)
    image = nib.Nifti1Image(np.zeros(shape, np.float32), affine)
    return RegistrationResult(image, image, field, parse_prompt("intra"), {}, 0.0, affine_matrix=matrix)


def _interior(x, shape, affine, margin):
    ijk = (x - affine[:3, 3]) / np.diag(affine)[:3]
    return np.all((ijk > margin) & (ijk < np.array(shape) - 1 - margin), axis=1)


def test_moving_points_come_back_to_the_fixed_points_that_map_onto_them():
    shape, spacing, origin = (60, 50, 40), (2.0, 2.0, 3.0), (-60.0, -50.0, -60.0)
    result = _result(shape, spacing, origin)
    rng = np.random.default_rng(0)
    affine, x = _grid(shape, spacing, origin)
    fixed = x[_interior(x, shape, affine, 3)]
    fixed = fixed[rng.choice(len(fixed), 500)] + rng.uniform(-0.9, 0.9, (500, 3))   # between voxel centres
    moving = _mapping(fixed)
    back = result.moving_points_to_fixed(moving)
    assert np.abs(back - fixed).max() < 0.05           # the field is the mapping sampled every 2-3 mm
    assert np.allclose(result.warp_points(back), moving, atol=0.011)                   # within tol_mm
    assert np.allclose(result.moving_points_to_fixed(moving[7]), back[7])             # one point [3]
    with pytest.raises(InputError, match="NaN"):
        result.moving_points_to_fixed([[1.0, 2.0, np.nan]])


def test_the_inverse_field_on_a_fine_grid_is_found_on_a_lattice_and_interpolated():
    """0.8 mm voxels, a 3 mm deformation of ~10 cm wavelength: the inverse is solved on a ~2 mm lattice and
    interpolated; it stays within ITK's default tolerance of the voxel-by-voxel inverse (0.1 mm at most;
    InvertDisplacementFieldImageFilter's MaxErrorToleranceThreshold), and y + W(y) maps back onto y."""
    shape, spacing, origin = (96, 90, 80), (0.8, 0.8, 0.8), (-38.0, -36.0, -32.0)
    result = _result(shape, spacing, origin, u=lambda p: 0.5 * _u(p * 1.5), matrix=np.eye(4))
    affine = result.affine
    lazy, stats = inverse_field(result.displacement, affine, np.eye(4), shape, affine)
    assert stats.points == 39 * 37 * 33 and stats.unconverged == 0   # ~2 mm apart, first and last voxels included
    fine = np.asarray(lazy)
    assert fine.shape == (*shape, 3) and np.array_equal(lazy[10:20], fine[10:20])           # read in blocks
    assert np.array_equal(lazy[:, :, 5:9, 2], fine[:, :, 5:9, 2]) and lazy.any()
    exact, _ = _inverse_on_grid(result.displacement, affine, np.eye(4), shape, affine, 0.01)
    error = np.linalg.norm(fine - exact, axis=-1)
    assert error.max() < 0.1 and np.percentile(error, 99) < 0.05 and np.median(error) < 0.01
    _, y = _grid(shape, spacing, origin)
    landed = result.warp_points(y + fine.reshape(-1, 3))
    assert np.abs(landed - y).max() < 0.1


def test_a_field_squeezed_two_and_a_half_fold_is_still_inverted():
    """Where the deformation compresses tissue to 40 % (Jacobian far from the identity) the plain fixed-point
    step stops contracting; Newton's steps finish the job."""
    def squeeze(p):                       # x -> x - 0.6 * 8 * sin(x/8) near the origin: slope 0.4 at x = 0
        return np.stack([-4.8 * np.sin(p[:, 0] / 8.0) * np.exp(-(p[:, 0] / 40.0) ** 2),
                         np.zeros(len(p)), np.zeros(len(p))], axis=1)
    shape, spacing, origin = (80, 8, 8), (1.0, 4.0, 4.0), (-40.0, -16.0, -16.0)
    result = _result(shape, spacing, origin, u=squeeze, matrix=np.eye(4))
    y = np.stack([np.linspace(-20, 20, 81), np.zeros(81), np.zeros(81)], axis=1)
    back = result.moving_points_to_fixed(y)
    assert np.allclose(result.warp_points(back), y, atol=0.011)
    assert result.inverse_displacement.shape == (*shape, 3) and result.metrics["inverse"]["unconverged"] == 0


def test_a_folded_field_is_refused_not_inverted_wrongly():
    """Folded, the mapping sends several fixed points onto one moving point: there is no inverse to give."""
    def fold(p):                          # slope 1 - 2 = -1 around x = 0: the mapping folds
        return np.stack([-16.0 * np.sin(p[:, 0] / 8.0) * np.exp(-(p[:, 0] / 20.0) ** 2),
                         np.zeros(len(p)), np.zeros(len(p))], axis=1)
    result = _result((80, 8, 8), (1.0, 4.0, 4.0), (-40.0, -16.0, -16.0), u=fold, matrix=np.eye(4))
    slope = np.gradient(result.displacement[..., 0], axis=0) + 1.0          # det J: only x moves
    result.jacobian = {"nonpositive_jacobian_pct": float((slope <= 0).mean() * 100)}
    assert 0 < result.jacobian["nonpositive_jacobian_pct"] < 50 and not result.invertible
    with pytest.raises(UserError, match=r"folds at .* % of its voxels .* no inverse"):
        _ = result.inverse_displacement
    with pytest.raises(UserError, match="no inverse"):
        result.moving_points_to_fixed([0.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def phantom_pair():
    from data_tools.phantom import make_subject
    a = make_subject(31, shape=(64, 64, 64), spacing_mm=(6.0, 6.0, 6.0))
    b = make_subject(32, shape=(64, 64, 64), spacing_mm=(6.0, 6.0, 6.0))
    to_nib = lambda arr: nib.Nifti1Image(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))), a.affine)  # noqa: E731
    return {"fixed": to_nib(a.image), "moving": to_nib(b.image),
            "fixed_labels": to_nib(a.labels), "moving_labels": to_nib(b.labels)}


def _mean_dice(a, b):
    ids = [i for i in np.unique(a) if i and (b == i).any()]
    return float(np.mean([2 * ((a == i) & (b == i)).sum() / ((a == i).sum() + (b == i).sum()) for i in ids]))


@pytest.mark.slow
def test_fixed_labels_carried_onto_the_moving_scan_match_its_own(phantom_pair, tmp_path):
    """Two phantom subjects registered with the shipped model: the fixed subject's labels, carried onto the
    moving grid by the inverse, overlap the moving subject's labels far better than unregistered; the written
    inverse field, applied by SimpleITK to the fixed scan, reproduces inverse_warped.nii.gz."""
    model = UniReg.from_pretrained("unireg-tiny-phantom")
    result = model.register(phantom_pair["fixed"], phantom_pair["moving"], "inter",
                            fixed_labels=phantom_pair["fixed_labels"])
    moving_labels = np.asarray(phantom_pair["moving_labels"].dataobj)
    carried = result.warp_to_moving(phantom_pair["fixed_labels"])
    assert carried.shape == moving_labels.shape and np.allclose(carried.affine, phantom_pair["moving"].affine)
    before = _mean_dice(moving_labels, np.asarray(phantom_pair["fixed_labels"].dataobj))
    after = _mean_dice(moving_labels, np.asarray(carried.dataobj))
    assert after > before + 0.1, (before, after)

    paths = result.save(tmp_path / "out", inverse=True)
    assert {"inverse_displacement", "inverse_warped", "inverse_warped_labels"} <= set(paths)
    written = nib.load(paths["inverse_warped_labels"])
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(carried.dataobj))
    nib.save(phantom_pair["fixed"], tmp_path / "fixed.nii.gz")
    nib.save(phantom_pair["moving"], tmp_path / "moving.nii.gz")
    fixed = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"), sitk.sitkFloat32)
    reference = sitk.ReadImage(str(tmp_path / "moving.nii.gz"))
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(str(paths["inverse_displacement"]), sitk.sitkVectorFloat64))
    by_itk = sitk.GetArrayFromImage(sitk.Resample(fixed, reference, field, sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    ours = np.transpose(np.asarray(nib.load(paths["inverse_warped"]).dataobj), (2, 1, 0))
    inside = (ours > -1000) & (by_itk > -1000)
    assert inside.mean() > 0.5 and np.abs(ours - by_itk)[inside].max() < 1.0
    assert "inverse" in __import__("json").loads(paths["metrics"].read_text())

    with pytest.raises(InputError, match="must lie on the fixed image's grid"):
        result.warp_to_moving(nib.Nifti1Image(np.arange(1000, dtype=np.float32).reshape(10, 10, 10), np.eye(4)))


@pytest.mark.slow
def test_the_command_line_writes_the_inverse_on_request(phantom_pair, tmp_path, capsys):
    for name, image in phantom_pair.items():
        nib.save(image, tmp_path / f"{name}.nii.gz")
    args = ["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
            "--prompt", "inter", "--refine", "off", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "inverse_displacement_itk.nii.gz").exists()
    assert main([*args, "--out", str(tmp_path / "both"), "--inverse",
                 "--fixed-labels", str(tmp_path / "fixed_labels.nii.gz")]) == 0
    field = nib.load(tmp_path / "both" / "inverse_displacement_itk.nii.gz")
    assert field.shape == (*phantom_pair["moving"].shape, 1, 3)
    assert np.allclose(field.affine, phantom_pair["moving"].affine)
    assert nib.load(tmp_path / "both" / "inverse_warped_labels.nii.gz").get_data_dtype().kind in "iu"


def test_an_inverse_solved_on_a_lattice_is_written_block_by_block(tmp_path):
    """On 0.8 mm voxels the saved inverse field and the fixed scan on the moving grid are made from the lattice
    a block at a time; the file holds the same field as ``inverse_displacement``."""
    shape = (40, 36, 30)
    result = _result(shape, (0.8, 0.8, 0.8), (-16.0, -14.0, -12.0), matrix=np.eye(4))
    _, x = _grid(shape, (0.8, 0.8, 0.8), (-16.0, -14.0, -12.0))
    image = (100 * np.sin(x[:, 0] / 5) * np.cos(x[:, 1] / 7)).reshape(shape).astype(np.float32)
    result.fixed = result.moving = nib.Nifti1Image(image, result.affine)
    result.jacobian = {"nonpositive_jacobian_pct": 0.0, "sd_log_jacobian": 0.1}       # what the overview prints
    paths = result.save(tmp_path / "out", inverse=True)
    written = np.asarray(nib.load(paths["inverse_displacement"]).dataobj)[:, :, :, 0, :] * np.array([-1, -1, 1])
    assert np.allclose(written, result.inverse_displacement, atol=1e-5)           # LPS on disk, RAS here
    carried = np.asarray(nib.load(paths["inverse_warped"]).dataobj)
    assert carried.shape == shape and np.abs(carried).max() > 10
