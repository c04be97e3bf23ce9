"""Start the real app (app.py) on a free loopback port for the browser and API tests."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model_dir, cache: Path, tmp: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """app.py with the model in ``model_dir``; Gradio's cache in ``cache``, temporary files in ``tmp``."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", GRADIO_TEMP_DIR=str(cache),
               TMPDIR=str(tmp))
    cmd = [sys.executable, str(ROOT / "app.py"), "--model", str(model_dir), "--device", "cpu",
           "--port", str(port), "--max-new-tokens", "6", *extra]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    for _ in range(240):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}/"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("app exited:\n" + log.read_text()[-3000:]) from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("app did not start:\n" + log.read_text()[-3000:])


def stop_app(proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM, as a service manager stops it: a clean shutdown within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("app did not stop on SIGTERM:\n" + log.read_text()[-3000:]) from None
