"""Evaluate a Photon model: accuracy per task family, MRA, keep rate, retention audit, baselines.

    python -m photon_core.eval --demo-split test --scans 20 --curve 50 100 200 400 --out reports/demo_test
    python -m photon_core.eval --demo-split test --scans 0 --pairs 12 \\
        --out reports/demo_temporal                                          # prior + current
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
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from photon_core.eval.datasets import DatasetError, parse_columns, read_records
from photon_core.eval.official import PROTOCOLS
from photon_core.eval.progress import Progress
from photon_core.eval.report import (
    failure_line,
    failures,
    read_predictions,
    rescore,
    write_atomic,
    write_report,
)
from photon_core.inference.predictor import MAX_NEW_TOKENS_LIMIT, Predictor
from photon_core.io.volume import load_volume
from photon_core.model.budget import Budget
from photon_core.model.hub import add_model_arguments
from photon_core.train.distributed import init_distributed
from photon_core.train.synthetic.splits import SPLITS


def evaluate_records(pred: Predictor, recs: list[dict], rank: int = 0, world: int = 1,
                     max_new_tokens: int = 32, budget: str | None = None,
                     rows: list[dict] | None = None) -> list[dict]:
    """Ask every record (see `datasets.read_records`); sharded by image, each volume encoded once.
    A volume that cannot be read, or a question that cannot be asked (too long, a budget the
    checkpoint cannot run), is reported on its rows (error, score 0), not fatal: one bad record does
    not cost the rest of the set. A record with a ``prior_image`` is asked with that prior scan in
    the prompt too. ``budget`` applies to the records without a budget of their own (None: the
    checkpoint's default). ``max_new_tokens``: the longest answer (32, as photon-ask and the app decode).
    Rows are appended to ``rows`` as they are answered, so a caller that is interrupted keeps the ones
    finished."""
    by_image: dict[tuple, list[dict]] = {}
    for r in recs:
        by_image.setdefault((r["image"], r.get("prior_image")), []).append(r)
    model_space = lambda path: torch.from_numpy(np.load(path).astype(np.float32))  # noqa: E731
    rows = [] if rows is None else rows
    progress = Progress(len(by_image), rank, world)
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
            try:
                a = pred.ask(r["question"], budget=r.get("budget") or budget, max_new_tokens=max_new_tokens)
            except ValueError as e:
                rows.append(base | dict(prediction="", kept=0, error=f"question not asked: {e}"))
                continue
            rows.append(base | dict(prediction=a.text, kept=a.kept, total=a.total, budget=a.budget))
        progress.done(len(group))
    rescore(rows)
    return rows


def _refuse(message: str) -> None:
    """One line, exit status 2: a mistake in what the user asked for, said before any model loads."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def _plan(args) -> tuple[list[dict] | None, str]:
    """Everything that can be checked without a model, checked before one loads (a model takes seconds
    to minutes): the records of --data, or the demo split's size, the budget, the --out folder.
    Returns the records (None for the demo split) and a one-line description of the run."""
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        _refuse(f"--max-new-tokens {args.max_new_tokens}: an answer is 1 to {MAX_NEW_TOKENS_LIMIT} tokens")
    if args.budget is not None:
        try:
            Budget.parse(args.budget)
        except ValueError as e:
            _refuse(f"--budget {args.budget}: {e}")
    recs = None
    if args.data:
        if args.curve:
            _refuse("--curve draws accuracy-vs-kept-tokens curves on the demo split (--demo-split); "
                    "with --data, run once per budget with --budget N and compare the reports")
        try:
            recs = read_records(args.data, parse_columns(args.columns), args.images)
        except (DatasetError, ValueError, UnicodeError) as e:
            _refuse(str(e))
        except OSError as e:
            _refuse(f"{args.data}: {e.strerror or e}")
        if not recs:
            _refuse(f"{args.data}: no records to evaluate (the file is empty or holds only a header)")
        what = f"{len(recs)} records of {args.data}"
    else:
        if args.scans < 0 or args.pairs < 0:
            _refuse("--scans and --pairs count scans to generate: 0 or more")
        if args.scans + args.pairs == 0:
            _refuse("nothing to evaluate: --scans 0 and no --pairs")
        what = (f"{args.scans} scans" + (f" and {args.pairs} temporal pairs" if args.pairs else "")
                + f" of the demo split {args.demo_split or 'test'!r} (seed {args.seed}), every supported "
                "question of each" + ("" if args.no_baselines else ", with the matched baselines")
                + (f", curves at {', '.join(map(str, args.curve))} kept tokens" if args.curve else ""))
    if args.budget is not None:
        what += f", budget {args.budget}" + (" (where a record names none)" if recs else "")
    _check_out(args.out)
    return recs, what


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        _refuse(f"--out {out} is a file; name a folder for the report")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", type=Path,
                    help="our JSONL, a CSV or folder of CSVs (3D-RAD-style), a JSON list "
                         "(DeepTumorVQA-style)")
    ap.add_argument("--images", type=Path, help="folder the records' image paths are relative to")
    ap.add_argument("--columns", nargs="*", default=[], help="field=COLUMN overrides, e.g. image=VolumeName")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the data and options, print what would be evaluated (the first records "
                         "as read), then stop; no model is loaded")
    ap.add_argument("--demo-split", choices=SPLITS)
    ap.add_argument("--scans", type=int, default=40,
                    help="demo-split scans to generate (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="demo-split generator seed (default: %(default)s)")
    ap.add_argument("--enlargement", type=float, default=0.0,
                    help="demo split: share of scans with an enlarged organ, and its questions (0 = off)")
    ap.add_argument("--pairs", type=int, default=0,
                    help="demo split: temporal pairs (prior + current) after the scans, "
                         "with longitudinal questions")
    ap.add_argument("--budget", default=None,
                    help="keep budget of every question, as photon-ask takes it: auto | full | 300 | 25%% | "
                         "threshold:0.4 | ... (default: the checkpoint's own); with --data, a record's "
                         "own budget field wins")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help=f"longest answer, in tokens (default: 32 with --data, as photon-ask and the "
                         f"app; 8 for the demo split's short answers; at most {MAX_NEW_TOKENS_LIMIT})")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--curve", type=int, nargs="*", default=[],
                    help="demo split: kept-token counts for accuracy-vs-tokens curves (ITS top-k vs the "
                         "baselines)")
    ap.add_argument("--bertscore-model",
                    help="local encoder folder (safetensors) for BERTScore of open answers; "
                         "off when not given (nothing is downloaded)")
    ap.add_argument("--bertscore-layers", type=int, default=None,
                    help="hidden layer whose states BERTScore compares (default: the last)")
    ap.add_argument("--score", type=Path, metavar="PREDICTIONS_JSONL",
                    help="compute the metrics of a predictions file (this tool's or another model's); "
                         "no model is run")
    ap.add_argument("--protocol", choices=PROTOCOLS,
                    help="also compute the figures an official evaluator gives (3D-RAD: Photon's "
                         "evaluation.py; DeepTumorVQA: Photon's scripts or the benchmark's own scorer); rows "
                         "need family and subtype")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.score:
        if args.data or args.demo_split or args.model:
            ap.error("--score scores saved answers: it runs no model, "
                     "so --data, --demo-split and --model do not go with it")
        try:
            rows = read_predictions(args.score)
        except (OSError, ValueError) as e:
            ap.error(str(e))
        _check_out(args.out)
        rescore(rows)
        write_report(rows, args.out, {"scored_from": args.score.name}, args.bertscore_model,
                     args.bertscore_layers, args.protocol)
        if line := failure_line(rows):
            print(line, file=sys.stderr)
        return
    recs, what = _plan(args)
    if args.dry_run:
        print(f"would evaluate {what}; report to {args.out}")
        for r in (recs or [])[:5]:
            print(json.dumps(r))
        return
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _refuse(f"--out {args.out}: {e.strerror or e}")
    rank, world = init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    try:
        pred = Predictor(args.model, subfolder=args.subfolder, revision=args.revision, device=args.device)
    except ValueError as e:                             # a checkpoint that cannot load, in words
        _refuse(str(e))
    if args.budget is not None and (why := pred.supports(args.budget)):
        _refuse(f"--budget {args.budget}: {why}")
    new_tokens = args.max_new_tokens or (32 if recs is not None else 8)
    about = {"model": pred.name, "checkpoint": pred.checkpoint.to_dict(), "device": str(pred.device),
             "world_size": world, "max_new_tokens": new_tokens} | (
                 {"budget": args.budget} if args.budget is not None else {})
    rows: list[dict] = []
    started = time.time()
    main_thread = threading.current_thread() is threading.main_thread()   # (signals are the main thread's)
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        try:
            if recs is not None:
                evaluate_records(pred, recs, rank, world, max_new_tokens=new_tokens, budget=args.budget,
                                 rows=rows)
            else:
                from photon_core.eval.demo import evaluate_demo  # the synthetic data: torch-side generator

                evaluate_demo(pred, args.demo_split or "test", args.scans, args.seed, rank, world,
                              baselines=not args.no_baselines, curve=tuple(args.curve),
                              enlargement=args.enlargement, pairs=args.pairs, budget=args.budget, rows=rows,
                              max_new_tokens=new_tokens)
        except KeyboardInterrupt as e:
            _interrupted(rows, args, about, rank, world, started, e)
        write_atomic(_shard(args.out, rank), "".join(json.dumps(r) + "\n" for r in rows))
        if world > 1:
            try:
                dist.barrier()
            except KeyboardInterrupt as e:      # stopped while waiting for the other ranks: rows written
                _interrupted(None, args, about, rank, world, started, e)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if rank == 0:
        allrows = []
        for r in range(world):
            p = _shard(args.out, r)
            allrows += [json.loads(x) for x in p.read_text().splitlines()]
            p.unlink()
        write_report(allrows, args.out, about, args.bertscore_model, args.bertscore_layers, args.protocol)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0 and (line := failure_line(allrows)):
        print(line, file=sys.stderr)
        if len(failures(allrows)) == len([r for r in allrows if not r["family"].startswith("_")]):
            print(f"error: every record failed; nothing was answered (see {args.out / 'metrics.md'})",
                  file=sys.stderr)
            raise SystemExit(1)


