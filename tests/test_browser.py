"""End-to-end: the real app in headless Debian Chromium driven by Playwright.

Open, pick a sample, ask a suggested question, see an answer and a token count; change the budget
and see the card and the 3-D view update; Compare; upload a NIfTI; upload a bad file and see the
error while the app keeps working; download the export; add a prior scan and ask about change.
Screenshots go to artifacts/screenshots/
"""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, SAMPLES

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "artifacts" / "screenshots"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (make test installs it)")
    port = _free_port()
    log = tmp_path_factory.mktemp("applog") / "app.log"
    cache = tmp_path_factory.mktemp("gradio_cache")          # the files Gradio serves (in a folder of the app's)
    tmp = tmp_path_factory.mktemp("app_tmp")                 # the sessions' folders
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", GRADIO_TEMP_DIR=str(cache),
               TMPDIR=str(tmp))
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", str(tiny_model_dir), "--device", "cpu",
                             "--port", str(port), "--max-new-tokens", "6"], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("app exited:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
    yield url
    assert any(p.is_file() for p in cache.rglob("*")) and list(tmp.glob("photon_ct_*"))   # the tests made files
    proc.terminate()                     # SIGTERM, as a service manager stops it: a clean shutdown
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("app did not stop on SIGTERM:\n" + log.read_text()[-3000:])
    left = [p for p in cache.rglob("*") if p.is_file()] + list(tmp.glob("photon_ct_*"))
    assert not left, f"files left after shutdown: {left[:5]}"


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
        pg.set_default_timeout(120_000)
        pg.goto(app_url)
        pg.wait_for_selector("#load_case")
        yield pg
        browser.close()


def _card(page):
    return page.locator("#answer-card").inner_text()


def test_sample_ask_budget_compare_upload_export(page, tmp_path):
    # the first sample case is shown on opening
    page.wait_for_selector("#status")
    page.wait_for_function("document.querySelector('#status').innerText.includes('voxels')")
    assert "Abdomen" in page.locator("#status").inner_text()
    # the first suggested question is filled in; ask it
    q = page.locator("#question textarea").input_value()
    assert q.endswith("?")
    page.click("#ask")
    page.wait_for_selector("#answer-card")
    page.wait_for_function("document.querySelector('#token-count') && "
                           "document.querySelector('#token-count').innerText.includes('/ 1000')")
    card1 = _card(page)
    assert "Visual tokens kept" in card1 and "budget auto" in card1
    page.wait_for_selector("#model3d canvas", state="attached")
    page.screenshot(path=str(SHOTS / "01_answer_auto.png"), full_page=True)

    # switch the budget to Tokens and move the slider: the card updates to the new count
    page.locator("#mode label", has_text="Tokens").click()
    page.wait_for_function("document.querySelector('#token-count').innerText.includes('budget top_k')")
    num = page.locator("#budget input[type=number]")
    slider = page.locator("#budget input[type=range]")
    box = slider.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] / 2)   # click = press + release
    page.wait_for_function("document.querySelector('#token-count').innerText.includes('top_k:' + "
                           "document.querySelector('#budget input[type=number]').value)")
    kept = int(num.input_value())
    assert f"Visual tokens kept: {kept} / 1000" in _card(page)
    assert 100 <= kept <= 300
    page.screenshot(path=str(SHOTS / "02_budget_tokens.png"), full_page=True)

    # compare
    page.get_by_role("tab", name="Compare").click()
    page.click("#compare")
    page.wait_for_function("document.querySelectorAll('#compare_table tr').length >= 6")
    rows = page.locator("#compare_table tr").all_inner_texts()
    assert [r.split("\t")[0].strip() for r in rows[1:]] == ["Auto", "10%", "25%", "50%", "Full"]
    assert "100" in rows[2] and "1000" in rows[5]
    page.screenshot(path=str(SHOTS / "03_compare.png"), full_page=True)

    # export: the NIfTI mask, the JSON report and the PNG views are downloadable
    page.get_by_role("tab", name="Export").click()
    page.click("#export")
    page.wait_for_selector("#export_files a", timeout=120_000)
    names = page.locator("#export_files").inner_text().replace("\n", "")
    assert "kept_blocks.nii.gz" in names and "report.json" in names and "view3d.png" in names
    with page.expect_download() as dl:
        page.locator("#export_files tr", has_text="kept_blocks.nii").locator("a").first.click()
    target = tmp_path / "kept_blocks.nii.gz"
    dl.value.save_as(str(target))
    img = nib.load(str(target))
    assert img.shape == (122, 101, 112) and set(np.unique(np.asarray(img.dataobj))) <= {0, 1}

    # the case picker loads another sample
    page.get_by_role("tab", name="Sample case").click()
    page.locator("#case input").click()
    page.get_by_role("option", name="Chest/abdomen CT angiography, aortic dissection (1.5 mm)").click()
    page.click("#load_case")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Chest')")

    # upload a bad file: a readable error, and the app keeps working
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    page.get_by_role("tab", name="Upload").click()
    page.set_input_files("#upload input[type=file]", str(bad))
    page.click("#load_upload")
    page.wait_for_selector("text=not a readable", timeout=60_000)
    page.screenshot(path=str(SHOTS / "04_bad_upload_error.png"), full_page=True)

    # upload a real NIfTI (a crop of the chest sample) and ask on it
    vol = nib.load(str(SAMPLES / "chest_aorta_ct/ct.nii.gz"))
    crop = nib.Nifti1Image(np.asanyarray(vol.dataobj)[10:110, 10:110, 20:140], vol.affine)
    good = tmp_path / "upload.nii.gz"
    nib.save(crop, str(good))
    page.locator("#upload button[aria-label='Clear']").first.click()
    page.set_input_files("#upload input[type=file]", str(good))
    page.click("#load_upload")
    page.wait_for_function("document.querySelector('#status').innerText.includes('100×100×120')")
    page.locator("#question textarea").fill("Is there an abnormality of the aorta?")
    page.locator("#mode label", has_text="Auto").click()
    page.click("#ask")
    page.wait_for_function("document.querySelector('#token-count').innerText.includes('budget auto')")
    page.screenshot(path=str(SHOTS / "05_uploaded_nifti.png"), full_page=True)

    # the same scan with a prior (an earlier crop): both go in the prompt, the card counts each
    prior = tmp_path / "prior.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(vol.dataobj)[12:112, 8:108, 20:140], vol.affine), str(prior))
    page.set_input_files("#prior_upload input[type=file]", str(prior))
    page.click("#load_upload")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Prior scan')")
    assert page.locator("#export_files a").count() == 0          # the previous scan's export is gone
    page.locator("#question textarea").fill("Has the aortic lesion grown since the prior scan?")
    page.click("#ask")
    page.wait_for_selector("#prior-count")
    assert "/ 2000" in page.locator("#token-count").inner_text()
    assert "prior scan" in page.locator("#prior-count").inner_text()
    page.screenshot(path=str(SHOTS / "06_prior_and_current.png"), full_page=True)
