"""Prompts steer: training rewards what the prompt names, and a tiny model learns to follow it."""
import numpy as np
import pytest
import torch

from synthetic import blob_volume, dice
from unireg import UniReg, UniRegConfig
from unireg.data import PromptSampling
from unireg.losses import RegistrationLoss, smoothness_weight
from unireg.organs import ORGAN_TO_ID
from unireg.preprocessing import normalize_ct
from unireg.prompt import Prompt
from unireg.training.objective import registration_step

SHAPE = (32, 32, 32)
LIVER, SPLEEN = ORGAN_TO_ID["liver"], ORGAN_TO_ID["spleen"]


def _tensor(array):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(array, (2, 1, 0))).copy())[None, None]


def opposite_pair(seed):
    """Fixed blobs; in the moving scan the liver moves +x and the spleen -x: no one smooth field fits both."""
    rng = np.random.default_rng(seed)
    fixed_hu, fixed_lab = blob_volume(SHAPE, seed=seed)
    shift = rng.uniform(2.0, 3.5)
    plus_hu, plus_lab = blob_volume(SHAPE, shift=(shift, 0, 0), seed=seed + 100)
    minus_hu, minus_lab = blob_volume(SHAPE, shift=(-shift, 0, 0), seed=seed + 100)
    moving_hu, moving_lab = plus_hu.copy(), np.where(plus_lab == SPLEEN, 0, plus_lab)
    moving_hu[plus_lab == SPLEEN] = -100
    spleen = minus_lab == SPLEEN
    moving_hu[spleen], moving_lab[spleen] = minus_hu[spleen], SPLEEN
    return fixed_hu, fixed_lab, moving_hu, moving_lab


def test_prompt_sampling_names_single_organs_groups_and_whole_body():
    rng = np.random.default_rng(0)
    sampling = PromptSampling(whole_body_prob=0.25, group_prob=0.35, zero_shot=("pancreas",))
    present = ["liver", "spleen", "pancreas", "stomach", "kidney_left"]
    draws = [sampling.sample(present, rng) for _ in range(2000)]
    sizes = np.array([len(d) for d in draws])
    assert abs((sizes == 0).mean() - 0.25) < 0.04                       # whole body
    assert abs((sizes == 1).mean() - 0.75 * 0.65) < 0.05                # single organs
    assert set(sizes) == {0, 1, 2, 3}
    assert not any("pancreas" in d for d in draws)                      # zero-shot: never named
    assert PromptSampling(enabled=False).sample(present, rng) == present


def test_named_organs_weigh_more_in_the_similarity():
    """A misaligned organ costs more when the prompt names it than under the whole-body prompt."""
    torch.manual_seed(0)
    fixed = torch.rand(1, 1, 24, 24, 24)
    warped = fixed.clone()
    mask = torch.zeros_like(fixed)
    mask[..., 4:10, 4:10, 4:10] = 1
    warped[mask.bool()] = torch.rand(int(mask.sum()))                  # only the organ disagrees
    loss = RegistrationLoss(lncc_kernel=5)
    velocity, lam, valid = torch.zeros(1, 3, 12, 12, 12), torch.zeros(1), torch.ones(1, 1)
    named = loss(fixed, warped, velocity, lam, mask, mask, valid, focused=torch.tensor([True]))["similarity"]
    whole = loss(fixed, warped, velocity, lam, mask, mask, valid, focused=torch.tensor([False]))["similarity"]
    assert named > whole + 0.05, (named, whole)                          # LNCC loss: higher is worse


def test_a_one_organ_pair_keeps_its_say_beside_a_whole_body_pair():
    """Dice is averaged over each pair's organs first: pooled over the batch, a pair prompted with one
    organ next to a pair scored on 40 organs would count for 1/41 of the Dice term."""
    torch.manual_seed(0)
    shape, k = (1, 1, 16, 16, 16), 40
    fixed = torch.zeros(2, k, *shape[2:])
    for j in range(k):
        fixed[:, j, j % 16, :, :] = 1.0
    warped = fixed.clone()
    warped[1, 0] = torch.roll(fixed[1, 0], 3, dims=0)                 # pair 1: its one organ misaligned
    valid = torch.zeros(2, k)
    valid[0], valid[1, 0] = 1.0, 1.0                                  # pair 0: 40 organs, all aligned
    image, velocity = torch.rand(2, 1, *shape[2:]), torch.zeros(2, 3, 8, 8, 8)
    terms = RegistrationLoss(lncc_kernel=5)(image, image, velocity, torch.zeros(2), fixed, warped, valid,
                                            focused=torch.tensor([False, True]))
    assert terms["dice"] == pytest.approx(0.5, abs=0.01), terms["dice"]    # (0 + 1) / 2, not 1 / 41


def test_controller_gain_rescales_the_shipped_model_without_changing_its_field():
    """A fine-tune may let conditions learn faster (``model.controller_gain``): same field before it trains."""
    model = UniReg.from_pretrained("unireg-tiny-phantom").eval()
    torch.manual_seed(0)
    fixed, moving = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    prompt = [Prompt(type="inter", organs=("liver",), smoothness=0.3)]
    with torch.no_grad():
        before = model(fixed, moving, prompt).displacement
        for controller in model.controllers:
            controller.set_gain(0.09)
        after = model(fixed, moving, prompt).displacement
    assert model.controllers[0].scale == 0.09
    assert torch.allclose(before, after, atol=1e-5) and before.abs().max() > 0.05


def test_smoothness_weight_spans_two_orders_of_magnitude_monotonically():
    lam = torch.linspace(0, 1, 11)
    w = smoothness_weight(lam)
    assert torch.all(w[1:] > w[:-1]) and w[-1] / w[0] >= 100


