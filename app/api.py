"""The integrators' API: named endpoints that take a scan (a file, a DICOM study's files or .zip, or a
sample id), a question and a budget, and return JSON — no browser session state involved.

    /ask      (question, scan, sample, budget, label_map, label_table, prior, series, prior_series) -> JSON
    /compare  (question, scan, sample, label_map, label_table, prior, series, prior_series) -> JSON rows
    /export   (same as /ask)        -> [kept_blocks.nii.gz, report.json], JSON answer (the PNG views
                                       come with the page's Export, which renders them)

``budget``: auto | full | 300 (tokens) | 25% | top_k:300 | ratio:0.25 | threshold:0.4; left empty, the
checkpoint's default (auto on S2, full on S1, as photon-ask). The JSON holds
the answer (None when it does not parse for its question; the raw text always), its probability,
kept/total, the kept token indices (and how many lie wholly outside the scan), θ, per-structure
retention, the structures the question names, warnings (the loader's, a low retention of the asked
structure, label-name notes) and the checkpoint's provenance. Errors come back as the client's error
with a readable message.
"""
from __future__ import annotations

import gradio as gr
import numpy as np

from photon_core.inference.prompt import clean_question
from photon_core.model.budget import Budget

from .handlers import _key, asking, bind, message, watched
from .service import Audit, Engine, Session, cases, prior_description
from .view import FileStore


def _session(engine: Engine, scan, sample, label_map, label_table, prior, series,
             prior_series=None) -> Session:
    files = [str(f) for f in scan] if isinstance(scan, (list, tuple)) else ([str(scan)] if scan else [])
    opt = lambda f: str(f) if f else None  # noqa: E731
    if files:                                 # watched: stops at its next step once the client is gone
        return engine.load_upload(files, opt(label_map), watched(), prior_file=opt(prior),
                                  label_table=opt(label_table), series=series or None,
                                  prior_series=prior_series or None)
    if sample:
        if label_map or prior or series or prior_series:
            raise ValueError("A sample case carries its own label map, has no prior scan and no series to "
                             "choose; give a scan file to add them.")
        return engine.load_case(str(sample), watched())
    raise ValueError(f"Give a scan file (NIfTI, NRRD, DICOM files or .zip) or a sample id "
                     f"({', '.join(c['id'] for c in cases())}).")


def _budget(engine: Engine, text) -> Budget:
    """The budget asked for; none: the checkpoint's default (auto on S2, full on S1, which has no θ)."""
    return Budget.parse(text) if text and str(text).strip() else engine.predictor.default_budget


def result(engine: Engine, s: Session, ans, audit: Audit) -> dict:
    """The JSON of one answer."""
    warnings = list(s.warnings)
    if audit.warning:
        warnings.append(f"retention: {audit.warning}")
    if s.label_note:
        warnings.append(f"label names: {s.label_note}")
    if not audit.readable:
        warnings.append("the answer does not parse for its question type (see raw_text)")
    out = {
        "scan": _scan(s),
        "question": s.question, "answer": ans.text if audit.readable else None, "readable": audit.readable,
        "raw_text": ans.text, "probability": audit.probability, "budget": ans.budget,
        "kept": ans.kept, "total": ans.total, "keep_fraction": round(ans.keep_fraction, 4),
        "kept_token_indices": list(ans.kept_indices), "kept_tokens_outside_scan": audit.outside,
        "theta": round(float(ans.theta), 4) if np.isfinite(ans.theta) else None,
        "per_organ_retention": {k: round(v, 4) for k, v in audit.retention.items()},
        "asked_structures": list(audit.asked), "counted_by_any_overlap": list(audit.small),
        "warnings": warnings, "checkpoint": engine.provenance(), "device": ans.device,
        "latency_s": {"prefill": round(ans.prefill_s, 4), "decode": round(ans.decode_s, 4)},
        "token_grid": "10x10x10 over the (140, 280, 280) model volume; index = a*100 + b*10 + c",
    }
    if ans.prior_total:
        out["prior_scan"] = {**_prior(s), "total": ans.prior_total, "kept": ans.prior_kept}
    return out


def _scan(s: Session) -> dict:
    return {"title": s.title, "summary": s.volume.summary(), "series": s.series_uid,
            "series_found": _series_found(s.series)}


