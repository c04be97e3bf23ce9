"""The figures the official evaluators give, computed from our prediction rows (our own code).

Protocols (``--protocol`` of the evaluator; rows carry "family", "subtype", "answer", "prediction",
"answer_type"):

* ``3d-rad`` — Photon's ``evaluation/evaluation.py`` after ``jsonl_results_to_csv.py``: per subtask
  (family = task, subtype = subtask), closed questions score 1 when the answer and the prediction are
  equal after collapsing whitespace and lower-casing (nothing else: "yes." is wrong); open ones get
  corpus BLEU-1 (the `evaluate` package's ``bleu`` with ``max_order=1``: mteval-v13a tokens, case
  kept, clipped unigram matches over the subtask, one brevity penalty for the subtask), ROUGE-1 F1
  (``rouge-score`` tokens) and BERTScore F1; a task is the mean of its subtasks (each metric over
  the subtasks that have it). A subtask whose BLEU is undefined (every prediction empty, e.g. its
  scans failed to load) gets ``"bleu": null`` and a ``"note"`` saying why.
* ``deeptumor-photon-mc`` / ``deeptumor-photon-free`` — Photon's ``multi-choice-evaluation.py`` /
  ``free-text-evaluation.py``: per (question type, subtype) accuracy by exact string equality, or, for
  the nine numeric subtypes of the free-text set, MRA in floating point (thresholds 0.50…0.95, the first
  number parsed with sign, leading-dot decimals and exponents, no thousands separators); a type is the
  mean of its subtypes, the total the mean over all subtypes. The free-text protocol adds
  ``evaluate_deeptumor_free_text_medical_metrics.py``: sensitivity / specificity / accuracy of the three
  existence subtypes (answers read as yes/no words; unreadable ones skipped), macro and micro.
* ``deeptumorvqa-mc`` / ``deeptumorvqa-free`` — the benchmark's own scorer (DeepTumorVQA
  ``src/deeptumorvqa/eval/metrics.py``): letters A–D; numeric subtypes 1 − relative error (clipped at
  0) plus tolerance bands, binary yes/no with sensitivity and specificity, categorical normalised
  exact and partial match; figures rounded to 4 decimals as it rounds them, super-types weighted by
  question count, overall the micro average.

Where our own metrics (metrics.py) read answers more leniently, these are the ones to compare with
published numbers. What still differs, and why, is in the README ("Official evaluators");
tests/fixtures/official_eval holds the figures the official scripts gave on fixture predictions.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from photon_core.eval.metrics import rouge1

PROTOCOLS = ("3d-rad", "deeptumor-photon-mc", "deeptumor-photon-free", "deeptumorvqa-mc", "deeptumorvqa-free")


def _groups(rows: list[dict], key) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


# ============================================================================ 3D-RAD (Photon's scripts)
_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # . and , unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # . and , unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # - after a digit
]


def tokens_13a(text: str) -> list[str]:
    """mteval-v13a tokens (what `evaluate`'s bleu uses by default; case is kept)."""
    line = str(text).replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return line.split()


def corpus_bleu1(preds: list[str], refs: list[str]) -> float:
    """BLEU-1 over a set of answers: clipped unigram matches / prediction tokens, times one brevity
    penalty exp(1 − ref/pred tokens) when the predictions are shorter in total."""
    matches = pred_len = ref_len = 0
    for p, r in zip(preds, refs, strict=True):
        pt, rt = tokens_13a(p), tokens_13a(r)
        matches += sum((Counter(pt) & Counter(rt)).values())
        pred_len, ref_len = pred_len + len(pt), ref_len + len(rt)
    if not pred_len or not ref_len:
        raise ValueError(
            "BLEU of a set whose predictions or answers are all empty is undefined "
            "(the official script divides by zero)"
        )
    precision = matches / pred_len
    ratio = pred_len / ref_len
    return precision * (1.0 if ratio > 1.0 else math.exp(1 - 1 / ratio))


def rad3d_correct(pred: str, gt: str) -> bool:
    norm = lambda s: " ".join(str(s).split()).lower()  # noqa: E731
    return norm(pred) == norm(gt)


def rad3d(rows: list[dict], bertscore_model: str | None = None, bertscore_layers: int | None = None) -> dict:
    """Per subtask and per task, as Photon's 3D-RAD evaluator reports them."""
    subtasks = {}
    for (task, sub), rs in _groups(rows, lambda r: (str(r["family"]), str(r.get("subtype") or ""))).items():
        preds, refs = [str(r["prediction"]).strip() for r in rs], [str(r["answer"]).strip() for r in rs]
        if all(r.get("answer_type") in ("closed", "choice") for r in rs):
            d = {"accuracy": _mean(rad3d_correct(p, g) for p, g in zip(preds, refs))}
        else:
            try:
                d = {"bleu": corpus_bleu1(preds, refs)}
            except ValueError as e:  # e.g. every scan of the subtask failed: no answer to score
                d = {"bleu": None, "note": f"BLEU not computed: {e}"}
            d["rouge1"] = _mean(rouge1(p, g) for p, g in zip(preds, refs))
            if bertscore_model:
                from photon_core.eval.metrics import bertscore

                d["f1"] = _mean(
                    b["bertscore_f1"] for b in bertscore(preds, refs, bertscore_model, bertscore_layers)
                )
        subtasks[f"{task}/{sub}"] = d | {"n": len(rs)}
    tasks = {}
    for task, subs in _groups(list(subtasks.items()), lambda kv: kv[0].split("/")[0]).items():
        # a task may hold closed subtasks (accuracy) and open ones (BLEU, ROUGE, ...): each metric is the
        # mean over the subtasks that have it (and could compute it: None when none could)
        keys = list(dict.fromkeys(k for _, d in subs for k in d if k not in ("n", "note")))
        tasks[task] = {}
        for k in keys:
            vals = [d[k] for _, d in subs if d.get(k) is not None]
            tasks[task][k] = _mean(vals) if vals else None
    return {"protocol": "3d-rad", "subtasks": subtasks, "tasks": tasks}


# ============================================================================ DeepTumorVQA (Photon's scripts)
PHOTON_MRA_SUBTYPES = {
    "lesion volume measurement",
    "organ HU measurement",
    "organ volume measurement",
    "largest lesion diameter",
    "largest lesion slice",
    "lesion count by location",
    "lesion counting",
    "organ aggregation",
    "tumor organ HU difference",
}
PHOTON_EXISTENCE_SUBTYPES = (
    "liver_lesion_existence",
    "kidney_tumor_existence",
    "pancreatic_lesion_existence",
)
_FLOAT = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_YES = {"yes", "true", "present", "positive", "exist", "exists", "有", "是", "存在", "阳性", "1"}
_NO = {"no", "false", "absent", "negative", "not exist", "无", "否", "不存在", "阴性", "未见", "0"}


def mra_float(pred: str, gt: str) -> float:
    """MRA as Photon's DeepTumorVQA script computes it: floating-point relative error against the
    thresholds 0.50…0.95 (so 19 for 20, an error of 0.05, counts at 0.95), |gt| floored at 1e-6."""
    p, g = _FLOAT.search(str(pred)), _FLOAT.search(str(gt))
    if p is None or g is None:
        return 0.0
    err = abs(float(p.group()) - float(g.group())) / max(abs(float(g.group())), 1e-6)
    return sum(err < 1.0 - t for t in (0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95)) / 10


def _yes_no(text) -> bool | None:
    s = str(text).strip().lower().strip(" .,:;!?，。；：！？")
    return True if s in _YES else False if s in _NO else None


def deeptumor_photon(rows: list[dict], free_text: bool) -> dict:
    """Photon's multiple-choice (``free_text=False``) or free-text DeepTumorVQA figures."""
    subtypes = {}
    for (qtype, sub), rs in _groups(rows, lambda r: (str(r["family"]), str(r.get("subtype") or ""))).items():
        if free_text and sub in PHOTON_MRA_SUBTYPES:
            subtypes[(qtype, sub)] = {
                "metric": "MRA",
                "score": _mean(mra_float(r["prediction"], r["answer"]) for r in rs),
                "n": len(rs),
            }
        else:
            subtypes[(qtype, sub)] = {
                "metric": "ACC",
                "score": _mean(r["prediction"] == r["answer"] for r in rs),
                "n": len(rs),
            }
    types = {t: _mean(d["score"] for (t_, _), d in subtypes.items() if t_ == t) for t, _ in subtypes}
    out = {
        "protocol": "deeptumor-photon-" + ("free" if free_text else "mc"),
        "subtypes": {f"{t}/{s}": d for (t, s), d in subtypes.items()},
        "types": types,
        "total": _mean(d["score"] for d in subtypes.values()),
    }
    if free_text:
        out["existence"] = _existence(rows)
    return out


def _existence(rows: list[dict]) -> dict:
    counts = {s: Counter() for s in PHOTON_EXISTENCE_SUBTYPES}
    for r in rows:
        if not str(r["family"]).lower().startswith("recognition") or r.get("subtype") not in counts:
            continue
        truth, pred = _yes_no(r["answer"]), _yes_no(r["prediction"])
        c = counts[r["subtype"]]
        if truth is None or pred is None:
            c["SKIP"] += 1
        else:
            c[("T" if truth == pred else "F") + ("P" if pred else "N")] += 1
    div = lambda a, b: a / b if b else 0.0  # noqa: E731
    rates = lambda c: {
        "sensitivity": div(c["TP"], c["TP"] + c["FN"]),
        "specificity": div(c["TN"], c["TN"] + c["FP"]),  # noqa: E731
        "accuracy": div(c["TP"] + c["TN"], c["TP"] + c["TN"] + c["FP"] + c["FN"]),
    }
    used = {s: c for s, c in counts.items() if c["TP"] + c["TN"] + c["FP"] + c["FN"]}
    per = {s: {k: c[k] for k in ("TP", "TN", "FP", "FN", "SKIP")} | rates(c) for s, c in counts.items()}
    macro = {k: _mean(rates(c)[k] for c in used.values()) for k in ("sensitivity", "specificity", "accuracy")}
    return {"subtypes": per, "macro": macro, "micro": rates(sum(counts.values(), Counter()))}


# ============================================================================ DeepTumorVQA's own scorer
NUMERIC = {
    "organ volume measurement",
    "organ HU measurement",
    "lesion volume measurement",
    "organ HU ratio",
    "tumor burden percentage",
    "largest lesion diameter",
    "largest lesion slice",
    "lesion counting",
    "lesion count by location",
    "organ aggregation",
    "tumor organ HU difference",
}
BINARY = {
    "pancreatic lesion existence",
    "liver lesion existence",
    "kidney lesion existence",
    "kidney tumor existence",
    "kidney cyst existence",
    "colon lesion existence",
    "PDAC existence",
    "PNET existence",
    "lesion outlier",
    "organ enlargement",
    "pancreatic steatosis",
    "pancreatic cyst resectability",
    "pseudocyst determination",
    "splenomegaly detection",
    "portal hypertension assessment",
}  # every other subtype: categorical
TOLERANCES = (0.05, 0.10, 0.20, 0.50)
_THINK = re.compile(r"<think>.*?</think>|<think>.*$", re.S)
_NUM = re.compile(r"-?\d+\.?\d*")


def _unthink(text: str) -> str:
    return _THINK.sub("", str(text)).strip()


def _letter(text: str) -> str:
    s = _unthink(text).upper()
    if s and s[0] in "ABCD":
        return s[0]
    m = re.search(r"\b([A-D])\b", s)
    return m.group(1) if m else ""


def _number(text) -> float | None:
    m = _NUM.search(str(text).strip())
    return float(m.group()) if m else None


def _binary(text: str) -> str:
    s = str(text).strip().lower()
    for word in ("yes", "no"):
        if s.startswith(word):
            return word
    return "yes" if re.search(r"\byes\b", s) else "no" if re.search(r"\bno\b", s) else ""


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s\-]", "", str(text).strip().lower()))


