"""Evaluate a Photon model: accuracy per task family, MRA, keep rate, retention audit, baselines.

    python -m photon_core.eval --demo-split test --scans 60 --out reports/demo_test
    python -m photon_core.eval --demo-split test --scans 0 --pairs 12 --out reports/demo_temporal   # prior + current
    python -m photon_core.eval --data my_set.jsonl --out reports/mine        # open JSONL layout
    python -m photon_core.eval --data 3D-RAD/test_csvs --images 3D-RAD/volumes --out reports/3drad
    python -m photon_core.eval --data DeepTumorVQA/test.json --columns image=image_path --dry-run
    python -m photon_core.eval --data ... --bertscore-model LOCAL_ENCODER_DIR    # + BERTScore F1 (open)
    python -m photon_core.eval --score predictions.jsonl --out reports/rescored  # metrics only, no model
    torchrun --nproc_per_node 2 -m photon_core.eval ...                       # sharded by scan

JSONL records: {"image": path (NIfTI/DICOM/NRRD, or a model-space .npy with "space": "model"),
"question", "answer", "family", "answer_type": closed|choice|open|numeric, "organ", "meta"}, and
"prior_image" for a question about change since an earlier scan (both go in the prompt).
Writes predictions.jsonl, metrics.json and metrics.md. With organ masks (the demo split) it also
reports per-organ coverage of the asked organ, Jaccard between kept sets of two organ prompts on
the same scan, accuracy when the volume is replaced by noise, and the same questions under
FastV, VisionZip-style and random-k at the kept count ITS chose (matched budgets); ``--curve``
adds accuracy-vs-kept-tokens curves for ITS top-k and the three baselines.

``--score`` reads a predictions JSONL (this tool's, or any model's rows with "answer", "prediction"
and optionally "family", "answer_type", "kept", "total") and computes the metrics from the answers
alone, every score recomputed from the answer text stored beside it; no model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from photon_core.inference.audit import jaccard
from photon_core.train.synthetic.generator import SPLITS, DemoGenerator
from photon_core.eval.datasets import parse_columns, read_records
from photon_core.train.distributed import init_distributed
from photon_core.eval.metrics import aggregate, balanced_accuracy, score
from photon_core.eval.official import PROTOCOLS, official
from photon_core.inference.predictor import Predictor
from photon_core.io.preprocess import block_fractions
from photon_core.model.budget import Budget
from photon_core.model.hub import add_model_arguments
from photon_core.io.volume import load_volume
from photon_core.organs import block_cover


BASELINES = ("fastv", "visionzip", "random")


def organ_block_cover(mask: torch.Tensor) -> np.ndarray:
    """Model-space organ mask (140, 280, 280) → (1000,) blocks it covers (`organs.block_cover`)."""
    return block_cover(block_fractions(mask)).cpu().numpy()


def evaluate_demo(pred: Predictor, split: str, scans: int, seed: int, rank: int = 0, world: int = 1,
                  baselines: bool = True, noise: bool = True, curve: tuple = (), enlargement: float = 0.0,
                  pairs: int = 0) -> list[dict]:
    """Generate ``scans`` scans of the demo split and ask every supported question on each; then
    ``pairs`` temporal pairs (prior + current in each prompt) with their longitudinal questions."""
    gen = DemoGenerator(split, seed=seed, pool=3, enlargement=enlargement)
    rows = []
    for i in range(scans + pairs):
        if i < scans:
            (frames, qa, meta, organs), prior = gen.sample(), None
        else:
            prior, frames, qa, meta, organs = gen.pair()
        if i % world != rank:
            continue
        t0 = time.perf_counter()
        pred.set_volume(frames, prior=prior)
        set_s = time.perf_counter() - t0
        covers = {o: organ_block_cover(m) for o, m in organs.items()}
        kept_by_organ = {}
        for j, q in enumerate(qa):
            t1 = time.perf_counter()
            a = pred.ask(q["question"], max_new_tokens=8)    # the checkpoint's own budget (S1: full)
            ask_s = time.perf_counter() - t1
            row = dict(scan=i, **{k: q[k] for k in ("question", "answer", "family", "answer_type", "organ")},
                       prediction=a.text, kept=a.kept, total=a.total, theta=a.theta,
                       latency_first_s=set_s + ask_s if j == 0 and prior is None else None, latency_ask_s=ask_s)
            if prior is not None:
                row["pair"] = True
            if q["organ"] in covers and covers[q["organ"]].any():
                cov = covers[q["organ"]]
                row["organ_coverage"] = float(a.keep_grid.ravel()[cov].mean())
                if q["family"] == "existence":
                    kept_by_organ[q["organ"]] = a.keep_grid.ravel()
            if baselines and a.kept > 0:
                for mode in BASELINES:
                    b = pred.ask(q["question"], budget=Budget(mode, float(a.kept), seed=i * 100 + j), max_new_tokens=8)
                    row[f"{mode}_prediction"] = b.text
            if curve:
                row["curve_predictions"] = {}
                for k in curve:
                    for mode in ("top_k",) + BASELINES:
                        b = pred.ask(q["question"], budget=Budget(mode, float(k), seed=i * 100 + j), max_new_tokens=8)
                        row["curve_predictions"][f"{mode}:{k}"] = b.text
            rows.append(row)
        names = sorted(kept_by_organ)
        for x in range(len(names)):
            for y in range(x + 1, len(names)):
                rows.append(dict(scan=i, family="_pair", jaccard=jaccard(kept_by_organ[names[x]], kept_by_organ[names[y]]),
                                 organs=[names[x], names[y]]))
        if noise:
            pred.set_volume(torch.rand_like(frames), prior=None if prior is None else torch.rand_like(prior))
            for q in qa:
                if q["answer_type"] in ("closed", "choice"):
                    n = pred.ask(q["question"], max_new_tokens=8)
                    rows.append(dict(scan=i, family="_noise", answer_type=q["answer_type"], source_family=q["family"],
                                     answer=q["answer"], prediction=n.text))
    rescore(rows)
    return rows


def evaluate_records(pred: Predictor, recs: list[dict], rank: int = 0, world: int = 1,
                     max_new_tokens: int = 16) -> list[dict]:
    """Ask every record (see `datasets.read_records`); sharded by image, each volume encoded once.
    A volume that cannot be read is reported on its rows (error, score 0), not fatal. A record with
    a ``prior_image`` is asked with that prior scan in the prompt too."""
    by_image: dict[tuple, list[dict]] = {}
    for r in recs:
        by_image.setdefault((r["image"], r.get("prior_image")), []).append(r)
    model_space = lambda path: torch.from_numpy(np.load(path).astype(np.float32))  # noqa: E731
    rows = []
    for n, ((image, prior), group) in enumerate(by_image.items()):
        if n % world != rank:
            continue
        read = model_space if group[0].get("space") == "model" else load_volume
        try:
            pred.set_volume(read(image), prior=read(prior) if prior else None)
            error = None
        except (ValueError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
        for r in group:
            base = dict(question=r["question"], answer=r["answer"], family=r.get("family", "all"),
                        answer_type=r.get("answer_type", "open"), organ=r.get("organ"),
                        image=Path(image).name, **({"subtype": r["subtype"]} if r.get("subtype") else {}))
            if error:
                rows.append(base | dict(prediction="", kept=0, error=error))
                continue
            a = pred.ask(r["question"], budget=r.get("budget"), max_new_tokens=max_new_tokens)
            rows.append(base | dict(prediction=a.text, kept=a.kept, total=a.total))
    rescore(rows)
    return rows


def read_predictions(path: Path) -> list[dict]:
    """A predictions JSONL (see ``--score``): rows need "answer" and "prediction" (the evaluator's own
    audit rows, families "_pair" and "_noise", pass as written); "family" defaults to "all",
    "answer_type" to "open"."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(r, dict):
            raise ValueError(f"{path}:{n}: not a JSON object")
        r.setdefault("family", "all")
        if not str(r["family"]).startswith("_"):
            missing = [k for k in ("answer", "prediction") if k not in r]
            if missing:
                raise ValueError(f"{path}:{n}: no {' or '.join(repr(k) for k in missing)} field")
            r.setdefault("answer_type", "open")
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


