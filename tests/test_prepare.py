"""Real-data preparation on small trees written by the test in each layout."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from data_tools.phantom import make_intra_pair, make_subject, save_subject
from data_tools.prepare import PreparationError, prepare_dataset
from data_tools.shards import prepared_pairs, write_shards
from unireg.data import iterate_pairs
from unireg.organs import ORGAN_TO_ID

SHAPE, SPACING = (40, 40, 40), (9.0, 9.0, 9.0)
CLASSES = ["liver", "spleen", "kidney_left", "kidney_right", "stomach"]


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    d = tmp_path_factory.mktemp("phantoms")
    out = {}
    for i in range(4):
        s = make_subject(20 + i, shape=SHAPE, spacing_mm=SPACING)
        out[f"s{i}"] = (s, save_subject(s, d, f"s{i}", montage=False))
    moving, _ = make_intra_pair(out["s0"][0], seed=3)
    out["s0_b"] = (moving, save_subject(moving, d, "s0_b", montage=False))
    return out


def _mask(subject, paths, name):
    ct = nib.load(paths["ct"])
    return nib.Nifti1Image((np.transpose(subject.labels, (2, 1, 0)) == ORGAN_TO_ID[name]).astype(np.uint8), ct.affine)


def test_totalsegmentator_layout_with_missing_file_and_other_grid(subjects, tmp_path):
    root = tmp_path / "ts"
    for sid, (subject, paths) in subjects.items():
        if sid == "s0_b":
            continue
        (root / sid / "segmentations").mkdir(parents=True)
        ct = nib.load(paths["ct"])
        nib.save(ct, root / sid / "ct.nii.gz")
        for name in CLASSES:
            if sid == "s1" and name == "spleen":
                continue                                        # missing label file
            mask = _mask(subject, paths, name)
            if sid == "s2" and name == "liver":                  # liver mask on a coarser grid
                coarse = np.diag([18.0, 18.0, 18.0, 1.0])
                coarse[:3, 3] = ct.affine[:3, 3]
                mask = resample_from_to(mask, ((20, 20, 20), coarse), order=0)
            nib.save(mask, root / sid / "segmentations" / f"{name}.nii.gz")
    result = prepare_dataset("totalsegmentator", root, tmp_path / "out", spacing=(9.0, 9.0, 9.0))
    assert result["scans"]["s1_0"]["missing_labels"] == ["spleen"]
    assert any("resampled" in n for n in result["scans"]["s2_0"]["notes"])
    s2 = np.asanyarray(nib.load(result["scans"]["s2_0"]["labels"]).dataobj)
    assert (s2 == ORGAN_TO_ID["liver"]).sum() > 100              # resampled, not lost
    s1 = np.asanyarray(nib.load(result["scans"]["s1_0"]["labels"]).dataobj)
    assert not (s1 == ORGAN_TO_ID["spleen"]).any()
    assert {p["type"] for p in result["pairs"]} == {"inter"}
    for p in result["pairs"]:                                     # no pair crosses the split
        assert result["splits"][p["fixed_id"].rsplit("_", 1)[0]] == result["splits"][p["moving_id"].rsplit("_", 1)[0]]
    ct = nib.load(result["scans"]["s0_0"]["image"])
    assert ct.get_data_dtype() == np.int16 and nib.aff2axcodes(ct.affine) == ("R", "A", "S")


def test_learn2reg_layout_and_shards(subjects, tmp_path):
    root = tmp_path / "l2r"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    names = {"s0": "0001_0000", "s0_b": "0001_0001", "s1": "0002_0000", "s3": "0003_0000"}
    for sid, stem in names.items():
        subject, paths = subjects[sid]
        nib.save(nib.load(paths["ct"]), root / "imagesTr" / f"{stem}.nii.gz")
        ct = nib.load(paths["ct"])
        lab = np.zeros(ct.shape, np.uint8)
        for value, name in enumerate(CLASSES[:3], start=1):
            lab[np.transpose(subject.labels, (2, 1, 0)) == ORGAN_TO_ID[name]] = value
        if sid != "s3":                                          # s3's label file is missing
            nib.save(nib.Nifti1Image(lab, ct.affine), root / "labelsTr" / f"{stem}.nii.gz")
        training.append({"image": f"./imagesTr/{stem}.nii.gz", "label": f"./labelsTr/{stem}.nii.gz"})
    task = {"labels": {"0": "background", "1": "liver", "2": "spleen", "3": "left kidney"}, "training": training,
            "registration_val": [{"fixed": "./imagesTr/0001_0000.nii.gz", "moving": "./imagesTr/0001_0001.nii.gz"},
                                 {"fixed": "./imagesTr/0001_0000.nii.gz", "moving": "./imagesTr/0003_0000.nii.gz"}]}
    (root / "task_dataset.json").write_text(json.dumps(task))
    result = prepare_dataset("learn2reg", root, tmp_path / "out", spacing=(9.0, 9.0, 9.0))
    assert [s["scan"] for s in result["skipped"]] == ["0003_0000"]
    assert "label map of 0003 not found" in result["skipped"][0]["reason"]
    assert len(result["pairs"]) == 1 and result["pairs"][0]["type"] == "intra"
    lab = np.asanyarray(nib.load(result["scans"]["0001_0000.nii.gz"]["labels"]).dataobj)
    assert set(np.unique(lab)) == {0, ORGAN_TO_ID["liver"], ORGAN_TO_ID["spleen"], ORGAN_TO_ID["kidney_left"]}
    split = result["pairs"][0]["split"]
    index = write_shards(prepared_pairs(tmp_path / "out" / "pairs.json", split), tmp_path / "shards")
    assert index["counts"]["intra"] == 1
    sample = next(iterate_pairs(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))))
    assert sample["fixed"].shape == sample["moving"].shape and "liver" in sample["meta"]["organs"]


def test_csv_layout_and_bad_label_names(subjects, tmp_path):
    rows = []
    for sid, session in (("s0", "a"), ("s0_b", "b"), ("s1", "a"), ("s2", "a")):
        _, paths = subjects[sid]
        rows.append({"image": str(paths["ct"]), "label": str(paths["labels"]), "subject": sid[:2], "session": session})
    table = tmp_path / "scans.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = prepare_dataset("csv", table, tmp_path / "out", spacing=(9.0, 9.0, 9.0))
    types = {p["type"] for p in result["pairs"]}
    assert "intra" in types or result["splits"]["s0"] != "train"
    with pytest.raises(PreparationError, match="unknown layout"):
        prepare_dataset("nnunet", table, tmp_path / "x")
    (tmp_path / "l2r_bad").mkdir()
    (tmp_path / "l2r_bad" / "task.json").write_text(json.dumps({"labels": {"1": "hepar"}}))
    with pytest.raises(PreparationError, match="'hepar' is not a TotalSegmentator class"):
        prepare_dataset("learn2reg", tmp_path / "l2r_bad", tmp_path / "y")
