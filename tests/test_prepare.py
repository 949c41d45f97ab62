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
from unireg.io import ijk_to_tensor_order
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
    return nib.Nifti1Image((ijk_to_tensor_order(subject.labels) == ORGAN_TO_ID[name]).astype(np.uint8), ct.affine)


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
    out = tmp_path / "out"
    result = prepare_dataset("totalsegmentator", root, out, spacing=(9.0, 9.0, 9.0))
    assert result["scans"]["s1_0"]["missing_labels"] == ["spleen"]
    assert any("resampled" in n for n in result["scans"]["s2_0"]["notes"])
    s2 = np.asanyarray(nib.load(out / result["scans"]["s2_0"]["labels"]).dataobj)   # paths relative to pairs.json
    assert (s2 == ORGAN_TO_ID["liver"]).sum() > 100              # resampled, not lost
    s1 = np.asanyarray(nib.load(out / result["scans"]["s1_0"]["labels"]).dataobj)
    assert not (s1 == ORGAN_TO_ID["spleen"]).any()
    assert {p["type"] for p in result["pairs"]} == {"inter"}
    for p in result["pairs"]:                                     # no pair crosses the split
        assert result["splits"][p["fixed_id"].rsplit("_", 1)[0]] == result["splits"][p["moving_id"].rsplit("_", 1)[0]]
    ct = nib.load(out / result["scans"]["s0_0"]["image"])
    assert ct.get_data_dtype() == np.int16 and nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    assert all(n % 16 == 0 for n in ct.shape)                    # the working-grid rule: loads as stored


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
            lab[ijk_to_tensor_order(subject.labels) == ORGAN_TO_ID[name]] = value
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
    lab = np.asanyarray(nib.load(tmp_path / "out" / result["scans"]["0001_0000.nii.gz"]["labels"]).dataobj)
    assert set(np.unique(lab)) == {0, ORGAN_TO_ID["liver"], ORGAN_TO_ID["spleen"], ORGAN_TO_ID["kidney_left"]}
    split = result["pairs"][0]["split"]
    index = write_shards(prepared_pairs(tmp_path / "out" / "pairs.json", split), tmp_path / "shards")
    assert index["counts"]["intra"] == 1
    sample = next(iterate_pairs(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))))
    assert sample["fixed"].shape == sample["moving"].shape and "liver" in sample["meta"]["organs"]


def _csv(tmp_path, subjects, rows):
    table = tmp_path / "scans.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "label", "subject", "session"])
        writer.writeheader()
        for sid, subject, session in rows:
            paths = subjects[sid][1]
            writer.writerow({"image": str(paths["ct"]), "label": str(paths["labels"]), "subject": subject,
                             "session": session})
    return table


def test_csv_layout_and_bad_label_names(subjects, tmp_path):
    table = _csv(tmp_path, subjects, [("s0", "s0", "a"), ("s0_b", "s0", "b"), ("s1", "s1", "a"), ("s2", "s2", "a")])
    out = tmp_path / "out"
    result = prepare_dataset("csv", table, out, spacing=(9.0, 9.0, 9.0))
    assert sorted(result["scans"]) == ["s0_a", "s0_b", "s1_a", "s2_a"] and result["skipped"] == []
    # three subjects: one per split, so the only pairs are s0's two scans, both ways, in s0's split
    assert sorted(result["splits"].values()) == ["test", "train", "val"]
    got = sorted((p["fixed_id"], p["moving_id"], p["type"], p["split"]) for p in result["pairs"])
    assert got == [("s0_a", "s0_b", "intra", result["splits"]["s0"]), ("s0_b", "s0_a", "intra", result["splits"]["s0"])]
    for name, sid in (("s0_a", "s0"), ("s1_a", "s1"), ("s0_b", "s0_b")):   # CSV label values are TotalSegmentator ids
        labels = np.asanyarray(nib.load(out / result["scans"][name]["labels"]).dataobj)
        assert set(np.unique(labels).tolist()) == set(np.unique(subjects[sid][0].labels).tolist()), name
    assert json.loads((out / "pairs.json").read_text())["pairs"] == result["pairs"]
    with pytest.raises(PreparationError, match="unknown layout"):
        prepare_dataset("nnunet", table, tmp_path / "x")
    (tmp_path / "l2r_bad").mkdir()
    (tmp_path / "l2r_bad" / "task.json").write_text(json.dumps({"labels": {"1": "hepar"}}))
    with pytest.raises(PreparationError, match="'hepar' is not a TotalSegmentator class"):
        prepare_dataset("learn2reg", tmp_path / "l2r_bad", tmp_path / "y")


