"""Evaluation on the synthetic demo split, where the exact ground truth allows an audit of what was kept.

Every supported question of each generated scan is asked under the auto budget; beside the answers:
the asked organ's blocks kept (coverage), the Jaccard of two organ prompts' kept sets on one scan,
the same questions under FastV / VisionZip-style / random-k at the kept count ITS chose (matched
budgets), optional accuracy-vs-kept-tokens curves, and the same closed questions with the volume
replaced by uniform noise (accuracy and the asked organ's coverage there: do the answers and where
the model looks come from the scan?).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from photon_core.eval.progress import Progress
from photon_core.eval.report import BASELINES, rescore
from photon_core.inference.audit import jaccard
from photon_core.inference.predictor import Predictor
from photon_core.io.preprocess import block_fractions
from photon_core.model.budget import MIN_KEEP_TOKENS, Budget
from photon_core.organs import block_cover
from photon_core.train.synthetic.generator import DemoGenerator


def organ_block_cover(mask: torch.Tensor) -> np.ndarray:
    """Model-space organ mask (140, 280, 280) → (1000,) blocks ≥ 25% that organ (the paper's retention
    analysis; an organ with none is not scored, as in every committed report)."""
    return block_cover(block_fractions(mask), small=False).cpu().numpy()


def evaluate_demo(pred: Predictor, split: str, scans: int, seed: int, rank: int = 0, world: int = 1,
                  baselines: bool = True, noise: bool = True, curve: tuple = (), enlargement: float = 0.0,
                  pairs: int = 0, budget: str | None = None, rows: list[dict] | None = None,
                  max_new_tokens: int = 8) -> list[dict]:
    """Generate ``scans`` scans of the demo split and ask every supported question on each; then
    ``pairs`` temporal pairs (prior + current in each prompt) with their longitudinal questions.
    ``budget`` (None: the checkpoint's own) is ITS's; the baselines match the count it kept. Rows are
    appended to ``rows`` as they are finished, so a caller that is interrupted keeps them. Answers are
    decoded to at most ``max_new_tokens`` (the split's answer forms take fewer than 8)."""
    gen = DemoGenerator(split, seed=seed, pool=3, enlargement=enlargement)
    rows = [] if rows is None else rows
    progress = Progress(scans + pairs, rank, world)
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
            # budget None: the checkpoint's (S1: full)
            a = pred.ask(q["question"], budget=budget, max_new_tokens=max_new_tokens)
            ask_s = time.perf_counter() - t1
            row = dict(scan=i, **{k: q[k] for k in ("question", "answer", "family", "answer_type", "organ")},
                       prediction=a.text, kept=a.kept, total=a.total, theta=a.theta,
                       latency_first_s=set_s + ask_s if j == 0 and prior is None else None,
                       latency_ask_s=ask_s)
            if prior is not None:
                row["pair"] = True
            if q["organ"] in covers and covers[q["organ"]].any():
                cov = covers[q["organ"]]
                row["organ_coverage"] = float(a.keep_grid.ravel()[cov].mean())
                if q["family"] == "existence":
                    kept_by_organ[q["organ"]] = a.keep_grid.ravel()
            if baselines and a.kept >= MIN_KEEP_TOKENS:      # (a baseline below the floor is refused)
                for mode in BASELINES:
                    b = pred.ask(q["question"], budget=Budget(mode, float(a.kept), seed=i * 100 + j),
                                 max_new_tokens=max_new_tokens)
                    row[f"{mode}_prediction"] = b.text
            if curve:
                row["curve_predictions"] = {}
                for k in curve:
                    for mode in ("top_k",) + BASELINES:
                        b = pred.ask(q["question"], budget=Budget(mode, float(k), seed=i * 100 + j),
                                     max_new_tokens=max_new_tokens)
                        row["curve_predictions"][f"{mode}:{k}"] = b.text
            rows.append(row)
        names = sorted(kept_by_organ)
        for x in range(len(names)):
            for y in range(x + 1, len(names)):
                rows.append(dict(scan=i, family="_pair",
                                 jaccard=jaccard(kept_by_organ[names[x]], kept_by_organ[names[y]]),
                                 organs=[names[x], names[y]]))
        if noise:
            pred.set_volume(torch.rand_like(frames), prior=None if prior is None else torch.rand_like(prior))
            for q in qa:
                if q["answer_type"] in ("closed", "choice"):
                    n = pred.ask(q["question"], budget=budget, max_new_tokens=max_new_tokens)
                    row = dict(scan=i, family="_noise", answer_type=q["answer_type"],
                               source_family=q["family"], answer=q["answer"], prediction=n.text)
                    if q["organ"] in covers and covers[q["organ"]].any():    # the same blocks, on noise
                        row["organ_coverage"] = float(n.keep_grid.ravel()[covers[q["organ"]]].mean())
                    rows.append(row)
        progress.done(len(qa))
    rescore(rows)
    return rows
