"""SynthMorph-style pairs: deterministic, several organ-named labels, an exact true field, shardable."""
import numpy as np
import pytest
import torch

from data_tools.prepare import PreparationError
from data_tools.shards import write_shards
from data_tools.synth import SynthConfig, synth_pair, synth_pairs
from unireg.data import iterate_pairs
from unireg.modeling.transform import SpatialTransformer
from unireg.organs import ORGAN_TO_ID

SHAPE, SPACING = (40, 40, 40), (6.0, 6.0, 6.0)


@pytest.fixture(scope="module")
def pair():
    return synth_pair(3, SHAPE, SPACING, config=SynthConfig(max_displacement_mm=24.0))


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    ids = [i for i in np.unique(a) if i]
    return float(np.mean([2 * np.sum((a == i) & (b == i)) / (np.sum(a == i) + np.sum(b == i)) for i in ids]))


def test_same_seed_same_pair_other_seed_other_pair(pair):
    again = synth_pair(3, SHAPE, SPACING, config=SynthConfig(max_displacement_mm=24.0))
    other = synth_pair(4, SHAPE, SPACING, config=SynthConfig(max_displacement_mm=24.0))
    for k in ("fixed", "moving", "fixed_seg", "moving_seg", "displacement"):
        assert np.array_equal(pair[k], again[k]), k
    assert not np.array_equal(pair["fixed_seg"], other["fixed_seg"])
    assert pair["meta"] == again["meta"]


def test_layout_dtypes_and_ct_like_intensities(pair):
    assert pair["fixed"].dtype == pair["moving"].dtype == np.int16
    assert pair["fixed_seg"].dtype == pair["moving_seg"].dtype == np.uint8
    assert pair["fixed"].shape == pair["moving_seg"].shape == SHAPE
    assert pair["displacement"].shape == (3, *SHAPE) and pair["displacement"].dtype == np.float32
    outside = pair["fixed_seg"] == 0
    inside = ~outside
    assert np.median(pair["fixed"][outside]) < -500                # air (and unlabelled tissue) around
    assert -300 < np.median(pair["fixed"][inside]) < 400           # labelled tissue in a CT range
    assert pair["fixed"].min() >= -1024 and pair["fixed"].max() <= 3071
    meta = pair["meta"]
    assert meta["type"] == "intra" and meta["source"] == "synth" and meta["spacing"] == list(SPACING)
    assert meta["organs"] and all(o in ORGAN_TO_ID for o in meta["organs"])


def test_several_labels_of_reasonable_size(pair):
    ids, counts = np.unique(pair["fixed_seg"], return_counts=True)
    sizes = counts[ids > 0]
    assert len(sizes) >= 6                                          # 16 synthetic labels, a quarter unlabelled
    assert np.median(sizes) > 0.005 * pair["fixed_seg"].size        # blobs, not speckle
    assert sizes.max() < 0.5 * pair["fixed_seg"].size               # no label swallows the volume
    named = [o for o in pair["meta"]["organs"]]
    assert len(named) == len(set(named)) == len(sizes)              # distinct organ ids, all in both scans


def test_true_displacement_maps_moving_labels_onto_fixed(pair):
    fixed, moving = pair["fixed_seg"], pair["moving_seg"]
    ids = np.unique(moving)
    one_hot = torch.from_numpy(np.stack([moving == i for i in ids]).astype(np.float32))[None]
    warped = SpatialTransformer()(one_hot, torch.from_numpy(pair["displacement"])[None])[0]
    warped = ids[warped.argmax(0).numpy()]
    identity, registered = mean_dice(fixed, moving), mean_dice(fixed, warped)
    assert identity < 0.85                                          # the deformation is real ...
    assert registered > 0.9 and registered > identity + 0.08       # ... and the field undoes it


def test_given_organ_list_and_bad_arguments():
    organs = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas"]
    p = synth_pair(0, (24, 24, 24), (8.0, 8.0, 8.0), n_labels=8, organs=organs)
    assert set(p["meta"]["organs"]) <= set(organs)
    with pytest.raises(PreparationError, match="distinct organs"):
        synth_pair(0, (24, 24, 24), n_labels=16, organs=organs)
    with pytest.raises(PreparationError, match="unknown organ"):
        synth_pair(0, (24, 24, 24), organs=["livr"] * 20)
    with pytest.raises(PreparationError, match="n_labels"):
        synth_pair(0, (24, 24, 24), n_labels=1)
    with pytest.raises(PreparationError, match="pair_type"):
        synth_pair(0, (24, 24, 24), pair_type="cross")


def test_write_shards_round_trips_synthetic_pairs(tmp_path):
    pairs = list(synth_pairs(3, seed=2, shape=(24, 24, 24), spacing=(8.0, 8.0, 8.0)))
    assert len({k for k, _ in pairs}) == 3
    index = write_shards(iter(pairs), tmp_path)
    assert index["counts"]["pairs"] == 3 and index["counts"]["intra"] == 3
    assert [list(s) for s in index["spacing"]] == [[8.0, 8.0, 8.0]]
    originals = dict(pairs)
    seen = 0
    for sample in iterate_pairs(sorted(str(p) for p in tmp_path.glob("*.tar"))):
        original = originals[sample["key"]]
        for k in ("fixed", "moving", "fixed_seg", "moving_seg", "displacement"):
            assert np.array_equal(sample[k], original[k]), k
        assert sample["meta"]["organs"] == original["meta"]["organs"]
        seen += 1
    assert seen == 3


def test_anisotropic_spacing_keeps_the_field_in_millimetres():
    spacing = (5.0, 2.0, 2.5)
    p = synth_pair(5, (24, 48, 40), spacing, config=SynthConfig(max_displacement_mm=15.0))
    assert p["fixed"].shape == (24, 48, 40) and p["displacement"].shape == (3, 24, 48, 40)
    peak_mm = np.abs(p["displacement"]).reshape(3, -1).max(axis=1) * np.array(spacing)
    assert np.all(peak_mm < 1.5 * 15.0) and np.all(peak_mm > 0.25 * 15.0)   # mm alike on every axis
    assert peak_mm.max() < 2.5 * peak_mm.min()


def test_independent_contrast_redraws_only_the_moving_palette():
    shape, spacing = (24, 24, 24), (8.0, 8.0, 8.0)
    ct = synth_pair(6, shape, spacing)
    mr_like = synth_pair(6, shape, spacing, config=SynthConfig(independent_contrast=True))
    for k in ("fixed", "fixed_seg", "moving_seg", "displacement"):
        assert np.array_equal(ct[k], mr_like[k]), k                 # same anatomy, field and fixed scan

    def label_medians(p):
        return np.array([np.median(p["moving"][p["moving_seg"] == i]) - np.median(p["fixed"][p["fixed_seg"] == i])
                         for i in np.unique(p["fixed_seg"]) if i])

    assert np.abs(label_medians(ct)).max() < 80                      # CT: HU kept up to jitter, bias, gamma
    assert np.abs(label_medians(mr_like)).max() > 150                # another contrast for the same labels
