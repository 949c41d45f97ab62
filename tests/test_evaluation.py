"""`unireg eval` data handling: shard names are checked up front, skipped samples are reported."""
import io
import json
import tarfile

import numpy as np
import pytest

from data_tools.shards import make_phantom_shards
from unireg.errors import UserError
from unireg.evaluation import evaluate_shards, shard_list, write_report


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_shards")
    make_phantom_shards(out, n_subjects=2, shape=(16, 16, 16), spacing=(24.0,) * 3, seed=4, intra_per_subject=1,
                        inter_pairs=1, max_shard_bytes=1)
    return out


def small_model(spacing_mm: float = 24.0):
    """An untrained tiny UniReg small enough for 16^3 phantoms (what these tests need is a field, not a good one)."""
    from unireg import UniReg, UniRegConfig
    return UniReg(UniRegConfig.from_preset("tiny", vit_img_size=64, vit_depth=1, working_spacing_mm=spacing_mm)).eval()


def test_shard_names_are_checked_before_any_model_runs(shards, tmp_path):
    tars = sorted(str(p) for p in shards.glob("*.tar"))
    assert shard_list([str(shards)]) == tars                               # a folder
    assert shard_list([str(shards / "*.tar")]) == tars                     # a glob the shell did not expand
    assert shard_list([str(shards / "pairs-{000000..000001}.tar")]) == tars[:2]
    assert shard_list(["pipe:cat x.tar"]) == ["pipe:cat x.tar"]            # URLs are the loader's business
    with pytest.raises(UserError, match="missing.tar not found"):
        shard_list([str(tmp_path / "missing.tar")])
    with pytest.raises(UserError, match=r"'.*nothing-\*.tar' matches no file"):
        shard_list([str(tmp_path / "nothing-*.tar")])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="notes.txt is not a .tar shard"):
        shard_list([str(tmp_path / "notes.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .tar shards in this folder"):
        shard_list([str(tmp_path / "empty")])


def test_skipped_samples_are_counted_in_the_report(shards, tmp_path):
    broken = tmp_path / "broken.tar"                      # a readable tar whose one sample lacks its arrays
    with tarfile.open(broken, "w") as tar:
        payload = json.dumps({"type": "inter"}).encode()
        info = tarfile.TarInfo("bad.meta.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    model = small_model()
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    summary = evaluate_shards(model, urls + [str(broken)], with_hd95=False)
    assert summary["mean"]["pairs"] == 3 and summary["skipped"] == {"malformed sample": 1}
    assert np.isfinite(summary["mean"]["dice"])
    paths = write_report(summary, tmp_path / "report")
    assert "Skipped samples: 1 (1 malformed sample" in paths["markdown"].read_text()
    report = json.loads(paths["json"].read_text())
    assert report["skipped_total"] == 1 and report["mean"]["pairs"] == 3
    clean = evaluate_shards(model, urls, max_pairs=1, with_hd95=False)
    assert clean["skipped"] == {} and clean["mean"]["pairs"] == 1
    with pytest.raises(UserError, match=r"no pair could be read from 1 shard\(s\).*malformed sample"):
        evaluate_shards(model, [str(broken)])


def test_cli_eval_can_skip_hd95(shards, tmp_path):
    from unireg.cli import main
    model = small_model()
    model.save_pretrained(tmp_path / "model")
    for flags, name in (([], "with"), (["--no-hd95"], "without")):
        assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(shards), "--max-pairs", "1",
                     "--device", "cpu", "--out", str(tmp_path / name), *flags]) == 0
    with_hd95 = json.loads((tmp_path / "with" / "eval.json").read_text())["mean"]
    without = json.loads((tmp_path / "without" / "eval.json").read_text())["mean"]
    assert np.isfinite(with_hd95["hd95"]) and "hd95" not in without
    assert without["dice"] == pytest.approx(with_hd95["dice"])      # the same registration, one metric fewer


def test_model_card_numbers_are_the_ones_eval_wrote(tmp_path):
    """The card is assembled from `unireg eval` output (held-out table, prompt steering), never typed."""
    from unireg.steering import evaluate_steering, write_steering_report
    from unireg.training.model_card import write_model_card
    model = small_model(12.0)
    make_phantom_shards(tmp_path / "pair", n_subjects=1, shape=(32, 32, 32), spacing=(12.0,) * 3, seed=4,
                        intra_per_subject=1, inter_pairs=0)      # organs large enough to be prompted
    urls = sorted(str(p) for p in (tmp_path / "pair").glob("*.tar"))
    eval_dir = tmp_path / "eval"
    write_report(evaluate_shards(model, urls, with_hd95=False), eval_dir)
    write_steering_report(evaluate_steering(model, urls, zero_shot=("gallbladder",)), eval_dir)
    model_dir = model.save_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.csv").write_text("step,lr,pairs_per_s,loss\n10,0.001,2.5,0.3\n20,0.001,3.5,0.2\n")
    card = write_model_card(run, model_dir, eval_dir, "unireg-train --config x.yaml", "phantoms", 3.0,
                            hardware="one H100").read_text()
    assert (eval_dir / "eval.md").read_text() in card
    assert (eval_dir / "steering.md").read_text() in card
    assert "steps: 20, mean throughput 3.00 pairs/s, wall time 3 min on one H100" in card
    assert (model_dir / "training_curve.png").is_file()
    from unireg.cli import main                                # the same card through `unireg card`
    (model_dir / "README.md").unlink()
    assert main(["card", "--run", str(run), "--model", str(model_dir), "--eval", str(eval_dir), "--command", "x",
                 "--data", "phantoms", "--train-minutes", "3", "--hardware", "two CPU cores"]) == 0
    assert "wall time 3 min on two CPU cores" in (model_dir / "README.md").read_text()
    import csv
    rows = list(csv.DictReader(open(eval_dir / "steering.csv")))
    assert rows and all(float(r["field_change_mm"]) >= 0 for r in rows)    # how far naming the organ moves it


def test_steering_summary_splits_the_seen_organs_by_registration_type(tmp_path):
    """A prompt that steers breathing pairs and not inter-subject ones shows as two numbers, not one mean."""
    from unireg.steering import summarise_steering, write_steering_report

    def pair(reg_type, gain, organs=("liver", "pancreas", "gallbladder"), smooth=0.1):
        rows = {o: {"named": 0.7 + gain, "whole_body": 0.7, "identity": 0.6, "field_change_mm": 1.0} for o in organs}
        return {"key": "k", "type": reg_type, "organs": rows, "sd_log_jacobian": {0.0: 0.2, 0.5: 0.15, 1.0: smooth}}
    summary = summarise_steering([pair("intra", 0.10), pair("intra", 0.06, smooth=0.12),
                                  pair("inter", 0.0, ("liver",), smooth=0.11)], zero_shot=("gallbladder",))
    assert summary["by_type"]["intra"] == {"pairs": 2, "organs": 2, "mean_specificity_seen": pytest.approx(0.08),
                                           "sdlogj_ratio_mean": pytest.approx(0.55), "sdlogj_ratio_max": pytest.approx(0.6),
                                           "pairs_at_most_half": 1}
    assert summary["by_type"]["inter"] == {"pairs": 1, "organs": 1, "mean_specificity_seen": pytest.approx(0.0),
                                           "sdlogj_ratio_mean": pytest.approx(0.55), "sdlogj_ratio_max": pytest.approx(0.55),
                                           "pairs_at_most_half": 0}
    assert summary["mean_specificity_seen"] == pytest.approx((0.16 / 3 + 0.08) / 2)   # liver over 3 pairs, pancreas 2
    assert summary["mean_specificity_zero_shot"] == pytest.approx(0.08)
    text = write_steering_report(summary, tmp_path)["markdown"].read_text()
    assert "Seen organs by registration type: inter +0.000 (1 pairs, 1 organs); intra +0.080 (2 pairs, 2 organs)" in text
    assert ("SDlogJ at smooth=1 over smooth=0, pair by pair: inter mean 0.55 (largest 0.55), 0 of 1 pairs at most 0.5; "
            "intra mean 0.55 (largest 0.60), 1 of 2 pairs at most 0.5") in text


def _dice_by_masks(a, b, ids):
    out = {}
    for name, i in ids.items():
        size = int((a == i).sum() + (b == i).sum())
        if size:
            out[name] = 2.0 * int(((a == i) & (b == i)).sum()) / size
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32])
@pytest.mark.parametrize("wide", [False, True], ids=["joint histogram", "three histograms"])
def test_organ_dice_equals_dice_of_the_masks(dtype, wide, monkeypatch):
    """organ_dice's one-pass counting equals Dice of each organ's masks: ids beyond the largest asked for,
    negative ids and absent organs included, in C and Fortran order, on both of its counting paths."""
    from unireg import metrics
    if wide:
        monkeypatch.setattr(metrics, "_JOINT_IDS", 0)
    rng = np.random.default_rng(0)
    low = -3 if np.dtype(dtype).kind in "if" else 0
    a = rng.integers(low, 80, (40, 30, 20)).astype(dtype)
    b = np.where(rng.random(a.shape) < 0.3, rng.integers(low, 90, a.shape), a).astype(dtype)
    organs = {f"organ_{i}": i for i in range(0, 50, 3)}          # the maps also hold ids 49-89 and -3..-1
    for ids in (organs, organs | {"absent": 95}):
        expected = _dice_by_masks(a, b, ids)
        assert "absent" not in expected and len(expected) == 17 and 0.5 < min(expected.values()) < 1.0
        for order in ("C", "F"):
            got = metrics.organ_dice(np.asarray(a, order=order), np.asarray(b, order=order), ids)
            assert got.keys() == expected.keys()
            assert all(abs(got[k] - expected[k]) < 1e-12 for k in got)
