"""The organ map: the prompt's organs segmented in both scans, read by the fusion levels and by organ focus."""
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_tools.phantom import make_subject
from synthetic import centred_affine
from unireg import UniReg
from unireg.errors import UserError
from unireg.io import ijk_to_tensor_order
from unireg.losses import RegistrationLoss
from unireg.organs import ORGAN_TO_ID
from unireg.pipeline.grids import label_tensor, scan_tensor, working_grid
from unireg.prompt import parse_prompt
from unireg.training.objective import prompt_region, registration_step

SPACING = 6.0
SHAPE = (32, 32, 32)


def _affine():
    return centred_affine(SHAPE, SPACING)


def _scan(seed):
    subject = make_subject(seed, shape=SHAPE, spacing_mm=(SPACING,) * 3)
    hu = ijk_to_tensor_order(subject.image).astype(np.float32)
    return hu, ijk_to_tensor_order(subject.labels)


def _on_working_grid(model, volume, labels=False):
    """A scan (or label map) as register hands it to the network: on the model's working grid."""
    image = nib.Nifti1Image(volume, _affine())
    grid = working_grid(image, model.config)
    if labels:
        return label_tensor(image, grid, torch.device("cpu")).long()
    return scan_tensor(image, grid, model.config, torch.device("cpu"))


