"""The benchmark's ground truth and metric: pairs with a known mapping, TRE, folding, label scores.

A benchmark is only as good as its truth, so these check that the made moving scan really is
the fixed scan seen through the stated mapping, that identity scores exactly the deformation it
was given and that a method returning the true mapping scores zero.
"""
import importlib.util
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from known_deformation import (KnownDeformation, body_mask, evaluation_points, grid_points,  # noqa: E402
                               inside_grid, make_moving, sample)
import vs_optimisers  # noqa: E402
from registration_scores import folding_pct, label_scores, mapped_points, tre_stats, warp_labels  # noqa: E402

from data_tools.phantom import make_subject  # noqa: E402


@pytest.fixture(scope="module")
def subject():
    """A 48^3 phantom at 5 mm as a RAS nibabel image + labels in (i, j, k) order."""
    s = make_subject(7, shape=(48, 48, 48), spacing_mm=(5.0, 5.0, 5.0))
    to_ijk = lambda a: np.ascontiguousarray(np.transpose(a, (2, 1, 0)))  # noqa: E731
    return nib.Nifti1Image(to_ijk(s.image), s.affine), to_ijk(s.labels)


def true_field(fixed, truth):
    """The true fixed -> moving mapping as a mm field on the fixed grid (what a perfect method returns)."""
    points = grid_points(fixed.shape, fixed.affine)
    return (truth.inverse(points) - points).reshape(*fixed.shape, 3).astype(np.float32)


def test_identity_scores_a_pure_translation_exactly(subject):
    fixed, _ = subject
    truth = KnownDeformation.random(fixed, seed=1, rotation_deg=0, translation_mm=6.0, field_mm=0)
    points = evaluation_points(fixed, 500, seed=0)
    identity = mapped_points(np.zeros((*fixed.shape, 3), np.float32), fixed.affine, points)
    stats = tre_stats(identity, truth.inverse(points))
    assert stats["tre_median"] == pytest.approx(6.0, abs=1e-6)
    assert stats["tre_p95"] == pytest.approx(6.0, abs=1e-6)


def test_identity_tre_equals_the_deformation_magnitude(subject):
    """With rotation and a smooth field the identity error is |S^-1(x) - x|, and S(S^-1(x)) = x."""
    fixed, _ = subject
    truth = KnownDeformation.random(fixed, seed=2, rotation_deg=3.0, translation_mm=4.0, field_mm=7.0)
    points = evaluation_points(fixed, 2000, seed=0)
    true = truth.inverse(points)
    np.testing.assert_allclose(truth(true), points, atol=1e-3)           # the inverse is exact
    magnitude = np.linalg.norm(true - points, axis=1)
    stats = tre_stats(points, true)
    assert stats["tre_median"] == pytest.approx(np.median(magnitude))
    assert stats["tre_p95"] == pytest.approx(np.percentile(magnitude, 95))
    # the field's largest vector is 7 mm and the rigid part moves a ~120 mm body by at most ~4 + 6 mm
    assert 1.0 < stats["tre_median"] < 4.0 + 7.0 + 120 * np.deg2rad(3.0)
    no_field = KnownDeformation.random(fixed, seed=2, rotation_deg=3.0, translation_mm=4.0, field_mm=0.0)
    assert not np.allclose(no_field.inverse(points), true, atol=0.5)     # the field does move points


def test_true_mapping_scores_zero_and_restores_the_fixed_scan(subject):
    sharp, labels = subject
    fixed = nib.Nifti1Image(ndimage.gaussian_filter(np.asanyarray(sharp.dataobj).astype(np.float32), 1.5), sharp.affine)
    truth = KnownDeformation.random(fixed, seed=3, rotation_deg=3.0, translation_mm=4.0, field_mm=7.0)
    moving, moving_labels = make_moving(fixed, truth, noise_hu=0.0, labels=labels)
    field = true_field(fixed, truth)
    points = evaluation_points(fixed, 2000, seed=1)
    assert tre_stats(mapped_points(field, fixed.affine, points), truth.inverse(points))["tre_p95"] < 1e-3
    assert folding_pct(field, fixed.affine) == 0.0
    # moving(phi(x)) = fixed(x): the moving scan is the fixed one seen through the stated mapping
    grid = grid_points(fixed.shape, fixed.affine)
    body = body_mask(np.asanyarray(fixed.dataobj)).ravel() & inside_grid(grid + field.reshape(-1, 3), moving.shape, moving.affine)
    hu = np.asanyarray(fixed.dataobj).astype(np.float32).ravel()
    moving_hu = np.asanyarray(moving.dataobj).astype(np.float32)
    error = {name: np.abs(sample(moving_hu, moving.affine, grid + u.reshape(-1, 3), 1, -1024) - hu)[body].mean()
             for name, u in (("true", field), ("identity", 0 * field), ("reversed", -field))}
    assert error["true"] < 0.25 * error["identity"] and error["true"] < 0.25 * error["reversed"]
    # labels carried by the true mapping overlap the fixed labels; identity does not as well
    spacing = fixed.header.get_zooms()[:3]
    perfect = label_scores(labels, warp_labels(moving_labels, moving.affine, field, fixed.affine), spacing)
    none = label_scores(labels, warp_labels(moving_labels, moving.affine, np.zeros_like(field), fixed.affine), spacing)
    assert perfect["dice"] > 0.9 and perfect["dice"] > none["dice"] + 0.1
    assert perfect["hd95"] < none["hd95"]


