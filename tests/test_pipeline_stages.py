"""The full pipeline end to end: pre-alignment, instance optimisation and rigid structures, via register."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from data_tools.phantom import make_subject
from synthetic import centred_affine
from unireg import UniReg
from unireg.errors import UserError
from unireg.io import ijk_to_tensor_order
from unireg.metrics import jacobian_determinant
from unireg.organs import ORGAN_TO_ID
from unireg.pipeline.refine import STEP_PRESETS

SPACING = 4.0
SHAPE = (48, 48, 48)


def _affine():
    return centred_affine(SHAPE, SPACING)


@pytest.fixture(scope="module")
def model():
    return UniReg.from_pretrained("unireg-tiny-phantom")


@pytest.fixture(scope="module")
def fixed():
    """A phantom torso (spine, ribs, organs): asymmetric enough to pin down a rotation."""
    subject = make_subject(3, shape=SHAPE, spacing_mm=(SPACING,) * 3)
    return ijk_to_tensor_order(subject.image).astype(np.float32), ijk_to_tensor_order(subject.labels)


def _sample(volume, affine, world, order=1, cval=-1000.0):
    inv = np.linalg.inv(affine)
    ijk = inv[:3, :3] @ world.reshape(-1, 3).T + inv[:3, 3:4]
    return ndimage.map_coordinates(volume, ijk, order=order, cval=cval).reshape(world.shape[:-1])


def _world(shape, affine):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _rigid(deg, shift_mm):
    t = np.deg2rad(deg)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]
    m[:3, 3] = shift_mm
    return m


def test_pre_alignment_recovers_a_rigid_transform(model, fixed):
    """moving(y) = fixed(M^-1 y): the mapping fixed -> moving is M (10 deg, 15 mm)."""
    hu, lab = fixed
    truth = _rigid(10.0, [9.0, -9.0, 7.0])
    affine = _affine()
    world = _world(SHAPE, affine)
    back = world @ np.linalg.inv(truth)[:3, :3].T + np.linalg.inv(truth)[:3, 3]
    moving = _sample(hu, affine, back)
    result = model.register((hu, affine), (moving, affine), "inter", align="rigid", refine=False)
    est = result.affine_matrix
    body = world[lab > 0] if (lab > 0).any() else world.reshape(-1, 3)
    err = np.linalg.norm(body @ (est - truth)[:3, :3].T + (est - truth)[:3, 3], axis=1)
    angle = np.degrees(np.arccos(np.clip((np.trace(est[:3, :3].T @ truth[:3, :3]) - 1) / 2, -1, 1)))
    assert err.max() < 1.0 and angle < 0.5, (err.max(), angle)
    assert result.metrics["alignment"]["mode"] == "rigid"
    # the total mapping carries the affine: body points land where M puts them, up to the network's own
    # small field on the aligned pair (the shipped phantom network adds ~1 mm there)
    pts = body[::97]
    miss = np.linalg.norm(result.warp_points(pts) - (pts @ truth[:3, :3].T + truth[:3, 3]), axis=1)
    assert np.median(miss) < 1.5 and miss.max() < 4.0, miss


def test_pre_alignment_does_not_depend_on_the_models_grid(model, fixed):
    """Both shipped models (6 mm and 3 mm working grids) see the pair at the same alignment spacing, so
    "auto" makes the same decision and finds the same transform (a real abdomen was rigidly aligned at
    3 mm and left alone at 6 mm, and the final TRE followed)."""
    hu, _ = fixed
    truth = _rigid(6.0, [5.0, -4.0, 3.0])
    affine = _affine()
    moving = _sample(hu, affine, _world(SHAPE, affine) @ np.linalg.inv(truth)[:3, :3].T + np.linalg.inv(truth)[:3, 3])
    fine = UniReg.from_pretrained("unireg-tiny-3mm")
    assert fine.config.working_spacing_mm < model.config.working_spacing_mm
    results = [m.register((hu, affine), (moving, affine), "inter", refine=False) for m in (model, fine)]
    modes = [r.metrics["alignment"]["mode"] for r in results]
    assert modes[0] == modes[1] != "none", modes
    np.testing.assert_allclose(results[0].affine_matrix, results[1].affine_matrix, atol=1e-4)


@pytest.fixture(scope="module")
def deformed(fixed):
    """moving(y) = fixed(y + w(y)) with a smooth w; the true fixed -> moving mapping solves x + d = y."""
    hu, lab = fixed
    rng = np.random.default_rng(3)
    w = np.stack([ndimage.gaussian_filter(rng.normal(size=(12, 12, 12)), 2.0) for _ in range(3)], -1)
    w = np.stack([ndimage.zoom(w[..., c], 4, order=3) for c in range(3)], -1)
    w *= 9.0 / np.abs(w).max()                                  # up to 9 mm
    affine = _affine()
    world = _world(SHAPE, affine)
    moving = _sample(hu, affine, world + w)
    moving_lab = _sample(lab.astype(np.float32), affine, world + w, order=0, cval=0).astype(np.uint8)
    d = np.zeros_like(w)
    for _ in range(30):                                          # d = -w(x + d)
        d = -np.stack([_sample(w[..., c], affine, world + d, cval=0.0) for c in range(3)], -1)
    return hu, lab, moving, moving_lab, d, affine


def _tre(result, truth, lab):
    body = lab > 0
    return float(np.linalg.norm(result.displacement[body] - truth[body], axis=1).mean())


@pytest.mark.parametrize("options", [{}, {"similarity": "lncc"}, {"refine": "fast"}, {"refine": "accurate"}],
                         ids=["default", "lncc", "fast", "accurate"])
def test_instance_optimisation_beats_the_network_without_folding(model, deformed, options):
    hu, lab, moving, moving_lab, truth, affine = deformed
    kw = dict(moving_labels=(moving_lab, affine), align="none")
    network = model.register((hu, affine), (moving, affine), "intra", **kw, refine=False)
    full = model.register((hu, affine), (moving, affine), "intra", **kw, **options)
    identity = float(np.linalg.norm(truth[lab > 0], axis=1).mean())
    tre_net, tre_full = _tre(network, truth, lab), _tre(full, truth, lab)
    assert tre_full < 0.8 * min(tre_net, identity), (identity, tre_net, tre_full)
    refine = next(s for s in full.metrics["stages"] if s["stage"] == "refine")
    # "auto" resolves to the preset's: MIND-SSC + intensity for "auto", MIND-SSC alone for "fast"
    assert refine["similarity"] == options.get("similarity", "mind" if options.get("refine") == "fast" else "mind_ncc")
    assert all(level["loss_end"] < level["loss_start"] for level in refine["levels"]), refine["levels"]
    assert refine["kept"] == "optimised" and refine["loss_optimised"] < refine["loss_start"]
    # no level coarser than COARSEST_LEVEL_MM: on this 4 mm grid a 32 mm level sees 6^3 voxels
    assert [level["spacing_mm"] for level in refine["levels"]] == [16.0, 8.0, 4.0][-len(refine["levels"]):]
    assert full.jacobian["nonpositive_jacobian_pct"] == 0.0
    # the preset's steps: on this pair the loss still falls at every check, so no level stops early
    preset = STEP_PRESETS[options.get("refine", "auto")]
    assert [level["steps"] for level in refine["levels"]] == [preset.coarse_steps] * 2 + [preset.max_steps]
    if options.get("refine") == "fast":   # the 48^3 level on samples of its 110,592 voxels
        assert refine["levels"][-1]["sampled_voxels"] == STEP_PRESETS["fast"].sample_voxels < 48 ** 3


def test_an_unknown_similarity_is_named_before_any_work(model, deformed):
    hu, _, moving, _, _, affine = deformed
    with pytest.raises(UserError, match="similarity must be one of auto, mind_ncc, mind, lncc"):
        model.register((hu, affine), (moving, affine), "intra", similarity="ncc")


def test_rigid_prompt_keeps_the_structure_rigid(model, deformed):
    hu, lab, moving, moving_lab, truth, affine = deformed
    kw = dict(fixed_labels=(lab, affine), moving_labels=(moving_lab, affine), align="none", refine=60)
    free = model.register((hu, affine), (moving, affine), "intra", **kw)
    rigid = model.register((hu, affine), (moving, affine), "intra | rigid=liver", **kw)

    def jac_in_liver(result):
        disp = torch.from_numpy(np.transpose(result.displacement / SPACING, (3, 0, 1, 2)))[None].float()
        det = jacobian_determinant(disp)[0].numpy()
        inner = ndimage.binary_erosion(lab == ORGAN_TO_ID["liver"], iterations=2)
        return det[inner]

    det_free, det_rigid = jac_in_liver(free), jac_in_liver(rigid)
    assert np.abs(det_rigid - 1).mean() < 0.03, np.abs(det_rigid - 1).mean()
    assert np.abs(det_rigid - 1).mean() < 0.5 * np.abs(det_free - 1).mean()
    outside = (lab == 0) & (ndimage.binary_dilation(lab > 0, iterations=3) == 0)
    assert np.abs(rigid.displacement[outside]).max() > 0.5       # the rest still deforms


def test_a_partial_field_of_view_is_masked_not_matched_to_air(model, fixed, monkeypatch):
    """The moving scan is the fixed one cut to its central 60 % of slices: the true mapping is the
    identity. Instance optimisation must measure similarity only where the moving scan has data;
    matched against the air beyond its last slice, the anatomy next to the cut gets pulled."""
    import unireg.pipeline.grids as grids_module
    image, _ = fixed
    cut = slice(int(0.2 * SHAPE[2]), int(0.8 * SHAPE[2]))
    affine = _affine()
    moving_affine = affine.copy()
    moving_affine[:3, 3] += affine[:3, 2] * cut.start            # same world positions, fewer slices
    moving = np.ascontiguousarray(image[..., cut])
    near_cut = np.zeros(SHAPE, bool)                              # body voxels within 4 slices of the cuts
    for k in (cut.start, cut.stop - 1):
        near_cut[..., max(0, k - 4):k + 5] = True
    near_cut &= image > -500

    def worst_near_cut():
        result = model.register((image, affine), (moving, moving_affine), "intra", align="none")
        stage = next(s for s in result.metrics["stages"] if s["stage"] == "refine")
        inside = near_cut[:, :, cut]                               # the part the moving scan covers
        return float(np.linalg.norm(result.displacement[:, :, cut][inside], axis=-1).max()), stage

    masked, stage = worst_near_cut()
    assert 55 <= stage["moving_coverage_pct"] <= 65
    assert stage["moving_grid"] == [SHAPE[0], SHAPE[1], cut.stop - cut.start][::-1]   # its own slices, read once
    real = grids_module.coverage_tensor
    monkeypatch.setattr(grids_module, "coverage_tensor", lambda img, *a, **k: real(img, *a, **k) * 0 + 1)
    unmasked, _ = worst_near_cut()
    assert masked < 0.5 * SPACING and masked < 0.5 * unmasked, (masked, unmasked)


def test_focus_aligns_the_named_organ_where_the_whole_body_compromises(model, fixed):
    """The liver slides 10 mm, the body around it stays. Named in the prompt with ``focus=True`` and
    the fixed scan's label map saying where it is, the liver is registered more closely than by the
    whole-body call, and metrics.json records the focus. Without ``focus=True`` a named organ and a
    label map change nothing in instance optimisation; a focus that cannot be placed is an error."""
    hu, lab = fixed
    affine = _affine()
    liver = lab == ORGAN_TO_ID["liver"]
    shift = 10.0 * ndimage.gaussian_filter(liver.astype(np.float64), 1.0)      # mm along the first axis
    world = _world(SHAPE, affine)
    moving = _sample(hu, affine, world - shift[..., None] * np.array([1.0, 0.0, 0.0]))
    core = ndimage.binary_erosion(liver, iterations=4)
    truth = np.zeros(SHAPE + (3,))
    truth[..., 0] = 10.0

    def liver_error(result):
        return float(np.linalg.norm(result.displacement[core] - truth[core], axis=1).mean())

    def refine_info(result):
        return next(s for s in result.metrics["stages"] if s["stage"] == "refine")
    kw = dict(fixed_labels=(lab, affine), align="none")
    whole = model.register((hu, affine), (moving, affine), "intra", **kw)
    named = model.register((hu, affine), (moving, affine), "intra | liver", **kw)
    focused = model.register((hu, affine), (moving, affine), "intra | liver", focus=True, **kw)
    assert liver_error(focused) < 0.8 * min(liver_error(whole), liver_error(named)), \
        (liver_error(whole), liver_error(named), liver_error(focused))
    focus = refine_info(focused)["focus"]
    assert focus["organs"] == ["liver"] and focus["source"] == "fixed labels" and 0 < focus["voxels_pct"] < 50
    assert "focus" not in refine_info(named) and "focus" not in refine_info(whole)

    no_liver = (np.where(liver, 0, lab).astype(lab.dtype), affine)
    for prompt, options, message in (
            ("intra | liver", dict(fixed_labels=no_liver), "contain none of liver"),
            ("intra | liver, spleen", dict(fixed_labels=no_liver), None),      # the spleen is there: focus on it
            ("intra", dict(fixed_labels=(lab, affine)), "needs organs in the prompt"),
            ("intra | liver", {}, "needs a label map that shows liver"),
            ("intra | liver", dict(fixed_labels=(lab, affine), refine=False), "cannot be used with refine=False")):
        call = lambda: model.register((hu, affine), (moving, affine), prompt, focus=True, align="none",  # noqa: E731
                                      **{"refine": "fast", **options})
        if message is None:
            focus = refine_info(call())["focus"]
            assert focus["organs"] == ["spleen"] and focus["not_in_labels"] == ["liver"]
        else:
            with pytest.raises(UserError, match=message):
                call()
    from_moving = model.register((hu, affine), (moving, affine), "intra | liver", focus=True, align="none",
                                 refine="fast", moving_labels=(lab, affine))
    assert refine_info(from_moving)["focus"]["source"] == "moving labels"
