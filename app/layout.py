"""The Gradio Blocks: components and wiring only. What each event does is in `app.handlers`; the
integrators' endpoints (/ask, /compare, /export) are in `app.api`. The UI's own events are callable
but left off the API page (``api_visibility="undocumented"``)."""
from __future__ import annotations

import html
import logging
import math
from pathlib import Path

import gradio as gr

from photon_core.model.budget import MIN_KEEP_TOKENS
from viz.scene import ANTERIOR_CAMERA, BACKGROUND
from viz.slices import WINDOWS

from . import api
from . import handlers as h
from .service import Engine, cases
from .view import DEFAULT_WINDOW, FileStore

CACHE_MAX_AGE_S = 6 * 3600          # served files older than this are deleted (hourly sweep)
UI = "undocumented"
# A slider's number box commits on Enter as well as on blur (Gradio commits on blur only), a typed value
# outside the slider's range is brought into it first, and an emptied box gets back the value it had when
# it was entered (Gradio would refuse either with an error badge on every output, naming its component).
# And the style that keeps "Stop asking" invisible during an ask's first second.
JS = """() => {
  const style = document.createElement('style');   // "Stop asking" appears only once an ask has run 1 s
  style.textContent = '.appears-late { animation: appears-late 0s linear 1s both; } ' +
    '@keyframes appears-late { from { visibility: hidden; } to { visibility: visible; } }';
  document.head.appendChild(style);
  const ours = (t) => t && t.matches && t.matches('.commit-on-enter input[type=number]');
  const set = (t, v) => { t.value = v; t.dispatchEvent(new Event('input', {bubbles: true})); };
  const clamp = (t) => {
    const v = parseFloat(t.value);
    if (isNaN(v)) { if (t.dataset.entered) set(t, t.dataset.entered); return; }
    const lo = t.min === '' ? -Infinity : parseFloat(t.min), hi = t.max === '' ? Infinity : parseFloat(t.max);
    const c = Math.min(Math.max(v, lo), hi);
    if (c !== v) set(t, String(c));
  };
  document.addEventListener('focus', (e) => {
    if (ours(e.target) && !isNaN(parseFloat(e.target.value))) e.target.dataset.entered = e.target.value;
  }, true);
  document.addEventListener('keydown', (e) => { if (e.key === 'Enter' && ours(e.target)) e.target.blur(); });
  document.addEventListener('blur', (e) => { if (ours(e.target)) clamp(e.target); }, true);
}"""


def wire(fn, outputs: list[str], comps: dict, **deps):
    """A handler bound to its dependencies, returning its dict as a tuple in ``outputs`` order
    (a name the handler leaves out is skipped: that component keeps its value)."""
    bound = h.bind(fn, **deps)

    def call(*args, **kwargs):
        out = bound(*args, **kwargs) or {}
        vals = tuple(out.get(name, gr.skip()) for name in outputs)
        return vals[0] if len(vals) == 1 else vals

    call.__wrapped__ = bound            # Gradio reads the handler's parameters and type hints from it
    call.__annotations__ = bound.__annotations__
    call.__name__ = f"ui_{fn.__name__}"   # the UI's events never take the API's names
    return call, [comps[n] for n in outputs]


P, LAST, EVERY, ENTER = "private", "always_last", "multiple", "commit-on-enter"
log = logging.getLogger("photon_ct")
BAD_INPUTS = ("This request's inputs are not what the page's controls send (a number in a slider's range, "
              "one of a list's choices, a text, a file uploaded to this server); nothing was changed.")