def test_subject_ids_never_write_outside_out(subjects, tmp_path):
    table = _csv(tmp_path, subjects, [("s0", "../../escaped", "a"), ("s0_b", "../../escaped", "b"),
                                      ("s1", str(tmp_path / "abs"), "../a")])
    out = tmp_path / "deep" / "out"
    result = prepare_dataset("csv", table, out, spacing=(9.0, 9.0, 9.0))
    written = {p for p in tmp_path.rglob("*.nii.gz") if "phantoms" not in str(p)}
    assert written and all(p.parent == out / "subjects" for p in written)
    names = sorted(result["scans"])
    assert names[:2] == ["escaped_a", "escaped_b"] and names[2].endswith("_abs_a") and "/" not in names[2]
    assert not (tmp_path / "escaped_a_ct.nii.gz").exists() and not (tmp_path / "abs_a_ct.nii.gz").exists()
    clash = _csv(tmp_path, subjects, [("s0", "a/b", "0"), ("s1", "a_b", "0")])
    with pytest.raises(PreparationError, match="two scans get the file name 'a_b_0'"):
        prepare_dataset("csv", clash, tmp_path / "clash", spacing=(9.0, 9.0, 9.0))


def test_no_pairs_is_an_error_and_skipped_scans_are_counted(subjects, tmp_path, caplog):
    one = _csv(tmp_path, subjects, [("s0", "s0", "a")])
    with pytest.raises(PreparationError, match=r"no registration pairs: 1 scan\(s\) of 1 subject"):
        prepare_dataset("csv", one, tmp_path / "one", spacing=(9.0, 9.0, 9.0))
    assert not (tmp_path / "one" / "pairs.json").exists()
    corrupt = tmp_path / "corrupt_ct.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    rows = [("s0", "s0", "a"), ("s1", "s1", "a"), ("s2", "s2", "a")]
    table = _csv(tmp_path, subjects, rows)
    with open(table, "a") as f:
        f.write(f"{corrupt},{subjects['s3'][1]['labels']},s3,a\n")
    with pytest.raises(PreparationError, match=r"no registration pairs: 3 scan\(s\).*skipped 1 scan\(s\), e.g. s3_a"):
        prepare_dataset("csv", table, tmp_path / "three", spacing=(9.0, 9.0, 9.0))
    with open(table, "a") as f:                                   # a second scan of s0 gives pairs: skip is recorded
        f.write(f"{subjects['s0_b'][1]['ct']},{subjects['s0_b'][1]['labels']},s0,b\n")
    with caplog.at_level("WARNING"):
        result = prepare_dataset("csv", table, tmp_path / "four", spacing=(9.0, 9.0, 9.0))
    assert [s["scan"] for s in result["skipped"]] == ["s3_a"] and "not a readable NIfTI" in result["skipped"][0]["reason"]
    assert "skipped s3_a" in caplog.text and len(result["pairs"]) == 2


def test_empty_or_missing_roots_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreparationError, match="no <id>/ct.nii.gz found under"):
        prepare_dataset("totalsegmentator", tmp_path / "empty", tmp_path / "o")
    with pytest.raises(PreparationError, match="no task JSON"):
        prepare_dataset("learn2reg", tmp_path / "empty", tmp_path / "o")
    with pytest.raises(PreparationError, match="is not a CSV file"):
        prepare_dataset("csv", tmp_path / "empty", tmp_path / "o")
    with pytest.raises(PreparationError, match="nowhere not found"):
        prepare_dataset("csv", tmp_path / "nowhere", tmp_path / "o")
    (tmp_path / "empty.csv").write_text("image,label,subject,session\n")
    with pytest.raises(PreparationError, match="lists no scans"):
        prepare_dataset("csv", tmp_path / "empty.csv", tmp_path / "o")


def test_shards_are_all_or_nothing(subjects, tmp_path):
    table = _csv(tmp_path, subjects, [("s0", "s0", "a"), ("s0_b", "s0", "b"), ("s1", "s0", "c"), ("s2", "s2", "a"),
                                      ("s3", "s3", "a")])
    out = tmp_path / "out"
    result = prepare_dataset("csv", table, out, spacing=(9.0, 9.0, 9.0))
    split = result["pairs"][0]["split"]
    shards = tmp_path / "shards"
    first = write_shards(prepared_pairs(out / "pairs.json", split), shards, max_shard_bytes=1)   # one pair a shard
    assert first["counts"] == {"pairs": 6, "intra": 6, "inter": 0} and len(first["shards"]) == 6
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    assert result["pairs"][1]["moving_id"] == "s0_c"
    broken = out / result["pairs"][1]["moving"]                  # the second pair's moving scan is corrupt
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(PreparationError, match=f"moving scan .*{broken.name} is not a readable NIfTI"):
        write_shards(prepared_pairs(out / "pairs.json", split), shards, max_shard_bytes=1)
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before   # the earlier set, untouched, no partial tar
    with pytest.raises(PreparationError, match="no pairs to write"):
        write_shards(iter([]), tmp_path / "empty_shards")
    assert not list((tmp_path / "empty_shards").iterdir())
    with pytest.raises(PreparationError, match="has no pair in split 'nope'"):
        next(prepared_pairs(out / "pairs.json", "nope"))
