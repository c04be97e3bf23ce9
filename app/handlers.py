"""The Gradio Blocks: layout and event wiring. The work happens in `service.Engine`."""
from __future__ import annotations

import html
import logging
import traceback
from pathlib import Path

import gradio as gr
import numpy as np

from photon_core.model.budget import Budget
from photon_core.io.volume import VolumeError
from viz.charts import kept_vs_budget, retention_bars, saliency_histogram
from viz.scene import render_png, scene_glb, token_blocks
from viz.slices import WINDOWS, slice_rgb

from .service import Engine, Session, cases

log = logging.getLogger("photon_ct")
MODES = ["Auto", "Tokens", "Percent", "Threshold", "Full"]
COMPARE = [("Auto", Budget("auto")), ("10%", Budget("ratio", 0.10)), ("25%", Budget("ratio", 0.25)),
           ("50%", Budget("ratio", 0.50)), ("Full", Budget("full"))]


def budget_from(mode: str, value: float) -> Budget:
    if mode == "Auto":
        return Budget("auto")
    if mode == "Full":
        return Budget("full")
    if mode == "Tokens":
        return Budget("top_k", float(int(round(value))))
    if mode == "Percent":
        return Budget("ratio", float(value) / 100)
    if mode == "Threshold":
        return Budget("threshold", float(value))
    raise gr.Error(f"Unknown budget mode {mode!r}.")


def slider_for(mode: str, kept: int | None = None, total: int = 1000):
    if mode == "Tokens":
        return gr.update(minimum=0, maximum=total, step=10, value=kept or 390, label="Tokens to keep", interactive=True)
    if mode == "Percent":
        return gr.update(minimum=0, maximum=100, step=1, value=25, label="Percent of visual tokens", interactive=True)
    if mode == "Threshold":
        return gr.update(minimum=0, maximum=1, step=0.01, value=0.5, label="Threshold θ on ρ", interactive=True)
    return gr.update(label="(the model decides)" if mode == "Auto" else f"(all {total:,} tokens)", interactive=False)


def _guard(fn):
    """Every handler: a readable message for the user, a log line for us, and the server goes on."""
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (VolumeError, ValueError) as e:
            raise gr.Error(str(e)) from None
        except MemoryError:
            raise gr.Error("The server ran out of memory for this request; try a smaller scan.") from None
        except Exception as e:  # noqa: BLE001 - the UI must survive anything
            if type(e).__name__ == "OutOfMemoryError":
                import torch

                torch.cuda.empty_cache()
                raise gr.Error("The GPU ran out of memory for this request; memory was freed, please retry "
                               "with a lower budget.") from None
            log.error("unexpected error in %s: %s\n%s", fn.__name__, type(e).__name__, traceback.format_exc())
            raise gr.Error(f"Something went wrong ({type(e).__name__}); the app is still running.") from None
    wrapped.__name__ = fn.__name__
    return wrapped


CACHE_MAX_AGE_S = 6 * 3600          # served files older than this are deleted (hourly sweep)


