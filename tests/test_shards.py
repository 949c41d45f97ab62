"""Shards round-trip exactly; rank x worker splitting; corrupt data is skipped and counted."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from data_tools.shards import make_phantom_shards, phantom_pairs, write_shards
from unireg.config import UniRegConfig
from unireg.data import iterate_pairs, make_loader, skip_stats

#: The preprocessing of a model whose working grid is the fixture's 12 mm: pairs load as stored.
SPEC = UniRegConfig(working_spacing_mm=12.0).preprocessing


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    index = make_phantom_shards(out, n_subjects=4, shape=(32, 32, 32), spacing=(12.0, 12.0, 12.0), seed=5,
                                intra_per_subject=1, inter_pairs=4, max_shard_bytes=350_000)
    return out, index


def test_round_trip_is_bit_exact(shards, tmp_path):
    out, index = shards
    originals = dict(phantom_pairs(4, (32, 32, 32), (12.0, 12.0, 12.0), seed=5, intra_per_subject=1, inter_pairs=4))
    seen = 0
    for sample in iterate_pairs(sorted(str(p) for p in out.glob("*.tar"))):
        pair = originals[sample["key"]]
        for k in ("fixed", "moving", "fixed_seg", "moving_seg"):
            assert sample[k].dtype == pair[k].dtype and np.array_equal(sample[k], pair[k]), k
        if "displacement" in pair:
            assert np.array_equal(sample["displacement"], pair["displacement"])
        for k, v in pair["meta"].items():
            assert sample["meta"][k] == v
        seen += 1
    assert seen == len(originals) == index["counts"]["pairs"] == 8
    assert len(index["shards"]) >= 4 and "liver" in index["organs"]
    assert json.loads((out / "index.json").read_text())["counts"] == index["counts"]


def test_npz_encoding_round_trips_too(tmp_path):
    pairs = list(phantom_pairs(2, (16, 16, 16), (20.0, 20.0, 20.0), seed=1, intra_per_subject=1, inter_pairs=1))
    write_shards(iter(pairs), tmp_path, encoding="npz")
    got = {s["key"]: s for s in iterate_pairs(sorted(str(p) for p in tmp_path.glob("*.tar")))}
    for key, pair in pairs:
        assert np.array_equal(got[key]["moving_seg"], pair["moving_seg"])


def test_two_ranks_times_two_workers_see_every_pair_once(shards, monkeypatch):
    out, index = shards
    urls = sorted(str(p) for p in out.glob("*.tar"))
    keys = []
    for rank in range(2):
        for worker in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            for batch in make_loader(urls, batch_size=1, patch_size=None, seed=3, epoch=0, spec=SPEC):
                keys.extend(batch["key"])
    assert sorted(keys) == sorted(set(keys)) and len(keys) == index["counts"]["pairs"]


def test_same_seed_and_epoch_give_the_same_stream(shards):
    out, _ = shards
    urls = sorted(str(p) for p in out.glob("*.tar"))
    run = lambda epoch: [(b["key"], b["prompt"], float(b["fixed"].sum())) for b in  # noqa: E731
                         make_loader(urls, 2, (16, 16, 16), seed=1, epoch=epoch, spec=SPEC)]
    assert run(0) == run(0)
    assert run(0) != run(1)
    batch = next(iter(make_loader(urls, 2, (16, 16, 16), seed=1, epoch=0, spec=SPEC)))
    assert batch["fixed_seg"].dtype == batch["moving_seg"].dtype == torch.uint8      # as stored: 1/8 of int64
    assert batch["fixed"].dtype == torch.float32 and batch["fixed_seg"].shape == batch["fixed"].shape


def test_corrupt_shard_and_malformed_sample_are_skipped_and_counted(shards, tmp_path):
    out, index = shards
    urls = sorted(str(p) for p in out.glob("*.tar"))
    # a truncated copy of the first shard
    data = open(urls[0], "rb").read()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2 + 100])
    # a shard whose sample lacks its moving array
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tar:
        for name, payload in (("bad.fixed.npy", _npy(np.zeros((8, 8, 8), np.int16))), ("bad.meta.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    skip_stats.reset()
    keys = [s["key"] for s in iterate_pairs([str(truncated), str(broken)] + urls[1:])]
    assert skip_stats.counts["malformed sample"] >= 1
    assert skip_stats.counts["unreadable shard"] >= 1
    whole_shard_keys = {s["key"] for s in iterate_pairs(urls[1:])}
    assert whole_shard_keys <= set(keys)                 # the rest of the data still arrives
    assert "bad" not in keys


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_file_and_pipe_urls_stream_the_same_pairs(shards):
    """Object stores are read through ``pipe:`` (e.g. ``pipe:aws s3 cp s3://... -``); ``cat`` stands in."""
    out, _ = shards
    paths = sorted(str(p) for p in out.glob("*.tar"))
    keys = lambda urls: [s["key"] for s in iterate_pairs(urls)]  # noqa: E731
    expected = keys(paths)
    assert keys([f"file:{p}" for p in paths]) == expected
    assert keys([f"pipe:cat {p}" for p in paths]) == expected


def test_prompts_name_only_organs_large_enough_in_both_scans(shards):
    from unireg.data import MIN_PROMPT_VOXELS, prepare_pair
    from unireg.organs import ORGAN_TO_ID
    out, _ = shards
    sample = next(iterate_pairs(sorted(str(p) for p in out.glob("*.tar"))))
    sizes = {o: min(int((sample["fixed_seg"] == i).sum()), int((sample["moving_seg"] == i).sum()))
             for o, i in ORGAN_TO_ID.items() if o in sample["meta"]["organs"]}
    small = {o for o, n in sizes.items() if n < MIN_PROMPT_VOXELS}
    assert small and len(small) < len(sizes)            # the fixture has both kinds
    prompted = set()
    for epoch in range(40):
        prompted |= set(prepare_pair(sample, None, 0, epoch, True, None, False, spec=SPEC)["organs"])
    assert prompted and not prompted & small


def test_identity_pairs_make_moving_the_fixed_scan(shards):
    from unireg.data import prepare_pair
    out, _ = shards
    samples = list(iterate_pairs(sorted(str(p) for p in out.glob("*.tar"))))
    made = [prepare_pair(s, None, 0, epoch, True, None, False, identity_prob=0.5, spec=SPEC)
            for s in samples for epoch in range(4)]
    same = [b for b in made if bool((b["moving_seg"] == b["fixed_seg"]).all()) and bool((b["moving"] == b["fixed"]).all())]
    assert 0 < len(same) < len(made)
    plain = [prepare_pair(s, None, 0, 0, True, None, False, spec=SPEC) for s in samples]
    assert not any(bool((b["moving"] == b["fixed"]).all()) for b in plain)


def _centroid(mask) -> np.ndarray:
    return np.argwhere(np.asarray(mask)).mean(0)


def test_rigid_motion_moves_the_moving_scan_and_its_labels_together():
    """A shift moves image and labels by the same vector, within the peak; a rotation keeps an object's
    size and its distance from the rotation centre; the fixed scan is never touched."""
    from unireg.data import RigidMotion
    grid = np.indices((32, 32, 32)).transpose(1, 2, 3, 0)
    box = np.all(np.abs(grid - [12, 16, 18]) <= [5, 3, 2], axis=-1)             # an off-centre, asymmetric block
    hu = np.where(box, 300, -1000).astype(np.int16)
    arrays = {"fixed": hu.copy(), "moving": hu.copy(), "fixed_seg": box.astype(np.uint8),
              "moving_seg": box.astype(np.uint8)}
    shifts = []
    for seed in range(6):
        out, _ = RigidMotion(1.0, rotation_deg=0.0, translation_mm=12.0).apply(arrays, 4.0, np.random.default_rng(seed))
        assert np.array_equal(out["fixed"], arrays["fixed"]) and np.array_equal(out["fixed_seg"], arrays["fixed_seg"])
        moved_labels = _centroid(out["moving_seg"] > 0) - _centroid(box)
        moved_image = _centroid(out["moving"] > -350) - _centroid(box)
        assert np.linalg.norm(moved_labels - moved_image) <= 0.75          # labels: nearest voxel, image: trilinear
        assert np.linalg.norm(moved_image) <= 12.0 / 4.0 + 0.25
        shifts.append(np.linalg.norm(moved_image))
    assert max(shifts) > 1.0                                               # not a no-op
    turned, _ = RigidMotion(1.0, rotation_deg=90.0, translation_mm=0.0, centre_jitter=0.0).apply(
        arrays, 4.0, np.random.default_rng(3))
    seg = turned["moving_seg"] > 0
    assert abs(int(seg.sum()) - int(box.sum())) <= 0.1 * box.sum()
    assert not np.array_equal(seg, box)
    centre = np.full(3, 15.5)
    assert np.linalg.norm(_centroid(seg) - centre) == pytest.approx(np.linalg.norm(_centroid(box) - centre), abs=0.6)


@pytest.mark.parametrize("patch", [None, (24, 40, 28)])
def test_rigid_motion_truth_maps_the_fixed_scan_onto_the_moved_one(shards, patch):
    """A pair of one scan, moved rigidly: warping the moved scan by the carried ``motion`` (an affine head's
    target, normalised coordinates of the returned grid, cropped or padded) gives back the fixed scan; without
    a motion the target is the identity."""
    from unireg.data import RigidMotion, prepare_pair
    from unireg.modeling import affine_head
    from unireg.modeling.transform import SpatialTransformer
    out, _ = shards
    warp = SpatialTransformer()
    sample = next(iter(iterate_pairs(sorted(str(p) for p in out.glob("*.tar")))))
    still = prepare_pair(sample, patch, 0, 1, True, (0.0, 1.0), False, identity_prob=1.0, spec=SPEC)
    assert torch.allclose(still["motion"], torch.eye(3, 4), atol=1e-6)
    for seed in range(3):
        pair = prepare_pair(sample, patch, seed, 1, True, (0.0, 1.0), False, identity_prob=1.0, spec=SPEC,
                            rigid_motion=RigidMotion(1.0, rotation_deg=10.0, translation_mm=30.0))
        fixed, moved = pair["fixed"][None], pair["moving"][None]
        field = affine_head.displacement(pair["motion"][None], fixed.shape[2:])
        assert field.abs().amax() > 1.0                                        # the motion moves voxels
        inside = warp(torch.ones_like(moved), field, nearest=True) > 0.5       # where the moved grid has data
        inside &= warp(moved, field) > 0.05                                    # not the air the motion brought in
        back = (warp(moved, field) - fixed).abs()[inside].mean()
        plain = (moved - fixed).abs()[inside].mean()
        assert back < 0.35 * plain, (seed, float(back), float(plain))


def test_rigid_motion_off_leaves_the_training_stream_as_it_was(shards):
    """``rigid_motion_prob`` 0 draws nothing: every pair, prompt and λ is the one a run without it sees."""
    from unireg.data import RigidMotion, prepare_pair
    out, _ = shards
    for sample in iterate_pairs(sorted(str(p) for p in out.glob("*.tar"))):
        plain = prepare_pair(sample, None, 0, 1, True, (0.0, 1.0), True, spec=SPEC)
        off = prepare_pair(sample, None, 0, 1, True, (0.0, 1.0), True, spec=SPEC, rigid_motion=RigidMotion(0.0))
        moved = prepare_pair(sample, None, 0, 1, True, (0.0, 1.0), True, spec=SPEC, rigid_motion=RigidMotion(1.0))
        for k in ("fixed", "moving", "fixed_seg", "moving_seg"):
            assert torch.equal(plain[k], off[k]), k
        assert plain["prompt"] == off["prompt"] and torch.equal(plain["fixed_seg"], moved["fixed_seg"])
        assert not torch.equal(plain["moving"], moved["moving"])


def test_phantom_folder_feeds_shards_with_the_same_pairs(tmp_path):
    """`prepare phantom` writes a pairs.json that `prepare shards --from-pairs` reads, splits and all."""
    from data_tools.phantom import make_intra_pair, make_subject, phase_seed, subject_seed, write_phantom_dataset
    from data_tools.shards import shards_from_pairs
    result = write_phantom_dataset(tmp_path / "phantom", n_subjects=3, shape=(16, 16, 16), spacing=(24.0,) * 3,
                                   seed=2, montage=False)
    assert sorted(result["splits"].values()) == ["test", "train", "val"]
    val = [s for s, split in result["splits"].items() if split == "val"][0]
    index = shards_from_pairs(tmp_path / "phantom" / "pairs.json", tmp_path / "val", split="val")
    assert index["counts"] == {"pairs": 2, "intra": 2, "inter": 0} and index["split"] == "val"
    i = int(val.split("_")[1])
    subject = make_subject(subject_seed(2, i), shape=(16, 16, 16), spacing_mm=(24.0,) * 3)
    moving, disp = make_intra_pair(subject, phase_seed(2, i, 0))
    got = {s["key"]: s for s in iterate_pairs(sorted(str(p) for p in (tmp_path / "val").glob("*.tar")))}
    forward = got[f"{val}--{val}_phase0"]
    assert np.array_equal(forward["fixed"], subject.image) and np.array_equal(forward["moving"], moving.image)
    assert np.array_equal(forward["moving_seg"], moving.labels) and np.allclose(forward["displacement"], disp)
    assert "displacement" not in got[f"{val}_phase0--{val}"]      # the true field is known one way only


def test_training_mix_writes_every_source_and_augments_what_it_is_told(tmp_path):
    """`prepare shards` mixes torso phantoms, head phantoms and synthetic pairs; --ct-augment 1 sends
    every pair through the augmentation (each effect has its own odds) and marks it; grids stay."""
    import subprocess
    import sys
    common = ["--phantom-subjects", "2", "--head-subjects", "2", "--synth-pairs", "2", "--intra-per-subject", "1",
              "--inter-pairs", "1", "--shape", "24", "24", "24", "--spacing", "16", "16", "16", "--seed", "3"]
    for name, p in (("plain", "0"), ("augmented", "1")):
        proc = subprocess.run([sys.executable, "-m", "unireg.cli", "prepare", "shards", *common, "--ct-augment", p,
                               "--out", str(tmp_path / name)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    plain = {s["key"]: s for s in iterate_pairs(sorted(str(p) for p in (tmp_path / "plain").glob("*.tar")))}
    augmented = {s["key"]: s for s in iterate_pairs(sorted(str(p) for p in (tmp_path / "augmented").glob("*.tar")))}
    assert plain.keys() == augmented.keys()
    assert {s["meta"]["source"] for s in plain.values()} == {"phantom", "head_phantom", "synth"}
    assert len(plain) == 2 + 1 + 2 + 1 + 2                       # torso: 2 intra + 1 inter; head: same; synth: 2
    changed = 0
    for key, sample in augmented.items():
        assert sample["meta"].get("ct_augmented") is True and "ct_augmented" not in plain[key]["meta"]
        assert sample["fixed_seg"].shape == plain[key]["fixed_seg"].shape
        changed += any(not np.array_equal(sample[k], plain[key][k]) for k in ("fixed", "moving"))
    assert changed >= len(plain) // 2, changed


def test_training_mix_refuses_nothing_to_write(tmp_path):
    from data_tools.prepare import PreparationError
    from data_tools.shards import training_mix
    with pytest.raises(PreparationError, match="nothing to write"):
        list(training_mix(phantom_subjects=0))
    with pytest.raises(PreparationError, match="--ct-augment is a probability"):
        list(training_mix(phantom_subjects=1, ct_augment=1.5))


def test_a_batch_of_pairs_of_different_sizes_names_the_fix():
    from unireg.data import collate
    pairs = [{"fixed": torch.zeros(1, *shape), "key": key} for shape, key in (((8, 8, 8), "a"), ((8, 8, 16), "b"))]
    with pytest.raises(ValueError, match="data.patch_size"):
        collate(pairs)
    assert collate(pairs[:1])["fixed"].shape == (1, 1, 8, 8, 8)
