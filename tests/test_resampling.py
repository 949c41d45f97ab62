"""Chunked float32 resampling in unireg.io against independent references (scipy, nibabel, SimpleITK).

Grids here are deliberately mismatched (permuted, flipped, anisotropic, oblique) and the chunk
size is forced small so every function runs over many slabs.
"""
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nibabel.processing import resample_from_to
from scipy import ndimage

from unireg import io
from unireg.visualize import center_slices, overview_slices

FIXED_AFFINE = np.array([[3.0, 0, 0, -60], [0, 3.0, 0, -50], [0, 0, 4.0, -40], [0, 0, 0, 1]])
FIXED_SHAPE = (40, 36, 24)


def _moving_affine():
    """LPI-like permuted, flipped, anisotropic grid over the same region."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], float).T * [2.5, 3.5, 3.0]
    affine[:3, 3] = [-45.0, 50.0, 55.0]
    return affine


def _rotation(angle):
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rot


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(io, "CHUNK_POINTS", 3000)


@pytest.fixture(scope="module")
def moving():
    rng = np.random.default_rng(0)
    data = ndimage.gaussian_filter(rng.normal(size=(40, 34, 30)), 2) * 3000
    return nib.Nifti1Image(np.asfortranarray(data.astype(np.int16)), _moving_affine())  # F order, as nibabel loads


def _reference_sample(volume, affine, world, order, cval):
    """The pre-chunking implementation: map_coordinates at world points, ITK's voxel-cube rule."""
    inv = np.linalg.inv(affine)
    ijk = inv[:3, :3] @ world + inv[:3, 3:4]
    values = ndimage.map_coordinates(volume.astype(np.float64), ijk, order=order, mode="nearest", prefilter=False)
    outside = ((ijk < -0.5) | (ijk > np.array(volume.shape)[:, None] - 0.5)).any(axis=0)
    values[outside] = cval
    return values


def _world(shape, affine):
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return affine[:3, :3] @ ijk + affine[:3, 3:4]


def _smooth_field(shape, amplitude, seed):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(*shape, 3)), (3, 3, 3, 0))
    return (field * amplitude / np.abs(field).max()).astype(np.float32)


@pytest.mark.parametrize("rotate", [0.0, 0.3], ids=["axis-aligned", "oblique"])
def test_field_on_grid_matches_trilinear_reference(small_chunks, rotate):
    field_affine = _rotation(rotate) @ np.diag([6.0, 6.0, 6.0, 1.0])
    field_affine[:3, 3] = [-63.0, -52.0, -45.0]
    field = _smooth_field((22, 20, 18), 9.0, seed=1)
    ours = io.field_on_grid(field, field_affine, FIXED_SHAPE, FIXED_AFFINE)
    world = _world(FIXED_SHAPE, FIXED_AFFINE)
    inv = np.linalg.inv(field_affine)
    ijk = inv[:3, :3] @ world + inv[:3, 3:4]
    expected = np.stack([ndimage.map_coordinates(field[..., c].astype(np.float64), ijk, order=1, mode="nearest")
                         for c in range(3)], axis=-1).reshape(*FIXED_SHAPE, 3)
    assert ours.dtype == np.float32 and ours.shape == (*FIXED_SHAPE, 3)
    assert np.abs(ours - expected).max() < 1e-4
    assert np.abs(expected).max() > 3.0                  # a real field, and edges extended (not zero) outside


def test_field_on_grid_composes_a_matrix(small_chunks):
    field = _smooth_field((20, 18, 12), 5.0, seed=2)
    matrix = _rotation(0.1)
    matrix[:3, 3] = [4.0, -3.0, 2.0]
    u = io.field_on_grid(field, FIXED_AFFINE, FIXED_SHAPE, FIXED_AFFINE @ np.diag([0.5, 0.5, 0.5, 1]))
    ours = io.field_on_grid(field, FIXED_AFFINE, FIXED_SHAPE, FIXED_AFFINE @ np.diag([0.5, 0.5, 0.5, 1]),
                            matrix=matrix)
    x = _world(FIXED_SHAPE, FIXED_AFFINE @ np.diag([0.5, 0.5, 0.5, 1])).T.reshape(*FIXED_SHAPE, 3)
    expected = (x + u) @ matrix[:3, :3].T + matrix[:3, 3] - x            # A (x + u(x)) - x
    assert np.abs(ours - expected).max() < 1e-3


