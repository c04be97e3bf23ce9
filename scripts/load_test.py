"""Load test: N concurrent gradio_client users load sample cases and ask, for a bounded time.

    python scripts/load_test.py --url http://127.0.0.1:7860/ --clients 8 --seconds 300
    python scripts/load_test.py --start --clients 8 --seconds 120      # starts the app itself

Loopback only (refuses any other host). Stops by itself. Prints requests, failures, p50/p95 latency
and the server's RSS over time (when it started the server), as JSON on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
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


def client_loop(url: str, deadline: float, seed: int, lat: list, fails: list, lock: threading.Lock, downloads: str):
    from gradio_client import Client

    rng = random.Random(seed)
    try:
        c = Client(url, verbose=False, download_files=downloads)   # fetches every served file, as a browser does
        c.predict(rng.choice(CASES), api_name="/on_load_case")
    except Exception as e:  # noqa: BLE001
        with lock:
            fails.append(f"load: {type(e).__name__}: {e}")
        return
    budgets = [("Auto", 390), ("Tokens", 200), ("Percent", 25), ("Full", 390)]
    while time.time() < deadline:
        mode, value = rng.choice(budgets)
        t = time.perf_counter()
        try:
            c.predict(rng.choice(QUESTIONS), mode, value, "Axial", 0.5, "Soft tissue", 0.35, api_name="/on_ask")
            with lock:
                lat.append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001
            with lock:
                fails.append(f"ask: {type(e).__name__}: {str(e)[:200]}")


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
    if args.start:
        port = free_port()
        cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--device", "cpu", "--max-new-tokens", "8"]
        if args.model:
            cmd += ["--model", args.model]
        log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
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
    lat, fails, lock, rss = [], [], threading.Lock(), []
    # The clients' downloads go to a folder removed at the end; so do the empty folders gradio_client
    # leaves in the temporary directory for each download (it makes them with tempfile.gettempdir()).
    with tempfile.TemporaryDirectory(prefix="photon_ct_load_") as downloads:
        temp, tempfile.tempdir = tempfile.tempdir, downloads
        try:
            start = time.time()
            deadline = start + args.seconds
            threads = [threading.Thread(target=client_loop, args=(url, deadline, i, lat, fails, lock, downloads),
                                        daemon=True) for i in range(args.clients)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads) and time.time() < deadline + 120:
                if proc:
                    rss.append((round(time.time() - start, 1), round(rss_mb(proc.pid), 1)))
                time.sleep(5)
            for t in threads:
                t.join(timeout=1)
        finally:
            tempfile.tempdir = temp
    if proc:
        proc.terminate()
        proc.wait(20)
    base = [m for s, m in rss if s >= args.warmup]
    growth = (base[-1] - base[0]) / base[0] if len(base) >= 2 else None
    q = sorted(lat)
    report = dict(clients=args.clients, seconds=args.seconds, requests=len(lat), failures=len(fails),
                  failure_samples=fails[:5],
                  p50_s=round(statistics.median(q), 3) if q else None,
                  p95_s=round(q[int(0.95 * (len(q) - 1))], 3) if q else None,
                  rss_mb_over_time=rss, rss_growth_after_warmup=round(growth, 4) if growth is not None else None)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
