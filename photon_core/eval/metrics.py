"""VQA metrics: closed accuracy, BLEU-1 / ROUGE-1 for open answers, DeepTumorVQA's MRA for numbers.

* closed (yes/no, choice): exact match after normalisation (lower case, punctuation stripped,
  a leading yes/no taken as the answer).
* open: BLEU-1 (clipped unigram precision × brevity penalty, no smoothing) on the normalised words,
  and ROUGE-1 F1 on the tokens of the `rouge-score` package's default tokenizer (lower case, runs
  of [a-z0-9], no stemming), the package ROUGE is commonly computed with. Both reproduce their
  reference packages (nltk's `sentence_bleu` with weights (1,), `rouge_score`) on
  tests/fixtures/text_metrics; the official benchmark scripts were not at hand to check their
  tokenisation against.
* numeric: mean relative accuracy, MRA = mean over θ ∈ {0.50, 0.55, …, 0.95} of
  1[|pred − gt| / |gt| < 1 − θ]; a prediction without a number scores 0. Computed exactly on the
  decimals as written (19 for 20 is a relative error of exactly 0.05, not < 1 − 0.95): in floating
  point, 1 − 0.95 > 0.05, so whether such a boundary case counts depends on how the thresholds were
  rounded, and integer answers (counts, millimetres) meet these boundaries often.
* open, optional: BERTScore (P, R, F1 of greedy cosine matching of contextual token embeddings,
  no idf weighting, no baseline rescaling — the `bert-score` package's defaults) with a local model
  folder the user gives (`bertscore`); nothing is downloaded.
Per-family scores are averaged; the report's macro average is the mean of the family means.
Closed families also get a balanced accuracy (mean over answer values).
"""
from __future__ import annotations

import functools
import math
import re
from collections import Counter
from fractions import Fraction


def normalise(text: str) -> str:
    t = re.sub(r"[^\w\s.%-]", " ", str(text).lower())
    return " ".join(t.replace(".", " ").split()) if not re.search(r"\d\.\d", t) else " ".join(t.split())


def closed_correct(pred: str, gt: str) -> bool:
    p, g = normalise(pred), normalise(gt)
    if g in ("yes", "no"):
        first = p.split()[0] if p.split() else ""
        return first == g
    return p == g or p.split()[:len(g.split())] == g.split()


