"""Scoring and reporting: every score computed from the answer texts, in one place; the summary and its
tables.

Used by the evaluator after a run and by ``--score`` on saved predictions (ours or another model's),
so a report can be re-scored after a metric changes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from photon_core.eval.datasets import jsonl_rows, read_text
from photon_core.eval.metrics import aggregate, balanced_accuracy, score
from photon_core.eval.official import official

BASELINES = ("fastv", "visionzip", "random")


def read_predictions(path: Path) -> list[dict]:
    """A predictions JSONL (see ``--score``): rows need "answer" and "prediction" (the evaluator's own
    audit rows, families "_pair" and "_noise", pass as written); "family" defaults to "all",
    "answer_type" to "open". Another model's JSON nulls read as not given: a null family or answer
    type takes its default, a null prediction is the empty text (not the word "None", which would
    match the answer "none"), a null answer is refused; a family written as a number is its text."""
    rows = []
    for n, r in jsonl_rows(read_text(Path(path)), path):
        if not isinstance(r, dict):
            raise ValueError(f"{path}:{n}: not a JSON object")
        r["family"] = "all" if r.get("family") in (None, "") else str(r["family"])
        if not r["family"].startswith("_"):
            missing = [k for k in ("answer", "prediction") if k not in r]
            if missing:
                raise ValueError(f"{path}:{n}: no {' or '.join(repr(k) for k in missing)} field")
            if r["answer"] is None:          # nothing to score against (an empty answer matches anything)
                raise ValueError(f"{path}:{n}: the answer is null")
            r["answer"] = str(r["answer"])
            r["prediction"] = "" if r["prediction"] is None else str(r["prediction"])
            r["answer_type"] = str(r.get("answer_type") or "open")
        rows.append(r)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    return rows


def rescore(rows: list[dict]) -> None:
    """Score every answer from its text — the model's, each baseline's, each curve point's — the one
    place the evaluator scores (scores whose text an older file did not keep stay as recorded)."""
    for r in rows:
        if "prediction" not in r:
            continue
        grade = lambda text: score(text, r["answer"], r["answer_type"])  # noqa: E731
        r["scores"] = grade(r["prediction"])
        for mode in BASELINES:
            if f"{mode}_prediction" in r:
                r[f"{mode}_scores"] = grade(r[f"{mode}_prediction"])
        if "curve_predictions" in r:
            r["curve"] = {key: grade(text) for key, text in r["curve_predictions"].items()}


FAILED_LISTED = 5          # failed records named in the report (all of them are in predictions.jsonl)


def failures(rows: list[dict]) -> list[dict]:
    """The question rows that got no answer (a scan that could not be read, a question that could not
    be asked): each is scored 0, and each is named."""
    return [r for r in rows if r.get("error") and not str(r.get("family", "")).startswith("_")]


def failure_line(rows: list[dict]) -> str | None:
    """"N of M records failed (first: IMAGE: REASON)", or None when none did."""
    failed, qa = failures(rows), [r for r in rows if not str(r.get("family", "")).startswith("_")]
    if not failed:
        return None
    return (f"{len(failed)} of {len(qa)} records failed and are scored 0 "
            f"(first: {failed[0].get('image') or '?'}: {failed[0]['error']})")


def summarise(rows: list[dict]) -> dict:
    qa = [r for r in rows if not r["family"].startswith("_")]
    out = {"families": aggregate(qa), "n_questions": len(qa)}
    for f, bal in balanced_accuracy(qa).items():
        out["families"][f]["balanced_accuracy"] = bal
    failed = failures(qa)
    out["n_errors"] = len(failed)      # in the accuracy above as 0; left out of the means of kept tokens
    if failed:
        out["failed"] = [{"image": r.get("image"), "question": r.get("question"), "error": r["error"]}
                         for r in failed[:FAILED_LISTED]]
    frac = lambda rs: float(np.mean([r["kept"] / r.get("total", 1000) for r in rs])) if rs else None  # noqa: E731
    answered = [r for r in qa if not r.get("error")]       # a failed row kept nothing because it ran nothing
    counted = [r for r in answered if "kept" in r]           # predictions from elsewhere may not say
    out["keep_fraction_mean"] = frac(counted)
    out["keep_fraction_by_family"] = {f: frac([r for r in counted if r["family"] == f])
                                      for f in sorted({r["family"] for r in counted})}
    cov = [r["organ_coverage"] for r in qa if r.get("organ_coverage") is not None]
    if cov:
        out["asked_organ_coverage_mean"] = float(np.mean(cov))
    pairs = [r["jaccard"] for r in rows if r["family"] == "_pair"]
    if pairs:
        out["jaccard_two_organ_prompts_mean"] = float(np.mean(pairs))
    noise = [r for r in rows if r["family"] == "_noise"]
    if noise:
        out["noise_closed_accuracy"] = float(np.mean([r["scores"]["accuracy"] for r in noise]))
        clean = [r for r in qa if r["answer_type"] in ("closed", "choice")]
        out["clean_closed_accuracy"] = (float(np.mean([r["scores"]["accuracy"] for r in clean]))
                                        if clean else None)
        # the same questions' balanced accuracy with the volume replaced by noise (0.5: answers from the
        # words)
        scored = [r | {"family": r["source_family"]} for r in noise if "answer" in r and "source_family" in r]
        if scored:                                   # (reports written before these fields were kept: none)
            out["noise_balanced_accuracy"] = balanced_accuracy(scored)
        ncov = [r["organ_coverage"] for r in noise if r.get("organ_coverage") is not None]
        if ncov:
            out["noise_asked_organ_coverage_mean"] = float(np.mean(ncov))
    for mode in BASELINES:
        b = [dict(family=r["family"], scores=r[f"{mode}_scores"]) for r in qa if f"{mode}_scores" in r]
        if b:
            out[f"{mode}_matched"] = aggregate(b)
    curve_rows = [r for r in qa if "curve" in r]
    if curve_rows:
        keys = list(curve_rows[0]["curve"])
        out["curve_macro"] = {key: aggregate([dict(family=r["family"], scores=r["curve"][key])
                                              for r in curve_rows])["macro"]
                              for key in keys}
    first = [r["latency_first_s"] for r in answered if r.get("latency_first_s") is not None]
    if first:
        out["cpu_latency_set_volume_plus_first_ask_s_median"] = float(np.median(first))
        out["cpu_latency_ask_s_median"] = float(np.median([r["latency_ask_s"] for r in answered
                                                           if r.get("latency_ask_s") is not None]))
    return out


def add_bertscore(rows: list[dict], model_dir: str, num_layers: int | None = None) -> None:
    """Add BERTScore F1 (``metrics.bertscore``, a local model folder) to the scores of open-answer rows."""
    from photon_core.eval.metrics import bertscore
    graded = [r for r in rows
              if r.get("answer_type") == "open" and "scores" in r and not r["family"].startswith("_")]
    if graded:
        for r, b in zip(graded, bertscore([r["prediction"] for r in graded], [r["answer"] for r in graded],
                                          model_dir, num_layers)):
            r["scores"]["bertscore_f1"] = b["bertscore_f1"]


COLUMNS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "mra": "MRA", "exact": "exact",
           "bleu1": "BLEU-1", "rouge1": "ROUGE-1",
           "bertscore_f1": "BERTScore F1"}   # optional: shown if any row has it
OPTIONAL = ("bertscore_f1",)


def markdown(summary: dict) -> str:
    fams = {f: d for f, d in summary["families"].items() if f != "macro"}
    cols = [k for k in COLUMNS if k not in OPTIONAL or any(k in d for d in fams.values())]
    lines = ["| family | n | " + " | ".join(COLUMNS[k] for k in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    if summary.get("interrupted"):
        lines[:0] = [f"**Interrupted** (Ctrl-C): these figures cover the {summary['n_questions']} questions "
                     "answered before it, not the whole set.", ""]
    for f, d in fams.items():
        lines.append(f"| {f} | {d['n']} | "
                     + " | ".join(f"{d[k]:.3f}" if k in d else "" for k in cols) + " |")
    lines.append(f"\nmacro average: {summary['families']['macro']:.3f}")
    if summary.get("n_errors"):
        lines += ["", f"{summary['n_errors']} of {summary['n_questions']} questions failed (no answer: the "
                  "scan could not be read or the question could not be asked); they are scored 0 above "
                  "and left out of the kept-token means. "
                  + ("First ones:" if summary["n_errors"] > len(summary["failed"]) else "They are:"), ""]
        lines += [f"- {f['image'] or '?'}: {f['error']}" for f in summary["failed"]]
        lines.append("")
    if summary.get("curve_macro"):
        ks = sorted({int(k.split(":")[1]) for k in summary["curve_macro"]})
        modes = list(dict.fromkeys(k.split(":")[0] for k in summary["curve_macro"]))
        lines += ["", "macro score vs kept tokens:", "", "| kept | " + " | ".join(modes) + " |",
                  "|---|" + "---|" * len(modes)]
        for k in ks:
            lines.append(f"| {k} | "
                         + " | ".join(f"{summary['curve_macro'][f'{m}:{k}']:.3f}" for m in modes) + " |")
        lines.append("")
    if summary.get("official"):
        lines += ["", official_markdown(summary["official"])]
    for k, v in summary.items():
        if v is None:
            continue
        if k not in ("families", "curve_macro", "failed", "interrupted") and not isinstance(v, dict):
            lines.append(f"- {k}: {v if not isinstance(v, float) else round(v, 4)}")
        elif k.endswith("_matched"):
            lines.append(f"- {k}: macro {v['macro']:.3f}")
    return "\n".join(lines) + "\n"


def official_markdown(fig: dict) -> str:
    """The official protocol's figures as a table (the nested detail stays in metrics.json)."""
    lines = [f"official figures ({fig['protocol']}):", "", "| group | figures |", "|---|---|"]
    for section in ("tasks", "types"):
        for name, d in fig.get(section, {}).items():
            vals = d if isinstance(d, dict) else {"score": d}
            lines.append(f"| {name} | " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} n/a"
                                                    for k, v in vals.items()
                                                    if isinstance(v, float) or (v is None and k != "note"))
                         + " |")
    for name, d in fig.get("subtasks", {}).items():
        if d.get("note"):
            lines.append(f"| {name} | {d['note']} |")
    for key in ("total", "overall"):
        if key in fig:
            v = fig[key]["accuracy"] if isinstance(fig[key], dict) else fig[key]
            lines.append(f"| {key} | {v:.4f} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: a run stopped while
    writing (Ctrl-C, a full disk) leaves the previous file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(rows: list[dict], out: Path, about: dict, bertscore_model: str | None = None,
                 bertscore_layers: int | None = None, protocol: str | None = None) -> None:
    """predictions.jsonl, metrics.json and metrics.md in ``out``; the table is printed too. ``protocol``
    adds the figures an official evaluator gives (official.py) under "official". Every figure is
    computed before any file is written, so a failure leaves the folder as the last run left it."""
    if bertscore_model:
        add_bertscore(rows, bertscore_model, bertscore_layers)
    summary = summarise(rows) | about
    if protocol:
        summary["official"] = official(rows, protocol, bertscore_model, bertscore_layers)
    texts = {"predictions.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
             "metrics.json": json.dumps(summary, indent=1), "metrics.md": markdown(summary)}
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        write_atomic(out / name, text)
    print(texts["metrics.md"])
