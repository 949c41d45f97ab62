"""Instance optimisation recovers a known smooth field on a phantom pair, without folding.

The pair: ``moving = fixed`` warped by exp(-v) for a smooth random velocity ``v``, so the field that
maps moving onto fixed is known, ``d = exp(v)`` (voxels of the fixed grid), independent noise on both.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_tools.phantom import make_subject
from unireg.io import InputError
from unireg.metrics import jacobian_determinant
from unireg.modeling.transform import SpatialTransformer, VelocityIntegrator, resize_field
from unireg.organs import ORGAN_TO_ID
from unireg.pipeline.refine import (AUTO_BUDGET, _plan_steps, _pool_exact, level_shape, refine_velocity,
                                    rigidity_penalty)
from unireg.similarity import lncc_loss, local_variance
from unireg.preprocessing import normalize_ct

pytestmark = [pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp"), pytest.mark.usefixtures("one_torch_thread")]
SHAPE = (48, 48, 48)
SPACING = 4.0


def _smooth_velocity(seed: int, amplitude: float, coarse: int = 5) -> torch.Tensor:
    """A smooth random velocity on the half-resolution grid, largest component ``amplitude`` voxels."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 3, coarse, coarse, coarse, generator=g)
    v = F.interpolate(v, size=tuple(n // 2 for n in SHAPE), mode="trilinear", align_corners=True)
    return v * (amplitude / v.abs().max())


@functools.lru_cache(maxsize=4)
def _pair(seed: int = 0, amplitude: float = 2.0):
    """(fixed, moving, true field in fixed voxels, body mask, liver mask) as tensors."""
    subject = make_subject(7, shape=SHAPE, spacing_mm=(SPACING,) * 3, noise_hu=0.0)
    fixed = torch.from_numpy(normalize_ct(subject.image))[None, None]
    v = _smooth_velocity(seed, amplitude)
    integrate = VelocityIntegrator()
    truth = resize_field(integrate(v), SHAPE)
    moving = SpatialTransformer()(fixed, resize_field(integrate(-v), SHAPE))
    g = torch.Generator().manual_seed(seed + 100)
    fixed = fixed + 0.005 * torch.randn(fixed.shape, generator=g)
    moving = moving + 0.005 * torch.randn(moving.shape, generator=g)
    body = torch.from_numpy(subject.image > -500)
    liver = torch.from_numpy(subject.labels == ORGAN_TO_ID["liver"])
    return fixed, moving, truth, body, liver


def _tre_mm(displacement, truth, mask) -> float:
    return float((displacement[0] - truth[0]).norm(dim=0)[mask].mean() * SPACING)


def test_refine_from_zero_recovers_the_field_without_folding():
    fixed, moving, truth, body, _ = _pair()
    result = refine_velocity(fixed, moving, None, smoothness=0.3, spacing_mm=SPACING, levels=(4, 2, 1), steps=150)
    before = _tre_mm(torch.zeros_like(truth), truth, body)
    after = _tre_mm(result.displacement, truth, body)
    assert after < 0.6 * before, (before, after)
    warp = SpatialTransformer()
    assert lncc_loss(fixed, warp(moving, result.displacement)) < lncc_loss(fixed, moving) - 0.05
    assert float((jacobian_determinant(result.displacement) <= 0).float().mean()) == 0.0
    assert [h["level"] for h in result.history] == [4, 2, 1]
    assert all(h["similarity_end"] < h["similarity_start"] for h in result.history)
    assert sum(h["steps"] for h in result.history) <= 150
    assert result.velocity.shape[2:] == tuple(n // 2 for n in SHAPE)


def test_refine_improves_on_a_network_like_start():
    fixed, moving, truth, body, _ = _pair()
    start = 0.3 * _smooth_velocity(0, 2.0)            # a third of the true velocity: a partial prediction
    start_field = resize_field(VelocityIntegrator()(start), SHAPE)
    seen = []
    result = refine_velocity(fixed, moving, start, smoothness=0.3, spacing_mm=SPACING, levels=(2, 1), steps=60,
                             progress=lambda level, step, loss: seen.append((level, step)))
    before, after = _tre_mm(start_field, truth, body), _tre_mm(result.displacement, truth, body)
    assert after < 0.8 * before, (before, after)
    assert seen[0] == (0, 0) and len(seen) == sum(h["steps"] for h in result.history)
    assert result.check["kept"] == "optimised" and result.check["loss_optimised"] < result.check["loss_start"]


def test_an_optimisation_that_ends_worse_than_its_start_returns_the_start():
    """Steps far too large scramble the true field; the final check hands back the start, not the wreck."""
    fixed, moving, truth, body, _ = _pair()
    start = _smooth_velocity(0, 2.0)                   # the true velocity: nothing left to gain
    wrecked = refine_velocity(fixed, moving, start, smoothness=0.3, spacing_mm=SPACING, levels=(1,), steps=5, lr=5.0)
    assert wrecked.check["kept"] == "start" and wrecked.check["loss_start"] < wrecked.check["loss_optimised"]
    assert torch.equal(wrecked.velocity, start)
    assert _tre_mm(wrecked.displacement, truth, body) < 0.2 * _tre_mm(torch.zeros_like(truth), truth, body)


def test_the_final_check_uses_the_finest_level_that_ran():
    """A plan that leaves the finest level out (as the CPU budget does on large grids) is checked at the next one."""
    fixed, moving, _, _, _ = _pair()
    result = refine_velocity(fixed, moving, None, smoothness=0.3, spacing_mm=SPACING, levels=(4, 2, 1),
                             steps=[20, 20, 0], similarity="mind")
    assert [h["level"] for h in result.history] == [4, 2]
    assert result.check["kept"] == "optimised" and result.check["loss_optimised"] < result.check["loss_start"]


def test_zero_steps_returns_the_starting_velocity_and_its_field():
    fixed, moving, _, _, _ = _pair()
    start = _smooth_velocity(3, 1.5)[..., :20, :, :]   # any grid: the network's own
    result = refine_velocity(fixed, moving, start, smoothness=0.3, spacing_mm=SPACING, steps=0)
    assert torch.equal(result.velocity, start)
    assert torch.equal(result.displacement, resize_field(VelocityIntegrator()(start), SHAPE))
    assert result.history == []


@pytest.mark.slow
def test_higher_smoothness_gives_a_smoother_field():
    fixed, moving, _, body, _ = _pair()
    sd = {}
    for smoothness in (0.0, 1.0):
        result = refine_velocity(fixed, moving, None, smoothness=smoothness, spacing_mm=SPACING, levels=(2, 1),
                                 steps=60)
        sd[smoothness] = float(jacobian_determinant(result.displacement)[0][body].log().std())
    assert sd[1.0] < 0.6 * sd[0.0], sd


@pytest.mark.slow
def test_rigid_mask_keeps_the_structure_rigid_while_the_rest_deforms():
    fixed, moving, truth, body, liver = _pair(seed=1, amplitude=2.5)
    rigid = liver[None, None]
    outside = body & ~liver
    core = torch.from_numpy(_erode(liver.numpy()))
    dets, strain = {}, {}
    for weight in (0.0, 10.0):
        field = refine_velocity(fixed, moving, None, smoothness=0.2, spacing_mm=SPACING, levels=(2, 1), steps=80,
                                rigid_mask=rigid, rigid_weight=weight).displacement
        dets[weight] = jacobian_determinant(field)[0][core]
        strain[weight] = float(rigidity_penalty(field, core[None, None].float()))
        if weight:
            tre_outside = _tre_mm(field, truth, outside)
    assert (dets[0.0] - 1).abs().max() > 0.2                       # the true field squeezes the liver
    assert (dets[10.0] - 1).abs().max() < 0.05
    assert (dets[10.0] - 1).abs().mean() < 0.02
    assert strain[10.0] < 0.1 * strain[0.0]                        # no shear either: J is a rotation
    assert tre_outside < 0.7 * _tre_mm(torch.zeros_like(truth), truth, outside)


def _erode(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    return ndimage.binary_erosion(mask, iterations=1)


def test_mind_similarity_registers_a_contrast_changed_pair():
    fixed, moving, truth, body, _ = _pair()
    remapped = 0.5 + 0.5 * torch.cos(3.0 * moving)     # non-monotonic intensity change
    result = refine_velocity(fixed, remapped, None, smoothness=0.3, spacing_mm=SPACING, levels=(2, 1), steps=60,
                             similarity="mind")
    before = _tre_mm(torch.zeros_like(truth), truth, body)
    assert _tre_mm(result.displacement, truth, body) < 0.7 * before


def test_mind_ncc_registers_and_ignores_a_linear_intensity_change():
    """The intensity channel is standardised locally: a gain and an offset (another window, another
    scanner's calibration) leave it unchanged, and the pair still registers."""
    from unireg.pipeline.refine import INTENSITY_KERNEL, INTENSITY_WEIGHT, _descriptor
    from unireg.similarity import local_standardise, mind_ssc
    fixed, moving, truth, body, _ = _pair()
    descriptor = _descriptor(moving, "mind_ncc")           # MIND-SSC built in place, then the 13th channel
    assert torch.equal(descriptor[:, :12], mind_ssc(moving))
    assert torch.equal(descriptor[:, 12:], local_standardise(moving, INTENSITY_KERNEL) * INTENSITY_WEIGHT)
    scaled = 3.0 * moving + 40.0
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert torch.allclose(local_standardise(scaled)[inner], local_standardise(moving)[inner], atol=2e-2)
    result = refine_velocity(fixed, scaled, None, smoothness=0.3, spacing_mm=SPACING, levels=(2, 1), steps=60,
                             similarity="mind_ncc")
    assert _tre_mm(result.displacement, truth, body) < 0.7 * _tre_mm(torch.zeros_like(truth), truth, body)


def test_a_sampled_level_has_the_dense_loss_and_registers_as_well():
    """Reading the field and the moving features at points is the dense warp read there (all voxels
    sampled: the same loss), and a MIND level on 16384 of its 110,592 voxels recovers the field
    about as well as every voxel does."""
    from unireg.pipeline.points import field_at, level_points, values_at, warp_at
    from unireg.similarity import mind_loss, mind_ssc
    fixed, moving, truth, body, _ = _pair()
    f_feat, m_feat = mind_ssc(fixed), mind_ssc(moving)
    u = resize_field(_smooth_velocity(1, 3.0), (12, 12, 12))
    points = level_points(SHAPE, 48 ** 3, None, "cpu")
    assert len(torch.unique(points, dim=0)) == 48 ** 3
    # a channels-last volume (how refinement keeps the descriptors) is read row by row: the same values
    assert torch.equal(values_at(f_feat.contiguous(memory_format=torch.channels_last_3d), points),
                       values_at(f_feat, points))
    sampled = mind_loss(values_at(f_feat, points), warp_at(m_feat, points, field_at(u, points, SHAPE)))
    dense = mind_loss(f_feat, SpatialTransformer()(m_feat, resize_field(u, SHAPE)))
    assert float(sampled) == pytest.approx(float(dense), rel=1e-5)

    kw = dict(smoothness=0.3, spacing_mm=SPACING, levels=(2, 1), steps=60, similarity="mind")
    every = refine_velocity(fixed, moving, None, sample_voxels=0, **kw)
    few = refine_velocity(fixed, moving, None, sample_voxels=16384, **kw)
    assert [level["sampled_voxels"] for level in few.history] == [None, 16384]   # 24^3 level stays dense
    assert [level["sampled_voxels"] for level in every.history] == [None, None]
    before = _tre_mm(torch.zeros_like(truth), truth, body)
    tre_every, tre_few = _tre_mm(every.displacement, truth, body), _tre_mm(few.displacement, truth, body)
    assert tre_few < 0.7 * before and tre_few < 1.1 * tre_every, (before, tre_every, tre_few)


def test_sampled_steps_draw_new_points_inside_the_mask_and_runs_repeat():
    """Every step reads a new random sample (over its steps the optimiser sees most of the grid), only
    where the moving scan has data, and the seeded draws make two runs identical."""
    from unireg.pipeline.points import PointSampler
    mask = torch.zeros(1, 1, *SHAPE, dtype=torch.bool)
    mask[..., 10:30, :, :] = True
    sampler = PointSampler(SHAPE, mask, "cpu")
    first, second = sampler.draw(4096), sampler.draw(4096)
    assert not torch.equal(first, second)
    for points in (first, second):
        assert bool(((points[:, 0] >= 10) & (points[:, 0] < 30)).all())
        index = points[:, 0] * SHAPE[1] * SHAPE[2] + points[:, 1] * SHAPE[2] + points[:, 2]
        assert bool((index[1:] >= index[:-1]).all())          # memory order
    fixed, moving, _, _, _ = _pair()
    kw = dict(smoothness=0.3, spacing_mm=SPACING, levels=(2, 1), steps=20, similarity="mind", sample_voxels=4096)
    one, two = refine_velocity(fixed, moving, None, **kw), refine_velocity(fixed, moving, None, **kw)
    assert one.history[-1]["sampled_voxels"] == 4096
    assert torch.equal(one.displacement, two.displacement)


def test_edge_points_come_from_the_quarter_of_voxels_that_varies_most():
    """Besides its uniform sample, a step reads points where the fixed image varies most (organ
    boundaries), within the moving scan's coverage."""
    from unireg.pipeline.points import EDGE_FRACTION, PointSampler, edge_mask
    fixed, _, _, _, _ = _pair()
    inside = torch.zeros(1, 1, *SHAPE, dtype=torch.bool)
    inside[..., 4:44, :, :] = True
    edges = edge_mask(fixed, inside)
    assert not bool((edges & ~inside).any())
    assert abs(float(edges.sum()) / float(inside.sum()) - EDGE_FRACTION) < 0.01
    variance = local_variance(fixed, 3)
    assert float(variance[edges].min()) >= float(variance[inside & ~edges].max())
    points = PointSampler(SHAPE, inside, "cpu", edges).draw(1000, 500)
    assert len(points) == 1500
    on_edges = edges[0, 0][points[:, 0], points[:, 1], points[:, 2]]
    expected = (500 + 1000 * EDGE_FRACTION) / 1500            # the edge draws, and the uniform ones landing there
    assert abs(float(on_edges.float().mean()) - expected) < 0.05


def test_dice_term_pulls_labelled_structures_together():
    fixed, _, _, _, liver = _pair()
    fixed_mask = liver[None, None].float()
    moving_mask = SpatialTransformer()(fixed_mask, resize_field(VelocityIntegrator()(-_smooth_velocity(0, 2.0)), SHAPE))
    moving_mask = moving_mask > 0.5                    # label maps arrive as booleans or integers
    blank = torch.full_like(fixed, 0.5)                # no image information: only the masks can drive it
    result = refine_velocity(blank, blank, None, smoothness=0.3, spacing_mm=SPACING, levels=(2, 1), steps=60,
                             fixed_masks=fixed_mask.bool(), moving_masks=moving_mask)
    moving_mask = moving_mask.float()
    warped = SpatialTransformer()(moving_mask, result.displacement)

    def dice(a):
        return float(2 * (a * fixed_mask).sum() / (a.sum() + fixed_mask.sum()))
    assert dice(warped) > dice(moving_mask) + 0.03


@functools.lru_cache(maxsize=1)
def _sliding_pair():
    """The liver slides 10 mm along the first axis, the rest of the body stays: no smooth field fits
    both, so a whole-body optimisation compromises at the liver's boundary. (fixed, moving, truth,
    liver core: voxels whose 4-voxel neighbourhood is all liver, where the truth is the shift alone.)"""
    from scipy import ndimage
    fixed, _, _, _, liver = _pair()
    soft = torch.from_numpy(ndimage.gaussian_filter(liver.numpy().astype(np.float32), 1.0))
    truth = torch.zeros(1, 3, *SHAPE)
    truth[0, 0] = 2.5 * soft
    moving = SpatialTransformer()(fixed, -truth)
    core = torch.from_numpy(ndimage.binary_erosion(liver.numpy(), iterations=4))
    return fixed, moving, truth, liver, core


def test_a_focus_region_aligns_its_organ_where_the_whole_body_compromises():
    """Weighting the similarity towards the liver (grown by 2 voxels) makes the field follow the
    liver's slide instead of the static body around it."""
    from scipy import ndimage
    fixed, moving, truth, liver, core = _sliding_pair()
    focus = torch.from_numpy(ndimage.binary_dilation(liver.numpy(), iterations=2))[None, None]
    kw = dict(smoothness=0.3, spacing_mm=SPACING, levels=(2, 1), steps=60, similarity="lncc", velocity_factor=4)
    whole = refine_velocity(fixed, moving, None, **kw)
    focused = refine_velocity(fixed, moving, None, focus=focus, **kw)
    assert whole.history[-1]["focus_voxels"] is None
    assert focused.history[-1]["focus_voxels"] == int(focus.sum())
    before = _tre_mm(torch.zeros_like(truth), truth, core)
    tre_whole, tre_focused = _tre_mm(whole.displacement, truth, core), _tre_mm(focused.displacement, truth, core)
    assert tre_focused < 0.6 * tre_whole and tre_whole < before, (before, tre_whole, tre_focused)
    assert float(jacobian_determinant(focused.displacement).min()) > 0


def test_a_sampled_level_reads_extra_points_in_the_focus_and_follows_it():
    """A MIND level on samples draws FOCUS_VOXELS more points among the focus voxels at every step;
    from a start 60 % of the way, the focused field ends closer to the liver's slide."""
    from scipy import ndimage
    from unireg.pipeline import points as point_sampling, refine
    fixed, moving, truth, liver, core = _sliding_pair()
    focus = torch.from_numpy(ndimage.binary_dilation(liver.numpy(), iterations=2))[None, None]
    drawn = []
    original = point_sampling.PointSampler.draw

    def recording(self, n, n_edge=0):
        points = original(self, n, n_edge)
        drawn.append((self.count, points))
        return points
    start = resize_field(0.6 * truth, tuple(n // 2 for n in SHAPE))
    kw = dict(smoothness=0.3, spacing_mm=SPACING, levels=(2, 1), steps=60, similarity="mind_ncc", velocity_factor=4,
              sample_voxels=8192)
    whole = refine_velocity(fixed, moving, start, **kw)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(point_sampling.PointSampler, "draw", recording)
        focused = refine_velocity(fixed, moving, start, focus=focus, **kw)
    region = [points for count, points in drawn if count == int(focus.sum())]
    assert region and all(len(points) == refine.FOCUS_VOXELS for points in region)
    assert all(bool(focus[0, 0][p[:, 0], p[:, 1], p[:, 2]].all()) for p in region)
    assert focused.history[-1]["sampled_voxels"] == 8192
    assert _tre_mm(focused.displacement, truth, core) < 0.95 * _tre_mm(whole.displacement, truth, core)


@pytest.mark.parametrize("similarity, sample_voxels", [("lncc", 0), ("mind", 2 ** 12)])
def test_a_moving_scan_on_its_own_grid_is_read_through_the_voxel_map(similarity, sample_voxels):
    """Warp once: the moving scan is the fixed one stored from voxel (2, 1, 0) on (a grid of its own, 46 x
    47 x 48), and ``fixed_to_moving`` says so. Read through that map (dense LNCC levels and sampled MIND
    ones, coarse and fine), the unmoved pair matches as well as the scan with itself on one grid, where
    the moving scan covers the fixed one; the same scan taken as if it lay on the fixed grid does not,
    and a moving scan of another shape without a map is refused."""
    fixed = _pair()[0]
    moving = fixed[:, :, 2:, 1:, :].clone()
    to_moving = np.eye(4)
    to_moving[:3, 3] = (-2.0, -1.0, 0.0)
    coverage = torch.zeros_like(fixed)
    coverage[:, :, 2:, 1:, :] = 1.0
    def start_similarity(moving, matrix):
        res = refine_velocity(fixed, moving, None, smoothness=0.5, spacing_mm=SPACING, levels=(2, 1), steps=[1, 1],
                              similarity=similarity, sample_voxels=sample_voxels, edge_voxels=0,
                              moving_coverage=coverage, fixed_to_moving=matrix)
        return [level["similarity_start"] for level in res.history]
    itself = start_similarity(fixed, None)
    read_right = start_similarity(moving, to_moving)
    read_wrong = start_similarity(moving, np.eye(4))
    for same, right, wrong in zip(itself, read_right, read_wrong):
        spread = abs(wrong - same)
        # MIND-SSC scales by the scan's mean patch variance, which cropping changes a little (0.012 inside)
        assert abs(right - same) < 0.3 * spread and spread > 0.05 * abs(same), (itself, read_right, read_wrong)
    with pytest.raises(InputError, match="one grid"):
        refine_velocity(fixed, moving, None, smoothness=0.5, spacing_mm=SPACING, levels=(1,), steps=1)


def test_a_moving_grid_is_pooled_in_whole_blocks():
    """Level voxel a of the moving scan's own grid is the mean of voxels 4a .. 4a + 3 (the last partial
    block left out), whatever the grid's size; a side thinner than a block is its edge repeated."""
    x = torch.arange(3 * 10 * 17, dtype=torch.float32).reshape(1, 1, 3, 10, 17)
    pooled = _pool_exact(x, 4)
    assert pooled.shape == (1, 1, 1, 2, 4)
    padded = torch.cat([x, x[:, :, -1:]], dim=2)                       # 3 slices -> 4, the last repeated
    assert torch.allclose(pooled[0, 0, 0, 1, 2], padded[0, 0, 0:4, 4:8, 8:12].mean())


def test_bad_arguments_are_named():
    fixed, moving, _, _, _ = _pair()
    with pytest.raises(InputError, match="lncc, mind"):
        refine_velocity(fixed, moving, smoothness=0.3, spacing_mm=SPACING, similarity="ncc")
    with pytest.raises(InputError, match="one grid"):
        refine_velocity(fixed, moving[..., :-1], smoothness=0.3, spacing_mm=SPACING)
    with pytest.raises(InputError, match="both scans"):
        refine_velocity(fixed, moving, smoothness=0.3, spacing_mm=SPACING, fixed_masks=fixed)
    with pytest.raises(InputError, match="steps"):
        refine_velocity(fixed, moving, smoothness=0.3, spacing_mm=SPACING, steps=-1)
    with pytest.raises(InputError, match="focus .* no voxel"):
        refine_velocity(fixed, moving, smoothness=0.3, spacing_mm=SPACING, focus=torch.zeros_like(fixed))
    with pytest.raises(InputError, match="focus must be"):
        refine_velocity(fixed, moving, smoothness=0.3, spacing_mm=SPACING, focus=fixed[..., :-1])


def test_step_plans():
    shapes = [level_shape((128,) * 3, f) for f in (4, 2, 1)]
    cpu = _plan_steps("auto", shapes, torch.device("cpu"))
    assert cpu[0] > 0 and cpu[-1] == 0                   # the full 128^3 grid is beyond a CPU's budget
    assert sum(n * np.prod(s) for n, s in zip(cpu, shapes)) <= AUTO_BUDGET["cpu"] * 1.01
    assert all(n > 0 for n in _plan_steps("auto", shapes, torch.device("cuda")))
    for total in (0, 1, 7, 150):
        plan = _plan_steps(total, shapes, torch.device("cpu"))
        assert sum(plan) == total and plan[0] >= plan[-1]


def test_a_preset_skips_sampled_levels_that_repeat_the_finest_velocity_grid():
    """With a preset, a sampled middle level optimising the finest level's own velocity grid is left
    out (first and finest levels run); a number of steps runs every level, as asked."""
    fixed, moving, _, _, _ = _pair()
    kw = dict(smoothness=0.3, spacing_mm=SPACING, levels=(4, 2, 1), similarity="mind", sample_voxels=4096,
              velocity_factor=4)
    preset = refine_velocity(fixed, moving, None, steps="fast", **kw)
    assert [level["level"] for level in preset.history] == [4, 1]
    assert preset.history[-1]["sampled_voxels"] == 4096 and preset.history[0]["sampled_voxels"] is None
    counted = refine_velocity(fixed, moving, None, steps=[5, 5, 5], **kw)
    assert [level["level"] for level in counted.history] == [4, 2, 1]
    assert counted.history[1]["velocity_shape"] == counted.history[2]["velocity_shape"]