MERGE_WAIT_S = 20.0   # rank 0 waits this long for the other ranks' rows (torchrun kills them after 30 s)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's stop, or torchrun passing one on to its workers), met as Ctrl-C is."""


def _terminated(signum, frame):
    raise Terminated


def _shard(out: Path, rank: int) -> Path:
    return out / f"predictions.rank{rank}.jsonl"


def _interrupted(rows: list[dict] | None, args, about: dict, rank: int, world: int, started: float,
                 how: KeyboardInterrupt) -> None:
    """Ctrl-C (or SIGTERM): keep what was answered, marked interrupted, and exit 130 (143 for SIGTERM), as
    a shell does. Under torchrun (which passes the signal on to every rank) each rank writes its rows to
    predictions.rankN.jsonl; rank 0 waits up to ``MERGE_WAIT_S`` for the others' and writes the report of
    all it found, naming any rank missing (whose file, if it comes later, ``--score`` reads). ``rows``
    None: this rank's file is already written."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut the files short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = 143 if isinstance(how, Terminated) else 130
    if rows is not None:
        rescore(rows)
    if world > 1:
        if rows is not None:
            write_atomic(_shard(args.out, rank), "".join(json.dumps(r) + "\n" for r in rows))
        if rank != 0:
            print(f"\ninterrupted: rank {rank} kept its rows in {_shard(args.out, rank)}", file=sys.stderr)
            raise SystemExit(code)
        found = _await_shards(args.out, world, started)
        rows = [json.loads(x) for r in found for x in _shard(args.out, r).read_text().splitlines()]
        missing = [r for r in range(world) if r not in found]
        about = about | {"ranks_merged": found} | ({"ranks_missing": missing} if missing else {})
        if missing:
            print(f"\ninterrupted: rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} wrote no "
                  f"rows within {MERGE_WAIT_S:.0f} s; the report holds ranks {', '.join(map(str, found))}",
                  file=sys.stderr)
    if world > 1:
        for r in about["ranks_merged"]:             # merged (or empty): the report holds what they held
            _shard(args.out, r).unlink()
    if rows:
        write_report(rows, args.out, about | {"interrupted": True}, args.bertscore_model,
                     args.bertscore_layers, args.protocol)
        print(f"\ninterrupted: the report of the {len(rows)} rows answered so far is in {args.out}",
              file=sys.stderr)
    else:
        print("\ninterrupted before any question was answered; nothing written", file=sys.stderr)
    raise SystemExit(code)


def _await_shards(out: Path, world: int, started: float) -> list[int]:
    """The ranks whose rows file of this run (written since it started) is there, waiting up to
    ``MERGE_WAIT_S`` for all of them."""
    deadline = time.monotonic() + MERGE_WAIT_S
    while True:
        found = [r for r in range(world) if _written_since(_shard(out, r), started)]
        if len(found) == world or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _written_since(p: Path, t: float) -> bool:
    try:
        return p.stat().st_mtime >= t - 1.0      # (a file left by an earlier run is not this run's)
    except FileNotFoundError:
        return False


if __name__ == "__main__":
    main()
