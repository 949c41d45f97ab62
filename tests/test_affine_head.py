"""The network's affine head: its algebra, a model that gains one, and the pipeline's single matrix."""
import nibabel as nib
import numpy as np
import pytest
import torch

from data_tools.phantom import make_subject
from synthetic import centred_affine
from unireg import UniReg
from unireg.io import ijk_to_tensor_order
from unireg.modeling import affine_head
from unireg.losses import point_error
from unireg.modeling.affine_head import AffineHead
from unireg.pipeline.grids import scan_tensor, working_grid
from unireg.pipeline.mapping import total_displacement

#: a rotation of ~6 deg about the first axis, 3 % scaling along the last, and a shift (normalised units)
KNOWN = torch.tensor([[[1.0, 0.0, 0.0, 0.06],
                       [0.0, 0.995, -0.105, -0.04],
                       [0.0, 0.105, 1.025, 0.03]]])


def _smooth_volume(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, *[n // 4 for n in shape], generator=g)
    return torch.nn.functional.interpolate(noise, size=shape, mode="trilinear", align_corners=False)


def test_composed_mapping_is_the_deformation_then_the_affine():
    """compose(A, u) sends voxel x to A(x + u(x)): u acts in the fixed frame, the affine after it; the
    same affine as a 4x4 matrix on voxel indices (what the pipeline composes with) agrees."""
    shape = (24, 28, 20)
    u = 6 * (_smooth_volume(shape, 1).repeat(1, 3, 1, 1, 1) - 0.5)
    composed = affine_head.compose(KNOWN, u)[0].double()
    matrix = affine_head.index_matrix(KNOWN[0], shape)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        x = [int(torch.randint(0, n, (1,), generator=g)) for n in shape]
        moved = torch.tensor(x, dtype=torch.float64) + u[0, :, x[0], x[1], x[2]].double()
        expected = (matrix @ torch.cat([moved, torch.ones(1, dtype=torch.float64)]))[:3] - torch.tensor(x).double()
        assert torch.allclose(composed[:, x[0], x[1], x[2]], expected, atol=1e-4)
    affine_only = affine_head.displacement(KNOWN, shape)[0].double()
    assert torch.allclose(affine_head.compose(KNOWN, torch.zeros_like(u))[0].double(), affine_only, atol=1e-5)
    assert (composed - affine_only - u[0]).abs().max() > 0.1      # the linear part acts on u: not a plain sum


def test_the_head_fits_the_affine_its_keypoints_describe():
    """Keypoints of the moving scan that are the fixed scan's moved by a known affine give that affine;
    a new head (nearly flat heatmaps) gives the identity."""
    head = AffineHead()
    g = torch.Generator().manual_seed(0)
    source = torch.rand(1, affine_head.KEYPOINTS, 3, generator=g) * 1.6 - 0.8
    target = source @ KNOWN[0, :, :3].T + KNOWN[0, :, 3]
    head.keypoints = lambda scans: torch.cat([source, target])
    assert torch.allclose(head(torch.zeros(1, 1, 8, 8, 8), torch.ones(1, 1, 8, 8, 8)), KNOWN, atol=0.01)
    new = AffineHead()
    scans = torch.rand(2, 1, 24, 32, 28, generator=g)
    found = new(scans, torch.rand(2, 1, 24, 32, 28, generator=g))
    assert (point_error(found, torch.eye(3, 4).expand(2, 3, 4), (24, 32, 28)) < 0.01).all()   # voxels


@pytest.fixture(scope="module")
def shipped():
    return UniReg.from_pretrained("unireg-tiny-phantom")


@pytest.fixture(scope="module")
def pair():
    spacing = 6.0
    shape = (40, 40, 40)
    affine = centred_affine(shape, spacing)
    fixed = make_subject(3, shape=shape, spacing_mm=(spacing,) * 3)
    moving = make_subject(4, shape=shape, spacing_mm=(spacing,) * 3)
    return fixed.image.astype(np.float32), moving.image.astype(np.float32), affine


def test_a_new_head_leaves_a_pretrained_model_as_it_was_and_round_trips(shipped, pair, tmp_path):
    fixed, moving, _ = pair
    f = torch.from_numpy(ijk_to_tensor_order(fixed)).clamp(-1000, 1000)[None, None] / 2000 + 0.5
    m = torch.from_numpy(ijk_to_tensor_order(moving)).clamp(-1000, 1000)[None, None] / 2000 + 0.5
    with torch.no_grad():
        before = shipped(f, m, "inter-subject | liver", with_affine=False).displacement
        model = UniReg.from_pretrained("unireg-tiny-phantom")
        model.affine, model.config.affine_head = None, False        # the shipped model without its head
        model.add_affine_head()
        after = model(f, m, "inter-subject | liver")
    assert after.affine is not None and point_error(after.affine, torch.eye(3, 4)[None], f.shape[2:]) < 0.01
    assert torch.allclose(after.displacement, before, atol=0.01)       # voxels
    with torch.no_grad():
        model.affine.heatmaps.weight.normal_()                          # some affine
        moved = model(f, m, "inter-subject | liver")
        loaded = UniReg.from_pretrained(model.save_pretrained(tmp_path / "with_affine"))(f, m, "inter-subject | liver")
    assert loaded.affine is not None and torch.allclose(loaded.displacement, moved.displacement, atol=1e-5)
    assert not torch.allclose(moved.displacement, before, atol=0.1)


def test_register_carries_the_networks_affine_in_its_matrix(pair):
    """refine=False: the result's mm field is the network's own whole mapping, with the affine in
    ``affine_matrix`` (so ``affine.mat`` and the inverse use it) and the deformation on the working grid."""
    fixed, moving, affine = pair
    model = UniReg.from_pretrained("unireg-tiny-phantom")
    model.add_affine_head()
    model.affine.forward = lambda fixed, moving: KNOWN.to(fixed.dtype)
    fixed_img = nib.Nifti1Image(fixed, affine)
    result = model.register(fixed_img, nib.Nifti1Image(moving, affine), "inter-subject", refine=False, align="none")
    assert not np.allclose(result.affine_matrix, np.eye(4))
    network = next(s for s in result.metrics["stages"] if s["stage"] == "network")
    assert np.allclose(network["affine"], result.affine_matrix, atol=1e-5)

    grid = working_grid(fixed_img, model.config)
    f = scan_tensor(fixed_img, grid, model.config, "cpu")
    m = scan_tensor(nib.Nifti1Image(moving, affine), grid, model.config, "cpu")
    with torch.no_grad():
        whole = model(f, m, "inter-subject").displacement
    expected = total_displacement(whole, grid, fixed_img)
    inner = (slice(6, -6),) * 3
    err = np.linalg.norm(result.displacement[inner] - expected[inner], axis=-1)
    assert np.abs(expected[inner]).max() > 10          # the affine moves points by centimetres
    assert err.max() < 0.1, err.max()


def test_point_error_is_the_distance_the_two_affines_put_between_points():
    """A shift of s voxels between two affines is an error of |s|; a rotation weighs by how far it moves points."""
    shape = (20, 40, 30)
    shifted = torch.eye(3, 4)[None].clone()
    shifted[0, :, 3] = torch.tensor([3.0, 0.0, -4.0]) * 2 / torch.tensor([20.0, 40.0, 30.0])
    identity = torch.eye(3, 4)[None]
    assert point_error(shifted, identity, shape).item() == pytest.approx(5.0, rel=1e-5)
    assert point_error(identity, identity, shape).item() == 0
    small, large = KNOWN.clone(), KNOWN.clone()
    small[0, :, 3] = large[0, :, 3] = 0
    large[0, :, :3] = small[0, :, :3] @ small[0, :, :3]                 # the same rotation twice
    assert point_error(large, identity, shape) > 1.5 * point_error(small, identity, shape)


@pytest.mark.slow
def test_a_head_trained_alone_learns_a_known_motion():
    """The head alone, beside a small fresh model's frozen network and taught by the known motion (the loss's
    ``affine_weight`` term, as training uses it), finds a shift it has not seen (the rest of the model, prompt
    steering included, stays as it was)."""
    from unireg.config import UniRegConfig
    from unireg.losses import RegistrationLoss
    from unireg.modeling.model import UniRegModel
    torch.manual_seed(0)
    model = UniRegModel(UniRegConfig.from_preset("tiny", vit_img_size=64, vit_depth=1, working_spacing_mm=12.0,
                                                 affine_head=True))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("affine."))
    subject = make_subject(5, shape=(32, 32, 32), spacing_mm=(12.0,) * 3)
    fixed = torch.from_numpy(ijk_to_tensor_order(subject.image)).float().clamp(-1000, 1000)[None, None] / 2000 + 0.5
    shape = fixed.shape[2:]
    loss_fn = RegistrationLoss(similarity_weight=0.0, affine_weight=1.0)

    def moved(shift_voxels):
        """The fixed scan moved by ``shift`` and the motion a head must find (fixed point -> moved point)."""
        t = torch.eye(3, 4)[None].clone()
        t[0, :, 3] = torch.tensor(shift_voxels) * 2 / torch.tensor([float(n) for n in shape])
        truth = t.clone()
        truth[0, :, 3] = -t[0, :, 3]
        return model.warp(fixed, affine_head.displacement(t, shape)), truth

    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        moving, truth = moved((torch.rand(3, generator=g) * 6 - 3).tolist())
        out = model(fixed, moving, "intra-subject")
        lam = torch.zeros(1)
        loss = loss_fn(fixed, model.warp(moving, out.displacement), out.velocity, lam, affine=out.affine,
                       affine_target=truth)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        moving, truth = moved([2.0, -1.5, 1.0])
        out = model.eval()(fixed, moving, "intra-subject")
    assert point_error(out.affine, truth, shape).item() < 0.6 * 2.69   # |shift| = 2.69 voxels


def test_affine_only_steps_run_the_head_and_nothing_else():
    """``loss.affine_only``'s step is the head's point error against the known motion, with the network's
    other parts not run (so a head taught alone trains at the loader's pace)."""
    from unireg.config import UniRegConfig
    from unireg.losses import RegistrationLoss
    from unireg.modeling.model import UniRegModel
    from unireg.training.objective import affine_step
    model = UniRegModel(UniRegConfig.from_preset("tiny", vit_img_size=64, vit_depth=1, affine_head=True))
    with torch.no_grad():
        model.affine.heatmaps.weight.normal_(std=0.3)
    for part in (model.backbone, model.stem, *model.levels):
        part.forward = lambda *a, **k: pytest.fail("affine_only ran the network")
    g = torch.Generator().manual_seed(0)
    batch = {"fixed": torch.rand(2, 1, 24, 32, 24, generator=g), "moving": torch.rand(2, 1, 24, 32, 24, generator=g),
             "motion": KNOWN.expand(2, 3, 4)}
    terms = affine_step(model, batch, RegistrationLoss(affine_weight=2.0))
    expected = point_error(model.affine(batch["fixed"], batch["moving"]), batch["motion"], (24, 32, 24))
    assert terms["loss"].item() == pytest.approx(2.0 * expected.mean().item(), rel=1e-5) and terms["loss"] > 0
    terms["loss"].backward()
    assert model.affine.heatmaps.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_a_model_with_the_head_learns_repositioning_from_the_similarity_alone():
    """A small fresh model, trained 250 steps on pairs whose moving scan is the fixed one shifted
    by a random few voxels, puts that shift in its affine on a shift it has not seen."""
    from unireg.config import UniRegConfig
    from unireg.modeling.model import UniRegModel
    torch.manual_seed(0)
    config = UniRegConfig.from_preset("tiny", vit_img_size=64, vit_depth=1, working_spacing_mm=12.0,
                                      affine_head=True)
    model = UniRegModel(config)
    subject = make_subject(5, shape=(32, 32, 32), spacing_mm=(12.0,) * 3)
    fixed = torch.from_numpy(ijk_to_tensor_order(subject.image)).float().clamp(-1000, 1000)[None, None] / 2000 + 0.5
    shape = fixed.shape[2:]

    def shifted(shift_voxels):
        t = torch.zeros(1, 3, 4)
        t[0, :, :3] = torch.eye(3)
        t[0, :, 3] = torch.tensor(shift_voxels) * 2 / torch.tensor([float(n) for n in shape])
        return model.warp(fixed, affine_head.displacement(t, shape)), t

    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(250):
        moving, _ = shifted((torch.rand(3, generator=g) * 6 - 3).tolist())
        out = model(fixed, moving, "intra-subject")
        loss = (model.warp(moving, out.displacement) - fixed).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        moving, truth = shifted([2.0, -1.5, 1.0])
        out = model.eval()(fixed, moving, "intra-subject")
    # the moving scan is the fixed one moved by -shift: the mapping found must undo it (x -> x - shift)
    found = out.affine[0, :, 3] * torch.tensor([n / 2 for n in shape])
    assert torch.allclose(found, -torch.tensor([2.0, -1.5, 1.0]), atol=0.6), found


def test_a_pre_alignment_that_moved_the_scan_replaces_the_networks_affine(pair):
    fixed, moving, affine = pair
    model = UniReg.from_pretrained("unireg-tiny-phantom")
    model.add_affine_head()
    model.affine.forward = lambda fixed, moving: KNOWN.to(fixed.dtype)
    result = model.register(nib.Nifti1Image(fixed, affine), nib.Nifti1Image(moving, affine), "inter-subject",
                            refine=False, align="affine")
    network = next(s for s in result.metrics["stages"] if s["stage"] == "network")
    assert result.metrics["alignment"]["mode"] == "affine" and "affine" not in network
    assert np.allclose(result.affine_matrix, result.metrics["alignment"]["matrix"], atol=1e-5)


def test_the_head_stays_out_where_the_moving_scan_is_cut_short(pair):
    """Keypoints are centres of mass over the grid: a moving scan covering 60 % of the fixed one's slices would
    read as a scaling, so the pipeline leaves the head out there (and says so), and uses it on a whole scan."""
    fixed, moving, affine = pair
    model = UniReg.from_pretrained("unireg-tiny-phantom")
    cut = slice(8, 32)
    moving_affine = affine.copy()
    moving_affine[:3, 3] += affine[:3, 2] * cut.start
    short = model.register((fixed, affine), (np.ascontiguousarray(fixed[..., cut]), moving_affine), "intra",
                           refine=False, align="none")
    network = next(s for s in short.metrics["stages"] if s["stage"] == "network")
    assert "affine" not in network and network["affine_head"] == "not used: the moving scan covers 60 % of the fixed scan"
    assert np.allclose(short.affine_matrix, np.eye(4))
    whole = model.register((fixed, affine), (moving, affine), "inter", refine=False, align="none")
    network = next(s for s in whole.metrics["stages"] if s["stage"] == "network")
    assert "affine" in network and "affine_head" not in network