def test_warp_volume_matches_reference_for_images_and_labels(small_chunks, moving):
    field = _smooth_field(FIXED_SHAPE, 8.0, seed=3)
    world = _world(FIXED_SHAPE, FIXED_AFFINE) + field.reshape(-1, 3).T.astype(np.float64)
    data = np.asanyarray(moving.dataobj)
    ours = io.warp_volume(moving, field, FIXED_AFFINE)
    expected = _reference_sample(data, moving.affine, world, 1, io.HU_OUTSIDE).reshape(FIXED_SHAPE)
    assert ours.dtype == np.float32
    assert np.abs(ours - expected).max() < 0.05          # HU on a +-3000 image: float32 rounding only
    assert (ours == io.HU_OUTSIDE).any() and (ours != io.HU_OUTSIDE).mean() > 0.5

    ids = np.where(data > 500, 70001, np.where(data < -500, 3, 0)).astype(np.int32)
    labels = nib.Nifti1Image(np.asfortranarray(ids), moving.affine)
    warped = io.warp_volume(labels, field, FIXED_AFFINE, labels=True)
    expected = _reference_sample(ids, moving.affine, world, 0, 0).reshape(FIXED_SHAPE)
    assert warped.dtype == np.int32
    assert set(np.unique(warped)) == {0, 3, 70001}
    assert (warped == expected).mean() > 0.999           # only exact .5 ties may round the other way


@pytest.mark.parametrize("device", DEVICES)
def test_label_warp_on_a_device_equals_the_stored_array_gather(small_chunks, moving, device):
    """Label maps gathered on a named device (the pipeline names a GPU) give the ids the stored-array gather gives,
    in the map's own type, for a Fortran-ordered big-endian uint16 map too."""
    field = _smooth_field(FIXED_SHAPE, 8.0, seed=4)
    rng = np.random.default_rng(2)
    for ids in (rng.integers(0, 70000, moving.shape).astype(np.int32),
                np.asfortranarray(rng.integers(0, 300, moving.shape)).astype(">u2")):
        labels = nib.Nifti1Image(ids, moving.affine)
        on_device = io.warp_volume(labels, field, FIXED_AFFINE, labels=True, device=device)
        stored = io.warp_volume(labels, field, FIXED_AFFINE, labels=True)
        assert on_device.dtype == ids.dtype and np.array_equal(on_device, stored)
        assert (stored == 0).mean() < 0.5 and len(np.unique(stored)) > 100


