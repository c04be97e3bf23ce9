"""What each control of the app does, as module-level functions (testable without a browser).

A handler takes the inputs of its event, then its dependencies as keyword-only arguments (``engine``,
``store``), and returns a dict from output name to value; `app.layout` maps the names to components
(a name left out is left as it is). A handler never raises: a failure becomes a readable message in
the place it concerns (the status line for a load, the card for a question) and a toast, and
everything else stays as it was — so no output shows a stale "Error" badge and the screen never
mixes two scans.

State that cannot lie: a successful load resets every view of the previous scan (card, 3-D, slices,
charts, Compare, Export); a failed load keeps them all and says the previous scan is still active.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
import traceback
import typing
import weakref
from collections import OrderedDict

import gradio as gr

from photon_core.inference.prompt import clean_question
from photon_core.io.volume import VolumeError, clean_text
from photon_core.model.budget import MIN_KEEP_TOKENS, SCAN_TOKENS, Budget
from photon_core.organs import organs_in_question
from viz.charts import kept_vs_budget, retention_bars, saliency_histogram
from viz.slices import WINDOWS, pick

from .render import answer_card, compare_table, empty_card, legend_html, pending_html, status_html
from .service import Engine, Session, UploadPartError, cases
from .view import (
    DEFAULT_WINDOW,
    FileStore,
    View,
    build_view,
    export_pngs,
    focus,
    handling,
    highlighted,
    organ_legend,
    preset_window,
    request_started,
    scene_file,
    slices_file,
)

log = logging.getLogger("photon_ct")
MODES = ["Auto", "Tokens", "Percent", "Threshold", "Full"]
TOKENS_MAX = SCAN_TOKENS             # the Tokens slider's top (a prior scan doubles the tokens: Percent)
MAX_MESSAGE = 400
PROGRESS = gr.Progress()             # a marker: Gradio hands each event its own progress tracker


def bind(fn, **deps):
    """``fn`` with its keyword-only dependencies bound, as a plain function Gradio can read: the same
    parameters (minus the bound ones) and resolved type hints (gr.Request, gr.SelectData are injected)."""
    bound = functools.partial(fn, **deps)

    def call(*args, **kwargs):
        for a in (*args, *kwargs.values()):   # a request of a page showing it (see `release_closed`)
            if isinstance(a, Session):
                a.used_at = time.monotonic()
        with handling():                    # when this request began, for files written after a session end
            return bound(*args, **kwargs)

    call.__wrapped__ = bound
    call.__name__ = call.__qualname__ = fn.__name__
    call.__doc__ = fn.__doc__
    call.__annotations__ = {k: v for k, v in typing.get_type_hints(fn).items() if k not in deps}
    return call


# ---------------------------------------------------------------------------------------------- messages
def message(e: BaseException, where: str = "") -> str:
    """What to tell the user about an exception; unexpected ones are logged in full, shown in a line."""
    if isinstance(e, Stopped):
        log.info("%s stopped: %s", where, "at the user's request" if e.by_user else
                 "its client is gone (the request cancelled, or its page's connection closed)")
        return str(e)
    if isinstance(e, (VolumeError, ValueError)):
        return clean_text(str(e), MAX_MESSAGE)            # no server path, no word cut in half
    if isinstance(e, MemoryError):
        return "The server ran out of memory for this request; try a smaller scan."
    if type(e).__name__ == "OutOfMemoryError":
        import torch

        torch.cuda.empty_cache()
        return ("The GPU ran out of memory for this request; memory was freed, please retry with a lower "
                "budget.")
    log.error("unexpected error in %s: %s\n%s", where, type(e).__name__, traceback.format_exc())
    return f"Something went wrong ({type(e).__name__}); the app is still running."


# ---------------------------------------------------------------------------------------------- stopping
class Stopped(Exception):
    """A load (or an ask) stops at its next step: its page's "Stop loading" (or "Stop asking") was
    pressed, or its client can no longer receive the result — it cancelled the request (Gradio's /cancel,
    as an API client's ``job.cancel()`` sends it) or its page's connection closed (a tab closed, a client
    gone). The load ran on for seconds
    (a 512 × 512 × 300 scan: ≈ 1 s reading, 3 s preparing, 4 s drawing the anatomy), on a core of the
    CPU and, while it prepared, the engine's lock, which every ask waits for. ``by_user``: a Stop button."""

    def __init__(self, by_user: bool = False):
        super().__init__("Stopped at your request." if by_user else
                         "Stopped: the request was cancelled, or its page closed.")
        self.by_user = by_user


def client_gone() -> bool:
    """Whether the Gradio event this thread runs for is over for its client: no longer among the queue's
    running events (cancelled: Gradio cancels its task, not the thread running the function), or marked
    not alive (its page's event stream closed: Gradio drops the event's messages). False outside an
    event (tests, scripts) or where Gradio's queue is not as read here."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    jobs = getattr(getattr(blocks, "_queue", None), "active_jobs", None)
    if not event_id or not isinstance(jobs, list):
        return False
    for job in list(jobs):
        for event in job or ():
            if getattr(event, "_id", None) == event_id:
                return not getattr(event, "alive", True)
    return True


def _stop_check(presses: OrderedDict, request, since: float | None):
    """A check that raises `Stopped` once the client is gone or, given the page's ``request``, once its
    Stop button (whose presses ``presses`` records) was pressed ``since`` (default: now)."""
    key = _key(request) if request is not None else None
    since = time.monotonic() if since is None else since

    def check() -> None:
        if client_gone():
            raise Stopped
        if key is not None and presses.get(key, -1.0) >= since:
            raise Stopped(by_user=True)
    return check


def watched(progress=None, request=None, since: float | None = None):
    """``progress`` (Gradio's tracker, or none) that first raises `Stopped` once the client is gone or,
    given the page's ``request``, once the page's "Stop loading" was pressed ``since`` (default: now, as
    the load begins): each step a load reports is also where it stops."""
    check = _stop_check(_STOPS, request, since)

    def step(*args, **kwargs):
        check()
        if progress is not None:
            return progress(*args, **kwargs)
    return step


def asking(progress=None, request=None):
    """The ``tick`` of an ask (`AskBatcher.ask`, every quarter second while it waits): gives the ask up
    (raises `Stopped`) once its client is gone or, given the page's ``request``, once its "Stop asking"
    was pressed since the ask was asked for — queued, it never runs; running alone, it stops at its next
    token (or decoder layer, on a CPU) — and shows where it is: an official model's answer takes most of
    a minute on a CPU."""
    check = _stop_check(_ASK_STOPS, request, _ask_asked_at(request) if request is not None else None)

    def tick(where: dict) -> None:
        check()
        if progress is None:
            return
        if where["phase"] == "queued":
            progress(0.1, desc="Waiting for the model (another ask is running)")
        elif where["phase"] == "reading" and "layer" in where:
            k, n = where["layer"], where["layers"]
            progress(0.1 + 0.1 * k / n, desc=f"Photon reads the scan and the question: layer {k} of {n}")
        elif where["phase"] == "reading":
            progress(0.2, desc="Photon reads the scan and the question")
        else:
            n, most = where["tokens"], where["max_new_tokens"]
            progress(0.2 + 0.5 * n / most, desc=f"Photon writes the answer: {n} token{'s' * (n != 1)}")
    return tick


def show_stop(request: gr.Request = None) -> dict:
    """An upload's load was asked for: "Stop loading" shows until the load has returned (`hide_stop`).
    The load may begin later (queued, or waiting for the file to arrive): a Stop pressed from now on
    stops it."""
    with _LOADS_LOCK:
        _remember(_ASKED_LOAD, _key(request), time.monotonic())
    return {"stop_load": gr.update(visible=True)}


def hide_stop() -> dict:
    """The load has returned (landed, failed or stopped): "Stop loading" hides."""
    return {"stop_load": gr.update(visible=False)}


def stop_loading(request: gr.Request = None) -> None:
    """"Stop loading": the page's load asked for or running stops at its next step and the page keeps
    the scan it shows (the status line says so). A load past its last step lands as usual."""
    with _LOADS_LOCK:
        _remember(_STOPS, _key(request), time.monotonic())


def show_ask_stop(request: gr.Request = None) -> dict:
    """An ask (or Compare) was asked for: "Stop asking" is shown until it returns (`hide_ask_stop`); the
    page's style keeps it invisible for its first second, so that a quick answer shows no button."""
    key = _key(request)
    with _LOADS_LOCK:
        _remember(_ASKED_ASK, key, time.monotonic())
        _remember(_ASKS_SHOWN, key, _ASKS_SHOWN.get(key, 0) + 1)
    return {"stop_ask": gr.update(visible=True)}


def hide_ask_stop(request: gr.Request = None) -> dict:
    """An ask returned: "Stop asking" hides once no other ask of the page still runs."""
    key = _key(request)
    with _LOADS_LOCK:
        left = max(0, _ASKS_SHOWN.get(key, 0) - 1)
        _remember(_ASKS_SHOWN, key, left)
    return {"stop_ask": gr.update(visible=left > 0)}


def stop_asking(request: gr.Request = None) -> None:
    """"Stop asking": the page's asks asked for until now are given up (`asking`); the card keeps the
    answer it shows and says the ask was stopped."""
    with _LOADS_LOCK:
        _remember(_ASK_STOPS, _key(request), time.monotonic())


def _ask_asked_at(request) -> float | None:
    with _LOADS_LOCK:
        return _ASKED_ASK.pop(_key(request), None)


def _load_asked_at(request) -> float | None:
    """When the page asked for the load beginning now (`show_stop`, which runs first); None: not asked
    through the page's Load upload or series pickers."""
    with _LOADS_LOCK:
        return _ASKED_LOAD.pop(_key(request), None)


def toast(text: str) -> None:
    """A message in a toast: escaped, since Gradio renders a toast's text as HTML."""
    gr.Warning(_esc(text), duration=8)


# ---------------------------------------------------------------------------------------------- budgets
def budget_from(mode: str, tokens: float, percent: float, theta: float) -> Budget:
    """The keep budget of the controls (each mode has its own slider)."""
    if mode == "Auto":
        b = Budget("auto")
    elif mode == "Full":
        b = Budget("full")
    elif mode == "Tokens":
        b = Budget("top_k", float(int(round(tokens))))
    elif mode == "Percent":
        b = Budget("ratio", float(percent) / 100)
    elif mode == "Threshold":
        b = Budget("threshold", float(theta))
    else:
        raise ValueError(f"Unknown budget mode {mode!r}.")
    return b


def slider_visibility(mode: str) -> dict:
    return {"tokens": gr.update(visible=mode == "Tokens"), "percent": gr.update(visible=mode == "Percent"),
            "theta": gr.update(visible=mode == "Threshold")}


# ---------------------------------------------------------------------------------------------- loading
_LOADS_RUNNING: dict[str, int] = {}       # browser session -> loads in flight (asks wait for the new scan)
_ASKED_LOAD: OrderedDict[str, float] = OrderedDict()   # browser -> when its upload's load was asked for
_STOPS: OrderedDict[str, float] = OrderedDict()         # browser -> when its "Stop loading" was pressed
_ASKED_ASK: OrderedDict[str, float] = OrderedDict()     # browser -> when its latest ask was asked for
_ASK_STOPS: OrderedDict[str, float] = OrderedDict()     # browser -> when its "Stop asking" was pressed
_ASKS_SHOWN: OrderedDict[str, int] = OrderedDict()      # browser -> its asks asked for and not returned
_LOADS_LOCK = threading.Lock()
LOADING_MESSAGE = ("A new scan is loading: ask again when it has loaded (the answer would have been about "
                   "the previous scan).")


@contextlib.contextmanager
def _loading(request):
    """While a browser's load runs, its asks, compares and exports are refused (``_check_not_loading``):
    Gradio runs them beside the load, on the scan about to be replaced."""
    key = _key(request)
    with _LOADS_LOCK:
        _LOADS_RUNNING[key] = _LOADS_RUNNING.get(key, 0) + 1
    try:
        yield
    finally:
        with _LOADS_LOCK:
            _LOADS_RUNNING[key] -= 1
            if not _LOADS_RUNNING[key]:
                del _LOADS_RUNNING[key]


def _check_not_loading(request) -> None:
    if request is not None and _LOADS_RUNNING.get(_key(request)):
        raise ValueError(LOADING_MESSAGE)


_LANDED: OrderedDict[str, int] = OrderedDict()   # browser session -> `Session.serial` its last load put up
_LANDED_MAX = 4096                               # browsers remembered (an older one: nothing dropped)


def _remember(registry: OrderedDict, key: str, value) -> None:
    """A browser's entry in one of the per-browser registries, newest last; past ``_LANDED_MAX`` browsers
    the oldest is forgotten. The caller holds ``_LOADS_LOCK``."""
    registry[key] = value
    registry.move_to_end(key)
    while len(registry) > _LANDED_MAX:
        registry.popitem(last=False)


def _landed(request, s: Session, view: View) -> None:
    """A load of this browser succeeded: its page shows ``s`` now."""
    if request is None:
        return
    with _LOADS_LOCK:
        key = _key(request)
        _remember(_LANDED, key, s.serial)
        _SHOWN.pop(key, None)
        if s.shared is None:                # an upload's arrays: let go after its page closes
            refs = (weakref.ref(s), weakref.ref(view))
            _remember(_SHOWN, key, refs)
            closed, started = _CLOSED.get(key), request_started()
            if closed is not None and started is not None and started < closed[0]:
                _CLOSED[key] = (closed[0], *refs)   # the page closed while this load ran


# A closed page's state stays in Gradio an hour (in case the browser comes back); an uploaded scan's
# arrays (≈ 2 bytes a voxel, 3 with a label map: 225 MB for 512 × 512 × 300) go sooner, unless a request
# of the page came since.
RELEASE_AFTER_S = 600.0
RELEASED_MESSAGE = (f"This page was closed, and its uploaded scan let go of {RELEASE_AFTER_S / 60:.0f} "
                    "minutes later: load it again.")
_SHOWN: OrderedDict[str, tuple] = OrderedDict()   # browser -> weak refs to its upload's (Session, View)
_CLOSED: dict[str, tuple] = {}          # browser whose page closed -> (when, Session ref, View ref)
_SWEEPER: list[threading.Thread] = []


def _closed(request) -> None:
    key = _key(request)
    with _LOADS_LOCK:
        shown = _SHOWN.get(key)             # kept: a page that comes back may close again
        _CLOSED[key] = (time.monotonic(), *(shown or (None, None)))    # None: a load may still land
        if not (_SWEEPER and _SWEEPER[0].is_alive()):
            _SWEEPER[:] = [threading.Thread(target=_sweep_forever, name="photon-release", daemon=True)]
            _SWEEPER[0].start()


def release_closed(now: float | None = None) -> int:
    """Let go of the uploads of pages closed ``RELEASE_AFTER_S`` ago and not come back; how many."""
    now = time.monotonic() if now is None else now
    with _LOADS_LOCK:
        due = [k for k, v in _CLOSED.items() if now - v[0] >= RELEASE_AFTER_S]
        due = [(k, _CLOSED.pop(k)) for k in due]
    n = 0
    for key, (ended, s_ref, view_ref) in due:
        s, view = (s_ref(), view_ref()) if s_ref is not None else (None, None)
        if s is None or s.used_at > ended:              # gone already, or the page came back
            continue
        with _LOADS_LOCK:
            if _SHOWN.get(key, (None,))[0] is s_ref:
                del _SHOWN[key]
        s.release()
        if view is not None:
            view.release()
        n += 1
        log.info("released the closed page's upload %s", s.title)
    return n


def _sweep_forever() -> None:
    while True:
        time.sleep(min(60.0, RELEASE_AFTER_S))
        release_closed()
        with _LOADS_LOCK:
            if not _CLOSED:
                _SWEEPER.clear()
                return


_ASKED: OrderedDict[str, int] = OrderedDict()     # browser -> the ticket of its newest ask
_TICKETS = itertools.count(1)


def _ticket(request) -> int | None:
    """An ask of this browser begins (Ask, Enter, a budget control, Triage, Review): it is the newest."""
    if request is None:
        return None
    with _LOADS_LOCK:
        n = next(_TICKETS)
        _remember(_ASKED, _key(request), n)
    return n


def _outdated(request, ticket: int | None) -> bool:
    """A newer ask of the same browser began after this one: two controls' events run side by side, and
    the older one, answered last, would leave the page on the older question or budget."""
    if ticket is None:
        return False
    with _LOADS_LOCK:
        return _ASKED.get(_key(request), ticket) != ticket


def _superseded(request, s: Session) -> bool:
    """Another scan landed on this browser's page while ``s`` was being asked about (a load that began
    after the ask did: asks are refused only while a load runs): its answer would put ``s`` back."""
    if request is None:
        return False
    with _LOADS_LOCK:
        now = _LANDED.get(_key(request))
    return now is not None and now != s.serial




def _no_scan(s: Session | None) -> ValueError:
    return ValueError(RELEASED_MESSAGE if s is not None and s.released else
                      "Load a sample case or upload a scan first.")


def _suggestion(question: str | None, questions: list[str]) -> dict:
    """The question box after a case loads: the user's own question stays; an empty box or a sample
    case's suggestion becomes the new case's first suggestion."""
    mine = (question or "").strip()
    if mine and not any(mine == q for c in cases() for q in c.get("questions", [])):
        return {}
    return {"question": questions[0] if questions else ""}


def _fresh(engine: Engine, s: Session, view: View, questions: list[str]) -> dict:
    """Every output of a newly loaded scan: nothing of the previous scan survives (the question box is
    the caller's: see ``_suggestion``)."""
    i, j, k = view.point
    shape = view.hu_ras.shape
    w, lv = preset_window(DEFAULT_WINDOW)
    view.files.forget("export")
    return {"session": s, "view": view, "status": status_html(s), "pending": _pending(""),
            "card": empty_card(s),
            "suggested": gr.update(choices=questions, value=None),
            "model3d": scene_file(view, s),
            "legend": legend_html(None, [], organ_legend(view)),
            "slices": slices_file(view, s, w, lv, 0.35),
            "pt_i": gr.update(maximum=shape[0], value=i + 1),
            "pt_j": gr.update(maximum=shape[1], value=j + 1),
            "pt_k": gr.update(maximum=shape[2], value=k + 1),
            "preset": DEFAULT_WINDOW, "width": w, "level": lv,
            "hist": None, "retention": None, "cmp_table": "", "cmp_plot": None, "exp_files": None}


def _failed_load(old: Session | None, e: BaseException, name: str | None) -> dict:
    text = message(e, "load")
    stopped = isinstance(e, Stopped) and e.by_user
    if stopped:
        toast(f"Stopped loading {name or 'the scan'}.")
    else:
        toast(f"Could not load {name}: {text}" if name else f"Could not load: {text}")
    return {"status": status_html(old, error=text, failed_name=name, stopped=stopped)}


def load_case(title: str, old: Session | None, old_view: View | None, question: str | None = None,
              request: gr.Request = None, progress=PROGRESS, *, engine: Engine, store: FileStore) -> dict:
    """A sample case replaces the scan (or, failing, leaves everything as it was and says so)."""
    progress = watched(progress, request)   # a load stopped or whose client is gone: at its next step
    try:
        with _loading(request):
            s = engine.load_case(title, progress)
            progress(0.8, desc="Building the 3-D anatomy and the slices")
            view = build_view(s, store.session(_key(request)), progress)
            c = next(c for c in cases() if c["title"] == s.title)
            out = _fresh(engine, s, view, c.get("questions", []))
            _landed(request, s, view)
        out.update(_suggestion(question, c.get("questions", [])))
        out["series"] = out["prior_series"] = gr.update(choices=[], value=None, visible=False)
        return out
    except Exception as e:  # noqa: BLE001 - the UI must survive anything
        return _failed_load(old, e, title)


def load_upload(files, label_file, label_table, prior_file, series_uid: str | None, old: Session | None,
                old_view: View | None, prior_series: str | None = None, request: gr.Request = None,
                progress=PROGRESS, *, engine: Engine, store: FileStore) -> dict:
    """An upload replaces the scan; a DICOM upload holding several series lists them to choose from (the
    scan's under Series, the prior's under Prior series)."""
    paths = [str(f) for f in (files or [])]
    name = _upload_name(paths)
    # a load stopped (since the page asked for it) or whose client is gone stops at its next step
    progress = watched(progress, request, _load_asked_at(request))
    try:
        with _loading(request):
            s = engine.load_upload(paths, str(label_file) if label_file else None, progress,
                                   prior_file=str(prior_file) if prior_file else None,
                                   label_table=str(label_table) if label_table else None,
                                   series=series_uid or None,
                                   prior_series=(prior_series or None) if prior_file else None)
            progress(0.8, desc="Building the 3-D anatomy and the slices")
            view = build_view(s, store.session(_key(request)), progress)
            out = _fresh(engine, s, view, upload_questions(s))   # the question box keeps what was typed
            _landed(request, s, view)
        s.upload = _upload_key(files, label_file, label_table, prior_file)
        for picker, listed, uid in (("series", s.series, s.series_uid),
                                    ("prior_series", s.prior_series, s.prior_series_uid)):
            choices = [(x.label, x.uid) for x in listed]
            out[picker] = gr.update(choices=choices, value=uid, visible=bool(choices))
        return out
    except Exception as e:  # noqa: BLE001
        out = _failed_load(old, e, f"'{e.file_name}'" if isinstance(e, UploadPartError) else name)
        if old is not None:        # the pickers name the series still loaded
            if series_uid and any(x.uid == series_uid for x in old.series):
                out["series"] = gr.update(value=old.series_uid)
            if prior_series and any(x.uid == prior_series for x in old.prior_series):
                out["prior_series"] = gr.update(value=old.prior_series_uid)
        return out


_PICKS: dict[tuple, threading.Event] = {}     # Series picks running: (browser, upload, series) -> done


def pick_series(files, label_file, label_table, prior_file, series_uid: str | None, old: Session | None,
                old_view: View | None, prior_series: str | None = None, request: gr.Request = None,
                progress=PROGRESS, *, engine: Engine, store: FileStore) -> dict:
    """A series chosen in a picker (the scan's or the prior's): load it with the upload's other files. A
    mouse choice reaches the server twice at once (the dropdown's input event fires twice): the second
    waits for the first and changes nothing, instead of loading the study again and saying any failure
    twice. A choice of the series already loaded from the same files is nothing to do either."""
    upload = _upload_key(files, label_file, label_table, prior_file)
    prior_series = (prior_series or None) if prior_file else None
    key = (_key(request), upload, series_uid, prior_series)
    with _LOADS_LOCK:
        running = _PICKS.get(key)
        if running is None:
            _PICKS[key] = threading.Event()
    if running is not None:
        running.wait(timeout=600)
        return {}
    try:
        if (old is not None and old.upload == upload and series_uid == old.series_uid
                and prior_series == old.prior_series_uid):
            _load_asked_at(request)                   # no load: the ask is answered
            return {}
        return load_upload(files, label_file, label_table, prior_file, series_uid, old, old_view,
                           prior_series, request, progress, engine=engine, store=store)
    finally:
        with _LOADS_LOCK:
            _PICKS.pop(key).set()


def _upload_key(files, label_file, label_table, prior_file) -> tuple:
    return (tuple(str(f) for f in files or []), *(str(f) if f else None for f in (label_file, label_table,
                                                                                   prior_file)))


def upload_questions(s: Session) -> list[str]:
    """Questions to suggest for an upload: the sample cases' (the kinds the demo model was trained on),
    those about a structure of the upload's label map first."""
    questions = list(dict.fromkeys(q for c in cases() for q in c.get("questions", [])))
    if s.blocks:
        names = list(s.blocks)
        questions.sort(key=lambda q: not organs_in_question(q, names))
    return questions


def upload_changed(files, label_file, label_table, prior_file, s: Session | None = None) -> dict:
    """New files: the series choice of the previous upload no longer applies (and see `fields_changed`)."""
    out = fields_changed(files, label_file, label_table, prior_file, s)
    if out["pending"]["visible"]:
        out["series"] = gr.update(choices=[], value=None, visible=False)
    return out


def prior_changed(files, label_file, label_table, prior_file, s: Session | None = None) -> dict:
    """A new prior (or none): the prior's series choice no longer applies (and see `fields_changed`)."""
    out = fields_changed(files, label_file, label_table, prior_file, s)
    if out["pending"]["visible"]:
        out["prior_series"] = gr.update(choices=[], value=None, visible=False)
    return out


def fields_changed(files, label_file, label_table, prior_file, s: Session | None = None) -> dict:
    """A file of the Upload tab was added, replaced or removed (the scan, label map, names table, prior):
    nothing changes until "Load upload", and a note under the status line says so — a prior removed from
    its field is still asked with until then. The note is its own component, not the status line: a load
    that failed or was stopped as the field changed (two events answered at the same moment) keeps its
    message. Fields holding what is loaded (the field's event answered after the load) need no note, and
    the series pickers the load filled are kept."""
    fields = _upload_key(files, label_file, label_table, prior_file)
    if s is None or s.volume is None or s.upload == fields or (s.upload is None and fields == _NO_UPLOAD):
        return {"pending": _pending("")}
    return {"pending": _pending(pending_html(s))}


def _pending(note: str) -> dict:
    return gr.update(value=note, visible=bool(note))      # hidden when empty: no gap under the status


_NO_UPLOAD = ((), None, None, None)


def _upload_name(paths: list[str]) -> str | None:
    from pathlib import Path

    if not paths:
        return None
    first = Path(paths[0]).name
    return f"'{first}'" if len(paths) == 1 else f"{len(paths)} files ('{first}', …)"


def _key(request) -> str:
    return getattr(request, "session_hash", None) or "local"


# ---------------------------------------------------------------------------------------------- asking
def _answer_outputs(engine: Engine, s: Session, view: View, width, level, opacity, t0: float) -> dict:
    """Card, 3-D overlay, slices at the answer, charts — the audit computed once (s.audit)."""
    ans, audit = s.answer, s.audit
    t_views = time.perf_counter()
    if view.focused != s.question:     # a new question opens at its structure; the same one under another
        view.point, view.focused = focus(view, s), s.question   # budget keeps the crosshair where it is
    glb = scene_file(view, s)
    img = slices_file(view, s, width, level, opacity)
    hist = saliency_histogram(ans.rho, ans.theta, ans.keep_grid,
                              cut=ans.cut)
    ret = retention_bars(audit.retention, audit.asked, audit.small) if audit.retention else None
    view.files.forget("export")                     # an export belongs to the answer it was made from
    now = time.perf_counter()
    timing = {"views_ms": 1000 * (now - t_views), "total_ms": 1000 * (now - t0)}
    i, j, k = view.point
    stale = {}
    if s.compared is not None and s.compared != s.question:   # the table answers another question: gone
        s.compared, stale = None, {"cmp_table": "", "cmp_plot": None}
    return {**stale, "session": s, "card": answer_card(s, ans, audit, engine.provenance(), timing),
            "model3d": glb, "legend": legend_html(ans, highlighted(view, s), organ_legend(view)),
            "slices": img,
            "pt_i": i + 1, "pt_j": j + 1, "pt_k": k + 1, "hist": hist, "retention": ret, "exp_files": None}


def _failed_ask(engine: Engine, s: Session | None, e: BaseException) -> dict:
    text = message(e, "ask")
    toast(text)
    if s is not None and s.answer is not None:
        with s.lock:                        # the answer with its own audit, not another ask's halfway
            return {"card": answer_card(s, s.answer, s.audit, engine.provenance(), notice=text),
                    **_slider_of(s.answer.budget)}
    return {"card": empty_card(s).replace("Ask a question", f"Not asked: {_esc(text)} Ask a question", 1)}


def _slider_of(budget: str) -> dict:
    """The slider value of the budget an answer was made under: after a refused budget the slider goes
    back to the answer still shown, instead of showing the refused value beside it."""
    b = Budget.parse(budget)
    if b.mode == "top_k":
        return {"tokens": int(b.value)}
    if b.mode == "ratio":
        return {"percent": round(100 * float(b.value), 6)}
    if b.mode == "threshold":
        return {"theta": float(b.value)}
    return {}


def _esc(text: str) -> str:
    import html

    return html.escape(text)


def _answer_and_draw(engine: Engine, s: Session, view: View, question: str, budget: Budget, width, level,
                     opacity, t0: float, request, ticket: int | None, progress=None) -> dict:
    """Ask and draw the views of the answer, the session held so that they show one answer; nothing (said
    in a toast) when another scan landed on this browser's page meanwhile: drawn, the late answer would
    replace the new scan's views and served files. Nothing either when a newer ask of the page began
    before this one got the session: the newest ask is the one the page ends on."""
    with s.lock:
        if _outdated(request, ticket):
            return {}
        engine.answer(s, question, budget, tick=asking(progress, request))
        if not _superseded(request, s):
            if progress is not None:
                progress(0.7, desc="Drawing the kept blocks")
            out = _answer_outputs(engine, s, view, width, level, opacity, t0)
            if not _superseded(request, s):
                return out
    toast(f"The answer about {s.title} came after another scan was loaded; it is not shown. Ask again "
          f"about the scan now loaded.")
    return {}


def ask(s: Session | None, view: View | None, question: str, mode: str, tokens: float, percent: float,
        theta: float, width: float, level: float, opacity: float, request: gr.Request = None,
        progress=PROGRESS, *, engine: Engine) -> dict:
    """Ask the question under the budget of the controls; the views follow the answer."""
    t0 = time.perf_counter()
    ticket = _ticket(request)
    try:
        _check_not_loading(request)
        if s is None or view is None or s.volume is None:
            raise _no_scan(s)
        budget = budget_from(mode, tokens, percent, theta)
        progress(0.1, desc="Asking Photon")
        out = _answer_and_draw(engine, s, view, question, budget, width, level, opacity, t0, request, ticket,
                               progress)
        if out and budget.mode == "top_k" and budget.value != tokens:   # 33.7 typed: shows the 34 asked
            out["tokens"] = int(budget.value)
        return out
    except Exception as e:  # noqa: BLE001
        return _failed_ask(engine, s, e)


def reask(s: Session | None, view: View | None, question: str, mode: str, tokens: float, percent: float,
          theta: float, width: float, level: float, opacity: float, request: gr.Request = None, *,
          engine: Engine) -> dict:
    """A budget control moved: re-ask only when there is an answer to update, under a budget it was not
    given. A click into a slider's number box "releases" the slider at its value (Gradio): that asked again
    for the answer shown (a minute of an official model's time on a CPU), and the typed value's ask, sent
    next, could be answered first and then be dropped as the older of the two."""
    if s is None or s.answer is None or not (question or "").strip():
        return {}
    try:
        same = (s.budget == budget_from(mode, tokens, percent, theta)
                and s.question == clean_question(question))
    except ValueError:                              # refused by the ask below, in words
        same = False
    if same:
        return {}
    return ask(s, view, question, mode, tokens, percent, theta, width, level, opacity, request, engine=engine)


def mode_changed(s: Session | None, view: View | None, question: str, mode: str, tokens: float,
                 percent: float, theta: float, width: float, level: float, opacity: float,
                 request: gr.Request = None, *, engine: Engine) -> dict:
    """Show the new mode's own slider (each keeps its value) and re-ask under it."""
    out = reask(s, view, question, mode, tokens, percent, theta, width, level, opacity, request,
                engine=engine)
    for name, shown in slider_visibility(mode).items():     # a refused budget's reset keeps the visibility
        out[name] = gr.update(visible=shown["visible"], **({"value": out[name]} if name in out else {}))
    return out


def triage(s, view, question, tokens, percent, theta, width, level, opacity, request: gr.Request = None, *,
           engine: Engine) -> dict:
    """Auto: what Photon itself keeps."""
    out = ask(s, view, question, "Auto", tokens, percent, theta, width, level, opacity, request,
              engine=engine)
    return {**out, "mode": "Auto", **slider_visibility("Auto")} if out else out


def review(s, view, question, tokens, percent, theta, width, level, opacity, request: gr.Request = None, *,
           engine: Engine) -> dict:
    """At least twice what Auto keeps (≥ 100 tokens), as a Tokens budget; a count beyond the Tokens
    slider (with a prior scan's tokens) as the same share, in Percent."""
    t0 = time.perf_counter()
    ticket = _ticket(request)
    try:
        _check_not_loading(request)
        if s is None or view is None or s.volume is None:
            raise _no_scan(s)
        auto = engine.ask(s, question, Budget("auto"), tick=asking(None, request))   # a probe: not kept
        k = int(min(auto.total, max(2 * auto.kept, 100, MIN_KEEP_TOKENS)))
        if k <= TOKENS_MAX:
            mode, budget, value = "Tokens", Budget("top_k", float(k)), k
        else:
            mode, budget, value = "Percent", Budget("ratio", k / auto.total), round(100 * k / auto.total, 6)
        out = _answer_and_draw(engine, s, view, question, budget, width, level, opacity, t0, request, ticket)
        if not out:
            return out
        shown = {name: gr.update(visible=False) for name in ("tokens", "percent", "theta")}
        shown[mode.lower()] = gr.update(value=value, visible=True)
        return {**out, "mode": mode, **shown}
    except Exception as e:  # noqa: BLE001
        return _failed_ask(engine, s, e)


# ---------------------------------------------------------------------------------------------- views
def redraw_slices(s: Session | None, view: View | None, width: float, level: float, opacity: float) -> dict:
    if s is None or view is None or view.hu_ras is None:
        return {}
    try:
        with s.lock:                        # an answer with its own audit (the asked organ's outline)
            return {"slices": slices_file(view, s, width, level, opacity)}
    except Exception as e:  # noqa: BLE001
        toast(message(e, "slices"))
        return {}


def move_point(s, view, i, j, k, width, level, opacity) -> dict:
    """The crosshair sliders moved (1-based slice numbers)."""
    if view is None or view.hu_ras is None:
        return {}
    view.point = tuple(int(max(1, min(int(v), n))) - 1 for v, n in zip((i, j, k), view.hu_ras.shape))
    return redraw_slices(s, view, width, level, opacity)


def click_slices(s, view, width, level, opacity, evt: gr.SelectData) -> dict:
    """A click on a plane moves the crosshair there; the other two planes follow."""
    if view is None or view.layout is None or evt is None or not evt.index:
        return {}
    point = pick(view.layout, float(evt.index[0]), float(evt.index[1]), view.point)
    if point is None:
        return {}
    view.point = point
    i, j, k = point
    return {**redraw_slices(s, view, width, level, opacity), "pt_i": i + 1, "pt_j": j + 1, "pt_k": k + 1}


def set_preset(s, view, preset: str, opacity) -> dict:
    """A window preset sets width and level."""
    if preset not in WINDOWS:
        return {}
    w, lv = preset_window(preset)
    return {"width": w, "level": lv, **redraw_slices(s, view, w, lv, opacity)}


def set_window(s, view, width, level, opacity) -> dict:
    """Free width/level: the preset reads 'Custom' unless the pair is a preset's."""
    pair = (float(width), float(level))
    name = next((n for n, wl in WINDOWS.items() if tuple(map(float, wl)) == pair), "Custom")
    return {"preset": name, **redraw_slices(s, view, width, level, opacity)}


# ------------------------------------------------------------------------------------- compare, export
def compare(s: Session | None, question: str, request: gr.Request = None, progress=PROGRESS, *,
            engine: Engine) -> dict:
    try:
        _check_not_loading(request)
        if s is None or s.volume is None:
            raise _no_scan(s)
        progress(0.1, desc="Asking at Auto, 10%, 25%, 50% and Full (one batch)")
        with s.lock:
            rows = engine.compare_rows(s, question, asking(progress, request))
            s.compared = clean_question(question)
            return {"cmp_table": compare_table(rows, s.compared, s.title), "cmp_plot": kept_vs_budget(rows)}
    except Exception as e:  # noqa: BLE001
        text = message(e, "compare")
        toast(text)
        return {"cmp_table": f"<div id='compare-error' style='color:#b00'>Not compared: {_esc(text)}</div>"}


def export(s: Session | None, view: View | None, width, level, opacity, request: gr.Request = None, *,
           engine: Engine) -> dict:
    try:
        _check_not_loading(request)
        if s is None or s.answer is None or view is None:
            raise _no_scan(s) if s is not None and s.released else ValueError(
                "Ask a question first; the export holds the audit of an answer.")
        with s.lock:
            pngs = export_pngs(view, s, width, level, opacity)
            return {"exp_files": [str(p) for p in engine.export(s, pngs, view.files.new_folder("export"))]}
    except Exception as e:  # noqa: BLE001
        toast(message(e, "export"))
        return {"exp_files": None}


def session_ended(request: gr.Request = None, *, store: FileStore) -> None:
    """The browser left: its files go now, an upload's arrays ``RELEASE_AFTER_S`` later unless it comes
    back (`release_closed`), the rest of its state with Gradio's state expiry."""
    store.drop(_key(request))
    _closed(request)


def drop_view(view: View | None) -> None:
    if view is not None:
        view.cleanup()