def test_a_wider_smoothness_range_stiffens_smooth_1_and_leaves_smooth_0():
    """loss.smoothness_range (the shipped model's stage 5: [0.1, 30]) sets the regulariser's weight at both ends."""
    image, velocity = torch.rand(2, 1, 16, 16, 16), torch.randn(2, 3, 8, 8, 8)
    lam = torch.tensor([0.0, 1.0])
    terms = [RegistrationLoss(lncc_kernel=5, smoothness_range=r)(image, image, velocity, lam[i:i + 1].repeat(2))
             ["smoothness"] for r in ((0.1, 10.0), (0.1, 30.0)) for i in (0, 1)]
    at0_default, at1_default, at0_wide, at1_wide = (float(t) for t in terms)
    assert at0_wide == pytest.approx(at0_default) and at1_wide == pytest.approx(3 * at1_default)
    with pytest.raises(ValueError, match="smoothness_range must be two weights"):
        RegistrationLoss(smoothness_range=(1.0, 0.5))


def test_the_steering_margin_asks_the_named_field_to_beat_the_whole_body_one():
    fixed = torch.zeros(1, 1, 8, 8, 8)
    fixed[..., 2:6, 2:6, 2:6] = 1.0
    shifted = torch.roll(fixed, 2, dims=2)                       # Dice 0.5 against ``fixed``
    valid = torch.ones(1, 1)
    loss = RegistrationLoss(margin=0.05)
    assert float(loss.steering_margin(fixed, shifted, fixed, valid)) == 0.0     # named ahead by 0.5: satisfied
    named = shifted.clone().requires_grad_(True)
    gap = loss.steering_margin(named, shifted, fixed, valid)                       # level: the margin is owed
    assert float(gap) == pytest.approx(0.05, abs=1e-3)
    gap.backward()
    assert float(named.grad.abs().sum()) > 0


def test_registration_step_adds_the_margin_for_organ_prompts_only():
    fixed_hu, fixed_lab, moving_hu, moving_lab = opposite_pair(0)
    torch.manual_seed(0)
    model = UniReg(UniRegConfig.from_preset("tiny", vit_img_size=64, vit_depth=2, working_spacing_mm=1.0))
    batch = {"fixed": normalize_ct(_tensor(fixed_hu).float()).repeat(2, 1, 1, 1, 1),
             "moving": normalize_ct(_tensor(moving_hu).float()).repeat(2, 1, 1, 1, 1),
             "fixed_seg": _tensor(fixed_lab).long().repeat(2, 1, 1, 1, 1),
             "moving_seg": _tensor(moving_lab).long().repeat(2, 1, 1, 1, 1),
             "organs": [["liver"], ["liver", "spleen"]],
             "prompt": [Prompt(type="inter", organs=("liver",)), Prompt(type="inter")]}
    plain = registration_step(model, batch, RegistrationLoss(lncc_kernel=5))
    with_margin = registration_step(model, batch, RegistrationLoss(lncc_kernel=5, margin_weight=1.0, margin=0.05))
    # an untrained model's named and whole-body fields barely differ: the liver's margin is owed almost whole
    assert 0.03 < float(with_margin["margin"]) <= 0.05 + 1e-4
    assert float(with_margin["loss"]) == pytest.approx(float(plain["loss"]) + float(with_margin["margin"]), abs=1e-5)
    whole_only = dict(batch, organs=[["liver", "spleen"]] * 2, prompt=[Prompt(type="inter")] * 2)
    assert float(registration_step(model, whole_only, RegistrationLoss(lncc_kernel=5, margin_weight=1.0))["margin"]) == 0


@pytest.mark.slow
def test_tiny_model_learns_to_follow_the_prompt():
    """Trained a few hundred steps on pairs whose two organs move in opposite directions, the model
    aligns the liver better when prompted 'liver' than 'spleen', and the spleen the other way round."""
    pairs = [opposite_pair(i) for i in range(4)]
    torch.manual_seed(0)
    model = UniReg(UniRegConfig.from_preset("tiny", vit_img_size=64, vit_depth=2, working_spacing_mm=1.0))
    loss_fn = RegistrationLoss(lncc_kernel=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(260):
        fixed_hu, fixed_lab, moving_hu, moving_lab = pairs[step % len(pairs)]
        organ = ("liver", "spleen")[(step // len(pairs)) % 2]
        batch = {"fixed": normalize_ct(_tensor(fixed_hu).float()), "moving": normalize_ct(_tensor(moving_hu).float()),
                 "fixed_seg": _tensor(fixed_lab).long(), "moving_seg": _tensor(moving_lab).long(),
                 "organs": [[organ]], "prompt": [Prompt(type="inter", organs=(organ,), smoothness=0.1)]}
        terms = registration_step(model, batch, loss_fn)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    model.eval()
    fixed_hu, fixed_lab, moving_hu, moving_lab = opposite_pair(99)       # a held-out pair
    affine = np.eye(4)
    scores = {}
    for organ in ("liver", "spleen"):
        result = model.register((fixed_hu, affine), (moving_hu, affine), f"inter | {organ} | smooth=0.1",
                                moving_labels=(moving_lab, affine), refine=False, align="none")
        warped = np.asanyarray(result.warped_labels.dataobj)
        scores[organ] = {o: dice(fixed_lab, warped, ORGAN_TO_ID[o]) for o in ("liver", "spleen")}
    assert scores["liver"]["liver"] > scores["spleen"]["liver"] + 0.15, scores
    assert scores["spleen"]["spleen"] > scores["liver"]["spleen"] + 0.15, scores
    assert scores["liver"]["liver"] > dice(fixed_lab, moving_lab, LIVER) + 0.1, scores
