"""How well can the demo data's findings be told apart at all from one 14³ patch? A diagnostic that
measures and prints: the ceiling a detecting vision tower could reach at a CPU budget.

Patches on the model's 14³ grid are cut from scans of the demo generator with findings: every patch
that is ≥ 2% finding (positive), the same patch of the scan's clean twin (`DemoGenerator.counterfactual`:
same body and acquisition, no finding — a hard negative), and 12 patches of organ tissue without a
finding per scan. Two learners are trained on the train split's patches and scored on the test split's:

  flat   an MLP on the patch's 2,744 voxels (2,744 → 512 → 512 → 1): what a linear 14³ patch
         embedding followed by per-token MLPs can compute — the Photon vision tower's first stage;
  cnn    a small 3-D CNN (3×3×3 convolutions, 16 → 32 → 64 → 64 channels, max-pooled): the same patch
         read translation-equivariantly.

Printed per learner: patch AUROC (finding patches against all negatives, against their clean twins,
against other tissue); then, for each learner, on fresh test scans and their twins, the question-level
figure an existence answer needs: each organ's highest patch score against "this organ holds a
finding" (organ-level AUROC), and each scan's highest against "the scan has one" (scan-level).

``--stream`` trains on a stream of fresh patches instead — crops of the generator's pool bodies at
random offsets, acquired and with a lesion painted as the generator acquires and paints them (each
crop also unpainted, its twin) — ≈ 9,000 patches a second on a 2-core CPU, so the learners see
millions: does more data close the flat reader's gap?

    python research/patch_detect.py                       # ≈ 15 min on a 2-core CPU
    python research/patch_detect.py --stream --steps 12000 --learners flat
    python research/patch_detect.py --scans 40 --test-scans 10 --eval-scans 6 --steps 200 --downsample 2.5
"""
from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from photon_core.eval.metrics import auroc
from photon_core.io.preprocess import PATCH, block_fractions, blocks
from photon_core.train.synthetic.findings import FindingSampler, lesion_sites, sphere_mask
from photon_core.train.synthetic.generator import DemoGenerator

FINDING, TWIN, TISSUE = 1, 2, 3
MIN_SHARE = 0.02            # a patch is positive when ≥ 2% of its voxels are finding
TISSUE_SHARE = 0.25         # the audit's block rule, per patch


