"""The model can learn: a tiny UniReg trained in the test on one synthetic pair raises Dice."""
import numpy as np
import pytest
import torch

from synthetic import blob_volume, dice
from unireg import UniReg, UniRegConfig
from unireg.losses import RegistrationLoss
from unireg.organs import ORGAN_TO_ID
from unireg.preprocessing import normalize_ct
from unireg.prompt import parse_prompt
from unireg.training.objective import registration_step

SHAPE = (32, 32, 32)
PROMPT = "inter | liver, spleen | smooth=0.1"


def _tensor(array):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(array, (2, 1, 0))).copy())[None, None]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    fixed_hu, fixed_lab = blob_volume(SHAPE, seed=0)
    moving_hu, moving_lab = blob_volume(SHAPE, shift=(2.5, -2.0, 1.5), scale=0.85, seed=1)
    model = UniReg(UniRegConfig.from_preset("tiny", vit_img_size=64, vit_depth=2, working_spacing_mm=1.0))
    fixed, moving = normalize_ct(_tensor(fixed_hu).float()), normalize_ct(_tensor(moving_hu).float())
    batch = {"fixed": fixed, "moving": moving, "fixed_seg": _tensor(fixed_lab).long(),
             "moving_seg": _tensor(moving_lab).long(), "organs": [["liver", "spleen"]], "prompt": [parse_prompt(PROMPT)]}
    loss_fn = RegistrationLoss(lncc_kernel=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(250):
        terms = registration_step(model, batch, loss_fn)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(float(terms["loss"]))
    model.eval()
    return model, (fixed_hu, fixed_lab, moving_hu, moving_lab), losses


@pytest.mark.slow
def test_training_raises_dice_clearly_above_identity(trained):
    model, (fixed_hu, fixed_lab, moving_hu, moving_lab), losses = trained
    affine = np.eye(4)
    result = model.register((fixed_hu, affine), (moving_hu, affine), PROMPT,
                            moving_labels=(moving_lab, affine), fixed_labels=(fixed_lab, affine),
                            refine=False, align="none")  # the trained network alone
    warped = np.asanyarray(result.warped_labels.dataobj)
    for organ in ("liver", "spleen"):
        before = dice(fixed_lab, moving_lab, ORGAN_TO_ID[organ])
        after = dice(fixed_lab, warped, ORGAN_TO_ID[organ])
        assert after > before + 0.1, (organ, before, after)
    assert result.metrics["mean_dice_after"] > result.metrics["mean_dice_before"] + 0.1
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    assert result.jacobian["nonpositive_jacobian_pct"] < 1.0