def _score_subtype(pairs: list[tuple[str, str]], kind: str) -> dict:
    n = len(pairs)
    if kind == "mc":
        return {
            "accuracy": round(sum(_letter(p) == g.strip().upper() for p, g in pairs) / max(n, 1), 4),
            "n": n,
        }
    if kind == "numeric":
        mras, hits, scored = [], Counter(), 0
        for p, g in pairs:
            gt = _number(g)
            if gt is None:
                continue
            scored += 1
            pred = _number(_unthink(p))
            if pred is None:
                mras.append(0.0)
                continue
            err = (0.0 if pred == 0 else math.inf) if gt == 0 else abs(pred - gt) / abs(gt)
            mras.append(max(0.0, 1.0 - err) if gt != 0 else float(pred == 0))
            hits.update(t for t in TOLERANCES if err <= t)
        return {
            "mean_mra": round(sum(mras) / max(len(mras), 1), 4),
            "n": n,
            "tolerance": {f"{int(t * 100)}%": round(hits[t] / max(scored, 1), 4) for t in TOLERANCES},
        }
    if kind == "binary":
        c = Counter()
        for p, g in pairs:
            gt, pred = _binary(g), _binary(_unthink(p))
            c["correct"] += bool(pred) and pred == gt
            c[
                ("tp" if pred == "yes" else "fn")
                if gt == "yes"
                else ("fp" if pred == "yes" else "tn")
                if gt == "no"
                else "other"
            ] += 1
        return {
            "accuracy": round(c["correct"] / max(n, 1), 4),
            "n": n,
            "sensitivity": round(c["tp"] / max(c["tp"] + c["fn"], 1), 4),
            "specificity": round(c["tn"] / max(c["tn"] + c["fp"], 1), 4),
        }
    exact = partial = 0
    for p, g in pairs:
        gt, pred = _norm(g), _norm(_unthink(p))
        exact += gt == pred
        partial += gt == pred or bool(gt and pred and (gt in pred or pred in gt))
    return {
        "accuracy": round(exact / max(n, 1), 4),
        "partial_accuracy": round(partial / max(n, 1), 4),
        "n": n,
    }