class Blocks(gr.Blocks):
    """gr.Blocks that refuses an event's inputs of the wrong kind in one sentence and without a traceback
    in the server log: what a raw HTTP client can send and the page's controls cannot (a text, a list or
    1e308 for a slider, a value no list offers, a file not uploaded here). NaN and infinity, which
    Gradio's own range check lets through to the handlers, are refused too."""

    async def preprocess_data(self, block_fn, inputs, state, *args, **kwargs):
        try:
            for block, value in zip(block_fn.inputs, inputs):
                block = state[block._id] if state is not None and block._id in state else block
                refused = _refusal(block, value)
                if refused:
                    raise gr.Error(refused)
            return await super().preprocess_data(block_fn, inputs, state, *args, **kwargs)
        except gr.Error as e:               # Gradio's own (out of range) and ours
            raise gr.Error(e.message, print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - a value of the wrong kind, however Gradio's parts fail on it
            log.warning("refused the inputs of a request to %s: %s", block_fn.name,
                        (str(e).splitlines() or [type(e).__name__])[0][:200])
            raise gr.Error(BAD_INPUTS, print_exception=False) from None


def _refusal(block, value) -> str | None:
    """Why a slider's or a list's value cannot be taken (None: Gradio checks the rest)."""
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "…"
    if isinstance(block, gr.Slider) and isinstance(value, float) and not math.isfinite(value):
        return f"“{block.label}” takes a finite number; this request sent {shown}."
    if isinstance(block, (gr.Radio, gr.Dropdown)) and value is not None:
        choices = [c[1] if isinstance(c, (tuple, list)) else c for c in block.choices or []]
        if not isinstance(value, (str, int, float)) or value not in choices:
            names = ", ".join(map(str, choices[:5])) + (", …" if len(choices) > 5 else "")
            return f"“{block.label}” takes one of: {names or 'nothing yet'}; this request sent {shown}."
    return None


def build_ui(engine: Engine, store: FileStore | None = None) -> gr.Blocks:
    from viz.scene import warm_up

    warm_up()
    store = store or FileStore.create()
    c: dict = {}
    # Gradio copies every file it serves into its cache unless it is already there: our files are
    # written there (FileStore) and replaced per kind; what else lands in the cache (uploads, charts)
    # is swept hourly once older than CACHE_MAX_AGE_S; the cache of this app goes when it stops.
    with Blocks(title="Photon CT", analytics_enabled=False, delete_cache=(3600, CACHE_MAX_AGE_S)) as demo:
        c["session"] = gr.State(None)
        c["view"] = gr.State(None, delete_callback=h.drop_view)
        model = Path(engine.settings.model_dir).name if engine.settings.model_dir else "embedded demo model"
        gr.Markdown("## Photon CT — ask a CT scan, audit what the model kept\n"
                    f"<small>Model: {html.escape(model)} · research software, not for clinical use</small>")
        with gr.Row():
            with gr.Column(scale=3, min_width=340):
                _scan_and_question(c, engine)
            with gr.Column(scale=8):
                _views(c)
        _wire(c, demo, engine, store)
        api.register(engine, store)
    demo.photon_store = store
    return demo


def _scan_and_question(c: dict, engine: Engine) -> None:
    titles = [x["title"] for x in cases()]
    modes, modes_note = engine.budget_modes()
    with gr.Tab("Sample case"):
        c["case"] = gr.Dropdown(titles, value=titles[0], label="Sample case", elem_id="case")
        c["load_case"] = gr.Button("Load case", elem_id="load_case")
    with gr.Tab("Upload"):
        c["files"] = gr.File(label="CT: NIfTI / NRRD file, or the files / .zip of a DICOM study",
                             file_count="multiple", elem_id="upload", height=220)
        c["series"] = gr.Dropdown([], label="Series (the upload holds several)", visible=False,
                                  elem_id="series")
        c["label_file"] = gr.File(label="Optional label map (NIfTI, same grid)", elem_id="label_upload")
        c["label_table"] = gr.File(label="Optional label names (JSON {id: name} or CSV id,name; default: "
                                         "TotalSegmentator's class map when the ids fit)",
                                   file_types=[".json", ".csv"], elem_id="label_table")
        c["prior"] = gr.File(label="Optional prior scan of the same patient, for questions about change "
                                   "(NIfTI / NRRD, a DICOM .zip, or one enhanced multi-frame DICOM file)",
                             elem_id="prior_upload")
        c["prior_series"] = gr.Dropdown([], label="Prior series (the prior's upload holds several)",
                                        visible=False, elem_id="prior_series")
        c["load_upload"] = gr.Button("Load upload", elem_id="load_upload")
    c["stop_load"] = gr.Button("Stop loading", elem_id="stop_load", variant="stop", size="sm", visible=False)
    c["status"] = gr.HTML("<div id='scan-status'>No scan loaded.</div>", elem_id="status")
    c["pending"] = gr.HTML("", elem_id="pending", visible=False)   # Upload-tab files not loaded yet
    c["suggested"] = gr.Dropdown([], label="Suggested questions", elem_id="suggested")
    c["question"] = gr.Textbox(label="Question (Enter asks)", lines=1, max_lines=4, elem_id="question",
                               placeholder="e.g. Is there a lesion in the liver?")
    c["mode"] = gr.Radio(modes, value=modes[0][1], label="Keep budget", elem_id="mode",
                         info=modes_note or None)
    # each mode its own slider (its own value); the floor is checked with a message (a slider minimum
    # would refuse a typed value without one)
    c["tokens"] = gr.Slider(0, h.TOKENS_MAX, value=390, step=10, visible=False, elem_id="budget_tokens",
                            label=f"Tokens to keep (≥ {MIN_KEEP_TOKENS})", elem_classes=ENTER)
    c["percent"] = gr.Slider(0, 100, value=25, step=1, visible=False, elem_id="budget_percent",
                             label=f"Percent of visual tokens (≥ {MIN_KEEP_TOKENS / 10:g}%)",
                             elem_classes=ENTER)
    c["theta"] = gr.Slider(0, 1, value=0.5, step=0.01, label="Threshold θ on ρ", visible=False,
                           elem_id="budget_theta", elem_classes=ENTER)
    with gr.Row():
        c["triage"] = gr.Button("Triage (Auto)", elem_id="triage")
        c["review"] = gr.Button("Review (≥2× Auto)", elem_id="review")
    c["ask"] = gr.Button("Ask", variant="primary", elem_id="ask")
    c["stop_ask"] = gr.Button("Stop asking", elem_id="stop_ask", variant="stop", size="sm", visible=False,
                              elem_classes=["appears-late"])


def _views(c: dict) -> None:
    c["card"] = gr.HTML("<div id='answer-card' data-empty='1'>Load a case and ask a question.</div>",
                        elem_id="card")
    with gr.Tab("Views"):
        with gr.Row():          # a narrow window puts the key under the view (one word a line beside it)
            with gr.Column(scale=3, min_width=320):
                c["model3d"] = gr.Model3D(label="3-D: anatomy and the kept blocks (anterior view)",
                                          height=430, clear_color=(*BACKGROUND, 1.0),
                                          camera_position=ANTERIOR_CAMERA, elem_id="model3d")
            with gr.Column(scale=1, min_width=220):
                c["legend"] = gr.HTML("", elem_id="legend_box", min_height=100)
        c["slices"] = gr.Image(label="Axial · coronal · sagittal (click to move the crosshair)",
                               type="filepath", interactive=False, elem_id="slices", buttons=["download"],
                               height=400)
        w, lv = WINDOWS[DEFAULT_WINDOW]
        with gr.Row():
            c["preset"] = gr.Dropdown([*WINDOWS, "Custom"], value=DEFAULT_WINDOW, label="Window",
                                      elem_id="preset", scale=1, min_width=120)
            c["width"] = gr.Slider(1, 4000, value=w, step=1, label="Width (HU)", elem_id="win_width",
                                   elem_classes=ENTER, scale=2)
            c["level"] = gr.Slider(-1350, 1500, value=lv, step=1, label="Level (HU)", elem_id="win_level",
                                   elem_classes=ENTER, scale=2)
            c["opacity"] = gr.Slider(0, 1, value=0.35, step=0.05, label="Overlay opacity", elem_id="opacity",
                                     elem_classes=ENTER, scale=1)
        with gr.Row():
            for key, name in (("pt_k", "axial"), ("pt_j", "coronal"), ("pt_i", "sagittal")):
                c[key] = gr.Slider(1, 2, value=1, step=1, label=f"{name.capitalize()} slice",
                                   elem_id=f"pt_{name}", elem_classes=ENTER,
                                   buttons=[])        # no ↺: it went to slice 1, not where the view opened
    with gr.Tab("Saliency"):
        c["hist"] = gr.Plot(label="ρ histogram")
        c["retention"] = gr.Plot(label="Per-structure retention", elem_id="retention")
    with gr.Tab("Compare"):
        c["compare"] = gr.Button("Compare Auto / 10% / 25% / 50% / Full", elem_id="compare")
        c["cmp_table"] = gr.HTML(elem_id="compare_table")
        c["cmp_plot"] = gr.Plot()
    with gr.Tab("Export"):
        c["export"] = gr.Button("Export audit (NIfTI mask + JSON + PNG)", elem_id="export")
        c["exp_files"] = gr.File(label="Files", file_count="multiple", elem_id="export_files")


def _wire(c: dict, demo: gr.Blocks, engine: Engine, store: FileStore) -> None:
    ins = lambda *names: [c[n] for n in names]  # noqa: E731
    budget_in = ins("session", "view", "question", "mode", "tokens", "percent", "theta", "width", "level",
                    "opacity")
    no_mode = [x for x in budget_in if x is not c["mode"]]
    slices_in = ins("session", "view", "width", "level", "opacity")
    answer_out = ["session", "card", "model3d", "legend", "slices", "pt_i", "pt_j", "pt_k", "hist",
                  "retention", "exp_files", "cmp_table", "cmp_plot"]
    sliders_out = ["tokens", "percent", "theta"]
    load_out = ["session", "view", "status", "pending", "card", "suggested", "question", "model3d", "legend",
                "slices", "pt_i", "pt_j", "pt_k", "preset", "width", "level", "hist", "retention",
                "cmp_table", "cmp_plot", "exp_files", "series", "prior_series"]

    fn, outs = wire(h.load_case, load_out, c, engine=engine, store=store)
    case_in = ins("case", "session", "view", "question")
    c["load_case"].click(fn, case_in, outs, api_name="ui_load_case", api_visibility=UI)
    demo.load(fn, case_in, outs, api_visibility=P)       # open on a sample case
    # "Stop loading" shows while an upload's load runs: before it (chained) and hidden after it
    show, stop = wire(h.show_stop, ["stop_load"], c)
    hide, _ = wire(h.hide_stop, ["stop_load"], c)
    fn, outs = wire(h.load_upload, load_out, c, engine=engine, store=store)
    upload_in = ins("files", "label_file", "label_table", "prior", "series", "session", "view",
                    "prior_series")
    c["load_upload"].click(show, None, stop, queue=False, api_visibility=P).then(
        fn, upload_in, outs, api_name="ui_load_upload", api_visibility=UI).then(
        hide, None, stop, queue=False, api_visibility=P)
    fn, outs = wire(h.pick_series, load_out, c, engine=engine, store=store)
    for picker in ("series", "prior_series"):
        c[picker].input(show, None, stop, queue=False, api_visibility=P).then(
            fn, upload_in, outs, api_visibility=P).then(hide, None, stop, queue=False, api_visibility=P)
    c["stop_load"].click(h.bind(h.stop_loading), None, None, queue=False, api_visibility=P)
    fields = ins("files", "label_file", "label_table", "prior", "session")
    fn, outs = wire(h.upload_changed, ["series", "pending"], c)
    c["files"].change(fn, fields, outs, api_visibility=P)
    fn, outs = wire(h.fields_changed, ["pending"], c)
    for comp in ("label_file", "label_table"):
        c[comp].change(fn, fields, outs, api_visibility=P)
    fn, outs = wire(h.prior_changed, ["prior_series", "pending"], c)
    c["prior"].change(fn, fields, outs, api_visibility=P)
    c["suggested"].input(lambda q: q or gr.skip(), c["suggested"], c["question"], api_visibility=P)

    # "Stop asking" is shown while an ask runs (chained before it, hidden after it); the page's style keeps
    # it invisible for its first second (a quick answer shows no button)
    show_ask, stop_ask = wire(h.show_ask_stop, ["stop_ask"], c)
    hide_ask, _ = wire(h.hide_ask_stop, ["stop_ask"], c)

    # A budget control's chain runs for every trigger ("multiple", on each step: Gradio applies a trigger
    # mode to each step of a chain, and a step still pending from the previous trigger made the default,
    # "once", drop the next one — "always_last" held it until the page's next event). A click into a
    # slider's number box releases it before the typed value's release: that value was then not asked
    # for, 1 try in 4 in Chromium. Each ask runs as asked; the page's newest is the one shown
    # (`handlers._outdated`), and a release that changes nothing asks nothing (`handlers.reask`).
    def stoppable(trigger, fn, inputs, outputs, trigger_mode=None, **kw):
        mode = {"trigger_mode": trigger_mode} if trigger_mode else {}
        first = trigger(show_ask, None, stop_ask, queue=False, api_visibility=P, **mode)
        first.then(fn, inputs, outputs, **mode, **kw).then(hide_ask, None, stop_ask, queue=False,
                                                          api_visibility=P, **mode)

    fn, outs = wire(h.ask, answer_out + sliders_out, c, engine=engine)
    stoppable(c["ask"].click, fn, budget_in, outs, api_name="ui_ask", api_visibility=UI)
    stoppable(c["question"].submit, fn, budget_in, outs, api_visibility=P)
    fn, outs = wire(h.reask, answer_out + sliders_out, c, engine=engine)
    for slider in sliders_out:
        stoppable(c[slider].release, fn, budget_in, outs, trigger_mode=EVERY, api_visibility=P)
    fn, outs = wire(h.mode_changed, answer_out + sliders_out, c, engine=engine)
    stoppable(c["mode"].input, fn, budget_in, outs, trigger_mode=EVERY, api_visibility=P)
    fn, outs = wire(h.triage, answer_out + ["mode", *sliders_out], c, engine=engine)
    stoppable(c["triage"].click, fn, no_mode, outs, api_visibility=P)
    fn, outs = wire(h.review, answer_out + ["mode", *sliders_out], c, engine=engine)
    stoppable(c["review"].click, fn, no_mode, outs, api_visibility=P)
    c["stop_ask"].click(h.bind(h.stop_asking), None, None, queue=False, api_visibility=P)

    fn, outs = wire(h.redraw_slices, ["slices"], c)
    c["opacity"].release(fn, slices_in, outs, trigger_mode=LAST, api_visibility=P)
    fn, outs = wire(h.set_preset, ["width", "level", "slices"], c)
    c["preset"].input(fn, ins("session", "view", "preset", "opacity"), outs, api_visibility=P)
    fn, outs = wire(h.set_window, ["preset", "slices"], c)
    for comp in ("width", "level"):
        c[comp].release(fn, slices_in, outs, trigger_mode=LAST, api_visibility=P)
    fn, outs = wire(h.move_point, ["slices"], c)
    point_in = ins("session", "view", "pt_i", "pt_j", "pt_k", "width", "level", "opacity")
    for comp in ("pt_i", "pt_j", "pt_k"):
        c[comp].release(fn, point_in, outs, trigger_mode=LAST, api_visibility=P)
    fn, outs = wire(h.click_slices, ["slices", "pt_i", "pt_j", "pt_k"], c)
    c["slices"].select(fn, slices_in, outs, trigger_mode=LAST, api_visibility=P)

    fn, outs = wire(h.compare, ["cmp_table", "cmp_plot"], c, engine=engine)
    stoppable(c["compare"].click, fn, ins("session", "question"), outs, api_visibility=P)
    fn, outs = wire(h.export, ["exp_files"], c, engine=engine)
    c["export"].click(fn, slices_in, outs, api_visibility=P)
    demo.load(None, js=JS)
    demo.unload(h.bind(h.session_ended, store=store))
