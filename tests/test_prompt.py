"""Prompt parsing and prompt control of the field."""
import numpy as np
import pytest

from synthetic import blob_volume
from test_pretrained import _perturb_controllers
from unireg import Prompt, PromptError, UniReg, parse_prompt


@pytest.mark.parametrize("text, expected", [
    ("intra-subject | liver, spleen", Prompt("intra", ("liver", "spleen"))),
    ("inter | left kidney, right kidney | smooth=0.3", Prompt("inter", ("kidney_left", "kidney_right"), 0.3)),
    ("  INTER-Subject |Liver and Gall-Bladder ", Prompt("inter", ("liver", "gallbladder"))),
    ("intra | kidneys", Prompt("intra", ("kidney_left", "kidney_right"))),
    ("intra | IVC; bladder | smoothness: 0.8", Prompt("intra", ("inferior_vena_cava", "urinary_bladder"), 0.8)),
    ("liver", Prompt("inter", ("liver",))),
    ("intra", Prompt("intra", ())),
    ("inter | Vertebrae_L3, vertebrae T12", Prompt("inter", ("vertebrae_L3", "vertebrae_T12"))),
])
def test_structured_forms_and_synonyms(text, expected):
    parsed = parse_prompt(text)
    assert (parsed.type, parsed.organs, parsed.smoothness) == (expected.type, expected.organs, expected.smoothness)


def test_free_text():
    p = parse_prompt("align the pancreas between two patients")
    assert (p.type, p.organs) == ("inter", ("pancreas",))
    p = parse_prompt("follow the left kidney and the liver of the same patient over breathing")
    assert p.type == "intra" and set(p.organs) == {"kidney_left", "liver"}


@pytest.mark.parametrize("text, message", [
    ("intra | livr", "did you mean liver"),
    ("inter | kidny_left", "did you mean kidney_left"),
    ("intra | liver | smooth=1.7", "smoothness must lie in"),
    ("intra | inter | liver", "names the registration type twice"),
    ("please do something clever", "unknown organ"),
])
def test_errors_name_the_problem_and_suggest(text, message):
    with pytest.raises(PromptError, match=message):
        parse_prompt(text)


def test_prompt_round_trips_through_its_string():
    p = parse_prompt("inter | left kidney | smooth=0.25")
    assert parse_prompt(str(p)) == Prompt("inter", ("kidney_left",), 0.25, str(p))


def test_different_prompts_give_different_fields():
    model = UniReg.from_config("tiny")
    _perturb_controllers(model)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    fixed, _ = blob_volume((32, 32, 32), seed=0)
    moving, _ = blob_volume((32, 32, 32), shift=(2, -1, 1), seed=1)
    fields = {p: model.register((fixed, affine), (moving, affine), p, refine=False).displacement
              for p in ("intra | liver", "inter | liver", "intra | spleen, kidneys", "intra | liver | smooth=0.9")}
    keys = list(fields)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert np.abs(fields[a] - fields[b]).max() > 1e-3, (a, b)
    # same prompt written differently -> the same field
    again = model.register((fixed, affine), (moving, affine), "Intra-Subject | Liver", refine=False).displacement
    assert np.array_equal(again, fields["intra | liver"])