def test_folding_detects_a_folded_field(subject):
    fixed, _ = subject
    field = np.zeros((*fixed.shape, 3), np.float32)
    i = np.arange(fixed.shape[0], dtype=np.float32)[:, None, None]
    field[..., 0] = np.where((i > 10) & (i < 20), -2.0 * 5.0 * (i - 10), 0.0)   # x' = x - 2x: reversed along x
    assert 10.0 < folding_pct(field, fixed.affine) < 25.0


def test_clinical_moving_grids(subject):
    """Thick slices and a cropped field of view: the grid asked for, and TRE only where observable."""
    fixed, labels = subject
    truth = KnownDeformation.random(fixed, seed=4, rotation_deg=10.0, translation_mm=15.0, field_mm=7.0)
    thick, _ = make_moving(fixed, truth, spacing_mm=(5.0, 5.0, 10.0))
    assert thick.header.get_zooms()[:3] == (5.0, 5.0, 10.0)
    assert thick.shape[2] == pytest.approx(fixed.shape[2] / 2, abs=1)
    cropped, _ = make_moving(fixed, truth, crop=((0, 1), (0, 1), (0.25, 0.75)))
    assert cropped.shape[2] == pytest.approx(fixed.shape[2] / 2, abs=1)
    points = evaluation_points(fixed, 3000, seed=0)
    keep = inside_grid(truth.inverse(points), cropped.shape, cropped.affine)
    assert 0.2 < keep.mean() < 0.8


def _installed(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("method, module", [
    ("greedy", "picsl_greedy"), ("ants_syn", "ants"),
    pytest.param("convex_adam", "convexAdam", marks=pytest.mark.slow)])
def test_optimiser_output_is_converted_to_the_shared_convention(subject, method, module):
    """A known translation comes back as the fixed -> moving mapping in RAS mm (LPS flipped)."""
    if not _installed(module):
        pytest.skip(f"{module} not installed (pip install -e '.[bench]')")
    import optimiser_methods as om
    fixed, _ = subject
    truth = KnownDeformation.random(fixed, seed=0, rotation_deg=0, translation_mm=0, field_mm=0)
    truth.translation = np.array([6.0, -4.0, 3.0])
    moving, _ = make_moving(fixed, truth, noise_hu=0.0)
    field, seconds = getattr(om, method)(fixed, moving)
    points = evaluation_points(fixed, 2000, seed=0)
    shift = np.median(mapped_points(field, fixed.affine, points) - points, axis=0)
    np.testing.assert_allclose(shift, -truth.translation, atol=1.5)
    assert seconds > 0


def test_aligned_row_is_the_pre_alignment_alone(subject):
    """The "aligned" method maps points by the pipeline's linear stage only: a patient moved rigidly is
    recovered to within a voxel, and the network's field is not in it."""
    import optimiser_methods as om
    from unireg import UniReg
    fixed, _ = subject
    truth = KnownDeformation.random(fixed, seed=4, rotation_deg=4.0, translation_mm=8.0, field_mm=0)
    moving, _ = make_moving(fixed, truth, noise_hu=0.0)
    model = UniReg.from_pretrained("unireg-tiny-phantom")
    field, seconds = om.unireg_alignment(model)(fixed, moving, "intra")
    points = evaluation_points(fixed, 2000, seed=0)
    before = tre_stats(points, truth.inverse(points))["tre_median"]
    after = tre_stats(mapped_points(field, fixed.affine, points), truth.inverse(points))["tre_median"]
    assert before > 5.0 and after < 2.0, (before, after)
    # an affine field: its second differences vanish (no deformable part)
    assert np.abs(np.diff(field, n=2, axis=0)).max() < 1e-3
    assert seconds > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vs_optimisers.main(["--device", "cuda", "--cases", "phantom_inter", "--methods", "identity"])
    assert exit_info.value.code == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


def test_smooth_flag_reaches_the_prompts_and_is_checked(monkeypatch, capsys):
    """``--smooth`` is how the benchmark shows the smoothness knob's trade-off: every registration call gets
    the pair's prompt with ``| smooth=λ`` appended; a value outside [0, 1] stops before any work."""
    prompts = []
    real_build = vs_optimisers.build_methods

    def recording(names, model, device):
        methods, notes = real_build(["identity"], model, device)
        identity = methods["identity"]

        def run(fixed, moving, prompt):
            prompts.append(prompt)
            return identity(fixed, moving, prompt)
        return {"identity": run}, notes

    monkeypatch.setattr(vs_optimisers, "build_methods", recording)
    assert vs_optimisers.main(["--cases", "phantom_intra", "--methods", "identity", "--seeds", "1",
                               "--points", "200", "--smooth", "0.25"]) == 0
    assert prompts == ["intra | smooth=0.25"]
    with pytest.raises(SystemExit) as exit_info:
        vs_optimisers.main(["--cases", "phantom_intra", "--methods", "identity", "--smooth", "1.5"])
    assert exit_info.value.code == 2
    assert "--smooth must lie in [0, 1], got 1.5" in capsys.readouterr().err