def patch_grid(x: torch.Tensor) -> tuple:
    """The (depth, rows, columns) grid of 14³ patches of a (D, H, W) volume."""
    return tuple(n // PATCH for n in x.shape)


def patch_view(x: torch.Tensor) -> torch.Tensor:
    """(D, H, W) → (n, 14, 14, 14) patches on the model's grid, depth-major (a copy)."""
    return blocks(x, patch_grid(x)).permute(0, 2, 4, 1, 3, 5).reshape(-1, PATCH, PATCH, PATCH)


def _scans(split: str, n: int, seed: int, downsample: float):
    """``n`` scans with findings and their clean twins: (frames, twin, organs, finding map, findings)."""
    gen = DemoGenerator(split, seed=seed, pool=6 if split == "train" else 3, downsample=downsample)
    while n:
        frames, _, meta, organs = gen.sample(with_findings=1.0)
        if gen.last_truth is None:            # no site fitted: try another body
            continue
        twin, _ = gen.counterfactual()
        yield frames, twin, organs, gen.last_truth > 0, meta["findings"]
        n -= 1


def organ_shares(organs: dict) -> dict:
    """Each organ's share of every patch."""
    return {o: block_fractions(m, patch_grid(m)) for o, m in organs.items()}


def collect(split: str, scans: int, seed: int, downsample: float = 1.0, tissue_per_scan: int = 12):
    """Patches X (n, 14, 14, 14), labels y (n,) and kinds (FINDING, TWIN, TISSUE)."""
    rng = torch.Generator().manual_seed(seed)
    xs, kinds = [], []
    for frames, twin, organs, truth, _ in _scans(split, scans, seed, downsample):
        share = block_fractions(truth, patch_grid(truth))
        tissue = torch.stack(list(organ_shares(organs).values())).sum(0) >= TISSUE_SHARE
        pos = (share >= MIN_SHARE).nonzero()[:, 0]
        neg = (tissue & (share == 0)).nonzero()[:, 0]
        neg = neg[torch.randperm(len(neg), generator=rng)[:tissue_per_scan]]
        p, t = patch_view(frames), patch_view(twin)
        xs += [p[pos], t[pos], p[neg]]
        kinds += [torch.full((len(pos),), FINDING), torch.full((len(pos),), TWIN),
                  torch.full((len(neg),), TISSUE)]
    kind = torch.cat(kinds)
    return torch.cat(xs), (kind == FINDING).float(), kind


class PatchStream:
    """Fresh 14³ patches: a crop of a pool body around an organ voxel (at a random offset), acquired
    as the generator acquires a scan; with a lesion centred on that voxel painted as the generator
    paints it (nodules in the lungs, cysts and solid lesions elsewhere) and, beside it, the same crop
    unpainted. Crops whose lesion covers < 2% of the patch are drawn again."""

    def __init__(self, split: str = "train", seed: int = 0, downsample: float = 1.0):
        self.gen = DemoGenerator(split, seed=seed, pool=6 if split == "train" else 3, downsample=downsample)
        self.rng = self.gen.rng
        self.bodies = []
        for bg in self.gen.pool:
            lungs, solid = lesion_sites(bg.organs)
            sites = {o: bg.organs[o].nonzero() for o in lungs + solid
                     if bg.organs[o].sum() >= PATCH ** 3 // 8}
            if sites:
                self.bodies.append((bg, sites, set(lungs)))

    def pair(self):
        """(painted, unpainted) crops of one site, or None when the lesion misses the patch."""
        rng = self.rng
        bg, sites, lungs = rng.choice(self.bodies)
        organ = rng.choice(list(sites))
        c = sites[organ][rng.randrange(len(sites[organ]))].tolist()
        lo = [min(max(ci - rng.randint(0, PATCH - 1), 0), n - PATCH) for ci, n in zip(c, bg.frames.shape)]
        crop = self.gen.acquire(bg.frames[tuple(slice(a, a + PATCH) for a in lo)].clone(), bg)
        kind = "nodule" if organ in lungs else rng.choice(["cyst", "hypodense", "hyperdense"])
        sampler = FindingSampler(rng, crop.device, bg.voxel_mm)       # the body's grid
                                                                      # (coarser when downsampled)
        diam = sampler.diameter(kind)
        ball, sl = sphere_mask(crop.shape, [ci - a for ci, a in zip(c, lo)], diam / 2, crop.device,
                               bg.voxel_mm)
        if int(ball.sum()) < MIN_SHARE * PATCH ** 3:
            return None
        painted = crop.clone()
        sampler.paint(painted, sl, ball, diam, kind, sampler.level(kind))
        return painted, crop

    def batch(self, n: int = 256):
        xs = []
        while len(xs) < n:
            got = self.pair()
            if got:
                xs += got
        return torch.stack(xs[:n]), torch.tensor([1.0, 0.0] * (n // 2) + [1.0] * (n % 2))


class Flat(nn.Module):
    """An MLP on the patch's voxels: a linear patch embedding and per-token MLPs can do no more."""

    def __init__(self, width: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(PATCH ** 3, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x)[:, 0]


class Cnn(nn.Module):
    """A small 3-D CNN, max-pooled: the patch read translation-equivariantly."""

    def __init__(self):
        super().__init__()
        c = [1, 16, 32, 64, 64]
        layers = []
        for i, stride in enumerate((1, 2, 2, 1)):
            layers += [nn.Conv3d(c[i], c[i + 1], 3, stride=stride, padding=1), nn.SiLU()]
        self.net, self.head = nn.Sequential(*layers), nn.Linear(c[-1], 1)

    def forward(self, x):
        return self.head(self.net(x[:, None]).amax((2, 3, 4)))[:, 0]


LEARNERS = {"flat": Flat, "cnn": Cnn}


def draws(x: torch.Tensor, y: torch.Tensor, seed: int = 0, batch: int = 128):
    """Batches of uniform draws of the patches ``x`` (labels ``y``), flipped at random along each axis."""
    g = torch.Generator().manual_seed(seed)
    while True:
        i = torch.randint(len(x), (batch,), generator=g)
        xb = x[i]
        for axis in (-1, -2, -3):
            if torch.rand(1, generator=g) < 0.5:
                xb = xb.flip(axis)
        yield xb, y[i]


def train(model: nn.Module, batches, steps: int):
    """AdamW at 1e-3, BCE, ``steps`` batches of ``batches`` (standardised by the caller)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        xb, yb = next(batches)
        loss = F.binary_cross_entropy_with_logits(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    return torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else torch.zeros(0)


def patch_figures(s: torch.Tensor, kind: torch.Tensor) -> dict:
    """Patch AUROC of finding patches against all negatives, their clean twins, other tissue."""
    y = (kind == FINDING).tolist()
    out = {"all": auroc(s.tolist(), y)}
    for name, k in (("twin", TWIN), ("tissue", TISSUE)):
        m = (kind == FINDING) | (kind == k)
        out[name] = auroc(s[m].tolist(), [b for b, keep in zip(y, m.tolist()) if keep])
    return out


@torch.no_grad()
def question_figures(models: dict, scans, norm) -> dict:
    """Organ-level and scan-level AUROC of each model's highest patch score on ``scans`` (with twins)."""
    s_org = {k: [] for k in models}
    s_scan = {k: [] for k in models}
    y_org, y_scan = [], []
    for frames, twin, organs, _, findings in scans:
        shares = {o: s >= TISSUE_SHARE for o, s in organ_shares(organs).items()}
        shares = {o: m for o, m in shares.items() if m.any()}
        tissue = torch.stack(list(shares.values())).any(0)
        sick = {f["organ"] for f in findings}
        for vol, has in ((frames, True), (twin, False)):
            p = norm(patch_view(vol)[tissue])
            y_scan.append(has)
            y_org += [has and o in sick for o in shares]
            for k, m in models.items():
                s = torch.full((len(tissue),), -float("inf"))
                s[tissue] = score(m, p)
                s_scan[k].append(float(s.max()))
                s_org[k] += [float(s[msk].max()) for msk in shares.values()]
    if not any(y_org):
        raise ValueError("no organ of the evaluation scans holds a finding in a tissue patch: use more scans")
    return {k: dict(organ=auroc(s_org[k], y_org), scan=auroc(s_scan[k], y_scan), organs=len(y_org),
                    organs_with=sum(y_org), scans=len(y_scan)) for k in models}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scans", type=int, default=300, help="train-split scans to cut training patches from")
    ap.add_argument("--test-scans", type=int, default=80, help="test-split scans to cut scored patches from")
    ap.add_argument("--eval-scans", type=int, default=40,
                    help="further test scans (and twins) for the question level")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--downsample", type=float, default=1.0, help="the stream's grid (2.5 → 56×112×112)")
    ap.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    ap.add_argument("--stream", action="store_true",
                    help="train on fresh patches (PatchStream, 256 a step) instead of the train split's")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t0 = time.time()
    stream = PatchStream("train", 11 + args.seed, args.downsample) if args.stream else None
    x, y = stream.batch(2048) if stream else collect("train", args.scans, 11 + args.seed, args.downsample)[:2]
    xt, _, kt = collect("test", args.test_scans, 7 + args.seed, args.downsample)
    if not y.any() or not (kt == FINDING).any():
        ap.error("no patch of the scans is ≥ 2% finding: use more --scans / --test-scans (or --downsample 1)")
    mu, sd = x.mean(), x.std() + 1e-6
    norm = lambda v: (v - mu) / sd                                     # noqa: E731
    print(f"patches: train {'a stream, 256 a step' if stream else f'{len(x)} ({int(y.sum())} finding)'}, "
          f"test {len(xt)} ({int((kt == FINDING).sum())} finding); {time.time() - t0:.0f} s")
    models, out = {}, {}
    for name in args.learners:
        t = time.time()
        torch.manual_seed(args.seed)
        batches = (((norm(a), b) for a, b in iter(stream.batch, None)) if stream
                   else draws(norm(x), y, args.seed))
        models[name] = train(LEARNERS[name](), batches, args.steps)
        out[name] = f = patch_figures(score(models[name], norm(xt)), kt)
        print(f"{name}: patch AUROC {f['all']:.3f} (against clean twins {f['twin']:.3f}, other tissue "
              f"{f['tissue']:.3f}); {args.steps} steps, {time.time() - t:.0f} s")
    q = question_figures(models, _scans("test", args.eval_scans, 1_000 + args.seed, args.downsample), norm)
    for name, f in q.items():
        out[name].update(organ_auroc=f["organ"], scan_auroc=f["scan"])
        print(f"{name}: organ-level AUROC {f['organ']:.3f} ({f['organs_with']} of {f['organs']} organs "
              f"hold a finding), scan-level AUROC {f['scan']:.3f} ({f['scans']} scans, half clean twins)")
    return out


if __name__ == "__main__":
    main()
