"""Phantom: plausible anatomy, subject variation, intra pairs with a true field."""
import numpy as np
import pytest
from scipy import ndimage

from data_tools.phantom import load_displacement, make_intra_pair, make_subject, save_displacement, save_subject
from unireg.io import ijk_to_tensor_order
from unireg.organs import ORGAN_TO_ID
from synthetic import dice

SHAPE, SPACING = (64, 64, 64), (6.0, 6.0, 6.0)


@pytest.fixture(scope="module")
def subject():
    return make_subject(3, shape=SHAPE, spacing_mm=SPACING)


EXPECTED_HU = {  # plausible ranges of the organ's median HU
    "liver": (40, 130), "spleen": (30, 120), "kidney_left": (100, 220), "aorta": (100, 300),
    "lung_upper_lobe_left": (-950, -700), "vertebrae_L1": (250, 600), "urinary_bladder": (-20, 40),
}


def test_structures_exist_with_plausible_hu_and_volume(subject):
    assert len(subject.organs) >= 20
    voxel_ml = np.prod(SPACING) / 1000
    for organ, (lo, hi) in EXPECTED_HU.items():
        mask = subject.labels == ORGAN_TO_ID[organ]
        assert mask.any(), organ
        assert lo <= np.median(subject.image[mask]) <= hi, organ
    liver_ml = (subject.labels == ORGAN_TO_ID["liver"]).sum() * voxel_ml
    spleen_ml = (subject.labels == ORGAN_TO_ID["spleen"]).sum() * voxel_ml
    assert 800 < liver_ml < 2600 and 80 < spleen_ml < 500 and liver_ml > 3 * spleen_ml


def test_structures_lie_inside_the_body_in_sensible_places(subject):
    body = subject.image > -500
    body = ndimage.binary_fill_holes(body)
    labelled = subject.labels > 0
    assert (labelled & ~body).sum() < 0.01 * labelled.sum()
    centre = lambda o: np.argwhere(subject.labels == ORGAN_TO_ID[o]).mean(0)  # noqa: E731  (z, y, x)
    assert centre("liver")[2] > centre("spleen")[2]          # liver on the patient's right (+x in RAS)
    assert centre("lung_upper_lobe_right")[0] > centre("liver")[0]   # lungs above the liver
    assert centre("urinary_bladder")[0] < centre("kidney_left")[0]   # bladder below the kidneys
    assert centre("vertebrae_L1")[1] < centre("aorta")[1]           # spine posterior to the aorta


def test_subjects_differ_and_seed_is_deterministic(subject):
    again = make_subject(3, shape=SHAPE, spacing_mm=SPACING)
    other = make_subject(4, shape=SHAPE, spacing_mm=SPACING)
    assert np.array_equal(subject.image, again.image) and np.array_equal(subject.labels, again.labels)
    assert dice(subject.labels, other.labels, ORGAN_TO_ID["liver"]) < 0.95
    assert not np.array_equal(subject.image, other.image)


def test_true_displacement_of_intra_pair_aligns_labels(subject, tmp_path):
    moving, disp = make_intra_pair(subject, seed=11, amplitude_mm=18.0)
    grid = np.indices(SHAPE, dtype=np.float32)
    warped = ndimage.map_coordinates(moving.labels, grid + disp, order=0)
    organs = ["liver", "spleen", "kidney_right", "lung_lower_lobe_right", "stomach"]
    identity = np.mean([dice(subject.labels, moving.labels, ORGAN_TO_ID[o]) for o in organs])
    true = np.mean([dice(subject.labels, warped, ORGAN_TO_ID[o]) for o in organs])
    assert true > 0.85 and true > identity + 0.05, (identity, true)
    # breathing moves organs near the diaphragm more than the spine and body wall
    mag = np.linalg.norm(disp, axis=0)
    assert mag[subject.labels == ORGAN_TO_ID["liver"]].mean() > 3 * mag[subject.labels == ORGAN_TO_ID["vertebrae_L3"]].mean()
    path = save_displacement(disp, subject, tmp_path / "d.nii.gz")
    assert np.allclose(load_displacement(path), disp)


def test_saved_nifti_has_ras_affine_and_labels(subject, tmp_path):
    import json
    import nibabel as nib
    paths = save_subject(subject, tmp_path, "s")
    img = nib.load(paths["ct"])
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.header.get_zooms(), SPACING)
    assert np.array_equal(ijk_to_tensor_order(np.asanyarray(img.dataobj)), subject.image)
    names = json.loads(paths["json"].read_text())
    assert names[str(ORGAN_TO_ID["liver"])] == "liver" and paths["png"].stat().st_size > 1000
