"""The app's pieces without a browser: slice views, upload grouping, pipeline options."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from app.backend import group_pair_uploads, pipeline_options
from app.views import GRID_SPACING_VOXELS, PLANES, VIEWS, Views
from unireg.io import InputError
from unireg.prompt import Prompt
from unireg.result import RegistrationResult


def _result(shift_mm=(0.0, 0.0, 0.0), shape=(20, 24, 16), zooms=(2.0, 2.0, 4.0)):
    rng = np.random.default_rng(0)
    data = rng.normal(0, 200, shape).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    field = np.broadcast_to(np.array(shift_mm, np.float32), (*shape, 3)).copy()
    labels = np.zeros(shape, np.int16)
    labels[5:12, 6:15, 4:10] = 5
    lab_img = nib.Nifti1Image(labels, img.affine)
    result = RegistrationResult(fixed=img, moving=img, displacement=field, prompt=Prompt(), jacobian={}, seconds=0.0,
                                warped_labels=lab_img)
    return result, lab_img


def test_identity_views_match_the_fixed_scan_and_keep_proportions():
    result, labels = _result()
    views = Views.from_result(result, labels, labels)
    assert np.allclose(views.warped, views.fixed, atol=1e-3)
    assert np.allclose(views.jacobian, 1.0, atol=1e-5)
    for view in VIEWS:
        for plane in PLANES:
            rgb = views.render(view, plane)
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    axial, coronal = views.render("fixed", "axial", overlay=False), views.render("fixed", "coronal", overlay=False)
    assert axial.shape[0] / axial.shape[1] == pytest.approx(24 * 2 / (20 * 2), rel=0.05)     # y up, x across
    assert coronal.shape[0] / coronal.shape[1] == pytest.approx(16 * 4 / (20 * 2), rel=0.05)  # z up, x across
    # without overlay the difference of identical scans is black; the overlay colours the labelled box
    assert views.render("difference", "axial", overlay=False).max() < 10
    assert (views.render("warped", "axial", 7, overlay=True) != views.render("warped", "axial", 7, overlay=False)).any()


def test_deformation_grid_moves_with_the_field():
    still, _ = _result()
    shifted, _ = _result(shift_mm=(2.0 * GRID_SPACING_VOXELS / 2, 0.0, 0.0))     # half a grid period along x
    a = Views.from_result(still).grid["axial"][:, :, 8]
    b = Views.from_result(shifted).grid["axial"][:, :, 8]
    columns_a, columns_b = np.flatnonzero(a.mean(1) > 0.99), np.flatnonzero(b.mean(1) > 0.99)
    assert len(columns_a) and len(columns_b)
    assert not set(columns_a) & set(columns_b)


def test_slice_helpers():
    result, labels = _result()
    views = Views.from_result(result, labels, labels)
    assert [views.slice_count(p) for p in PLANES] == [16, 24, 20]
    assert views.centre_of([5], "axial") == 6 and views.centre_of([], "axial") is None
    with pytest.raises(ValueError, match="unknown view"):
        views.render("x-ray", "axial")


def test_upload_grouping(tmp_path):
    names = ["a_fixed.nii.gz", "a_moving.nii.gz", "a_fixed_labels.nii.gz", "a_moving_labels.nii.gz",
             "b-fixed.nii", "b-moving.nii", "b-fixed_labels.nii", "b-moving_labels.nii"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    pairs = group_pair_uploads([str(tmp_path / n) for n in names])
    assert len(pairs) == 2 and pairs[0]["fixed_labels"].endswith("a_fixed_labels.nii.gz")
    assert pairs[1]["moving"].endswith("b-moving.nii")
    with pytest.raises(InputError, match="lacks moving_labels"):
        group_pair_uploads([str(tmp_path / n) for n in names[:3]])
    (tmp_path / "scan.txt").write_text("hello")
    with pytest.raises(InputError, match="scan.txt"):
        group_pair_uploads([str(tmp_path / "scan.txt")])
    with pytest.raises(InputError, match="over the .* MB limit"):
        group_pair_uploads([str(tmp_path / names[0])], max_mb=1e-7)


def test_pipeline_options_follow_the_register_signature():
    def old(fixed, moving, prompt=None, optimize_steps=0):
        pass

    def new(fixed, moving, prompt=None, *, refine="auto", align="auto", adapter=None):
        pass

    def newest(fixed, moving, prompt=None, *, refine="auto", align="auto", focus=False, adapter=None):
        pass

    assert pipeline_options(new, "network only") == {"refine": False, "align": "none"}
    assert pipeline_options(new, "full") == {}
    assert pipeline_options(new, "fast") == {"refine": "fast"}
    assert pipeline_options(old, "network only") == {"optimize_steps": 0}
    assert pipeline_options(old, "full")["optimize_steps"] > 0
    assert pipeline_options(newest, "full + organ focus") == {"focus": True}
    with pytest.raises(InputError, match="no organ focus"):
        pipeline_options(new, "full + organ focus")
    with pytest.raises(InputError, match="pipeline"):
        pipeline_options(new, "fastest")


@pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")
def test_the_organ_focus_pipeline_registers_the_named_organ_with_the_fixed_labels(tmp_path):
    """The app's "full + organ focus" reaches register(focus=True): the example pair's fixed labels
    place the liver, metrics.json records it, and a prompt without organs is a clear error."""
    from app.backend import register_pair
    from app.examples import example_pair
    from unireg import UniReg
    from unireg.errors import UserError
    model = UniReg.from_pretrained("unireg-tiny-phantom")
    pair = example_pair(0, folder=tmp_path / "examples")
    reg = register_pair(model, pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"],
                        "inter | liver", "full + organ focus", out_dir=tmp_path / "out")
    refine = next(s for s in reg.result.metrics["stages"] if s["stage"] == "refine")
    assert refine["focus"]["organs"] == ["liver"] and refine["focus"]["source"] == "fixed labels"
    assert reg.result.metrics["dice_after"]["liver"] > reg.result.metrics["dice_before"]["liver"]
    with pytest.raises(UserError, match="needs organs in the prompt"):
        register_pair(model, pair["fixed"], pair["moving"], pair["fixed_labels"], None, "inter", "full + organ focus")


def test_metrics_text_says_when_the_optimiser_saw_the_label_maps():
    """With both label maps the full pipeline's Dice term used them: "Dice after" is not independent,
    and the page says so under the table."""
    from app.ui import metrics_markdown
    summary = {"prompt": "inter | liver", "seconds": 1.0, "jacobian": {}, "dice_before": {"liver": 0.8},
               "dice_after": {"liver": 0.95}, "mean_dice_before": 0.8, "mean_dice_after": 0.95}
    assert "Note:" not in metrics_markdown(summary)
    summary["dice_note"] = "instance optimisation used these label maps (Dice term)"
    assert metrics_markdown(summary).endswith("*Note: instance optimisation used these label maps (Dice term).*")


def test_a_zipped_dicom_series_uploads_as_a_scan(tmp_path):
    """Browsers upload files, not folders: a .zip of one DICOM series folder is read as that series; archives
    that escape their folder, hold several folders or unpack past the upload limit are refused by name."""
    import zipfile

    from app.backend import load_scan
    from synthetic import blob_volume, write_dicom_series
    hu, _ = blob_volume((24, 20, 16), seed=4)
    nifti = nib.Nifti1Image(np.rint(hu).astype(np.int16), np.diag([1.5, 1.5, 3.0, 1.0]))
    write_dicom_series(np.asanyarray(nifti.dataobj), nifti.affine, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.7")
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for f in sorted((tmp_path / "series").iterdir()):
            zipped.write(f, f"CT_chest/{f.name}")
        zipped.writestr("__MACOSX/CT_chest/._slice_000.dcm", b"resource fork")
    scan = load_scan(str(archive), "fixed scan", max_mb=10)
    assert np.array_equal(np.asanyarray(scan.dataobj).astype(np.float64), np.asanyarray(nifti.dataobj).astype(np.float64))
    assert np.allclose(scan.affine, nifti.affine, atol=1e-4)
    with pytest.raises(InputError, match="over the 0.01 MB limit"):
        load_scan(str(archive), "fixed scan", max_mb=0.01)
    for name, members, message in (("escape.zip", {"../outside.dcm": b"x"}, "a path outside its folder"),
                                   ("two.zip", {"a/1.dcm": b"x", "b/1.dcm": b"x"}, "files in several folders")):
        with zipfile.ZipFile(tmp_path / name, "w") as zipped:
            for member, data in members.items():
                zipped.writestr(member, data)
        with pytest.raises(InputError, match=message):
            load_scan(str(tmp_path / name), "moving scan", max_mb=10)
    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(InputError, match="not a readable zip archive"):
        load_scan(str(tmp_path / "bad.zip"), "moving scan", max_mb=10)
