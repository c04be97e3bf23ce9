"""Do the visual tokens hold the findings? A diagnostic that measures and prints.

A linear probe (logistic regression on the standardised visual tokens) is fit on scans of the demo
generator's train split to tell token blocks that hold a lesion or effusion from the others, then
scored on the test split: the per-token AUROC, and the scan-level AUROC of each scan's highest token
score against "the scan has a finding". The per-token figure can come from where findings may lie
(organ tissue versus air); the per-token figure within tissue (finding blocks against the other
blocks that are ≥ 25% organ, the audit's block rule) and the scan-level figure cannot — they are 0.5
when the tokens do not mark the findings themselves, whatever the LLM does with them.

The same figures for a classical blob detector on the voxels (no learning: a block's score is its
largest |difference of Gaussians|, σ 4 mm − 12 mm) tell how conspicuous the findings are.

    python research/detect_probe.py --scans 48                       # shipped model, real geometry
    python research/detect_probe.py --model runs/x/model --downsample 2.5
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from photon_core.eval.metrics import auroc
from photon_core.inference.predictor import DEMO_MODEL
from photon_core.io.preprocess import TOKEN_VOXELS, blocks, patchify
from photon_core.model.checkpoint import load_model
from photon_core.organs import BLOCK_FRACTION
from photon_core.train.aux_head import standardise_tokens
from photon_core.train.synthetic.generator import DemoGenerator
from photon_core.train.targets import token_targets


def _gaussian_blur(v: torch.Tensor, sigma_mm: float, voxel_mm: tuple) -> torch.Tensor:
    """Separable Gaussian blur of a (D, H, W) volume, σ in mm (edges replicated)."""
    out = v[None, None]
    for axis, vox in enumerate(voxel_mm):
        s = sigma_mm / vox
        r = max(1, int(3 * s))
        k = torch.exp(-torch.arange(-r, r + 1, dtype=v.dtype) ** 2 / (2 * s * s))
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), (k / k.sum()).reshape(shape))
    return out[0, 0]


def blob_scores(frames: torch.Tensor, grid: tuple, voxel_mm: tuple) -> torch.Tensor:
    """(V,) each token block's largest |difference of Gaussians| (σ 4 mm − 12 mm): a classical blob
    detector, the reference for what the visual tokens could mark."""
    dog = (_gaussian_blur(frames, 4.0, voxel_mm) - _gaussian_blur(frames, 12.0, voxel_mm)).abs()
    return blocks(dog, grid).amax((1, 3, 5)).flatten()


@torch.no_grad()
def tokens(model, split: str, scans: int, downsample: float, seed: int = 7, blob: bool = False,
           standardise: bool = False) -> dict:
    """Of ``scans`` scans: ``x`` (scans, V, D) visual tokens, ``y`` (scans, V) "block holds
    a finding", ``tissue`` (scans, V) "block is ≥ 25% organ (the audit's block rule) or holds a
    finding"; with ``blob``, also ``blob`` (scans, V) the blob detector's scores."""
    gen = DemoGenerator(split, seed=seed, pool=3, downsample=downsample)
    grid = tuple(n // v for n, v in zip(gen.shape, TOKEN_VOXELS))
    voxel_mm = gen.pool[0].voxel_mm
    out = {k: [] for k in ("x", "y", "tissue") + (("blob",) if blob else ())}
    for _ in range(scans):
        frames, _, _, organs = gen.sample()
        tg = token_targets(organs, gen.last_truth, grid)
        y = tg["lesion"] > 0
        x = model.encode_volume(*patchify(frames[:, None])).float()
        out["x"].append(standardise_tokens(x[None])[0] if standardise else x)
        out["y"].append(y)
        out["tissue"].append((tg["organ"].sum(-1) >= BLOCK_FRACTION) | y)
        if blob:
            out["blob"].append(blob_scores(frames, grid, voxel_mm))
    return {k: torch.stack(v) for k, v in out.items()}


def figures(s: torch.Tensor, t: dict) -> dict:
    """Per-token, per-token within tissue and scan-level (max token) AUROC of block scores ``s``."""
    y, m = t["y"], t["tissue"]
    return dict(token_auroc=auroc(s.flatten().tolist(), y.flatten().tolist()),
                tissue_auroc=auroc(s[m].tolist(), y[m].tolist()),
                scan_auroc=auroc(s.amax(1).tolist(), y.any(1).tolist()))


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
    ap.add_argument("--scans", type=int, default=48,
                    help="scans to fit on (train split) and to score (test)")
    ap.add_argument("--downsample", type=float, default=1.0,
                    help="the stream's grid (2.5 → 64 visual tokens)")
    ap.add_argument("--standardise", action="store_true",
                    help="probe each scan's tokens as deviations from its mean token "
                         "(--aux-standardise towers)")
    args = ap.parse_args(argv)
    model = load_model(args.model or DEMO_MODEL, "cpu", torch.float32).eval()
    fit = tokens(model, "train", args.scans, args.downsample, standardise=args.standardise)
    test = tokens(model, "test", args.scans, args.downsample, blob=True, standardise=args.standardise)
    y = test["y"]
    print(f"test split: {int(y.sum())} of {y.numel()} blocks hold a finding "
          f"({int(test['tissue'].sum())} tissue blocks); {int(y.any(1).sum())} of {len(y)} scans have one")
    out = {}
    for name, s in (("probe", fit_probe(fit["x"], fit["y"])(test["x"])), ("blob", test["blob"])):
        out[name] = f = figures(s, test)
        print(f"{name}: per-token AUROC {f['token_auroc']:.3f}, within tissue {f['tissue_auroc']:.3f}; "
              f"scan-level (max token) AUROC {f['scan_auroc']:.3f}")
    return out


if __name__ == "__main__":
    main()
