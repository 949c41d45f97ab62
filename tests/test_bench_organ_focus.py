"""bench/organ_focus.py scores organ X alone: its points lie in X, and no registration scores X's own overlap and motion."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from organ_focus import _organ_points, organ_scores  # noqa: E402
from vs_optimisers import phantom_pair  # noqa: E402

from unireg.organs import ORGAN_TO_ID  # noqa: E402


def test_organ_points_lie_in_the_organ_and_identity_scores_the_unregistered_overlap():
    pair = phantom_pair("intra", 0, 20000)
    liver = ORGAN_TO_ID["liver"]
    points, truth = _organ_points(pair, liver)
    voxels = np.rint(np.linalg.solve(pair.fixed.affine, np.c_[points, np.ones(len(points))].T)[:3].T).astype(int)
    assert len(points) >= 20 and (pair.fixed_labels[tuple(voxels.T)] == liver).all()
    identity = organ_scores(pair, np.zeros(pair.fixed.shape[:3] + (3,), np.float32), liver, (points, truth))
    fixed, moving = pair.fixed_labels == liver, pair.moving_labels == liver
    assert identity["dice"] == 2 * (fixed & moving).sum() / (fixed.sum() + moving.sum())
    assert identity["tre"] == np.median(np.linalg.norm(points - truth, axis=1)) > 1.0   # the liver breathes