def build_ui(engine: Engine) -> gr.Blocks:
    from viz.scene import warm_up

    warm_up()
    titles = [c["title"] for c in cases()]

    # ---------------------------------------------------------------- renderers
    def render_slices(s: Session, view, position, window_name, opacity):
        if s is None or s.hu_ras is None:
            return None
        overlay = None
        if s.answer is not None:
            keep = np.concatenate([s.answer.keep_grid.ravel(), [False]])
            overlay = keep[s.token_ras]
        return slice_rgb(s.hu_ras, s.spacing_ras, view.lower(), position, window_name, overlay, opacity)

    def render_answer(s: Session, ans):
        blocks = token_blocks(s.corners, ans.keep_grid.ravel(), ans.rho.ravel())
        glb = Path(s.workdir) / f"scene_{abs(hash((ans.budget, ans.kept, s.question))) % 10**8}.glb"
        glb.write_bytes(scene_glb(s.surfaces, blocks))
        png = render_png(s.surfaces, blocks, size=(560, 420))
        (Path(s.workdir) / "view3d.png").write_bytes(png)
        warning = engine.warning(s, s.question, ans)
        ret = engine.retention(s, ans)
        asked = next(iter([n for n in ret if n in (warning or "")] or [None]))
        card = answer_card(ans, engine.model_name, warning)
        return card, str(glb), str(Path(s.workdir) / "view3d.png"), saliency_histogram(ans.rho, ans.theta, ans.keep_grid), \
            (retention_bars(ret, asked) if ret else None)

    # ---------------------------------------------------------------- handlers
    @_guard
    def on_load_case(title, old, progress=gr.Progress()):
        if old is not None:
            old.cleanup()
        s = engine.load_case(title, progress)
        c = next(c for c in cases() if c["title"] == s.title)
        progress(0.95, desc="Rendering slices")
        return (s, status_md(s), gr.update(choices=c["questions"], value=None), c["questions"][0],
                render_slices(s, "Axial", 0.5, "Soft tissue", 0.35), None, None, None, None, None, "", None)

    @_guard
    def on_upload(files, label_file, prior_file, old, progress=gr.Progress()):
        paths = [str(f) for f in (files or [])]                 # gr.File gives file paths
        s = engine.load_upload(paths, str(label_file) if label_file else None, progress,
                               prior_file=str(prior_file) if prior_file else None)
        if old is not None:
            old.cleanup()
        return (s, status_md(s), gr.update(choices=[], value=None), "",
                render_slices(s, "Axial", 0.5, "Soft tissue", 0.35), None, None, None, None, None, "", None)

    @_guard
    def on_ask(s, question, mode, value, view, position, window_name, opacity, progress=gr.Progress()):
        progress(0.1, desc="Asking Photon")
        ans = engine.ask(s, question, budget_from(mode, value))
        progress(0.7, desc="Rendering the audit")
        card, glb, png, hist, ret = render_answer(s, ans)
        return s, card, glb, png, render_slices(s, view, position, window_name, opacity), hist, ret

    @_guard
    def on_review(s, question, view, position, window_name, opacity):
        auto = engine.ask(s, question, Budget("auto"))
        k = int(min(auto.total, max(2 * auto.kept, 100)))
        ans = engine.ask(s, question, Budget("top_k", float(k)))
        card, glb, png, hist, ret = render_answer(s, ans)
        return (s, card, glb, png, render_slices(s, view, position, window_name, opacity), hist, ret,
                gr.update(value="Tokens"), slider_for("Tokens", k, ans.total))

    @_guard
    def on_compare(s, question, progress=gr.Progress()):
        progress(0.1, desc="Asking at Auto, 10%, 25%, 50% and Full (one batch)")
        compare = [(n, b) for n, b in COMPARE if engine.supports(b)]     # an S1 checkpoint has no Auto
        answers = engine.compare(s, question, [b for _, b in compare])
        full = answers[-1].text
        rows = [dict(budget=n, kept=a.kept, answer=a.text, latency_ms=round(1000 * (a.prefill_s + a.decode_s)))
                for (n, _), a in zip(compare, answers)]
        body = "".join(
            f"<tr{' class=diff' if r['answer'] != full else ''}><td>{r['budget']}</td><td>{r['kept']}</td>"
            f"<td>{html.escape(r['answer'])}{' ⚠ differs from Full' if r['answer'] != full else ''}</td>"
            f"<td>{r['latency_ms']} ms (batch)</td></tr>" for r in rows)
        table = ("<table class='cmp'><tr><th>budget</th><th>kept tokens</th><th>answer</th><th>latency</th></tr>"
                 f"{body}</table><style>.cmp tr.diff td{{background:#ffe4c4}} .cmp td,.cmp th{{padding:4px 10px}}</style>")
        return table, kept_vs_budget(rows)

    @_guard
    def on_export(s, view, position, window_name, opacity):
        from PIL import Image
        import io

        pngs = {}
        img = render_slices(s, view, position, window_name, opacity)
        if img is not None:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            pngs[f"slice_{view}"] = buf.getvalue()
        if s is not None and s.answer is not None:   # the 3-D view of the answer being exported
            blocks = token_blocks(s.corners, s.answer.keep_grid.ravel(), s.answer.rho.ravel())
            pngs["view3d"] = render_png(s.surfaces, blocks, size=(800, 600))
        return [str(p) for p in engine.export(s, pngs)]

    def on_budget_change(s, question, mode, value, view, position, window_name, opacity):
        """Slider/mode moved: re-ask only when there is something to re-ask."""
        if s is None or s.answer is None or not (question or "").strip():
            return tuple(gr.skip() for _ in range(7))
        return on_ask(s, question, mode, value, view, position, window_name, opacity)

    def on_mode_change(s, question, mode, view, position, window_name, opacity):
        """A new mode: set the slider to that mode's default and re-ask under it."""
        kept = s.answer.kept if s is not None and s.answer is not None else None
        upd = slider_for(mode, kept, 2000 if s is not None and s.prior is not None else 1000)
        default = upd.get("value", 0)
        return (*on_budget_change(s, question, mode, default, view, position, window_name, opacity), upd)

    # ---------------------------------------------------------------- layout
    # Gradio copies every file it serves (3-D scenes, slices, exports) into its cache; without a
    # limit a long-running app fills the disk. Hourly, files older than CACHE_MAX_AGE_S go; the
    # cache of this app is removed when it shuts down.
    with gr.Blocks(title="Photon CT", analytics_enabled=False, delete_cache=(3600, CACHE_MAX_AGE_S)) as demo:
        state = gr.State(None, delete_callback=lambda s: s.cleanup() if s is not None else None)
        gr.Markdown("## Photon CT — ask a CT scan, audit what the model kept\n"
                    f"<small>Model: {html.escape(Path(engine.settings.model_dir).name if engine.settings.model_dir else 'embedded demo model')} · "
                    "research software, not for clinical use</small>")
        with gr.Row():
            with gr.Column(scale=4, min_width=330):
                with gr.Tab("Sample case"):
                    case = gr.Dropdown(titles, value=titles[0], label="Sample case", elem_id="case")
                    load_btn = gr.Button("Load case", elem_id="load_case")
                with gr.Tab("Upload"):
                    files = gr.File(label="CT: NIfTI / NRRD file, or the files / .zip of a DICOM series",
                                    file_count="multiple", elem_id="upload")
                    labels_file = gr.File(label="Optional label map (NIfTI, same grid)", file_count="single")
                    prior_file = gr.File(label="Optional prior scan of the same patient, for questions about "
                                               "change (NIfTI / NRRD, or a DICOM .zip)", file_count="single",
                                         elem_id="prior_upload")
                    upload_btn = gr.Button("Load upload", elem_id="load_upload")
                status = gr.Markdown("No scan loaded.", elem_id="status")
                suggested = gr.Dropdown([], label="Suggested questions", elem_id="suggested")
                question = gr.Textbox(label="Question", lines=2, elem_id="question",
                                      placeholder="e.g. Is there a lesion in the liver?")
                modes, modes_note = engine.budget_modes()
                mode = gr.Radio(modes, value=modes[0][1], label="Keep budget", elem_id="mode",
                                info=modes_note or None)
                value = gr.Slider(0, 1000, value=390, step=10, label="(the model decides)", interactive=False,
                                  elem_id="budget")
                with gr.Row():
                    triage = gr.Button("Triage (Auto)", elem_id="triage")
                    review = gr.Button("Review (≥2× Auto)", elem_id="review")
                ask_btn = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column(scale=7):
                card = gr.HTML("<i>Load a case and ask a question.</i>", elem_id="card")
                with gr.Tab("3D"):
                    model3d = gr.Model3D(label="Kept token blocks over the anatomy (colour = saliency ρ)",
                                         clear_color=(1, 1, 1, 1), height=420, elem_id="model3d")
                    png3d = gr.Image(label="Static render", type="filepath", height=300, elem_id="png3d")
                with gr.Tab("Slices"):
                    with gr.Row():
                        view = gr.Radio(["Axial", "Coronal", "Sagittal"], value="Axial", label="View")
                        window_name = gr.Dropdown(list(WINDOWS), value="Soft tissue", label="Window")
                    with gr.Row():
                        position = gr.Slider(0, 1, value=0.5, step=0.01, label="Slice position")
                        opacity = gr.Slider(0, 1, value=0.35, step=0.05, label="Overlay opacity")
                    slice_img = gr.Image(label="Original scan with kept blocks", type="numpy", elem_id="slice")
                with gr.Tab("Saliency"):
                    hist = gr.Plot(label="ρ histogram")
                    ret = gr.Plot(label="Per-organ retention")
                with gr.Tab("Compare"):
                    cmp_btn = gr.Button("Compare Auto / 10% / 25% / 50% / Full", elem_id="compare")
                    cmp_table = gr.HTML(elem_id="compare_table")
                    cmp_plot = gr.Plot()
                with gr.Tab("Export"):
                    exp_btn = gr.Button("Export audit (NIfTI mask + JSON + PNG)", elem_id="export")
                    exp_files = gr.File(label="Files", file_count="multiple", elem_id="export_files")

        slice_inputs = [view, position, window_name, opacity]
        answer_outputs = [state, card, model3d, png3d, slice_img, hist, ret]
        load_outputs = [state, status, suggested, question, slice_img, model3d, png3d, hist, ret, cmp_plot, cmp_table,
                        exp_files]                     # a new scan clears the previous scan's export
        load_btn.click(on_load_case, [case, state], load_outputs)
        demo.load(on_load_case, [case, state], load_outputs)          # open on the first sample case
        upload_btn.click(on_upload, [files, labels_file, prior_file, state], load_outputs)
        suggested.change(lambda q: q or gr.update(), suggested, question)
        mode.input(on_mode_change, [state, question, mode, *slice_inputs], answer_outputs + [value],
                   trigger_mode="always_last")
        ask_btn.click(on_ask, [state, question, mode, value, *slice_inputs], answer_outputs)
        question.submit(on_ask, [state, question, mode, value, *slice_inputs], answer_outputs)
        value.release(on_budget_change, [state, question, mode, value, *slice_inputs], answer_outputs,
                      trigger_mode="always_last")
        triage.click(lambda: (gr.update(value="Auto"), slider_for("Auto")), None, [mode, value]).then(
            on_ask, [state, question, gr.State("Auto"), value, *slice_inputs], answer_outputs)
        review.click(on_review, [state, question, *slice_inputs], answer_outputs + [mode, value])
        for comp in slice_inputs:
            comp.change(_guard(render_slices), [state, *slice_inputs], slice_img, trigger_mode="always_last")
        cmp_btn.click(on_compare, [state, question], [cmp_table, cmp_plot])
        exp_btn.click(on_export, [state, *slice_inputs], exp_files)
    return demo


