"""Shards round-trip exactly; rank x worker splitting; corrupt data is skipped and counted."""
import io
import json
import tarfile

import numpy as np
import pytest

from data_tools.shards import make_phantom_shards, phantom_pairs, write_shards
from unireg.data import iterate_pairs, make_loader, skip_stats


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
            for batch in make_loader(urls, batch_size=1, patch_size=None, seed=3, epoch=0):
                keys.extend(batch["key"])
    assert sorted(keys) == sorted(set(keys)) and len(keys) == index["counts"]["pairs"]


def test_same_seed_and_epoch_give_the_same_stream(shards):
    out, _ = shards
    urls = sorted(str(p) for p in out.glob("*.tar"))
    run = lambda epoch: [(b["key"], b["prompt"], float(b["fixed"].sum())) for b in  # noqa: E731
                         make_loader(urls, 2, (16, 16, 16), seed=1, epoch=epoch)]
    assert run(0) == run(0)
    assert run(0) != run(1)


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