def summarise(rows: list[dict]) -> dict:
    qa = [r for r in rows if not r["family"].startswith("_")]
    out = {"families": aggregate(qa), "n_questions": len(qa)}
    for f, bal in balanced_accuracy(qa).items():
        out["families"][f]["balanced_accuracy"] = bal
    frac = lambda rs: float(np.mean([r["kept"] / r.get("total", 1000) for r in rs])) if rs else None  # noqa: E731
    counted = [r for r in qa if "kept" in r]                 # predictions from elsewhere may not say
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
        out["clean_closed_accuracy"] = float(np.mean([r["scores"]["accuracy"] for r in clean])) if clean else None
    for mode in BASELINES:
        b = [dict(family=r["family"], scores=r[f"{mode}_scores"]) for r in qa if f"{mode}_scores" in r]
        if b:
            out[f"{mode}_matched"] = aggregate(b)
    curve_rows = [r for r in qa if "curve" in r]
    if curve_rows:
        keys = list(curve_rows[0]["curve"])
        out["curve_macro"] = {key: aggregate([dict(family=r["family"], scores=r["curve"][key]) for r in curve_rows])["macro"]
                              for key in keys}
    first = [r["latency_first_s"] for r in qa if r.get("latency_first_s") is not None]
    if first:
        out["cpu_latency_set_volume_plus_first_ask_s_median"] = float(np.median(first))
        out["cpu_latency_ask_s_median"] = float(np.median([r["latency_ask_s"] for r in qa]))
    return out


