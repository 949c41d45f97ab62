"""Head-and-neck phantom: CT-like HU per structure, TotalSegmentator ids, a true field for head motion."""
import numpy as np
import pytest
import torch

from data_tools.head_phantom import head_phantom_pairs, make_head_intra_pair, make_head_subject
from data_tools.phantom import Subject
from data_tools.shards import write_shards
from unireg.modeling.transform import SpatialTransformer
from unireg.organs import ORGAN_TO_ID

SHAPE, SPACING = (48, 48, 48), (5.5, 5.5, 5.5)


@pytest.fixture(scope="module")
def head():
    return make_head_subject(2, SHAPE, SPACING)


def test_subject_layout_and_determinism(head):
    assert isinstance(head, Subject)
    assert head.image.dtype == np.int16 and head.labels.dtype == np.uint8 and head.image.shape == SHAPE
    again = make_head_subject(2, SHAPE, SPACING)
    assert np.array_equal(head.image, again.image) and np.array_equal(head.labels, again.labels)
    assert not np.array_equal(head.labels, make_head_subject(3, SHAPE, SPACING).labels)
    with pytest.raises(ValueError, match="shape"):
        make_head_subject(0, (4, 48, 48))


def test_head_and_neck_structures_with_ct_values(head):
    expected = {"brain", "skull", "spinal_cord", "trachea", "esophagus", "thyroid_gland",
                *[f"vertebrae_C{i}" for i in range(1, 8)]}
    assert expected <= set(head.organs)
    hu = lambda name: float(np.median(head.image[head.labels == ORGAN_TO_ID[name]]))  # noqa: E731
    assert hu("skull") > 700 and 15 < hu("brain") < 50 and hu("trachea") < -500
    assert 60 < hu("thyroid_gland") < 200 and 300 < hu("vertebrae_C4") < 1000
    brain = head.labels == ORGAN_TO_ID["brain"]
    assert np.sum(brain & (head.image < 15)) > 0.01 * brain.sum()   # CSF ventricles inside the brain label
    air_in_body = (head.image < -500) & (head.labels == 0)
    z_mid = air_in_body[:, :, SHAPE[2] // 2 - 4: SHAPE[2] // 2 + 4]
    assert z_mid.any()                                               # sinuses / airway
    top = np.nonzero(brain.any(axis=(1, 2)))[0].max()
    bottom = np.nonzero((head.labels == ORGAN_TO_ID["vertebrae_C7"]).any(axis=(1, 2)))[0].min()
    assert top > 0.7 * SHAPE[0] and bottom < 0.25 * SHAPE[0]        # vertex to C7 in the field of view


def test_true_field_undoes_head_motion(head):
    moving, disp = make_head_intra_pair(head, seed=11)
    assert disp.shape == (3, *SHAPE) and disp.dtype == np.float32 and np.abs(disp).max() > 1.0
    names = ("brain", "skull", "vertebrae_C2", "spinal_cord")

    def dice(a, b):
        return np.array([2 * np.sum((a == i) & (b == i)) / (np.sum(a == i) + np.sum(b == i))
                         for i in (ORGAN_TO_ID[n] for n in names)])

    warped = SpatialTransformer()(torch.from_numpy(moving.labels.astype(np.float32))[None, None],
                                  torch.from_numpy(disp)[None], nearest=True)[0, 0].numpy()
    before, after = dice(head.labels, moving.labels), dice(head.labels, warped)
    # Thin structures (a skull of 1-2 voxels, the cord) lose Dice to nearest-neighbour rounding
    # alone (a half-voxel shift halves it), so the bar is the improvement, and the brain's Dice.
    assert after[0] > 0.95 and after[1] > before[1] + 0.3           # brain, and the skull that moved most
    assert after.mean() > before.mean() + 0.1


def test_head_pairs_write_to_shards(tmp_path):
    pairs = list(head_phantom_pairs(2, (24, 24, 24), (11.0, 11.0, 11.0), seed=1, intra_per_subject=1, inter_pairs=1))
    index = write_shards(iter(pairs), tmp_path)
    assert index["counts"] == {"pairs": 3, "inter": 1, "intra": 2}
    assert "brain" in index["organs"] and "vertebrae_C4" in index["organs"]
