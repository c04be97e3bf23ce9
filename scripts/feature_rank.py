"""How many directions do the visual tokens use, and does the question move ITS's ranking? Measures and prints.

For test-split scans of the demo generator, per background (abdominal, chest):

* the visual tokens (the merger's output, what the LLM reads) and the tower's hidden states (the
  merger's input): mean norm, the share of the norm that is the mean vector all tokens share, and the
  share of the variance (over tokens, around that mean) in the top 1 / 3 / 10 principal directions.
  A share near 1 in one direction means the tokens differ from each other along one line: the LLM
  gets a scalar per token (roughly its density), whatever the tower's width;
* ITS's saliency ρ for "Is there a lesion in the {organ}?" over every labelled organ of the scan:
  the mean correlation of ρ between two questions, and the question-dependent share of ρ's variance
  (variance across questions, per token, over variance across tokens, per question). A correlation
  of 1 and a share of 0 mean the same tokens rank first whatever organ is asked: no budget can make
  the kept sets of two organ prompts differ;
* the correlation of ρ on the scan with ρ on uniform noise of its shape, for the same question.

    python scripts/feature_rank.py                     # shipped model, 6 test scans
    python scripts/feature_rank.py --model runs/x/model --scans 12
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from photon_core.data import DemoGenerator
from photon_core.predictor import DEMO_MODEL, Predictor


def spectrum(x: torch.Tensor) -> dict:
    """Norm, mean-vector share and principal-direction variance shares of a (N, D) token matrix."""
    mu = x.mean(0)
    sv2 = torch.linalg.svdvals(x - mu).pow(2)
    share = lambda k: float(sv2[:k].sum() / sv2.sum().clamp_min(1e-12))  # noqa: E731
    return dict(norm=float(x.norm(dim=-1).mean()), mean_share=float(mu.norm() / x.norm(dim=-1).mean()),
                top1=share(1), top3=share(3), top10=share(10))


def question_dependence(rho: np.ndarray) -> tuple[float, float]:
    """(questions, tokens) ρ → mean pairwise correlation between questions, question-dependent variance share."""
    c = np.corrcoef(rho)
    off = c[~np.eye(len(rho), dtype=bool)]
    return float(np.nanmean(off)), float(rho.var(0).mean() / max(rho.var(1).mean(), 1e-12))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    ap.add_argument("--scans", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    folder = args.model or DEMO_MODEL
    pred = Predictor(folder, device="cpu")
    hidden = {}          # the merger's input, caught as set_volume encodes; its output is pred.features
    pred.model.visual.merger.register_forward_hook(lambda mod, inp, out: hidden.__setitem__("x", inp[0]))
    gen = DemoGenerator("test", seed=args.seed)
    rows: dict[str, list] = {}
    for _ in range(args.scans):
        frames, _, meta, organs = gen.sample()
        body = "chest" if meta["background"].startswith("chest") else "abdomen"
        names = [o for o, m in organs.items() if bool(m.any())]
        questions = [f"Is there a lesion in the {o}?" for o in names]
        pred.set_volume(frames)
        tokens, tower = pred.features.float(), hidden["x"].float()
        rho = np.stack([pred.ask(q, max_new_tokens=1).rho.ravel() for q in questions])
        pred.set_volume(torch.rand_like(frames))
        noise = np.stack([pred.ask(q, max_new_tokens=1).rho.ravel() for q in questions])
        corr, share = question_dependence(rho)
        rows.setdefault(body, []).append(dict(
            tokens=spectrum(tokens), hidden=spectrum(tower), corr=corr, share=share,
            noise=float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(rho, noise)]))))
    mean = lambda xs: statistics.mean(xs)  # noqa: E731
    print(f"model: {folder}")
    summary = {}
    for body, rs in rows.items():
        summary[body] = dict(corr=mean([r["corr"] for r in rs]), share=mean([r["share"] for r in rs]),
                             **{f"tokens_{k}": mean([r["tokens"][k] for r in rs]) for k in rs[0]["tokens"]})
        print(f"\n{body}: {len(rs)} scans")
        for part in ("tokens", "hidden"):
            s = {k: mean([r[part][k] for r in rs]) for k in rs[0][part]}
            label = "visual tokens (merger output)" if part == "tokens" else "tower hidden (merger input)"
            print(f"  {label:31s} norm {s['norm']:7.2f}  mean-vector share {s['mean_share']:.3f}  "
                  f"variance in top 1 / 3 / 10 directions {s['top1']:.3f} / {s['top3']:.3f} / {s['top10']:.3f}")
        print(f"  ITS rho between two organ questions: correlation {mean([r['corr'] for r in rs]):.3f}, "
              f"question-dependent variance share {mean([r['share'] for r in rs]):.3f}")
        print(f"  ITS rho, scan vs uniform noise (same question): correlation {mean([r['noise'] for r in rs]):.3f}")
    return summary


if __name__ == "__main__":
    main()
