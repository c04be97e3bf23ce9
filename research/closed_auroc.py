"""Does the model read the image for yes/no questions? A diagnostic that measures and prints.

For every existence / anomaly-detection question of the demo generator's scans, the margin
log P("yes") − log P("no") of the first answer token, turned toward "finding present" (its sign
flipped for "Is this scan normal?"), and the AUROC of that score against the truth. Accuracy alone
hides a model that answers the prior ("no" everywhere scores 0.91 on an unbalanced set).

With ``--enlargement`` the scans may hold an enlarged organ, and "Is the liver enlarged?"-type
questions are scored on their own (``enlargement``): the same words are asked of enlarged and normal
organs of the same pool bodies, so their AUROC above 0.5 comes from the image.

An AUROC can still come from the words (which organ is asked) rather than the pixels, so the script
also asks every question whose answer the findings decide of the same scan without its findings
(`DemoGenerator.counterfactual`): the paired win rate is the share of such questions whose score is
higher on the scan with the finding — 0.5 when the image does not move the answer.

    python research/closed_auroc.py --scans 24                       # shipped model, test split
    python research/closed_auroc.py --model runs/x/model --downsample 2.5
"""
from __future__ import annotations

import argparse

from photon_core.train.synthetic.questions import ENLARGED, FINDING_FAMILIES as FAMILIES, NORMAL_QUESTION as NORMAL

from photon_core.train.synthetic.generator import DemoGenerator
from photon_core.train.synthetic.splits import SPLITS
from photon_core.eval.metrics import auroc
from photon_core.inference.predictor import Predictor


def _scores(predictor: Predictor, frames, qs: list[dict], budget: str) -> list[float]:
    """Margin toward "finding present" of each question, asked (batched) about ``frames``."""
    tok = predictor.tokenizer
    yes, no = tok.encode("yes")[0], tok.encode("no")[0]
    predictor.set_volume(frames)
    lp = predictor.answer_logprobs([q["question"] for q in qs], budget)
    return [m * (-1 if q["question"] == NORMAL else 1) for q, m in zip(qs, (lp[:, yes] - lp[:, no]).tolist())]


def present(q: dict) -> bool:
    """Is the finding the question asks about present (its 'yes' flipped for the normal question)?"""
    return (q["answer"] == "yes") != (q["question"] == NORMAL)


def group(q: dict) -> str:
    """The question's family, or ``enlargement`` for an "is the organ enlarged?" question."""
    return "enlargement" if any(q["question"] == t.format(o=q["organ"]) for t in ENLARGED) else q["family"]


LUNGS = "existence, lungs"       # lung existence questions, also scored as a group of their own


def lungs(q: dict) -> bool:
    """A question about a lung (nodules in air: the most conspicuous finding the generator draws)."""
    return q["family"] == "existence" and (q.get("organ") or "").endswith("lung")


def groups(q: dict, first: str) -> tuple:
    """``first`` (the question's group), and the lung group for a lung question."""
    return (first, LUNGS) if lungs(q) else (first,)


def margins(predictor: Predictor, gen: DemoGenerator, scans: int, budget: str) -> dict:
    """{family or 'enlargement': (scores, finding present?)} over ``scans`` scans of the stream."""
    out = {f: ([], []) for f in FAMILIES + (("enlargement",) if gen.enlargement else ())}
    for _ in range(scans):
        frames, qa, _, _ = gen.sample()
        qs = [q for q in qa if q["family"] in FAMILIES]
        for q, m in zip(qs, _scores(predictor, frames, qs, budget) if qs else []):
            for g in groups(q, group(q)):
                out.setdefault(g, ([], []))
                out[g][0].append(m)
                out[g][1].append(present(q))
    return out


def paired(predictor: Predictor, gen: DemoGenerator, scans: int, budget: str) -> dict:
    """{family: [1 if the score is higher with the finding than without it (0.5 on a tie), ...]}."""
    out = {f: [] for f in FAMILIES}
    for _ in range(scans):
        frames, qa, _, _ = gen.sample(with_findings=1.0)
        clean, clean_qa = gen.counterfactual()
        before = {q["question"]: q for q in clean_qa}
        qs = [q for q in qa if q["question"] in before and present(q) and not present(before[q["question"]])]
        if not qs:
            continue
        for q, a, b in zip(qs, _scores(predictor, frames, qs, budget), _scores(predictor, clean, qs, budget)):
            for g in groups(q, q["family"]):
                out.setdefault(g, []).append(1.0 if a > b else 0.5 if a == b else 0.0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    ap.add_argument("--split", default="test", choices=SPLITS)
    ap.add_argument("--scans", type=int, default=24)
    ap.add_argument("--downsample", type=float, default=1.0, help="coarse-grid stream (curriculum stages)")
    ap.add_argument("--budget", default="auto")
    ap.add_argument("--enlargement", type=float, default=0.0,
                    help="share of scans with an enlarged organ; its questions scored as 'enlargement'")
    ap.add_argument("--no-paired", action="store_true", help="skip the paired (counterfactual) pass")
    args = ap.parse_args(argv)
    predictor = Predictor(args.model, device="cpu")
    gen = DemoGenerator(args.split, seed=0, downsample=args.downsample, enlargement=args.enlargement)
    for fam, (m, y) in margins(predictor, gen, args.scans, args.budget).items():
        pos = sum(y)
        if not pos or pos == len(y):
            print(f"{fam}: {len(y)} questions, one answer only — AUROC undefined")
            continue
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        print(f"{fam}: {len(y)} questions ({pos} with the finding); AUROC {auroc(m, y):.3f}; mean score "
              f"with {mean([a for a, b in zip(m, y) if b]):+.2f}, without {mean([a for a, b in zip(m, y) if not b]):+.2f}")
    if args.no_paired:
        return
    gen = DemoGenerator(args.split, seed=1, downsample=args.downsample)
    for fam, wins in paired(predictor, gen, args.scans, args.budget).items():
        if wins:
            print(f"{fam}: paired win rate {sum(wins) / len(wins):.3f} over {len(wins)} questions "
                  "(same scan with and without its finding)")


if __name__ == "__main__":
    main()