def status_md(s: Session) -> str:
    v = s.volume
    organs = f" · label map: {len(s.blocks)} organs" if s.blocks else ""
    prior = f"<br>Prior scan (asked together, first): {html.escape(s.prior.summary())}" if s.prior is not None else ""
    return f"**{html.escape(s.title)}** — {html.escape(v.summary())}{organs}{prior}"


def answer_card(ans, model_name: str, warning: str) -> str:
    warn = (f"<div id='retention-warning' style='background:#fde2e1;border-left:4px solid #d62728;padding:6px;"
            f"margin-top:6px'>⚠ Retention warning: {html.escape(warning)}. Small lesions and rare anatomy are "
            f"Photon's known failure cases; check the slices before trusting this answer.</div>") if warning else ""
    split = (f"<div id='prior-count'>prior scan {ans.prior_kept} / {ans.prior_total} · current scan "
             f"{ans.kept - ans.prior_kept} / {ans.total - ans.prior_total} (the views show the current scan)</div>"
             if ans.prior_total else "")
    return (f"<div id='answer-card' style='border:1px solid #ccc;border-radius:6px;padding:10px'>"
            f"<div style='font-size:1.3em'><b>Answer:</b> <span id='answer-text'>{html.escape(ans.text) or '(empty)'}</span></div>"
            f"<div id='token-count'>Visual tokens kept: <b>{ans.kept}</b> / {ans.total} ({100 * ans.keep_fraction:.1f}%)"
            f" · budget <b>{html.escape(ans.budget)}</b> · "
            f"{f'θ = {ans.theta:.3f}' if np.isfinite(ans.theta) else 'no θ (S1 checkpoint)'}</div>{split}"
            f"<div>Latency: prefill {1000 * ans.prefill_s:.0f} ms · decode {1000 * ans.decode_s:.0f} ms "
            f"({ans.generated_tokens} tokens) · device {html.escape(ans.device)}</div>"
            f"<div style='color:#666'>Model: {html.escape(model_name)}</div>{warn}</div>")
