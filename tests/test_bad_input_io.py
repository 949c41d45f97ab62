"""Inputs that reach unireg.io directly (API arrays and tensors, odd files): a clear InputError
or a documented conversion."""
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from unireg.errors import UserError
from unireg.io import InputError, load_image, load_labels, save_nifti, warp_volume

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _volume(dtype=np.float32, shape=(12, 10, 8)):
    rng = np.random.default_rng(0)
    return (rng.normal(size=shape) * 100).astype(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_become_float32(dtype):
    tensor = torch.from_numpy(_volume())[None, None].to(dtype)
    img = load_image(tensor, "fixed image", AFFINE)
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.float32 and data.shape == (12, 10, 8)
    assert np.array_equal(data, tensor[0, 0].float().numpy())
    assert np.allclose(img.affine, AFFINE)


def test_float16_array_becomes_float32():
    data = np.asanyarray(load_image(_volume(np.float16), "moving image", AFFINE).dataobj)
    assert data.dtype == np.float32


def test_int64_array_is_accepted():
    """numpy's default integer: nibabel refuses it without an explicit dtype."""
    data = np.asanyarray(load_image(_volume().astype(np.int64), "fixed image", AFFINE).dataobj)
    assert data.dtype == np.int64


@pytest.mark.parametrize("array, match", [
    (np.zeros((12, 10, 8), bool), "fixed image has boolean voxels"),
    (np.full((12, 10, 8), None, object), "fixed image has voxels of type object"),
    (np.zeros((12, 10, 8), np.complex64), "fixed image has voxels of type complex64"),
    (torch.zeros(12, 10, 8, dtype=torch.bool), "fixed image has boolean voxels"),
])
def test_non_numeric_voxels_are_refused(array, match):
    with pytest.raises(InputError, match=match) as info:
        load_image(array, "fixed image", AFFINE)
    assert "\n" not in str(info.value) and isinstance(info.value, UserError)


@pytest.mark.parametrize("affine, match", [
    (np.zeros((4, 4)), r"affine passed with the array is singular \(determinant 0\)"),
    (np.diag([2.0, 0.0, 3.0, 1.0]), "singular"),
    (np.diag([2.0, np.nan, 3.0, 1.0]), "NaN/inf"),
    (np.eye(3), r"affine must be 4x4, got shape \(3, 3\)"),
    ("identity", "affine must be a 4x4 array of numbers"),
])
def test_bad_affines_with_an_array_are_named(affine, match):
    with pytest.raises(InputError, match="moving image: .*" + match):
        load_image(_volume(), "moving image", affine)
    with pytest.raises(InputError, match=match):
        load_image((_volume(), affine), "moving image")


def test_array_without_affine_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            img = load_image(_volume(), "fixed image")
    messages = [str(w.message) for w in caught if "without an affine" in str(w.message)]
    assert len(messages) == 1 and "1 mm" in messages[0] and "fixed image" in messages[0]
    assert np.allclose(img.affine, np.eye(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(_volume(), "fixed image", AFFINE)             # an affine given: no warning


def test_header_claiming_huge_volume_is_refused_before_reading(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\0" * 64)
    with pytest.raises(InputError, match=r"fixed image: .*huge.nii claims 30000x30000x30000 voxels of int16 "
                                         r"\(54\.0 TB in memory\), more than this machine's .* of memory") as info:
        load_image(path, "fixed image")
    assert "\n" not in str(info.value)


def test_itk_header_claiming_huge_volume_is_refused(tmp_path):
    path = tmp_path / "huge.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 30000 30000 30000\nElementType = MET_SHORT\n"
                    "ElementSpacing = 1 1 1\nElementDataFile = LOCAL\n")
    with pytest.raises(InputError, match=r"huge.mha claims 30000x30000x30000x1 voxels of 2-byte \(54\.0 TB"):
        load_image(path, "moving image")


def test_truncated_nifti_names_its_size(tmp_path):
    path = tmp_path / "cut.nii"
    save_nifti(_volume(), AFFINE, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match=r"cut.nii has a header for 12x10x8 voxels of float32 .* cannot be read "
                                         r".*truncated"):
        load_image(path, "fixed image")


def test_scaled_nifti_loads_as_float32(tmp_path):
    raw = np.arange(12 * 10 * 8, dtype=np.int16).reshape(12, 10, 8)
    img = nib.Nifti1Image(raw, AFFINE)
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    data = np.asanyarray(load_image(tmp_path / "scaled.nii.gz", "fixed image").dataobj)
    assert data.dtype == np.float32 and np.array_equal(data, raw * 2.0 - 1024.0)


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.int64, np.float32])
def test_label_ids_above_int16_keep_their_value(dtype, tmp_path):
    reference = load_image(_volume(), "moving image", AFFINE)
    ids = np.zeros((12, 10, 8), dtype)
    ids[2:6, 2:6, 2:6] = 40001 if dtype == np.uint16 else 70001
    ids[7:10, 1:4, 1:4] = 5
    img = load_labels(ids, reference, "moving labels")
    data = np.asanyarray(img.dataobj)
    assert data.dtype == (np.int32 if dtype == np.float32 else dtype)
    assert set(np.unique(data)) == set(np.unique(ids))
    warped = warp_volume(img, np.zeros((12, 10, 8, 3), np.float32), AFFINE, labels=True)
    assert warped.dtype == data.dtype and np.array_equal(warped, data)
    nib.save(nib.Nifti1Image(warped, AFFINE, dtype=warped.dtype), tmp_path / "w.nii.gz")
    assert set(np.unique(np.asanyarray(nib.load(tmp_path / "w.nii.gz").dataobj))) == set(np.unique(ids))


def test_float_labels_must_be_whole_numbers():
    reference = load_image(_volume(), "moving image", AFFINE)
    with pytest.raises(InputError, match="moving labels holds non-integer values"):
        load_labels(np.full((12, 10, 8), 1.5, np.float32), reference, "moving labels")
    with pytest.raises(InputError, match="moving labels has boolean voxels"):
        load_labels(np.zeros((12, 10, 8), bool), reference, "moving labels")
