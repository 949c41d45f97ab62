"""Registration masks: what the similarity may look at, as ANTs' -x and elastix's -fMask / -mMask give users."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from synthetic import blob_volume
from unireg import UniReg
from unireg.batch import read_pair_csv
from unireg.cli import main
from unireg.errors import UserError
from unireg.io import InputError
from unireg.pipeline.align import align_pair

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
SHAPE = (40, 40, 40)


def _metal(shape=SHAPE, centre=(20, 26, 20), radius=3.5):
    """Distance (voxels) of every voxel from a sphere's centre, and the sphere: a metal artefact's place."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    r = np.sqrt(((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0))
    return r, r < radius


@pytest.fixture(scope="module")
def model():
    return UniReg.from_pretrained("unireg-tiny-phantom")


@pytest.fixture(scope="module")
def artefact_pair():
    """One scan twice (the true mapping is the identity); one copy carries 2000 HU metal that the other lacks.
    The mask leaves out the metal and a 5-voxel margin (MIND's patches read 3 voxels around a point)."""
    hu, _ = blob_volume(SHAPE, seed=0)
    with_metal = hu.copy()
    r, metal = _metal()
    with_metal[metal] = 2000
    return hu, with_metal, (r >= 9).astype(np.uint8), r < 8


@pytest.mark.parametrize("side", ["moving", "fixed"])
def test_a_mask_keeps_an_artefact_from_pulling_the_field(model, artefact_pair, side):
    clean, with_metal, mask, near = artefact_pair
    fixed, moving = ((clean, with_metal) if side == "moving" else (with_metal, clean))
    plain = model.register((fixed, AFFINE), (moving, AFFINE), "intra", align="none")
    masked = model.register((fixed, AFFINE), (moving, AFFINE), "intra", align="none", **{f"{side}_mask": (mask, AFFINE)})
    error = {name: np.linalg.norm(r.displacement, axis=-1) for name, r in (("plain", plain), ("masked", masked))}
    assert error["plain"][near].mean() > 1.0                      # the metal drags the field about
    assert error["masked"][near].mean() < 0.3 * error["plain"][near].mean()
    assert error["masked"].max() < 1.0                            # nowhere else pulled either
    refine = next(s for s in masked.metrics["stages"] if s["stage"] == "refine")
    assert 80 < refine["similarity_region_pct"] < 100                # the mask leaves out 5 % of the scan


@pytest.mark.parametrize("half", ["upper", "lower"])
def test_a_fixed_mask_aligns_the_region_it_marks(half):
    """The upper half of the moving scan moved 8 mm one way, the lower half 8 mm the other: the whole scans give
    one compromise, a fixed mask on one half that half's motion (rotating about the masked anatomy's centre)."""
    hu, _ = blob_volume(SHAPE, seed=1)
    norm = lambda a: torch.from_numpy(np.clip((a.astype(np.float32) + 1000) / 2000, 0, 1))[None, None]  # noqa: E731
    moving_hu = hu.copy()
    moving_hu[:20] = np.roll(hu, 2, axis=1)[:20]                  # upper: fixed(x) = moving(x + 8 mm)
    moving_hu[20:] = np.roll(hu, -2, axis=1)[20:]                 # lower: fixed(x) = moving(x - 8 mm)
    fixed, moving = norm(hu), norm(moving_hu)
    mask = torch.zeros_like(fixed)
    if half == "upper":
        mask[:, :, :18] = 1
    else:
        mask[:, :, 22:] = 1
    truth = np.array([0.0, 8.0 if half == "upper" else -8.0, 0.0])
    masked = align_pair(fixed, AFFINE, moving, AFFINE, mode="rigid", fixed_mask=mask)
    plain = align_pair(fixed, AFFINE, moving, AFFINE, mode="rigid")
    assert np.linalg.norm(masked.matrix[:3, 3] - truth) < 1.0
    assert np.allclose(masked.matrix[:3, :3], np.eye(3), atol=0.01)
    if half == "lower":                                           # unmasked, the upper half's motion wins
        assert np.linalg.norm(plain.matrix[:3, 3] - truth) > 10.0
    with pytest.raises(InputError, match="moving_mask must be"):
        align_pair(fixed, AFFINE, moving, AFFINE, mode="rigid", moving_mask=mask[:, :, :-1])
    with pytest.raises(InputError, match="a moving mask needs the LNCC similarity"):
        align_pair(fixed, AFFINE, moving, AFFINE, mode="rigid", similarity="mi", moving_mask=mask)


def test_bad_masks_are_named(model, artefact_pair):
    clean, with_metal, mask, _ = artefact_pair
    with pytest.raises(InputError, match="fixed mask has no voxel inside"):
        model.register((clean, AFFINE), (with_metal, AFFINE), "intra", fixed_mask=(np.zeros_like(mask), AFFINE))
    with pytest.raises(InputError, match="moving mask grid"):
        model.register((clean, AFFINE), (with_metal, AFFINE), "intra", moving_mask=(mask[:-1], AFFINE[:]))
    with pytest.raises(UserError, match="with align='none' and refine=False neither runs"):
        model.register((clean, AFFINE), (with_metal, AFFINE), "intra", align="none", refine=False,
                       moving_mask=(mask, AFFINE))
    apart = np.zeros_like(mask)
    apart[:3] = 1
    other = np.zeros_like(mask)
    other[-3:] = 1
    with pytest.raises(UserError, match="the masks leave no voxel where both scans can be compared"):
        model.register((clean, AFFINE), (with_metal, AFFINE), "intra", align="none", fixed_mask=(apart, AFFINE),
                       moving_mask=(other, AFFINE))


def test_masks_on_the_command_line_and_in_a_pair_list(artefact_pair, tmp_path, capsys):
    clean, with_metal, mask, _ = artefact_pair
    for name, data in (("fixed", clean), ("moving", with_metal), ("mask", mask)):
        nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / f"{name}.nii.gz")
    assert main(["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
                 "--moving-mask", str(tmp_path / "mask.nii.gz"), "--prompt", "intra", "--align", "none",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    capsys.readouterr()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert next(s for s in metrics["stages"] if s["stage"] == "refine")["similarity_region_pct"] < 100
    (tmp_path / "pairs.csv").write_text("fixed,moving,moving_mask\nfixed.nii.gz,moving.nii.gz,mask.nii.gz\n")
    pair = read_pair_csv(tmp_path / "pairs.csv")[0]
    assert pair.moving_mask == str((tmp_path / "mask.nii.gz").resolve()) and pair.fixed_mask is None
