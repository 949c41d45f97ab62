"""Known-motion pairs from a scan: the stored field is the truth, labels follow, the CLI shards them."""
import numpy as np
import pytest
import torch

from data_tools.known_motion import MotionConfig, known_motion_pair
from data_tools.phantom import make_subject, save_subject
from data_tools.prepare import PreparationError
from unireg.cli import main
from unireg.data import iterate_pairs
from unireg.modeling.transform import SpatialTransformer

SHAPE, SPACING = (40, 40, 40), (6.0, 6.0, 6.0)


@pytest.fixture(scope="module")
def subject():
    return make_subject(7, shape=SHAPE, spacing_mm=SPACING)


def _warp(moving: np.ndarray, displacement: np.ndarray, nearest: bool = False) -> np.ndarray:
    image = torch.from_numpy(moving.astype(np.float32))[None, None]
    return SpatialTransformer()(image, torch.from_numpy(displacement)[None], nearest=nearest)[0, 0].numpy()


def test_the_stored_field_maps_the_scan_onto_its_moved_copy(subject):
    pair = known_motion_pair(subject.image, subject.labels, SPACING, seed=1,
                             config=MotionConfig(rotation_deg=5, translation_mm=8, field_mm=8))
    fixed, moving, d = pair["fixed"].astype(np.float32), pair["moving"].astype(np.float32), pair["displacement"]
    assert d.shape == (3, *SHAPE) and d.dtype == np.float32 and np.abs(d).max() * SPACING[0] > 3
    inner = tuple(slice(4, n - 4) for n in SHAPE)            # the motion brings air in at the edges
    body = (fixed > -500)[inner]
    before = np.abs(fixed - moving)[inner][body].mean()
    after = np.abs(fixed - _warp(moving, d))[inner][body].mean()
    assert after < 0.1 * before, (before, after)
    warped_labels = _warp(pair["moving_seg"], d, nearest=True)
    agree = (warped_labels == pair["fixed_seg"])[inner][body].mean()
    assert agree > 0.97 and pair["meta"]["organs"], agree
    assert pair["meta"]["type"] == "intra" and pair["meta"]["spacing"] == list(SPACING)
    again = known_motion_pair(subject.image, subject.labels, SPACING, seed=1,
                              config=MotionConfig(rotation_deg=5, translation_mm=8, field_mm=8))
    assert np.array_equal(again["fixed"], pair["fixed"])


def test_a_still_config_gives_the_scan_back(subject):
    pair = known_motion_pair(subject.image, None, SPACING, seed=2,
                             config=MotionConfig(rotation_deg=0, translation_mm=0, field_mm=0))
    assert np.abs(pair["displacement"]).max() < 1e-4
    assert np.abs(pair["fixed"].astype(int) - pair["moving"].astype(int)).max() <= 1
    assert not pair["fixed_seg"].any() and pair["meta"]["organs"] == []


def test_bad_scans_are_named(subject):
    with pytest.raises(PreparationError, match="3-D scan"):
        known_motion_pair(subject.image[0], None, SPACING[:2], seed=0)
    broken = subject.image.astype(np.float32)
    broken[3, 3, 3] = np.nan
    with pytest.raises(PreparationError, match="NaN"):
        known_motion_pair(broken, None, SPACING, seed=0)
    with pytest.raises(PreparationError, match="non-negative"):
        known_motion_pair(subject.image, None, SPACING, seed=0, config=MotionConfig(field_mm=-1))


def test_prepare_shards_writes_known_motion_pairs_of_a_csv(subject, tmp_path):
    paths = save_subject(subject, tmp_path, "scan", montage=False)
    table = tmp_path / "scans.csv"
    table.write_text(f"image,label,subject\n{paths['ct']},{paths['labels']},patient7\n")
    out = tmp_path / "shards"
    assert main(["prepare", "shards", "--phantom-subjects", "0", "--known-motion", str(table),
                 "--known-motion-pairs", "2", "--spacing", "6", "6", "6", "--out", str(out)]) == 0
    pairs = list(iterate_pairs(sorted(str(p) for p in out.glob("*.tar"))))
    assert len(pairs) == 2
    for p in pairs:
        assert p["meta"]["source"] == "known_motion" and p["meta"]["moving_id"] == "patient7"
        assert p["displacement"].shape == (3, *p["fixed"].shape) and p["meta"]["organs"]
    assert not np.array_equal(pairs[0]["fixed"], pairs[1]["fixed"])
