"""A folder holding one DICOM series is a scan like a NIfTI file: same voxels in HU, same physical geometry,
and registration takes it; folders that hold no series, or several, are refused with the reason."""
import locale

import nibabel as nib
import numpy as np
import pytest

from synthetic import blob_volume, write_dicom_series
from unireg import UniReg
from unireg.io import InputError, load_image

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A CT-like volume on an anisotropic grid away from the origin, as NIfTI and as a DICOM series."""
    d = tmp_path_factory.mktemp("dicom")
    hu, _ = blob_volume((40, 36, 24), seed=3)
    affine = np.array([[-0.8, 0, 0, 90.0], [0, -0.8, 0, 120.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    nifti = nib.Nifti1Image(np.rint(hu).astype(np.int16), affine)
    nib.save(nifti, d / "scan.nii.gz")
    write_dicom_series(hu, affine, d / "series", "1.2.826.0.1.3680043.2.1125.1")
    return d, nifti


def test_a_dicom_folder_reads_as_the_same_scan(scan, monkeypatch):
    d, nifti = scan
    import unireg.io
    reader = unireg.io._read_dicom_series_as_is

    def resetting_locale(*args):      # as GDCM's writer does: reading must not leave it so
        locale.setlocale(locale.LC_ALL, "C")
        return reader(*args)
    monkeypatch.setattr(unireg.io, "_read_dicom_series_as_is", resetting_locale)
    before = locale.setlocale(locale.LC_ALL)
    from_dicom = load_image(d / "series", "fixed image")
    assert locale.setlocale(locale.LC_ALL) == before
    assert from_dicom.shape == nifti.shape
    assert np.allclose(from_dicom.affine, nifti.affine, atol=1e-4)
    # HU: the stored values (HU + 1024, unsigned) with the series' rescale intercept applied, as int16
    assert from_dicom.get_data_dtype() == np.int16
    assert np.array_equal(np.asanyarray(from_dicom.dataobj), np.asanyarray(nifti.dataobj))


def test_registration_takes_a_dicom_folder(scan):
    d, nifti = scan
    model = UniReg.from_config("tiny")
    result = model.register(d / "series", d / "scan.nii.gz", "inter", refine=False, align="none")
    assert result.displacement.shape == (*nifti.shape, 3)
    assert np.allclose(result.affine, nifti.affine, atol=1e-4)


def test_folders_without_one_series_are_refused(scan, tmp_path):
    d, nifti = scan
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is a folder without a DICOM series"):
        load_image(tmp_path / "empty", "fixed image")
    two = tmp_path / "two"
    hu, affine = np.asanyarray(nifti.dataobj), nifti.affine
    write_dicom_series(hu, affine, two, "1.2.826.0.1.3680043.2.1125.2")
    write_dicom_series(hu, affine, tmp_path / "other", "1.2.826.0.1.3680043.2.1125.3")
    for f in (tmp_path / "other").iterdir():            # a second series in the same folder
        f.rename(two / f"b_{f.name}")
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        load_image(two, "moving image")
    one = tmp_path / "one"
    write_dicom_series(hu[:, :, :1], affine, one, "1.2.826.0.1.3680043.2.1125.4")
    with pytest.raises(InputError, match="single slice"):
        load_image(one, "moving image")
