"""Photon CT — ask a question about a CT scan and audit which parts of it the model kept.

    python app.py [--model DIR|ORG/NAME [--subfolder SUB] [--revision REV]] [--device auto|cpu|cuda]
                  [--host 127.0.0.1] [--port 7860] [--auth USER:PASS]

Analytics are off, no share link is ever created, and nothing is fetched from the network unless
--model names a hub id (official weights, fetched once into the HF cache).
"""
from __future__ import annotations

import os
import sys

from photon_core.model.hub import is_hub_id

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"   # before gradio is imported: no outbound calls
# huggingface_hub reads these when gradio imports it: offline unless the command line names a hub id.
_MODEL = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--model"),
              next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--model=")), None))
if not (__name__ == "__main__" and _MODEL and is_hub_id(_MODEL)):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
CACHE_DIR = None                                  # Gradio's cache folder of this process (run as a script)
if __name__ == "__main__":
    import atexit
    import shutil
    import tempfile

    # Gradio copies every file it serves into its cache: this process gets a folder of its own there
    # (inside GRADIO_TEMP_DIR if set), emptied hourly of old files and removed when the process ends
    # however it ends short of a kill (a bad argument, Ctrl-C, SIGTERM: see main).
    if os.environ.get("GRADIO_TEMP_DIR"):           # a folder not made yet is made, as Gradio does
        os.makedirs(os.environ["GRADIO_TEMP_DIR"], exist_ok=True)
    CACHE_DIR = tempfile.mkdtemp(prefix="photon_ct_gradio_", dir=os.environ.get("GRADIO_TEMP_DIR") or None)
    atexit.register(shutil.rmtree, CACHE_DIR, ignore_errors=True)
    os.environ["GRADIO_TEMP_DIR"] = CACHE_DIR

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from starlette.requests import ClientDisconnect  # noqa: E402

from app.layout import build_ui  # noqa: E402
from app.service import Engine, Settings  # noqa: E402
from app.view import FileStore  # noqa: E402
from photon_core.inference.predictor import MAX_NEW_TOKENS_LIMIT  # noqa: E402
from photon_core.io.decode import prestart as prestart_decoder  # noqa: E402
from photon_core.io.volume import Limits  # noqa: E402
from photon_core.model.hub import add_model_arguments  # noqa: E402

log = logging.getLogger("photon_ct")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Photon CT: question answering on CT with a token-retention audit.")
    add_model_arguments(ap)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, loopback only)")
    ap.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    ap.add_argument("--auth", default=None, help="USER:PASS to require a login")
    ap.add_argument("--max-new-tokens", type=int, default=32,
                    help=f"longest answer, in tokens (default: %(default)s, at most {MAX_NEW_TOKENS_LIMIT})")
    ap.add_argument("--max-upload-mb", type=int, default=1000,
                    help="largest file an upload may hold, in MB (default: %(default)s)")
    ap.add_argument("--cache-volumes", type=int, default=4,
                    help="encoded volumes kept in memory (LRU; default: %(default)s)")
    args = ap.parse_args(argv)
    auth = args.auth
    if auth is not None and (":" not in auth or auth.startswith(":") or auth.endswith(":")):
        ap.error("--auth must look like USER:PASS")
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        ap.error(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}")
    if args.max_upload_mb < 1:
        ap.error("--max-upload-mb must be 1 or more")
    if args.cache_volumes < 1:
        ap.error("--cache-volumes must be 1 or more (the scan being asked about is kept encoded)")
    if not 1 <= args.port <= 65535:
        ap.error("--port must be between 1 and 65535")
    return args


def settings(args) -> Settings:
    """The engine's settings from the command line: ``--max-upload-mb`` bounds both what Gradio accepts
    and what the loader reads (``Limits.max_file_bytes``), so the two cannot disagree."""
    return Settings(model_dir=args.model, subfolder=args.subfolder, revision=args.revision,
                    device=args.device, max_new_tokens=args.max_new_tokens, cache_volumes=args.cache_volumes,
                    limits=Limits(max_file_bytes=args.max_upload_mb * 1_000_000))


def limit_malloc_arenas(n: int = 2) -> None:
    """Cap glibc malloc arenas: a threaded server otherwise keeps growing RSS through fragmentation."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, n)   # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv=None) -> None:
    # SIGTERM (a service manager's stop) shuts down as Ctrl-C does: the server closes, Gradio
    # removes its cached files, the sessions' folders go — also when it comes while the model loads.
    signal.signal(signal.SIGTERM, _interrupt)
    limit_malloc_arenas()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    engine = Engine(settings(args))
    try:
        _ = engine.predictor             # the model loads now: one that cannot is refused in words
    except ValueError as e:              # CheckpointError, a config that does not parse
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    store = FileStore.create()           # the sessions' served files, inside Gradio's cache folder
    demo = build_ui(engine, store)
    prestart_decoder()                   # a compressed DICOM series then skips the decoder's start
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    try:
        # quiet: Gradio's own lines (its URL, a hint about share links, which this app never makes) give way
        # to the one below, written once the server listens
        demo.queue(default_concurrency_limit=2).launch(
            server_name=args.host, server_port=args.port, auth=auth, share=False, show_error=True,
            max_file_size=engine.settings.limits.max_file_bytes, footer_links=["api"], quiet=True,
            prevent_thread_lock=True, app_kwargs={"exception_handlers": {ClientDisconnect: _client_left}})
        log.info("Photon CT on http://%s:%d (model: %s%s%s); Ctrl-C stops it", args.host, args.port,
                 args.model or "embedded demo model",
                 f", subfolder {args.subfolder}" if args.subfolder else "",
                 f", revision {args.revision}" if args.revision else "")
        while demo.is_running:           # until Ctrl-C or SIGTERM (``_interrupt``)
            time.sleep(0.2)
    except KeyboardInterrupt:
        log.info("Photon CT stopping")
    finally:
        demo.close()
        store.close()
        engine.close()   # Gradio's cache folder goes at exit (atexit above)
        log.info("Photon CT stopped; session files removed")


async def _client_left(request, exc):
    """A client that left in the middle of sending (a tab closed during an upload): nobody to answer, and
    not the server's failure (uvicorn logged a traceback for each)."""
    from starlette.responses import Response

    log.info("a client left during its request to %s", request.url.path)
    return Response(status_code=400)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
