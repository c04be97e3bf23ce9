"""The app's HTML, as plain functions of the session and the answer (no Gradio): the status line, the
answer card, the 3-D view's legend and the Compare table. Every value from a user or a model is escaped."""
from __future__ import annotations

import html

import numpy as np

from photon_core.model.budget import Budget, describe, floor_note, is_baseline
from viz.scene import AXIS_COLOURS, HIGHLIGHT, rho_bins

from .service import Audit, Session, prior_description

_BOX = "border:1px solid #ccc;border-radius:6px;padding:10px;overflow-wrap:anywhere"   # a long word wraps
_WARN = "background:#fff4e0;border-left:4px solid #e08a00;padding:6px;margin-top:6px"
_ERROR = "background:#fde2e1;border-left:4px solid #d62728;padding:6px;margin-top:6px"
_MUTED = "color:#666"


def esc(x) -> str:
    return html.escape(str(x))


def names(xs) -> str:
    """Structure names as words: 'kidney_left, liver' → 'kidney left, liver' (escaped)."""
    return esc(", ".join(n.replace("_", " ") for n in xs))


def _rgb(c) -> str:
    return "rgb({},{},{})".format(*(int(255 * v) for v in c[:3]))


def status_html(s: Session | None, error: str | None = None, failed_name: str | None = None,
                stopped: bool = False) -> str:
    """The scan now active, what the loader and the label map say about it, and a failed load's reason;
    ``stopped``: the failed load was stopped by the user ("Stop loading"), not refused."""
    parts = []
    if error:
        what = f" {esc(failed_name)}" if failed_name else ""
        still = (f" The previous scan is still active: <b>{esc(s.title)}</b>; questions are asked about it."
                 if s is not None and s.volume is not None else " No scan is loaded.")
        head = f"Stopped loading{what} at your request." if stopped else f"Could not load{what}: {esc(error)}"
        parts.append(f"<div id='load-error' style='{_ERROR}'>{head}{still}</div>")
    if s is None or s.volume is None:
        return "".join(parts) or "<div id='scan-status'>No scan loaded.</div>"
    body = f"<b id='scan-title'>{esc(s.title)}</b> — {esc(s.volume.summary())}"
    if s.blocks:
        body += f" · label map: {len(s.blocks)} structure{'s' * (len(s.blocks) != 1)}"
    if s.label_note:
        body += f"<div id='label-note' style='{_MUTED}'>Label names: {esc(s.label_note)}</div>"
    if s.small_structures:
        n = len(s.small_structures)
        body += (f"<details id='small-structures' style='{_MUTED}'><summary>{n} "
                 f"structure{'s' if n > 1 else ''} smaller than a token block: counted by any "
                 f"overlap</summary>"
                 f"{names(s.small_structures)}</details>")
    if s.prior is not None:
        prior = esc(prior_description(s.prior))
        body += f"<div id='prior-status'>Prior scan (asked together, first): {prior}</div>"
    if s.series:
        body += (f"<div id='series-note' style='{_MUTED}'>The upload holds {len(s.series)} series; choose "
                 f"one under “Series” (default: the axial CT series with most slices).</div>")
    if s.prior is not None and s.prior_series:
        body += (f"<div id='prior-series-note' style='{_MUTED}'>The prior's upload holds "
                 f"{len(s.prior_series)} series; choose one under “Prior series” (default: the axial CT "
                 f"series with most slices).</div>")
    if s.warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in s.warnings)
        body += (f"<div id='load-warnings' style='{_WARN}'>⚠ Check before reading answers:"
                 f"<ul style='margin:2px 0'>{items}</ul></div>")
    parts.append(f"<div id='scan-status' data-load='{s.serial}'>{body}</div>")
    return "".join(parts)


def pending_html(s: Session) -> str:
    """The Upload tab's files differ from the scan loaded: what questions are asked about until "Load
    upload"."""
    prior = ", with its prior scan" if s.prior is not None else ", without a prior scan"
    return (f"<div id='pending-note' style='{_WARN}'>The Upload tab's files changed: they are used when you "
            f"press “Load upload”. Until then questions are asked about {esc(s.title)}{prior}.</div>")


def empty_card(s: Session | None) -> str:
    what = f" about <b>{esc(s.title)}</b>" if s is not None and s.volume is not None else ""
    return f"<div id='answer-card' data-empty='1' style='{_BOX};{_MUTED}'>Ask a question{what}.</div>"


def _provenance(info: dict) -> str:
    text = esc(info.get("label") or info.get("name", ""))      # e.g. 'Org/Photon-S2 / 3D-RAD @ main (S2)'
    notice = f" — {esc(info['notice'])}" if info.get("notice") else ""
    return f"<div id='provenance' style='{_MUTED}'>Model: {text}{notice}</div>"


