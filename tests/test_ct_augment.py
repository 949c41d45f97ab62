"""CT appearance augmentation changes what it says and nothing else; dtypes, shapes and seeds hold."""
import numpy as np
import pytest

from data_tools.ct_augment import (PHASE_OFFSETS_HU, CTAugmentConfig, add_dose_noise, add_streaks, add_table,
                                   augment_ct, augment_pair, contrast_phase, thick_slices, truncate_fov)
from data_tools.phantom import make_subject
from data_tools.prepare import PreparationError
from unireg.organs import ORGAN_TO_ID
from unireg.preprocessing import HU_OUTSIDE

SPACING = (6.0, 6.0, 6.0)
ALWAYS = CTAugmentConfig(p_noise=1, p_thickness=1, p_contrast=1, p_truncate=1, p_table=1, p_streaks=1)


@pytest.fixture(scope="module")
def subject():
    return make_subject(7, shape=(40, 40, 40), spacing_mm=SPACING)


def high_frequency_energy(a: np.ndarray, axis: int) -> float:
    return float(np.mean(np.diff(a.astype(np.float64), axis=axis) ** 2))


def test_augment_ct_keeps_dtype_shape_and_is_seeded(subject):
    image, labels = augment_ct(subject.image, subject.labels, np.random.default_rng(1), ALWAYS, SPACING)
    again, labels_again = augment_ct(subject.image, subject.labels, np.random.default_rng(1), ALWAYS, SPACING)
    other, _ = augment_ct(subject.image, subject.labels, np.random.default_rng(2), ALWAYS, SPACING)
    assert image.dtype == np.int16 and labels.dtype == np.uint8 and image.shape == labels.shape == subject.image.shape
    assert np.array_equal(image, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(image, other) and not np.array_equal(image, subject.image)
    floats, _ = augment_ct(subject.image.astype(np.float32), subject.labels, np.random.default_rng(1), ALWAYS, SPACING)
    assert floats.dtype == np.float32


def test_nothing_happens_with_zero_probabilities(subject):
    never = CTAugmentConfig(p_noise=0, p_thickness=0, p_contrast=0, p_truncate=0, p_table=0, p_streaks=0)
    image, labels = augment_ct(subject.image, subject.labels, np.random.default_rng(0), never, SPACING)
    assert np.array_equal(image, subject.image) and np.array_equal(labels, subject.labels)


def test_labels_change_only_by_truncation_to_background(subject):
    no_cut = CTAugmentConfig(p_noise=1, p_thickness=1, p_contrast=1, p_truncate=0, p_table=1, p_streaks=1)
    _, labels = augment_ct(subject.image, subject.labels, np.random.default_rng(3), no_cut, SPACING)
    assert np.array_equal(labels, subject.labels)
    cut_organs = 0
    for seed in range(4):
        _, labels = augment_ct(subject.image, subject.labels, np.random.default_rng(seed), ALWAYS, SPACING)
        changed = labels != subject.labels
        assert np.all(labels[changed] == 0)
        cut_organs += changed.any()
    assert cut_organs >= 2


def test_thick_slices_blur_only_the_chosen_axis():
    z, y, x = np.meshgrid(*[np.arange(32)] * 3, indexing="ij")
    image = (100.0 * (z % 2) + 80.0 * (x % 2) + 3.0 * y).astype(np.float32)
    thick = thick_slices(image, axis=0, thickness_voxels=3)
    assert thick.shape == image.shape and thick.dtype == np.float32
    assert high_frequency_energy(thick, 0) < 0.2 * high_frequency_energy(image, 0)
    assert high_frequency_energy(thick, 2) == pytest.approx(high_frequency_energy(image, 2), rel=1e-5)
    assert high_frequency_energy(thick, 1) == pytest.approx(high_frequency_energy(image, 1), rel=1e-5)
    assert np.array_equal(thick_slices(image, axis=0, thickness_voxels=1.2), image)   # thinner than 1.5 voxels
    along_x = thick_slices(image, axis=2, thickness_voxels=4)
    assert high_frequency_energy(along_x, 2) < 0.2 * high_frequency_energy(image, 2)
    assert high_frequency_energy(along_x, 0) == pytest.approx(high_frequency_energy(image, 0), rel=1e-5)


def test_contrast_phase_shifts_only_the_listed_organs(subject):
    hu = subject.image.astype(np.float32)
    arterial = contrast_phase(hu, subject.labels, "arterial", strength=0.5)
    liver, aorta, sacrum_like = (subject.labels == ORGAN_TO_ID[o] for o in ("liver", "aorta", "vertebrae_L3"))
    assert liver.any() and aorta.any() and sacrum_like.any()
    assert np.allclose(arterial[liver] - hu[liver], 0.5 * PHASE_OFFSETS_HU["arterial"]["liver"])
    assert np.allclose(arterial[aorta] - hu[aorta], 0.5 * PHASE_OFFSETS_HU["arterial"]["aorta"])
    listed = np.isin(subject.labels, [ORGAN_TO_ID[o] for o in PHASE_OFFSETS_HU["arterial"]])
    assert np.array_equal(arterial[~listed], hu[~listed])          # bone, fat, air, unlisted organs untouched
    assert np.array_equal(contrast_phase(hu, subject.labels, "portal_venous"), hu)
    only_liver = {"custom": {"liver": 40.0}}
    shifted = contrast_phase(hu, subject.labels, "custom", 1.0, only_liver)
    assert np.allclose(shifted - hu, 40.0 * liver)


def test_truncation_makes_the_edge_air_and_background(subject):
    hu = subject.image.astype(np.float32)
    cut, labels = truncate_fov(hu, subject.labels, SPACING, np.random.default_rng(0), fov_fraction=(0.7, 0.7))
    outside = cut == HU_OUTSIDE
    body_lost = outside & (hu > -500)
    assert body_lost.sum() > 0.02 * (hu > -500).sum()              # the body edge is cut off ...
    assert np.all(labels[outside] == 0) and (subject.labels[outside] > 0).any()
    assert np.array_equal(cut[~outside], hu[~outside])             # ... and nothing inside the FOV changes
    assert np.array_equal(labels[~outside], subject.labels[~outside])
    assert np.all(outside == outside[:1])                          # one FOV circle for every slice
    centre = (slice(None), slice(15, 25), slice(15, 25))
    assert not outside[centre].any()


def test_table_is_a_dense_slab_posterior_to_the_body(subject):
    hu = subject.image.astype(np.float32)
    cfg = CTAugmentConfig(table_gap_mm=(6.0, 6.0), table_thickness_mm=(6.0, 6.0), table_hu=(300.0, 300.0))
    with_table = add_table(hu, subject.labels, SPACING, np.random.default_rng(0), cfg)
    added = with_table != hu
    assert added.any() and np.all(with_table[added] == 300.0)
    assert np.all(hu[added] < -500) and np.all(subject.labels[added] == 0)   # only into air
    body_y = np.nonzero((hu > -500).any(axis=(0, 2)))[0]
    table_y = np.nonzero(added.any(axis=(0, 2)))[0]
    assert table_y.min() < body_y.min()                             # below (posterior to) the body
    assert np.all(added == added[:1])                               # the length of the scan


def test_streaks_radiate_from_a_dense_point(subject):
    hu = subject.image.astype(np.float32)
    cfg = CTAugmentConfig(n_streaks=(6, 6), streak_hu=(300.0, 300.0))
    streaked = add_streaks(hu, SPACING, np.random.default_rng(4), cfg)
    diff = streaked - hu
    slices = np.nonzero(np.abs(diff).max(axis=(1, 2)) > 0)[0]
    assert 0 < len(slices) < hu.shape[0] // 2                       # a few axial slices only
    s = diff[slices[len(slices) // 2]]
    assert (s > 50).sum() > 10 and (s < -50).sum() > 10             # bright and dark lines
    point = np.argwhere(streaked[slices[len(slices) // 2]] >= 1500)
    assert len(point)                                               # the metal point ...
    far = np.argwhere(np.abs(s) > 30) - point.mean(axis=0)
    assert np.sqrt((far ** 2).sum(axis=1)).max() * SPACING[1] > 40  # ... and lines reaching away from it


def test_dose_noise_grows_with_lower_dose_and_density():
    image = np.zeros((24, 48, 48), np.float32)
    image[:, :, :24] = -1000.0                                      # air | water
    full = add_dose_noise(image, np.random.default_rng(1), sigma_hu=10.0, dose=1.0) - image
    low = add_dose_noise(image, np.random.default_rng(1), sigma_hu=10.0, dose=0.25) - image
    assert low[:, :, 24:].std() == pytest.approx(2 * full[:, :, 24:].std(), rel=0.05)
    assert full[:, :, 24:].std() == pytest.approx(10.0, rel=0.15)
    assert full[:, :, :24].std() < 0.4 * full[:, :, 24:].std()
    assert abs(float(full.mean())) < 1.0


def test_augment_pair_and_bad_config(subject):
    pair = {"fixed": subject.image, "moving": subject.image.copy(), "fixed_seg": subject.labels,
            "moving_seg": subject.labels.copy(), "meta": {"spacing": list(SPACING)}, "displacement": None}
    out = augment_pair(pair, np.random.default_rng(5), ALWAYS)
    assert not np.array_equal(out["fixed"], out["moving"])          # scans augmented independently
    assert out["meta"] is pair["meta"] and np.array_equal(pair["fixed"], subject.image)   # input untouched
    with pytest.raises(PreparationError, match="probability"):
        augment_ct(subject.image, subject.labels, np.random.default_rng(0), CTAugmentConfig(p_noise=2))
    with pytest.raises(PreparationError, match="phases"):
        augment_ct(subject.image, subject.labels, np.random.default_rng(0), CTAugmentConfig(phases=("venous",)))
