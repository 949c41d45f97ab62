"""Organ-motion pairs: organs slide by offsets of their own, and the stored field says where."""
import numpy as np

from data_tools.organ_motion import organ_motion_pair, organ_motion_pairs
from data_tools.phantom import make_subject
from unireg.organs import ORGAN_TO_ID


def test_moved_organs_take_their_own_offsets_and_the_field_maps_them_back():
    subject = make_subject(3, (32, 32, 32), (12.0, 12.0, 12.0))
    moving, displacement = organ_motion_pair(subject, seed=5)
    shifts = {}
    for organ, idx in ORGAN_TO_ID.items():
        mask = subject.labels == idx
        if mask.any() and np.abs(displacement[:, mask]).sum() > 0:
            values = displacement[:, mask].reshape(3, -1)
            assert (values == values[:, :1]).all(), organ                 # one rigid offset per organ
            shifts[organ] = tuple(values[:, 0])
    assert 2 <= len(shifts) <= 4 and len(set(shifts.values())) >= 2      # organs move, and differently
    z, y, x = np.nonzero(np.abs(displacement).sum(0) > 0)
    zz, yy, xx = (c + displacement[a, z, y, x].astype(int) for a, c in enumerate((z, y, x)))
    inside = (zz >= 0) & (zz < 32) & (yy >= 0) & (yy < 32) & (xx >= 0) & (xx < 32)
    # fixed(x) = moving(x + d(x)) on the moved organs (where a later organ did not land on top)
    same = moving["labels"][zz[inside], yy[inside], xx[inside]] == subject.labels[z[inside], y[inside], x[inside]]
    assert same.mean() > 0.9
    still = np.abs(displacement).sum(0) == 0
    assert (moving["image"][still & (moving["labels"] == subject.labels)] ==
            subject.image[still & (moving["labels"] == subject.labels)]).all()


def test_pairs_are_intra_and_deterministic():
    a = list(organ_motion_pairs(1, (24, 24, 24), (16.0, 16.0, 16.0), seed=2, per_subject=2))
    b = list(organ_motion_pairs(1, (24, 24, 24), (16.0, 16.0, 16.0), seed=2, per_subject=2))
    assert [k for k, _ in a] == [k for k, _ in b] and len(a) == 2
    assert all(p["meta"]["type"] == "intra" and p["meta"]["source"] == "organ_motion" for _, p in a)
    assert np.array_equal(a[1][1]["moving"], b[1][1]["moving"])
    assert not np.array_equal(a[0][1]["moving"], a[1][1]["moving"])