def answer_card(s: Session, ans, audit: Audit | None, provenance: dict, timing: dict | None = None,
                notice: str | None = None) -> str:
    """The answer, what it belongs to (question, scan), how sure and how lean it was, and its warnings."""
    audit = audit or Audit({}, (), {}, "", (), True, None)
    note = (f"<div id='card-notice' style='{_ERROR}'>Not asked: {esc(notice)} Shown: the previous "
            f"answer.</div>" if notice else "")
    if audit.readable:
        answer = f"<span id='answer-text'>{esc(ans.text) or '(empty)'}</span>"
    else:
        answer = (f"<span id='unreadable' style='color:#b00'>unreadable answer</span> <span style='{_MUTED}'>"
                  f"(the model's text: <code id='answer-text'>{esc(ans.text) or '(empty)'}</code>)</span>")
    prob = ("—" if audit.probability is None else f"{100 * audit.probability:.0f}%")
    budget = budget_words(ans)
    split = (f"<div id='prior-count'>prior scan {ans.prior_kept} / {ans.prior_total} · current scan "
             f"{ans.kept - ans.prior_kept} / {ans.total - ans.prior_total} (the views show the current "
             f"scan)</div>" if ans.prior_total else "")
    t = timing or {}
    model_ms = 1000 * (ans.prefill_s + ans.decode_s)
    lat = (f"model {model_ms:.0f} ms (prefill {1000 * ans.prefill_s:.0f} · decode "
           f"{1000 * ans.decode_s:.0f}, {ans.generated_tokens} tokens)")
    if "views_ms" in t:
        lat += f" · views {t['views_ms']:.0f} ms · server total {t['total_ms']:.0f} ms"
    warn = ""
    if audit.warning:
        warn += (f"<div id='retention-warning' style='{_ERROR}'>⚠ Retention warning: {esc(audit.warning)}. "
                 f"Small lesions and rare anatomy are Photon's known failure cases; check the slices before "
                 f"trusting this answer.</div>")
    if audit.untrained:
        warn += (f"<div id='untrained-note' style='{_WARN}'>⚠ The demo model was trained only on English "
                 f"questions of a few kinds (is there…, which organ, which side, how many, how large, a "
                 f"choice of two); this question is none of them, so its answer means nothing.</div>")
    small_asked = [n for n in audit.asked if n in audit.small]
    if small_asked:
        warn += (f"<div id='small-note' style='{_WARN}'>{names(small_asked)}: smaller than a token block, so "
                 f"its retention counts every block it touches (any overlap).</div>")
    if audit.unlabelled:
        what = ", ".join(audit.unlabelled)
        warn += (f"<div id='unlabelled-note' style='{_WARN}'>{esc(what)}: not in this scan's label map, so "
                 f"whether the answer kept {'it' if len(audit.unlabelled) == 1 else 'them'} cannot be "
                 f"checked (no retention figure, no outline); read the slices.</div>")
    if s.warnings:                  # the load's warnings beside every answer (the status may be off-screen)
        items = "".join(f"<li>{esc(w)}</li>" for w in s.warnings)
        warn += (f"<details id='card-scan-warnings' style='{_WARN}'><summary>⚠ This scan was loaded with "
                 f"{len(s.warnings)} warning{'s' * (len(s.warnings) != 1)}: check before reading the answer"
                 f"</summary><ul style='margin:2px 0'>{items}</ul></details>")
    asked = f" · asked structure: {names(audit.asked)}" if audit.asked else ""
    return (f"<div id='answer-card' style='{_BOX}'>{note}"
            f"<div id='card-question' style='{_MUTED}'>Q: {esc(s.question)} — on <b>{esc(s.title)}</b>"
            f"{asked}</div><div style='font-size:1.3em'><b>Answer:</b> {answer} <span id='probability' "
            f"style='font-size:0.75em;{_MUTED}' title='exp(mean token log-probability)'>probability {prob}"
            f"</span></div><div id='token-count'>Visual tokens kept: <b>{ans.kept}</b> / {ans.total} "
            f"({100 * ans.keep_fraction:.1f}%) · budget {budget}</div>{split}{_outside(audit.outside)}"
            f"<div id='latency'>{lat} · device {esc(ans.device)}</div>{_provenance(provenance)}{warn}</div>")


def _outside(n: int) -> str:
    """Kept tokens the slices cannot show: the scan is smaller than the model's field, padded around."""
    if not n:
        return ""
    lie = "lie" if n > 1 else "lies"
    return (f"<div id='outside-note' style='{_MUTED}'>{n} of the kept tokens {lie} wholly in the padding "
            f"around this scan (smaller than the model's field): the 3-D view draws them beside the anatomy; "
            f"the slices and the exported mask cannot show them.</div>")