def _fit_map(model, scans, prompts, steps):
    """Teach only the organ map where ``prompts`` name organs in ``scans`` (each a pair with itself)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.organ_map.parameters():
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(model.organ_map.parameters(), lr=1e-2)
    loss_fn = RegistrationLoss()
    images = torch.cat([_on_working_grid(model, hu) for hu, _ in scans])
    labels = torch.cat([_on_working_grid(model, lab, labels=True) for _, lab in scans])
    for step in range(steps):
        prompt = parse_prompt(prompts[step % len(prompts)])
        logits = model(images, images, [prompt] * len(scans)).organ_maps[0]
        loss = loss_fn.organ_map_error(logits, prompt_region(labels, [prompt] * len(scans), logits.shape[2:]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def mapped_model(one_torch_thread):
    """The shipped model with an organ map fitted to two phantom subjects (about 30 s on one core)."""
    torch.manual_seed(0)
    model = UniReg.from_pretrained("unireg-tiny-phantom")
    model.add_organ_map()
    return _fit_map(model, [_scan(1), _scan(2)], ["inter | liver", "inter | spleen"], steps=200)


def test_adding_an_organ_map_keeps_the_field_and_survives_save_and_load(tmp_path):
    """Fine-tuning starts from the model it extends: the fusion levels read the two new channels with
    zero weights, so the field is the old one; the map and its config flag round-trip through
    save_pretrained."""
    torch.manual_seed(0)
    fixed, moving = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    model = UniReg.from_pretrained("unireg-tiny-phantom")
    with torch.no_grad():
        before = model(fixed, moving, "inter | liver")
    assert before.organ_maps is None
    model.add_organ_map()
    with torch.no_grad():
        after = model(fixed, moving, "inter | liver")
    assert torch.equal(after.displacement, before.displacement)
    assert after.organ_maps[0].shape == after.organ_maps[1].shape == (1, 1, 16, 16, 16)
    # a two-organ prompt maps their union: at least as much as either organ alone, everywhere
    with torch.no_grad():
        liver, spleen, both = (model(fixed, moving, p).organ_maps[0]
                               for p in ("inter | liver", "inter | spleen", "inter | liver, spleen"))
    assert torch.allclose(both, torch.maximum(liver, spleen), atol=1e-5)
    model.save_pretrained(tmp_path / "with_map")
    loaded = UniReg.from_pretrained(tmp_path / "with_map")
    assert loaded.config.organ_map
    with torch.no_grad():
        again = loaded(fixed, moving, "inter | liver")
    assert torch.allclose(again.organ_maps[0], after.organ_maps[0], atol=1e-5)
    assert torch.allclose(again.displacement, after.displacement, atol=1e-5)


def test_the_map_finds_the_organ_the_prompt_names_in_an_unseen_scan(mapped_model):
    """Fitted on two subjects, the map of a third one shows the liver for "liver" and the spleen for
    "spleen": it follows the prompt, not a fixed salient organ."""
    hu, lab = _scan(7)
    image = _on_working_grid(mapped_model, hu)
    lab = _on_working_grid(mapped_model, lab, labels=True)[0, 0].numpy()
    found = {}
    for organ in ("liver", "spleen"):
        with torch.no_grad():
            logits = mapped_model(image, image, f"inter | {organ}").organ_maps[0]
        found[organ] = torch.sigmoid(F.interpolate(logits, size=lab.shape, mode="trilinear"))[0, 0].numpy() > 0.5
    for organ, other in (("liver", "spleen"), ("spleen", "liver")):
        truth = lab == ORGAN_TO_ID[organ]
        dice = 2 * (found[organ] & truth).sum() / (found[organ].sum() + truth.sum())
        assert dice > 0.6, (organ, dice)
        assert (found[organ] & (lab == ORGAN_TO_ID[other])).sum() < 0.1 * (lab == ORGAN_TO_ID[other]).sum()


def test_training_teaches_the_map_the_prompts_organs():
    """registration_step adds the map's error against the prompt's organs (every organ for the whole-body
    prompt) and its gradient reaches the map; pairs with synthetic label ids are left out of it."""
    labels = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    labels[:, :, :4] = ORGAN_TO_ID["liver"]
    labels[:, :, 4:6, :4] = ORGAN_TO_ID["spleen"]
    region = prompt_region(labels, [parse_prompt("inter | spleen"), parse_prompt("inter")], (4, 4, 4))
    assert region.shape == (2, 1, 4, 4, 4)
    assert float(region[0].sum()) == pytest.approx(8.0)     # the spleen: 64 of 512 voxels, 8 of 64 cells' worth
    assert float(region[1, 0, :3, :2].min()) == 1.0 and float(region[1, 0, 3].max()) == 0.0   # whole body: all organs

    torch.manual_seed(0)
    model = UniReg.from_pretrained("unireg-tiny-phantom")
    model.add_organ_map()
    hu, lab = _scan(1)
    image, labels = _on_working_grid(model, hu), _on_working_grid(model, lab, labels=True)
    batch = {"fixed": image, "moving": image.flip(2), "fixed_seg": labels, "moving_seg": labels.flip(2),
             "prompt": [parse_prompt("inter | liver")]}
    terms = registration_step(model, batch, RegistrationLoss())
    assert "organ_map" in terms and float(terms["organ_map"]) > 0
    terms["loss"].backward()
    assert model.organ_map.query[0].weight.grad.abs().sum() > 0
    assert model.levels[0].block[0].weight.grad[:, -2:].abs().sum() > 0   # the levels learn to read it
    # a synthetic pair's label ids are random draws: it trains the field, never the map
    synthetic = registration_step(model, {**batch, "anatomical": torch.tensor([False])}, RegistrationLoss())
    assert "organ_map" not in synthetic and "dice" in synthetic


@pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")
def test_focus_without_label_maps_comes_from_the_organ_map(mapped_model):
    """register(focus=True) with no label map: the fixed scan's organ map places the named organ, and
    metrics.json says the focus came from it. Without an organ map the same call asks for labels."""
    hu, lab = _scan(7)
    affine = _affine()
    moving = np.roll(hu, 1, axis=0)
    result = mapped_model.register((hu, affine), (moving, affine), "inter | liver", focus=True, align="none",
                                   refine=20)
    refine = next(s for s in result.metrics["stages"] if s["stage"] == "refine")
    focus = refine["focus"]
    assert focus["source"] == "organ map" and focus["organs"] == ["liver"]
    liver_pct = 100 * (lab == ORGAN_TO_ID["liver"]).mean()
    assert liver_pct < focus["voxels_pct"] < 60, (liver_pct, focus)
    plain = UniReg.from_pretrained("unireg-tiny-phantom")
    with pytest.raises(UserError, match="no organ map"):
        plain.register((hu, affine), (moving, affine), "inter | liver", focus=True, align="none", refine=20)


def test_steering_report_says_how_well_the_map_found_each_organ(mapped_model, tmp_path):
    """`unireg eval --steering` on a model with an organ map adds the map's Dice of each named organ in the
    fixed scan: the liver and spleen it was fitted to are found, an organ it never saw is not."""
    import csv

    from data_tools.shards import make_phantom_shards
    from unireg.steering import evaluate_steering, write_steering_report
    make_phantom_shards(tmp_path / "pair", n_subjects=1, shape=SHAPE, spacing=(SPACING,) * 3, seed=7,
                        intra_per_subject=1, inter_pairs=0)
    urls = sorted(str(p) for p in (tmp_path / "pair").glob("*.tar"))
    paths = write_steering_report(evaluate_steering(mapped_model, urls), tmp_path / "eval")
    rows = {r["organ"]: r for r in csv.DictReader(open(paths["csv"]))}
    assert float(rows["liver"]["map_dice"]) > 0.6 and float(rows["spleen"]["map_dice"]) > 0.5, rows
    unseen = [o for o in rows if o not in ("liver", "spleen")]
    assert unseen and all(float(rows[o]["map_dice"]) < 0.5 for o in unseen), rows
    assert "| organ map Dice |" in paths["markdown"].read_text()