def first_number(text: str) -> Fraction | None:
    """The first number written in ``text``, exactly ("3.3" is 33/10, not the float nearest it);
    thousands separators are read as such ("1,250 ml" is 1250)."""
    m = re.search(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|-?\d+(?:\.\d+)?", str(text))
    return Fraction(m.group().replace(",", "")) if m else None


def mra(pred: str, gt: str) -> float:
    p, g = first_number(pred), first_number(gt)
    if p is None or g is None:
        return 0.0
    if g == 0:
        return float(p == 0)
    # |p − g| / |g| < 1 − θ with 1 − θ = k/20: 20·|p − g| < k·|g|, in exact arithmetic
    return sum(20 * abs(p - g) < k * abs(g) for k in range(1, 11)) / 10


def bleu1(pred: str, gt: str) -> float:
    p, g = normalise(pred).split(), normalise(gt).split()
    if not p or not g:
        return 0.0
    overlap = sum((Counter(p) & Counter(g)).values())
    precision = overlap / len(p)
    bp = 1.0 if len(p) > len(g) else math.exp(1 - len(g) / len(p))
    return bp * precision


def rouge_tokens(text: str) -> list[str]:
    """The `rouge-score` package's default tokens: "T2-weighted" → ["t2", "weighted"], "3.5" → ["3", "5"]."""
    return re.findall(r"[a-z0-9]+", str(text).lower())


def rouge1(pred: str, gt: str) -> float:
    p, g = rouge_tokens(pred), rouge_tokens(gt)
    overlap = sum((Counter(p) & Counter(g)).values())
    if not overlap:
        return 0.0
    prec, rec = overlap / len(p), overlap / len(g)
    return 2 * prec * rec / (prec + rec)


def score(pred: str, gt: str, answer_type: str) -> dict:
    if answer_type == "numeric":
        return {"mra": mra(pred, gt), "exact": float(normalise(pred) == normalise(gt))}
    if answer_type in ("closed", "choice"):
        return {"accuracy": float(closed_correct(pred, gt))}
    return {"exact": float(normalise(pred) == normalise(gt)), "bleu1": bleu1(pred, gt),
            "rouge1": rouge1(pred, gt)}


def aggregate(rows: list[dict]) -> dict:
    """rows: {family, answer_type, scores} → per-family means and the macro average of the main metric."""
    fam: dict[str, dict[str, list]] = {}
    count: dict[str, int] = {}
    for r in rows:
        d = fam.setdefault(r["family"], {})
        count[r["family"]] = count.get(r["family"], 0) + 1
        for k, v in r["scores"].items():
            d.setdefault(k, []).append(v)
    # n = questions in the family (a family may mix closed and open questions; each metric is the
    # mean over the questions that have it)
    out = {f: {k: sum(v) / len(v) for k, v in d.items()} | {"n": count[f]} for f, d in fam.items()}
    main = []
    for _, d in out.items():
        main.append(d.get("accuracy", d.get("mra", d.get("exact", 0.0))))
    out["macro"] = sum(main) / len(main) if main else 0.0
    return out


def balanced_accuracy(rows: list[dict]) -> dict:
    """Per family of closed questions: the mean over answer values of the accuracy on that value,
    so a model that always says "no" scores 0.5 however few "yes" questions a set has."""
    by: dict[str, dict[str, list]] = {}
    for r in rows:
        if r.get("answer_type") in ("closed", "choice") and "accuracy" in r.get("scores", {}):
            by.setdefault(r["family"], {}).setdefault(str(r["answer"]).strip().lower(), []).append(
                r["scores"]["accuracy"])
    return {f: sum(sum(v) / len(v) for v in d.values()) / len(d) for f, d in by.items()}


def auroc(scores: list[float], positive: list[bool]) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` labels (Mann–Whitney, ties count
    half): 0.5 when the scores carry no information, 1 when every positive outranks every negative."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        raise ValueError("AUROC needs at least one positive and one negative")
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def bertscore(cands: list[str], refs: list[str], model_dir: str, num_layers: int | None = None) -> list[dict]:
    """BERTScore of each candidate against its reference with a local encoder (safetensors only).

    As the reference implementation computes it: each sentence is encoded alone with its special
    tokens (each distinct text once); the hidden states after ``num_layers`` layers (default: all) are
    L2-normalised; every
    token's best cosine match in the other sentence (its special tokens included as matches) is
    averaged over the sentence's tokens with the special tokens weighted 0 — P over the candidate,
    R over the reference; F1 = 2PR / (P + R). An empty candidate or reference scores 0.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer, GPT2Tokenizer, RobertaTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, use_fast=False)
    model = AutoModel.from_pretrained(model_dir, use_safetensors=True).eval()   # never a pickle
    layer = model.config.num_hidden_layers if num_layers is None else int(num_layers)
    special = {tok.cls_token_id, tok.sep_token_id}
    prefix = {"add_prefix_space": True} if isinstance(tok, (GPT2Tokenizer, RobertaTokenizer)) else {}

    @functools.cache                       # an evaluation set repeats its answers: each text once
    @torch.no_grad()
    def embed(text: str):
        text = text.strip()
        ids = tok.encode(text, add_special_tokens=True, max_length=tok.model_max_length, truncation=True,
                         **(prefix if text else {}))
        h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].float()
        w = torch.tensor([0.0 if i in special else 1.0 for i in ids])
        return h / h.norm(dim=-1, keepdim=True), w, not text

    out = []
    for c, r in zip(cands, refs, strict=True):
        (hc, wc, c_empty), (hr, wr, r_empty) = embed(c), embed(r)
        if c_empty or r_empty:
            out.append({"bertscore_p": 0.0, "bertscore_r": 0.0, "bertscore_f1": 0.0})
            continue
        sim = hc @ hr.T
        p = float((sim.max(1).values * wc).sum() / wc.sum())
        rec = float((sim.max(0).values * wr).sum() / wr.sum())
        out.append({"bertscore_p": p, "bertscore_r": rec,
                    "bertscore_f1": 2 * p * rec / (p + rec) if p + rec else 0.0})
    return out