def _prior(s: Session) -> dict:
    return {"scan": prior_description(s.prior), "series": s.prior_series_uid,
            "series_found": _series_found(s.prior_series)}


def _series_found(listed: list) -> list[dict]:
    """The series of an upload holding several, each with the id that ``series`` / ``prior_series`` take
    (an opaque key, not the DICOM UID) and its label (description, slices, kernel)."""
    return [{"series": x.uid, "label": x.label} for x in listed]


def _fail(e: BaseException, where: str):
    """The client's error, in words; no traceback in the server log (``message`` logs an unexpected
    error in full, a refused request is not the server's failure)."""
    raise gr.Error(message(e, where), print_exception=False) from None


def ask(question: str, scan: list[str] | None = None, sample: str | None = None, budget: str | None = None,
        label_map: str | None = None, label_table: str | None = None, prior: str | None = None,
        series: str | None = None, prior_series: str | None = None, *, engine: Engine) -> dict:
    """Ask a question about a scan under a keep budget; the answer and its audit as JSON."""
    try:
        s = _session(engine, scan, sample, label_map, label_table, prior, series, prior_series)
        ans, audit = engine.answer(s, question, _budget(engine, budget), tick=asking())
        return result(engine, s, ans, audit)
    except Exception as e:  # noqa: BLE001
        _fail(e, "api ask")


def compare(question: str, scan: list[str] | None = None, sample: str | None = None,
            label_map: str | None = None, label_table: str | None = None, prior: str | None = None,
            series: str | None = None, prior_series: str | None = None, *, engine: Engine) -> dict:
    """The question at Auto / 10% / 25% / 50% / Full in one batch; which answers differ from Full."""
    try:
        s = _session(engine, scan, sample, label_map, label_table, prior, series, prior_series)
        rows = engine.compare_rows(s, question, asking())
        question = clean_question(question)
        for r in rows:
            r["raw_text"] = r["answer"]
            if not r["readable"]:
                r["answer"] = None
        out = {"scan": _scan(s), "question": question,
               "rows": rows, "warnings": list(s.warnings), "checkpoint": engine.provenance()}
        if s.prior is not None:
            out["prior_scan"] = _prior(s)
        return out
    except Exception as e:  # noqa: BLE001
        _fail(e, "api compare")


def export(question: str, scan: list[str] | None = None, sample: str | None = None, budget: str | None = None,
           label_map: str | None = None, label_table: str | None = None, prior: str | None = None,
           series: str | None = None, prior_series: str | None = None, request: gr.Request = None, *,
           engine: Engine, store: FileStore):
    """As /ask, plus the audit files: the kept blocks on the scan's own grid (NIfTI) and report.json.
    Each client session keeps only its latest export."""
    try:
        s = _session(engine, scan, sample, label_map, label_table, prior, series, prior_series)
        ans, audit = engine.answer(s, question, _budget(engine, budget), tick=asking())
        folder = store.session(f"api-{_key(request)}").new_folder("export")
        files = engine.export(s, {}, folder)
        return [str(p) for p in files], result(engine, s, ans, audit)
    except Exception as e:  # noqa: BLE001
        _fail(e, "api export")


def register(engine: Engine, store: FileStore) -> None:
    """The endpoints, on hidden components of the Blocks being built."""
    with gr.Column(visible=False):
        scan = gr.File(file_count="multiple", label="scan")
        sample = gr.Textbox(label="sample")
        question = gr.Textbox(label="question")
        budget = gr.Textbox(value="", label="budget")      # empty: the checkpoint's default
        label_map = gr.File(label="label_map")
        label_table = gr.File(label="label_table")
        prior = gr.File(label="prior")
        series = gr.Textbox(label="series")
        prior_series = gr.Textbox(label="prior_series")
        answer = gr.JSON(label="result")
        files = gr.File(file_count="multiple", label="files")
        ask_btn, cmp_btn, exp_btn = gr.Button("ask"), gr.Button("compare"), gr.Button("export")
    with_budget = [question, scan, sample, budget, label_map, label_table, prior, series, prior_series]
    ask_btn.click(bind(ask, engine=engine), with_budget, answer, api_name="ask")
    cmp_btn.click(bind(compare, engine=engine),
                  [question, scan, sample, label_map, label_table, prior, series, prior_series], answer,
                  api_name="compare")
    exp_btn.click(bind(export, engine=engine, store=store), with_budget, [files, answer],
                  api_name="export")
