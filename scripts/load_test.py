"""Load test: N concurrent gradio_client users load sample cases and ask, for a bounded time.

    python scripts/load_test.py --url http://127.0.0.1:7860/ --clients 8 --seconds 300
    python scripts/load_test.py --start --clients 8 --seconds 120      # starts the app itself

Each user loads a case through the UI's own event (3-D scene and slices are written and fetched, as a
browser does), then asks through the UI's event, and every fourth question through the public /ask.
Loopback only (refuses any other host). Stops by itself. Prints requests, failures, p50/p95 latency,
and — when it started the server — the server's RSS over time and the disk use of the app's folder
(Gradio's cache, which holds the sessions' files) over time and at the end, as JSON on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
CASES = ["Abdomen/pelvis CT (3 mm)", "Chest/abdomen CT angiography, aortic dissection (1.5 mm)"]
CASE_IDS = dict(zip(CASES, ["abdomen_ct", "chest_aorta_ct"]))
QUESTIONS = ["Is there a lesion in the liver?", "Is the spleen enlarged?", "Which kidney is larger?",
             "Is there an abnormality of the aorta?"]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_loop(url: str, deadline: float, seed: int, lat: list, fails: list, lock: threading.Lock,
                downloads: str):
    from gradio_client import Client

    rng = random.Random(seed)
    case = rng.choice(CASES)
    try:
        # downloads every served file, as a browser fetches it
        c = Client(url, verbose=False, download_files=downloads)
        c.predict(case, "", api_name="/ui_load_case")        # the case, and an empty question box
    except Exception as e:  # noqa: BLE001
        with lock:
            fails.append(f"load: {type(e).__name__}: {e}")
        return
    budgets = [("Auto", 390, 25), ("Tokens", 200, 25), ("Percent", 390, 25), ("Full", 390, 25)]
    n = 0
    while time.time() < deadline:
        mode, tokens, percent = rng.choice(budgets)
        question = rng.choice(QUESTIONS)
        t = time.perf_counter()
        try:
            if n % 4 == 3:                       # an integrator's call: stateless, JSON back
                r = c.predict(question=question, sample=CASE_IDS[case], budget="auto", api_name="/ask")
                assert r["total"] == 1000, r
            else:
                out = c.predict(question, mode, tokens, percent, 0.5, 400, 40, 0.35, api_name="/ui_ask")
                assert any("Visual tokens kept" in str(o) for o in out), str(out)[:300]
            with lock:
                lat.append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001
            with lock:
                fails.append(f"ask: {type(e).__name__}: {str(e)[:200]}")
        n += 1


def disk_mb(folder: str | None) -> float | None:
    if not folder:
        return None
    return round(sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20, 2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None)
    ap.add_argument("--start", action="store_true", help="start the app on a free loopback port")
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--warmup", type=float, default=30, help="seconds before the RSS baseline is taken")
    ap.add_argument("--server-log", default=None, help="with --start: write the server's output here")
    args = ap.parse_args(argv)
    if args.seconds > 600:
        ap.error("--seconds is capped at 600")
    proc = None
    url = args.url
    cache = None
    if args.start:
        cache = tempfile.mkdtemp(prefix="photon_ct_load_cache_")     # the app's Gradio cache: all it serves
        port = free_port()
        cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--device", "cpu",
               "--max-new-tokens", "8"]
        if args.model:
            cmd += ["--model", args.model]
        log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=cache))
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("load tests only target loopback addresses")
    lat, fails, lock, rss, disk = [], [], threading.Lock(), [], []
    # The clients' downloads go to a folder removed at the end; so do the empty folders gradio_client
    # leaves in the temporary directory for each download (it makes them with tempfile.gettempdir()).
    with tempfile.TemporaryDirectory(prefix="photon_ct_load_") as downloads:
        temp, tempfile.tempdir = tempfile.tempdir, downloads
        try:
            start = time.time()
            deadline = start + args.seconds
            threads = [threading.Thread(target=client_loop, daemon=True,
                                        args=(url, deadline, i, lat, fails, lock, downloads))
                       for i in range(args.clients)]
            for t in threads:
                t.start()
            sampled = 0.0
            while any(t.is_alive() for t in threads) and time.time() < deadline + 120:
                if proc and time.time() - sampled >= 5:          # memory and disk every 5 s
                    sampled = time.time()
                    rss.append((round(sampled - start, 1), round(rss_mb(proc.pid), 1)))
                    disk.append((round(sampled - start, 1), disk_mb(cache)))
                time.sleep(0.5)                                   # the end noticed within 0.5 s
            for t in threads:
                t.join(timeout=1)
        finally:
            tempfile.tempdir = temp
    disk_end = disk_mb(cache)
    if proc:
        proc.terminate()
        proc.wait(20)
        disk_after_stop = disk_mb(cache)
        shutil.rmtree(cache, ignore_errors=True)
    base = [m for s, m in rss if s >= args.warmup]
    growth = (base[-1] - base[0]) / base[0] if len(base) >= 2 else None
    q = sorted(lat)
    report = dict(clients=args.clients, seconds=args.seconds, requests=len(lat), failures=len(fails),
                  failure_samples=fails[:5],
                  p50_s=round(statistics.median(q), 3) if q else None,
                  p95_s=round(q[int(0.95 * (len(q) - 1))], 3) if q else None,
                  rss_mb_over_time=rss,
                  rss_growth_after_warmup=round(growth, 4) if growth is not None else None,
                  disk_mb_over_time=disk, disk_mb_at_end=disk_end,
                  disk_mb_after_stop=disk_after_stop if proc else None)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