def deeptumorvqa(rows: list[dict], choice: bool) -> dict:
    """DeepTumorVQA's own figures: ``choice`` rows are answered with letters (answer = the correct
    option's letter); free-form rows are scored by their subtype's answer type."""
    subtypes, primary = {}, {}
    for sub, rs in _groups(rows, lambda r: str(r.get("subtype") or "")).items():
        kind = (
            "mc" if choice else "numeric" if sub in NUMERIC else "binary" if sub in BINARY else "categorical"
        )
        subtypes[sub] = _score_subtype([(str(r["prediction"] or ""), str(r["answer"])) for r in rs], kind)
        subtypes[sub]["type"] = str(rs[0]["family"])
        primary[sub] = subtypes[sub]["mean_mra" if kind == "numeric" else "accuracy"]
    types = {}
    for t, subs in _groups(list(subtypes), lambda s: subtypes[s]["type"]).items():
        n = sum(subtypes[s]["n"] for s in subs)
        types[t] = {
            "accuracy": round(sum(primary[s] * subtypes[s]["n"] for s in subs) / max(n, 1), 4),
            "n": n,
        }
    total = sum(d["n"] for d in subtypes.values())
    overall = round(sum(primary[s] * d["n"] for s, d in subtypes.items()) / max(total, 1), 4)
    return {
        "protocol": "deeptumorvqa-" + ("mc" if choice else "free"),
        "subtypes": subtypes,
        "types": types,
        "overall": {"accuracy": overall, "n": total},
    }


# ============================================================================ dispatch
def official(
    rows: list[dict], protocol: str, bertscore_model: str | None = None, bertscore_layers: int | None = None
) -> dict:
    """The figures of ``protocol`` (one of PROTOCOLS) on prediction rows."""
    rows = [r for r in rows if "prediction" in r and not str(r.get("family", "")).startswith("_")]
    if protocol == "3d-rad":
        return rad3d(rows, bertscore_model, bertscore_layers)
    if protocol.startswith("deeptumor-photon-"):
        return deeptumor_photon(rows, free_text=protocol.endswith("free"))
    if protocol.startswith("deeptumorvqa-"):
        return deeptumorvqa(rows, choice=protocol.endswith("mc"))
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
