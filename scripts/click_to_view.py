"""Click-to-view time in a real browser: from the Ask click to the answer card, the 3-D view's scene
file and the slice image all being updated (headless Debian Chromium, Playwright, 1600×1200).

    python scripts/click_to_view.py --start [--model DIR] [--asks 6] [--shots docs]   # starts the app itself
    python scripts/click_to_view.py --url http://127.0.0.1:7860/ --slices-tab Slices   # an app whose
                                                       # slices sit in another tab (asked twice per question)

Loopback only. Prints one JSON line: per ask the times (s) to the card, the scene file (.glb fetched)
and the slice image (loaded), the slowest of them (click-to-view), and the model time the card reports.
``--shots DIR`` then saves screenshots of the app (the liver question on the abdomen sample): the page,
the 3-D view with its legend, the tri-planar slices and the Compare tab, as small PNGs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["Is there a lesion in the liver?", "Is the spleen enlarged?", "Which kidney is larger?",
             "Is there an abnormality of the aorta?", "Is there a lesion in the pancreas?",
             "Is the gallbladder distended?", "Is there a cyst in the left kidney?"]

# Records, from the click on, when the card, the slice image and a newly fetched .glb first change.
_ARM = """([cardSel, sliceSel]) => {
  const img = document.querySelector(sliceSel);
  const card = document.querySelector(cardSel);
  performance.clearResourceTimings();            // the buffer holds 250 entries; Gradio's assets fill it
  performance.setResourceTimingBufferSize(10000);
  const a = document.querySelector('#model3d a[download]');
  window.__ctv = {t0: performance.now(), card0: card ? card.innerHTML : '', slice0: img ? img.src : '',
                  glb0: a ? a.href : ''};
}"""
_DONE = """([cardSel, sliceSel, needSlice, needGlb]) => {
  // One server message updates every output; an output whose file did not change is already shown.
  const r = window.__ctv, now = performance.now();
  const card = document.querySelector(cardSel);
  if (!r.card && card && card.innerHTML !== r.card0 && card.innerText.includes('/')) r.card = now;
  if (!r.card) return false;
  const img = document.querySelector(sliceSel);
  if (!r.slice && img && img.src && img.complete && img.naturalWidth) r.slice = now;
  const a = document.querySelector('#model3d a[download]');       // the scene file the 3-D view shows
  if (!r.glb && a && a.href) {
    const g = performance.getEntriesByType('resource').filter(e => e.name === a.href);
    if (a.href === r.glb0) r.glb = now;
    else if (g.length) r.glb = Math.max(...g.map(e => e.responseEnd));  // an entry lands when the fetch ends
    r.newScene = a.href !== r.glb0;
  }
  return (r.slice || !needSlice) && (r.glb || !needGlb);
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str | None, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--device", "cpu"]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", TMPDIR=str(tmp))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(tmp / "app.log", "w"), stderr=subprocess.STDOUT,
                            env=env)
    for _ in range(480):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}/"
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the app exited:\n" + (tmp / "app.log").read_text()[-2000:]) from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the app did not start")


def measure(page, question: str, slice_sel: str, need_slice: bool, need_glb: bool) -> dict:
    page.locator("#question textarea").fill(question)
    page.evaluate(_ARM, ["#answer-card", slice_sel])
    page.click("#ask")
    try:
        page.wait_for_function(_DONE, arg=["#answer-card", slice_sel, need_slice, need_glb], polling="raf",
                               timeout=120_000)
    except Exception:
        print("timed out waiting; state:", page.evaluate("window.__ctv"), page.evaluate(
            "performance.getEntriesByType('resource').map(e => e.name)"), page.evaluate(
            "[...document.querySelectorAll('#model3d a[download]')].map(a => a.href)"), file=sys.stderr)
        raise
    r = page.evaluate("window.__ctv")
    out = {k: round((r[k] - r["t0"]) / 1000, 3) for k in ("card", "slice", "glb") if r.get(k)}
    if need_glb:
        out["new_scene_file"] = bool(r.get("newScene"))
    card = page.locator("#answer-card").inner_text()
    out["model_ms"] = _model_ms(card)
    return out


def screenshots(page, folder: Path, slice_sel: str) -> None:
    """The app after the liver question (3-D view drawn), its 3-D view and legend, its slices, Compare."""
    folder.mkdir(parents=True, exist_ok=True)
    measure(page, "Is there a lesion in the liver?", slice_sel, True, True)
    page.wait_for_timeout(5000)                                   # Babylon draws the new scene
    _save(page.screenshot(), folder / "screenshot_answer.png")
    box3d, legend = page.locator("#model3d").bounding_box(), page.locator("#legend_box").bounding_box()
    clip = {"x": box3d["x"], "y": box3d["y"], "width": legend["x"] + legend["width"] - box3d["x"],
            "height": box3d["height"]}
    _save(page.screenshot(clip=clip), folder / "screenshot_3d_anterior.png")
    _save(page.locator("#slices").screenshot(), folder / "screenshot_triplanar.png")
    page.get_by_role("tab", name="Compare").click()
    page.click("#compare")
    page.wait_for_function("document.querySelectorAll('#compare_table tr').length >= 6")
    page.wait_for_timeout(1000)
    _save(page.screenshot(), folder / "screenshot_compare.png")


def _save(png: bytes, path: Path) -> None:
    """A small PNG: the screenshot quantised to 256 colours."""
    import io

    from PIL import Image

    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)


def _model_ms(card: str) -> float | None:
    import re

    m = re.search(r"prefill (\d+)(?: ms)? · decode (\d+)", card)
    return float(m.group(1)) + float(m.group(2)) if m else None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None)
    ap.add_argument("--start", action="store_true",
                    help="start the app (this checkout) on a free loopback port")
    ap.add_argument("--model", default=None)
    ap.add_argument("--asks", type=int, default=6)
    ap.add_argument("--slices-tab", default=None,
                    help="the tab holding the slices, if not beside the 3-D view")
    ap.add_argument("--slice-selector", default="#slices img, #slice img")
    ap.add_argument("--shots", default=None, help="save screenshots (screenshot_*.png) into this folder")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="photon_ctv_"))
    proc = None
    try:
        url = args.url
        if args.start:
            proc, url = start_app(args.model, tmp)
        if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("click_to_view only targets loopback addresses")
        rows = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                         headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.set_default_timeout(180_000)
            page.goto(url)
            page.wait_for_function("document.querySelector('#status') && "
                                   "document.querySelector('#status').innerText.includes('voxels')")
            phases = [(None, True, True)] if not args.slices_tab else [("3D", False, True),
                                                                        (args.slices_tab, True, False)]
            measure(page, QUESTIONS[-1], args.slice_selector, False, False)          # warm-up
            for n in range(args.asks):
                row = {}
                for p, (tab, need_slice, need_glb) in enumerate(phases):
                    if tab:
                        page.get_by_role("tab", name=tab, exact=True).click()
                    q = QUESTIONS[(n * len(phases) + p) % (len(QUESTIONS) - 1)]
                    for k, v in measure(page, q, args.slice_selector, need_slice, need_glb).items():
                        row[k] = v if k not in row else max(row[k], v)
                row["view"] = max(row[k] for k in ("card", "slice", "glb"))
                rows.append(row)
            if args.shots:
                screenshots(page, Path(args.shots), args.slice_selector)
            browser.close()
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"asks": rows, "median_view_s": statistics.median(r["view"] for r in rows),
              "median_card_s": statistics.median(r["card"] for r in rows),
              "median_model_ms": statistics.median(r["model_ms"] for r in rows if r.get("model_ms"))}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
