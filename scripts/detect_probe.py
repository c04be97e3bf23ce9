"""Do the visual tokens hold the findings? A diagnostic that measures and prints.

A linear probe (logistic regression on the standardised visual tokens) is fit on scans of the demo
generator's train split to tell token blocks that hold a lesion or effusion from the others, then
scored on the test split: the per-token AUROC, and the scan-level AUROC of each scan's highest token
score against "the scan has a finding". The per-token figure can come from where findings may lie
(organ tissue versus air); the scan-level figure cannot — it is 0.5 when the tokens do not mark the
findings themselves, whatever the LLM does with them.

    python scripts/detect_probe.py --scans 48                       # shipped model, real geometry
    python scripts/detect_probe.py --model runs/x/model --downsample 2.5
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from photon_core.checkpoint import load_model
from photon_core.data import DemoGenerator
from photon_core.metrics import auroc
from photon_core.predictor import DEMO_MODEL
from photon_core.preprocess import TOKEN_VOXELS, patchify
from photon_core.train import token_targets


@torch.no_grad()
def tokens(model, split: str, scans: int, downsample: float, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(scans, V, D) visual tokens and (scans, V) "block holds a finding" of ``scans`` scans (lesion bodies)."""
    gen = DemoGenerator(split, seed=seed, pool=3, downsample=downsample, lesion_bodies=True)
    grid = tuple(n // v for n, v in zip(gen.shape, TOKEN_VOXELS))
    x, y = [], []
    for _ in range(scans):
        frames, _, _, organs = gen.sample()
        x.append(model.encode_volume(*patchify(frames[:, None])).float())
        y.append(token_targets(organs, gen.last_truth, grid)["lesion"] > 0)
    return torch.stack(x), torch.stack(y)


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 400):
    """Class-balanced logistic regression with a small L2; returns the scoring function."""
    mu, sd = x.mean((0, 1)), x.std((0, 1)) + 1e-6
    w = torch.zeros(x.shape[-1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    pos_weight = (~y).sum() / y.sum().clamp(min=1)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(((x - mu) / sd) @ w + b, y.float(), pos_weight=pos_weight)
        loss = loss + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda z: (((z - mu) / sd) @ w + b).detach()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the shipped demo model)")
    ap.add_argument("--scans", type=int, default=48, help="scans to fit on (train split) and to score (test)")
    ap.add_argument("--downsample", type=float, default=1.0, help="the stream's grid (2.5 → 64 visual tokens)")
    args = ap.parse_args(argv)
    model = load_model(args.model or DEMO_MODEL, "cpu", torch.float32).eval()
    score = fit_probe(*tokens(model, "train", args.scans, args.downsample))
    x, y = tokens(model, "test", args.scans, args.downsample)
    s = score(x)
    has = y.any(1)
    out = dict(token_auroc=auroc(s.flatten().tolist(), y.flatten().tolist()),
               scan_auroc=auroc(s.amax(1).tolist(), has.tolist()))
    print(f"per-token AUROC {out['token_auroc']:.3f} ({int(y.sum())} of {y.numel()} blocks hold a finding); "
          f"scan-level (max token) AUROC {out['scan_auroc']:.3f} ({int(has.sum())} of {len(has)} scans)")
    return out


if __name__ == "__main__":
    main()