def add_bertscore(rows: list[dict], model_dir: str, num_layers: int | None = None) -> None:
    """Add BERTScore F1 (``metrics.bertscore``, a local model folder) to the scores of open-answer rows."""
    from photon_core.eval.metrics import bertscore
    graded = [r for r in rows if r.get("answer_type") == "open" and "scores" in r and not r["family"].startswith("_")]
    if graded:
        for r, b in zip(graded, bertscore([r["prediction"] for r in graded], [r["answer"] for r in graded],
                                          model_dir, num_layers)):
            r["scores"]["bertscore_f1"] = b["bertscore_f1"]


COLUMNS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "mra": "MRA", "exact": "exact",
           "bleu1": "BLEU-1", "rouge1": "ROUGE-1", "bertscore_f1": "BERTScore F1"}   # optional: shown if any row has it
OPTIONAL = ("bertscore_f1",)


def markdown(summary: dict) -> str:
    fams = {f: d for f, d in summary["families"].items() if f != "macro"}
    cols = [k for k in COLUMNS if k not in OPTIONAL or any(k in d for d in fams.values())]
    lines = ["| family | n | " + " | ".join(COLUMNS[k] for k in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for f, d in fams.items():
        lines.append(f"| {f} | {d['n']} | " + " | ".join(f"{d[k]:.3f}" if k in d else "" for k in cols) + " |")
    lines.append(f"\nmacro average: {summary['families']['macro']:.3f}")
    if summary.get("curve_macro"):
        ks = sorted({int(k.split(":")[1]) for k in summary["curve_macro"]})
        modes = list(dict.fromkeys(k.split(":")[0] for k in summary["curve_macro"]))
        lines += ["", "macro score vs kept tokens:", "", "| kept | " + " | ".join(modes) + " |",
                  "|---|" + "---|" * len(modes)]
        for k in ks:
            lines.append(f"| {k} | " + " | ".join(f"{summary['curve_macro'][f'{m}:{k}']:.3f}" for m in modes) + " |")
        lines.append("")
    if summary.get("official"):
        lines += ["", official_markdown(summary["official"])]
    for k, v in summary.items():
        if v is None:
            continue
        if k not in ("families", "curve_macro") and not isinstance(v, dict):
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
            lines.append(f"| {name} | " + ", ".join(f"{k} {v:.4f}" for k, v in vals.items()
                                                    if isinstance(v, float)) + " |")
    for key in ("total", "overall"):
        if key in fig:
            v = fig[key]["accuracy"] if isinstance(fig[key], dict) else fig[key]
            lines.append(f"| {key} | {v:.4f} |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out: Path, about: dict, bertscore_model: str | None = None,
                 bertscore_layers: int | None = None, protocol: str | None = None) -> None:
    """predictions.jsonl, metrics.json and metrics.md in ``out``; the table is printed too. ``protocol``
    adds the figures an official evaluator gives (official.py) under "official"."""
    if bertscore_model:
        add_bertscore(rows, bertscore_model, bertscore_layers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarise(rows) | about
    if protocol:
        summary["official"] = official(rows, protocol, bertscore_model, bertscore_layers)
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    (out / "metrics.md").write_text(markdown(summary))
    print(markdown(summary))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", type=Path, help="our JSONL, a CSV or folder of CSVs (3D-RAD-style), a JSON list "
                                              "(DeepTumorVQA-style)")
    ap.add_argument("--images", type=Path, help="folder the records' image paths are relative to")
    ap.add_argument("--columns", nargs="*", default=[], help="field=COLUMN overrides, e.g. image=VolumeName")
    ap.add_argument("--dry-run", action="store_true", help="print the first records as read, then stop")
    ap.add_argument("--demo-split", choices=SPLITS)
    ap.add_argument("--scans", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--enlargement", type=float, default=0.0,
                    help="demo split: share of scans with an enlarged organ, and its questions (0 = off)")
    ap.add_argument("--pairs", type=int, default=0,
                    help="demo split: temporal pairs (prior + current) after the scans, with longitudinal questions")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--curve", type=int, nargs="*", default=[],
                    help="kept-token counts for accuracy-vs-tokens curves (ITS top-k vs the baselines)")
    ap.add_argument("--bertscore-model", help="local encoder folder (safetensors) for BERTScore of open answers; "
                                              "off when not given (nothing is downloaded)")
    ap.add_argument("--bertscore-layers", type=int, default=None,
                    help="hidden layer whose states BERTScore compares (default: the last)")
    ap.add_argument("--score", type=Path, metavar="PREDICTIONS_JSONL",
                    help="compute the metrics of a predictions file (this tool's or another model's); no model is run")
    ap.add_argument("--protocol", choices=PROTOCOLS,
                    help="also compute the figures an official evaluator gives (3D-RAD: Photon's "
                         "evaluation.py; DeepTumorVQA: Photon's scripts or the benchmark's own scorer); rows "
                         "need family and subtype")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.score:
        if args.data or args.demo_split or args.model:
            ap.error("--score scores saved answers: it runs no model, so --data, --demo-split and --model do not go with it")
        try:
            rows = read_predictions(args.score)
        except (OSError, ValueError) as e:
            ap.error(str(e))
        rescore(rows)
        write_report(rows, args.out, {"scored_from": args.score.name}, args.bertscore_model, args.bertscore_layers,
                     args.protocol)
        return
    if args.data and args.dry_run:
        recs = read_records(args.data, parse_columns(args.columns), args.images)
        print(f"{len(recs)} records")
        for r in recs[:5]:
            print(json.dumps(r))
        return
    rank, world = init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    pred = Predictor(args.model, subfolder=args.subfolder, revision=args.revision, device=args.device)
    if args.data:
        rows = evaluate_records(pred, read_records(args.data, parse_columns(args.columns), args.images), rank, world)
    else:
        rows = evaluate_demo(pred, args.demo_split or "test", args.scans, args.seed, rank, world,
                             baselines=not args.no_baselines, curve=tuple(args.curve), enlargement=args.enlargement,
                             pairs=args.pairs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"predictions.rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if world > 1:
        dist.barrier()
    if rank == 0:
        allrows = []
        for r in range(world):
            p = args.out / f"predictions.rank{r}.jsonl"
            allrows += [json.loads(x) for x in p.read_text().splitlines()]
            p.unlink()
        write_report(allrows, args.out, {"model": pred.name, "checkpoint": pred.checkpoint.to_dict(),
                                         "device": str(pred.device), "world_size": world},
                     args.bertscore_model, args.bertscore_layers, args.protocol)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
