"""Bad input gets a clear error naming the problem."""
import nibabel as nib
import numpy as np
import pytest

from synthetic import blob_volume
from unireg import PromptError, UniReg
from unireg.io import InputError

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


@pytest.fixture(scope="module")
def model():
    return UniReg.from_config("tiny")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    hu, lab = blob_volume((24, 24, 24))
    nib.save(nib.Nifti1Image(hu, AFFINE), d / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, AFFINE), d / "labels.nii.gz")
    return d


def _save(d, name, data, affine=AFFINE):
    path = d / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_missing_file(model, good):
    with pytest.raises(InputError, match="moving image not found"):
        model.register(good / "ct.nii.gz", good / "nope.nii.gz")


def test_not_an_image(model, good, tmp_path):
    (tmp_path / "notes.nii.gz").write_text("not an image")
    with pytest.raises(InputError, match="not a readable NIfTI"):
        model.register(good / "ct.nii.gz", tmp_path / "notes.nii.gz")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="unsupported file type '.png'"):
        model.register(tmp_path / "scan.png", good / "ct.nii.gz")


def test_2d_image(model, good, tmp_path):
    path = _save(tmp_path, "slice.nii.gz", np.random.rand(24, 24).astype(np.float32))
    with pytest.raises(InputError, match="fixed image is 2-D"):
        model.register(path, good / "ct.nii.gz")


def test_4d_image(model, good, tmp_path):
    path = _save(tmp_path, "series.nii.gz", np.random.rand(24, 24, 24, 3).astype(np.float32))
    with pytest.raises(InputError, match="4-D with 3 volumes"):
        model.register(good / "ct.nii.gz", path)


def test_nan_voxels(model, good, tmp_path):
    data = np.random.rand(24, 24, 24).astype(np.float32)
    data[3, 4, 5] = np.nan
    data[6, 7, 8] = np.inf
    with pytest.raises(InputError, match="2 NaN/inf voxels"):
        model.register(_save(tmp_path, "nan.nii.gz", data), good / "ct.nii.gz")


def test_empty_image(model, good, tmp_path):
    with pytest.raises(InputError, match="moving image is empty"):
        model.register(good / "ct.nii.gz", _save(tmp_path, "flat.nii.gz", np.zeros((24, 24, 24), np.int16)))


def test_label_map_on_another_grid(model, good, tmp_path):
    labels = _save(tmp_path, "lab.nii.gz", np.zeros((20, 24, 24), np.uint8))
    with pytest.raises(InputError, match="moving labels grid .* differs from its image's grid"):
        model.register(good / "ct.nii.gz", good / "ct.nii.gz", moving_labels=labels)
    shifted = AFFINE.copy()
    shifted[0, 3] = 10
    labels = _save(tmp_path, "lab2.nii.gz", np.asanyarray(nib.load(good / "labels.nii.gz").dataobj), shifted)
    with pytest.raises(InputError, match="differs from its image's grid"):
        model.register(good / "ct.nii.gz", good / "ct.nii.gz", moving_labels=labels)


def test_unknown_organ(model, good):
    with pytest.raises(PromptError, match="unknown organ 'pancreaz'; did you mean pancreas"):
        model.register(good / "ct.nii.gz", good / "ct.nii.gz", prompt="inter | pancreaz")


def test_images_that_do_not_overlap(model, good, tmp_path):
    far = AFFINE.copy()
    far[:3, 3] = 5000.0
    hu, _ = blob_volume((24, 24, 24))
    with pytest.raises(InputError, match="do not overlap in physical space"):
        model.register(good / "ct.nii.gz", _save(tmp_path, "far.nii.gz", hu, far))
