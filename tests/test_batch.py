"""`unireg register --pairs`: a CSV of pairs with one model; the list checked up front, each pair written
atomically, finished pairs skipped on a second run, a failing pair listed and the others done."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest

from synthetic import blob_volume
from unireg import UniReg
from unireg.batch import read_pair_csv, register_batch
from unireg.cli import main
from unireg.io import InputError

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two good pairs (one with labels and its own prompt), one whose moving scan is not an image."""
    d = tmp_path_factory.mktemp("cohort")
    for seed, name in ((0, "atlas"), (1, "a"), (2, "b")):
        hu, lab = blob_volume((32, 32, 32), shift=(seed, -seed, 1), seed=seed)
        nib.save(nib.Nifti1Image(hu, AFFINE), d / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(lab, AFFINE), d / f"{name}_labels.nii.gz")
    (d / "broken.nii.gz").write_text("not an image")
    UniReg.from_config("tiny").save_pretrained(d / "model")
    _write_csv(d / "pairs.csv", [
        {"name": "subject_a", "fixed": "atlas.nii.gz", "moving": "a.nii.gz", "prompt": "inter | liver",
         "fixed_labels": "atlas_labels.nii.gz", "moving_labels": "a_labels.nii.gz"},
        {"name": "subject_broken", "fixed": "atlas.nii.gz", "moving": "broken.nii.gz"},
        {"name": "", "fixed": "atlas.nii.gz", "moving": "b.nii.gz"},
    ])
    return d


def _write_csv(path, rows, fields=("name", "fixed", "moving", "prompt", "fixed_labels", "moving_labels")):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _summary(out):
    with open(out / "summary.csv", newline="") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def test_a_batch_registers_every_good_pair_lists_the_bad_one_and_resumes(cohort, capsys):
    out = cohort / "out"
    args = ["register", "--pairs", str(cohort / "pairs.csv"), "--out", str(out), "--model", str(cohort / "model"),
            "--prompt", "inter", "--refine", "off", "--align", "none", "--no-progress"]
    assert main(args) == 1                                  # one pair failed
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"pairs": 3, "done": 2, "done before": 0, "failed": 1,
                                        "summary": str(out / "summary.csv")}
    assert "1 of 3 pairs failed" in captured.err
    rows = _summary(out)
    assert [rows[n]["status"] for n in ("subject_a", "subject_broken", "pair_0003")] == ["done", "failed", "done"]
    assert "broken.nii.gz" in rows["subject_broken"]["reason"] and "not a readable NIfTI" in rows["subject_broken"]["reason"]
    metrics = json.loads((out / "subject_a" / "metrics.json").read_text())
    assert metrics["prompt"] == "inter | liver"             # the row's own prompt
    assert rows["subject_a"]["mean_dice_after"] != "" and rows["pair_0003"]["mean_dice_after"] == ""
    assert json.loads((out / "pair_0003" / "metrics.json").read_text())["prompt"] == "inter | whole body"
    assert nib.load(out / "pair_0003" / "warped.nii.gz").shape == (32, 32, 32)
    assert not (out / "subject_broken").exists()

    # a second run leaves the finished pairs alone and tries the failed one again
    stamp = (out / "subject_a" / "metrics.json").stat().st_mtime_ns
    assert main(args) == 1
    assert json.loads(capsys.readouterr().out)["done before"] == 2
    assert (out / "subject_a" / "metrics.json").stat().st_mtime_ns == stamp
    rows = _summary(out)
    assert rows["subject_a"]["status"] == "done before" and rows["subject_a"]["mean_dice_after"] != ""
    assert rows["subject_broken"]["status"] == "failed"

    # fixed, the broken pair registers and the batch succeeds
    nib.save(nib.load(cohort / "b.nii.gz"), cohort / "broken.nii.gz")
    assert main(args) == 0
    assert _summary(out)["subject_broken"]["status"] == "done"


def test_the_whole_list_is_checked_before_any_work(cohort, tmp_path):
    _write_csv(tmp_path / "bad.csv", [
        {"name": "x", "fixed": str(cohort / "atlas.nii.gz"), "moving": "missing.nii.gz"},
        {"name": "x", "fixed": str(cohort / "atlas.nii.gz"), "moving": str(cohort / "a.nii.gz")},
        {"name": "../up", "fixed": str(cohort / "atlas.nii.gz"), "moving": str(cohort / "a.nii.gz")},
        {"name": "y", "fixed": str(cohort / "atlas.nii.gz"), "moving": str(cohort / "a.nii.gz"), "prompt": "inter | livr"},
    ])
    with pytest.raises(InputError) as info:
        read_pair_csv(tmp_path / "bad.csv")
    message = str(info.value)
    assert "4 problem(s), nothing registered" in message
    for part in ("line 2 (x): moving missing.nii.gz not found", "line 3 (x): the name is also on line 2",
                 "line 4 (../up): the name must be", "line 5 (y): unknown organ 'livr'"):
        assert part in message, part

    _write_csv(tmp_path / "columns.csv", [{"fixed": "a", "scan": "b"}], fields=("fixed", "scan"))
    with pytest.raises(InputError, match="must name the columns fixed and moving"):
        read_pair_csv(tmp_path / "columns.csv")
    with pytest.raises(InputError, match="pair list not found"):
        read_pair_csv(tmp_path / "nothing.csv")
    out = tmp_path / "out"
    assert main(["register", "--pairs", str(tmp_path / "bad.csv"), "--out", str(out),
                 "--model", str(cohort / "model")]) == 2
    assert not out.exists()
    assert main(["register", "--pairs", str(cohort / "pairs.csv"), "--moving", str(cohort / "a.nii.gz"),
                 "--out", str(out), "--model", str(cohort / "model")]) == 2
    assert main(["register", "--out", str(out), "--model", str(cohort / "model")]) == 2
    (tmp_path / "a_file").write_text("")
    assert main(["register", "--pairs", str(cohort / "pairs.csv"), "--out", str(tmp_path / "a_file"),
                 "--model", str(cohort / "model")]) == 2


def test_overwrite_registers_finished_pairs_again(cohort, tmp_path):
    model = UniReg.from_config("tiny")
    pairs = [p for p in read_pair_csv(cohort / "pairs.csv", "inter") if p.name == "pair_0003"]
    first = register_batch(model, pairs, tmp_path, show_progress=False, refine=0, align="none")
    again = register_batch(model, pairs, tmp_path, show_progress=False, refine=0, align="none")
    replaced = register_batch(model, pairs, tmp_path, overwrite=True, show_progress=False, refine=0, align="none")
    assert [r[0]["status"] for r in (first, again, replaced)] == ["done", "done before", "done"]
