"""The bundled sample cases' suggested questions, asked as the app asks them. Measures and prints.

For every case in `sample_cases/cases.json` and each of its suggested questions: the model's answer
at the chosen budget, the visual tokens kept, and — where the case has a label map — the share of
each asked organ's token blocks that were kept (the app's retention panel; a block counts for an
organ when ≥ 25% of its voxels belong to it). Goes through `app.service.Engine`, the app's own path
(official preprocessing, the same encode cache), so what it prints is what a user of the app sees.

    python scripts/case_answers.py                                # shipped demo model, auto budget
    python scripts/case_answers.py --model runs/x/model --budget 25% --json out.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.service import Engine, Settings, cases  # noqa: E402
from photon_core.model.budget import Budget  # noqa: E402


def case_answers(engine: Engine, budget, case_ids: list[str] | None = None) -> list[dict]:
    rows = []
    for c in cases():
        if case_ids and c["id"] not in case_ids:
            continue
        s = engine.load_case(c["id"])
        for q in c.get("questions", []):
            ans, audit = engine.answer(s, q, budget)
            rows.append({"case": c["id"], "question": q, "answer": ans.text, "kept": ans.kept,
                         "asked_organs": {o: round(r, 3) for o, r in audit.asked_retention.items()}})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    ap.add_argument("--budget", default="auto", help="auto, full, 25%%, 300 (tokens), threshold:0.4")
    ap.add_argument("--cases", nargs="*", default=None, help="case ids (default: every bundled case)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    bundled = [c["id"] for c in cases()]
    unknown = sorted(set(args.cases or []) - set(bundled))
    if unknown:
        ap.error(f"unknown case id(s) {', '.join(unknown)}; bundled: {', '.join(bundled)}")
    engine = Engine(Settings(model_dir=args.model, device="cpu"))
    try:
        rows = case_answers(engine, Budget.parse(args.budget), args.cases)
    finally:
        engine.close()
    print(f"model: {engine.predictor.name}; budget {args.budget}")
    print("| case | question | answer (kept of 1,000) | asked organ's blocks kept |")
    print("|---|---|---|---|")
    for r in rows:
        org = ", ".join(f"{o.replace('_', ' ')} {v:.2f}" for o, v in r["asked_organs"].items()) or "—"
        print(f"| {r['case']} | {r['question']} | {r['answer']} ({r['kept']}) | {org} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