def budget_words(ans) -> str:
    """The budget an answer was made under, where it cut the saliency ρ, and the model's own θ when the
    budget did not use it (HTML)."""
    b = Budget.parse(ans.budget)
    cut = ans.cut
    text = f"<b id='budget-words'>{esc(describe(b))}</b>"
    if b.mode == "auto":
        return text + (f" · θ = {ans.theta:.3f}" if cut is not None else " · no θ (S1 checkpoint)")
    if is_baseline(b):
        text += " (chosen by the baseline's rule, not by ρ)"
    elif note := floor_note(b, cut):
        text += f"{note} (cut at ρ = {cut:.3f})"
    elif cut is not None and b.mode != "threshold":
        text += f", the most salient (cut at ρ = {cut:.3f})"
    if np.isfinite(ans.theta):
        text += f" · Photon's own θ = {ans.theta:.3f}, not applied"
    return text


def legend_html(ans=None, highlighted: list[str] = (), organs: list[tuple[str, tuple]] = ()) -> str:
    """The 3-D view's key: orientation, the ρ colour steps of the kept region (θ marked), the organs."""
    steps = "".join(f"<div style='flex:1;background:{_rgb(c)}' title='ρ {lo:.1f}–{hi:.1f}'></div>"
                    for lo, hi, c in rho_bins())
    theta, cut = "", None
    if ans is not None:
        cut = ans.cut
    if cut is not None:
        theta = (f"<div style='position:absolute;left:{100 * float(np.clip(cut, 0, 1)):.1f}%;top:-3px;"
                 f"height:20px;border-left:2px solid #000' title='cut'></div>")
        what = "θ" if Budget.parse(ans.budget).mode == "auto" else "the cut"
    if ans is None:
        kept = "no answer yet: the anatomy only"
    elif ans.prior_total:           # the prior scan's kept tokens are not drawn
        kept = (f"kept region of this answer: {ans.kept - ans.prior_kept} / {ans.total - ans.prior_total} "
                f"tokens of the current scan; {ans.prior_kept} of the prior scan are not drawn")
    else:
        kept = f"kept region of this answer: {ans.kept} / {ans.total} tokens"
    axes = " ".join(f"<span style='color:{_rgb(c)};font-weight:bold'>{a}</span>"
                    for a, c in AXIS_COLOURS.items())
    organ_rows = "".join(
        f"<div><span style='display:inline-block;width:10px;height:10px;background:"
        f"{_rgb(HIGHLIGHT) if n in highlighted else _rgb(c)}'></span> {esc(n.replace('_', ' '))}"
        f"{' (asked)' if n in highlighted else ''}</div>" for n, c in organs)
    return (f"<div id='legend' style='font-size:0.85em'>"
            f"<div><b>Anterior view</b>: the patient faces you, their right on your left — as on the "
            f"axial and coronal slices. Letters mark the sides; axes {axes}.</div>"
            f"<div style='margin-top:8px'><b>Kept blocks</b>, coloured by saliency ρ ({kept}):</div>"
            f"<div style='position:relative;display:flex;height:14px;margin:4px 0'>{steps}{theta}</div>"
            f"<div style='display:flex;justify-content:space-between'><span>ρ 0</span>"
            f"{f'<span>black tick: {what} at ρ = {cut:.3f}</span>' if theta else ''}<span>1</span></div>"
            f"<div style='margin-top:8px'>{organ_rows}</div></div>")


def compare_table(rows: list[dict], question: str, scan: str) -> str:
    """The answers to one question under each budget, headed by the question and the scan they answer."""
    body = []
    for r in rows:
        text = (esc(r["answer"]) if r["readable"]
                else f"<i>unreadable answer</i> <code>{esc(r['answer']) or '(empty)'}</code>")
        prob = "—" if r["probability"] is None else f"{100 * r['probability']:.0f}%"
        flag = " ⚠ differs from Full" if r["differs_from_full"] else ""
        body.append(f"<tr{' class=diff' if r['differs_from_full'] else ''}><td>{esc(r['budget'])}</td>"
                    f"<td>{r['kept']} / {r['total']}</td><td>{text}{flag}</td><td>{prob}</td>"
                    f"<td>{r['latency_ms']} ms (batch)</td></tr>")
    return (f"<div id='compare-question' style='{_MUTED}'>Q: {esc(question)} — on <b>{esc(scan)}</b></div>"
            "<table class='cmp'><tr><th>budget</th><th>kept tokens</th><th>answer</th><th>probability</th>"
            f"<th>latency</th></tr>{''.join(body)}</table>"
            "<style>.cmp tr.diff td{background:#ffe4c4} .cmp td,.cmp th{padding:4px 10px}</style>")