def test_warp_without_field_equals_zero_field(small_chunks, moving):
    zero = io.warp_volume(moving, np.zeros((*FIXED_SHAPE, 3), np.float32), FIXED_AFFINE)
    none = io.warp_volume(moving, None, FIXED_AFFINE, shape=FIXED_SHAPE)
    assert np.array_equal(zero, none)
    ids = nib.Nifti1Image(np.asfortranarray((np.asanyarray(moving.dataobj) // 300).astype(np.int32) + 70000),
                          moving.affine)
    zero = io.warp_volume(ids, np.zeros((*FIXED_SHAPE, 3), np.float32), FIXED_AFFINE, labels=True)
    none = io.warp_volume(ids, None, FIXED_AFFINE, labels=True, shape=FIXED_SHAPE)   # one index table per axis
    expected = _reference_sample(np.asanyarray(ids.dataobj), ids.affine, _world(FIXED_SHAPE, FIXED_AFFINE), 0, 0)
    assert none.dtype == np.int32 and len(np.unique(none)) > 4 and (none == 0).mean() > 0.05
    assert np.array_equal(zero, none) and np.array_equal(none, expected.reshape(FIXED_SHAPE))
    with pytest.raises(ValueError, match="shape"):
        io.warp_volume(moving, None, FIXED_AFFINE)


@pytest.mark.parametrize("order", ["F", "C"])
@pytest.mark.parametrize("permuted", [True, False], ids=["permuted", "same axes"])
def test_label_resampling_between_parallel_grids_in_either_memory_order(order, permuted):
    """The per-axis gather equals the sampled reference whatever the map's memory order and axis order, and
    a map whose axes follow the fixed grid's comes back in its own memory order (Dice then reads both alike)."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 120, size=(40, 34, 30)).astype(np.uint8)
    affine = _moving_affine() if permuted else np.diag([2.5, 3.5, 3.0, 1.0]) + np.array(
        [[0, 0, 0, -58.0], [0, 0, 0, -47.0], [0, 0, 0, -42.0], [0, 0, 0, 0]])
    labels = nib.Nifti1Image(np.asarray(ids, order=order), affine)
    out = io.warp_volume(labels, None, FIXED_AFFINE, labels=True, shape=FIXED_SHAPE)
    expected = _reference_sample(ids, affine, _world(FIXED_SHAPE, FIXED_AFFINE), 0, 0).reshape(FIXED_SHAPE)
    assert out.dtype == np.uint8 and (out == 0).mean() > 0.01 and np.array_equal(out, expected)
    if not permuted:
        assert out.flags.f_contiguous if order == "F" else out.flags.c_contiguous


def test_working_grid_resample_equals_nibabel(moving):
    grid = io.WorkingGrid.from_image(nib.Nifti1Image(np.zeros(FIXED_SHAPE, np.float32), FIXED_AFFINE), 6.0, 128, 8)
    ours = grid.resample(moving)
    float_moving = nib.Nifti1Image(np.asanyarray(moving.dataobj).astype(np.float32), moving.affine)
    expected = resample_from_to(float_moving, (grid.shape, grid.affine), order=1, mode="constant", cval=io.HU_OUTSIDE)
    assert ours.dtype == np.float32 and np.allclose(ours, np.asanyarray(expected.dataobj), atol=1e-3)
    ids = nib.Nifti1Image(np.full(moving.shape, 70001, np.int32), moving.affine)
    assert set(np.unique(grid.resample(ids, labels=True))) <= {0.0, 70001.0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rotate", [0.0, 0.3], ids=["axis-aligned", "oblique"])
def test_device_resample_equals_scipy(small_chunks, moving, device, rotate):
    """The GPU path of ``WorkingGrid.resample`` (run here on whatever device there is) keeps scipy's rules:
    the same values, air and background outside, the same nearest voxel at exact half-voxel ties
    (a 2:1 grid puts every point on one), for a Fortran-ordered int16 scan and big-endian uint16 labels."""
    fixed = nib.Nifti1Image(np.zeros(FIXED_SHAPE, np.float32), _rotation(rotate) @ FIXED_AFFINE)
    grids = [io.WorkingGrid.from_image(fixed, 6.0, 128, 8), io.WorkingGrid.from_image(fixed, 3.0, 128, 8)]
    tie = moving.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    tie[:3, 3] = moving.affine[:3, 3] + moving.affine[:3, :3] @ [0.5, 0.5, 0.5]
    grids.append(io.WorkingGrid((20, 17, 15), tie))
    rng = np.random.default_rng(1)
    labels = nib.Nifti1Image(rng.integers(0, 300, moving.shape).astype(">u2"), moving.affine)
    for grid in grids:
        to_img = np.linalg.inv(moving.affine) @ grid.affine
        ours = io._resample_on_device(np.asanyarray(moving.dataobj), to_img, grid.shape, False, torch.device(device))
        expected = grid.resample(moving)
        assert ours.device.type == device and ours.dtype == torch.float32
        assert np.abs(ours.cpu().numpy() - expected).max() < 0.05
        assert ((ours.cpu().numpy() == io.HU_OUTSIDE) == (expected == io.HU_OUTSIDE)).all()
        ours = io._resample_on_device(np.asanyarray(labels.dataobj), to_img, grid.shape, True, torch.device(device))
        assert np.array_equal(ours.cpu().numpy(), grid.resample(labels, labels=True))


def test_sample_at_world_keeps_label_type(small_chunks, moving):
    data = np.asanyarray(moving.dataobj)
    world = _world(FIXED_SHAPE, FIXED_AFFINE)[:, ::5] + 0.7
    linear = io.sample_at_world(data, moving.affine, world.astype(np.float32), 1, -1024.0)
    assert np.abs(linear - _reference_sample(data, moving.affine, world, 1, -1024.0)).max() < 0.05
    nearest = io.sample_at_world(data, moving.affine, world.astype(np.float32), 0, 0, mode="nearest")
    assert nearest.dtype == np.int16


def test_label_ids_equals_unique():
    rng = np.random.default_rng(4)
    labels = rng.choice(np.array([0, 5, 117, 70001, -3], np.int32), size=(30, 20, 10))
    assert np.array_equal(io.label_ids(labels), np.unique(labels))
    assert np.array_equal(io.label_ids(labels.astype(np.int64) * 10 ** 7), np.unique(labels.astype(np.int64) * 10 ** 7))


def test_written_field_reads_in_simpleitk_like_its_own_file(tmp_path, small_chunks):
    field = _smooth_field(FIXED_SHAPE, 6.0, seed=5)
    affine = FIXED_AFFINE @ np.array([[0, 1, 0, 0], [-1, 0, 0, 35], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    io.write_itk_displacement(field, affine, tmp_path / "ours.nii.gz")
    # SimpleITK's own writer from the same field: a reference for values and geometry.
    lps = np.ascontiguousarray(np.transpose(field * [-1, -1, 1], (2, 1, 0, 3))).astype(np.float32)
    theirs = sitk.GetImageFromArray(lps, isVector=True)
    io._set_itk_geometry(theirs, affine)
    sitk.WriteImage(theirs, str(tmp_path / "theirs.nii.gz"))
    a, b = sitk.ReadImage(str(tmp_path / "ours.nii.gz")), sitk.ReadImage(str(tmp_path / "theirs.nii.gz"))
    assert a.GetPixelID() == sitk.sitkVectorFloat32 and a.GetNumberOfComponentsPerPixel() == 3
    assert a.GetSize() == b.GetSize()
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        assert np.allclose(getattr(a, get)(), getattr(b, get)(), atol=1e-5), get
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(a, sitk.sitkVectorFloat64))
    ijk = (7, 11, 5)
    point = a.TransformIndexToPhysicalPoint(ijk)
    moved = np.array(transform.TransformPoint(point)) - point
    assert np.allclose(moved, field[ijk] * [-1, -1, 1], atol=1e-5)    # LPS vectors on disk


class _Result:
    """What overview_png reads from a RegistrationResult."""

    def __init__(self, fixed, moving, displacement):
        self.fixed, self.moving, self.displacement = fixed, moving, displacement
        self.affine = fixed.affine


def test_overview_slices_equal_slices_of_full_volumes(moving):
    affine = FIXED_AFFINE @ np.array([[0, 0, -1, 23], [1, 0, 0, 0], [0, -1, 0, 39], [0, 0, 0, 1]], float)
    shape = (24, 40, 36)
    rng = np.random.default_rng(6)
    fixed = nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), affine)
    field = _smooth_field(shape, 8.0, seed=7)
    result = _Result(fixed, moving, field)
    slices = overview_slices(result)

    def canonical(data):
        return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(data.astype(np.float32), affine)).dataobj)
    full = {"fixed": np.asanyarray(fixed.dataobj),
            "moving": io.warp_volume(moving, None, affine, shape=shape),
            "warped": io.warp_volume(moving, field, affine)}
    for key, volume in full.items():
        for ours, expected in zip(slices[key], center_slices(canonical(volume))):
            assert ours.shape == expected.shape
            assert np.allclose(ours, expected, atol=1e-3), key


def test_field_written_as_mha_equals_the_nifti(tmp_path):
    field = _smooth_field(FIXED_SHAPE, 6.0, seed=8)
    io.write_itk_displacement(field, FIXED_AFFINE, tmp_path / "field.nii.gz")
    io.write_itk_displacement(field, FIXED_AFFINE, tmp_path / "field.mha")       # through SimpleITK
    a, b = sitk.ReadImage(str(tmp_path / "field.nii.gz")), sitk.ReadImage(str(tmp_path / "field.mha"))
    assert b.GetPixelID() == sitk.sitkVectorFloat32
    assert np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
