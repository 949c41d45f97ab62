"""The Gradio app driven by real headless Chromium (Playwright + the system ``chromium``), and by
``gradio_client`` through the same registration endpoint.

The app runs as ``python -m app`` in a subprocess on a free 127.0.0.1 port with its own example
cache. The run saves screenshots of both tabs to docs/screenshots/ for the README.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (see .ci/run)")
if CHROMIUM is None:
    pytest.skip("no system chromium (apt-get install chromium chromium-driver, see .ci/run)", allow_module_level=True)

RUN_TIMEOUT_MS = 240_000   # registrations and adaptation on a loaded 2-core CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    cache = tmp_path_factory.mktemp("cache")
    log = open(tmp_path_factory.mktemp("log") / "app.log", "w")
    env = {**os.environ, "UNIREG_CACHE": str(cache), "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--max-upload-mb", "20"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
        try:
            if urllib.request.urlopen(url, timeout=5).status == 200:
                break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("app did not start within 180 s")
    yield {"url": url, "cache": cache, "log": Path(log.name)}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.set_default_timeout(RUN_TIMEOUT_MS)
    page.goto(server["url"])
    page.wait_for_selector("#register-button")
    yield page
    page.close()


# ------------------------------------------------------------------------------------- helpers
def pick(page, elem_id: str, option: str, search: str | None = None) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.click()
    if search:
        box.fill(search)
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def load_example(page, name="phantom pair A (inter-subject)") -> None:
    pick(page, "example-pair", name)
    for elem in ("fixed-file", "moving-file", "fixed-labels-file", "moving-labels-file"):
        page.wait_for_selector(f"#{elem} a[download]")


def register_and_wait(page) -> str:
    page.locator("#register-button").click()
    page.wait_for_function("() => document.querySelector('#metrics')?.innerText.includes('Registered')")
    for plane in ("axial", "coronal", "sagittal"):
        page.wait_for_selector(f"#view-{plane} img")
    return page.locator("#metrics").inner_text()


def download(page, elem_id: str, folder: Path) -> Path:
    with page.expect_download() as info:
        page.locator(f"#{elem_id} a[download]").first.click()
    target = folder / info.value.suggested_filename
    info.value.save_as(target)
    return target


def error_text(page) -> str:
    toast = page.locator(".toast-body, [data-testid='toast-body']").first
    toast.wait_for()
    return toast.inner_text()


# --------------------------------------------------------------------------------------- tests
def test_register_example_with_composed_prompt(page, server, tmp_path):
    import SimpleITK as sitk
    load_example(page)
    pick(page, "organ-picker", "pancreas", search="panc")
    # the example's organs + the picked one, composed by the page
    page.wait_for_function("() => document.querySelector('#prompt-box textarea, #prompt-box input')?.value"
                           " === 'inter | liver, spleen, pancreas'", timeout=30_000)
    metrics = register_and_wait(page)
    assert "pancreas" in metrics and "Dice after" in metrics and "non-positive Jacobian" in metrics
    before = page.locator("#view-axial img").get_attribute("src")
    page.get_by_role("radio", name="Jacobian map").check()
    page.wait_for_function("(src) => document.querySelector('#view-axial img')?.src !== src", arg=before)
    jacobian = page.locator("#view-axial img").get_attribute("src")
    page.get_by_role("radio", name="warped", exact=True).check()
    page.wait_for_function("(src) => document.querySelector('#view-axial img')?.src !== src", arg=jacobian)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "app_register.png"), full_page=True)

    field = download(page, "field-download", tmp_path)
    assert field.name == "displacement_itk.nii.gz"
    disp, fixed = sitk.ReadImage(str(field)), sitk.ReadImage(str(next(server["cache"].rglob("subject40_*_ct.nii.gz"))))
    assert disp.GetNumberOfComponentsPerPixel() == 3 and disp.GetSize() == fixed.GetSize()
    assert np.allclose(disp.GetSpacing(), fixed.GetSpacing()) and np.allclose(disp.GetOrigin(), fixed.GetOrigin())
    assert np.allclose(disp.GetDirection(), fixed.GetDirection())
    values = sitk.GetArrayFromImage(disp)
    assert np.isfinite(values).all() and np.abs(values).max() > 0.5       # a real deformation, in mm
    labels = download(page, "labels-download", tmp_path)
    assert sitk.ReadImage(str(labels)).GetSize() == fixed.GetSize()
    # the other direction: the fixed labels on the moving scan's grid, overlapping its own labels
    carried = sitk.ReadImage(str(download(page, "inverse-labels-download", tmp_path)))
    moving_labels = sitk.ReadImage(str(next(server["cache"].rglob("subject41_*_labels.nii.gz"))))
    assert carried.GetSize() == moving_labels.GetSize()
    assert np.allclose(carried.GetOrigin(), moving_labels.GetOrigin())
    a, b = sitk.GetArrayFromImage(carried), sitk.GetArrayFromImage(moving_labels)
    liver = 5                                                     # unireg.organs.ORGAN_TO_ID["liver"]
    assert 2 * ((a == liver) & (b == liver)).sum() / ((a == liver).sum() + (b == liver).sum()) > 0.8
    assert download(page, "inverse-field-download", tmp_path).name == "inverse_displacement_itk.nii.gz"


def test_bad_upload_shows_an_error_and_the_app_keeps_working(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a CT scan\n")
    page.locator("#fixed-file input[type=file]").set_input_files(str(notes))
    page.locator("#moving-file input[type=file]").set_input_files(str(notes))
    page.wait_for_selector("#moving-file a[download]")
    page.locator("#register-button").click()
    message = error_text(page)
    assert "fixed scan" in message and "unsupported file type" in message and ".txt" in message
    # the same session still registers
    page.locator("#fixed-file button[aria-label='Clear']").first.click()
    page.locator("#moving-file button[aria-label='Clear']").first.click()
    load_example(page, "phantom pair B (inter-subject)")
    assert "Dice after" in register_and_wait(page)


def test_few_shot_flow(page, tmp_path):
    from unireg.adapter import Adapter
    page.get_by_role("tab", name="Few-shot").click()
    k = page.locator("#k-slider input[type=number]")
    k.fill("1")
    k.press("Enter")
    steps = page.locator("#steps-slider input[type=number]")
    steps.fill("5")
    steps.press("Enter")
    pick(page, "structure-picker", "duodenum", search="duod")
    page.locator("#adapt-button").click()
    page.wait_for_function("() => document.querySelector('#adapt-summary')?.innerText.includes('Adapter ready')")
    summary = page.locator("#adapt-summary").inner_text()
    # one pair: cross-validated on its reverse, which picks how many of the 5 steps to keep (maybe none)
    assert "k = 1 pairs" in summary and "1-fold cross-validation" in summary and "duodenum" in summary
    page.wait_for_selector("#loss-curve img")
    adapter = Adapter.load(download(page, "adapter-download", tmp_path))
    assert adapter.metadata["k"] == 1 and adapter.metadata["structure"] == ["duodenum"]
    assert adapter.metadata["steps_asked"] == 5 and f"{adapter.metadata['steps']} steps" in summary

    page.locator("#held-out-button").click()
    page.wait_for_function("() => document.querySelector('#held-out-metrics')?.innerText.includes('with adapter')")
    table = page.locator("#held-out-metrics").inner_text()
    assert "duodenum" in table and "zero-shot" in table
    for plane in ("axial", "coronal", "sagittal"):
        page.wait_for_selector(f"#held-out-{plane} img")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "app_fewshot.png"), full_page=True)


def test_gradio_client_calls_registration(server, tmp_path):
    import SimpleITK as sitk
    from gradio_client import Client, handle_file

    from app.examples import example_pair
    pair = example_pair(21, folder=server["cache"])    # same files the app's example B uses
    client = Client(server["url"], verbose=False)
    out = client.predict(handle_file(pair["fixed"]), handle_file(pair["moving"]), handle_file(pair["fixed_labels"]),
                         handle_file(pair["moving_labels"]), "inter | kidney_left, kidney_right", "network only",
                         "unireg-tiny-phantom", "warped", True, api_name="/register")
    markdown, metrics, *rest = out
    assert "Registered" in markdown
    assert set(metrics["dice_after"]) == {"kidney_left", "kidney_right"}
    field_path = next(p for p in rest if isinstance(p, str) and p.endswith("displacement_itk.nii.gz"))
    field = sitk.ReadImage(field_path)
    assert field.GetSize() == sitk.ReadImage(pair["fixed"]).GetSize()
    with pytest.raises(Exception, match="unknown organ"):
        client.predict(handle_file(pair["fixed"]), handle_file(pair["moving"]), None, None, "inter | livr",
                       "network only", "unireg-tiny-phantom", "warped", True, api_name="/register")
