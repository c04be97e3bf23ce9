"""Synthetic findings with exact ground truth: cysts, solid lesions, lung nodules, effusion, enlargement.

`FindingSampler` draws findings into a body's frames (in place, remembering what it overwrote so a
counterfactual clean twin can be rebuilt) and marks a frames-shaped truth map (finding diameter in mm).
Each `Finding` knows its organ, side, diameter (mm) and volume (ml).

Where a finding goes is decided on the organ masks (their device: the CPU in the GPU stream), what
it looks like is written into the frames (their device: the GPU there): the writes are dense and
masked, so a frames device never waits for the host, and on one CPU device they give the reference
stream bit for bit.
"""
from __future__ import annotations

import functools
import math
import random
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from photon_core.train.synthetic.anatomy import VOXEL_MM, hu_to_unit

NO_LESIONS = {"aorta"}                       # organs the generator draws no lesions into

def per_mask(fn):
    """Cache ``fn(mask)`` while that mask tensor lives unmodified: a pool body's organs serve many
    scans, so what is computed from them (their voxels, their token shares) is computed once. (A mask
    made under `torch.inference_mode` has no version counter: it is computed each time.)"""
    store: dict = {}

    @functools.wraps(fn)
    def cached(mask: torch.Tensor):
        if not isinstance(mask, torch.Tensor) or mask.is_inference():   # no version counter to trust
            return fn(mask)
        key = id(mask)
        hit = store.get(key)
        if hit is not None and hit[0]() is mask and hit[1] == mask._version:
            return hit[2]
        out = fn(mask)
        store[key] = (weakref.ref(mask, lambda _, k=key: store.pop(k, None)), mask._version, out)
        return out

    return cached


@per_mask
def voxels(mask: torch.Tensor) -> torch.Tensor:
    """``mask.nonzero()`` as int32 (N, 3), in the same order."""
    return mask.nonzero().to(torch.int32)


@per_mask
def count(mask: torch.Tensor) -> int:
    """Voxels in ``mask`` (a tensor, or an array)."""
    return int(torch.count_nonzero(mask)) if isinstance(mask, torch.Tensor) else int(mask.sum())


def lesion_sites(organs) -> tuple[list[str], list[str]]:
    """(lungs, solid organs) of ``organs`` a finding can be drawn in (nodules/effusion, solid lesions)."""
    lungs = [o for o in organs if o.endswith("lung")]
    return lungs, [o for o in organs if o not in lungs and o not in NO_LESIONS]


@dataclass
class Finding:
    kind: str          # cyst | hypodense | hyperdense | nodule | effusion
    organ: str
    center: tuple      # model voxel (d, h, w)
    diameter_mm: float
    volume_ml: float

    @property
    def focal(self) -> bool:
        """A lesion (asked about by existence, organ, side, count, size and type questions)."""
        return self.kind not in ("effusion", "enlargement")

    @property
    def side(self) -> str | None:
        return ("left" if self.organ.startswith("left") else "right" if self.organ.startswith("right")
                else None)


def sphere_mask(shape, center, radius_mm, device, voxel_mm=VOXEL_MM):
    """Bool ellipsoid (in voxels) of a sphere of radius_mm, and its bounding slices."""
    r = [radius_mm / v for v in voxel_mm]
    lo = [max(0, int(math.floor(c - ri))) for c, ri in zip(center, r)]
    hi = [min(n, int(math.ceil(c + ri)) + 1) for n, c, ri in zip(shape, center, r)]
    axes = [((torch.arange(a, b, device=device).float() - c) / ri) ** 2
            for a, b, c, ri in zip(lo, hi, center, r)]
    ball = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :] <= 1.0
    return ball, tuple(slice(a, b) for a, b in zip(lo, hi))


class FindingSampler:
    """Makes one scan with findings and its ground truth."""

    KINDS = {"cyst": 0.0, "hypodense": None, "hyperdense": None}

    def __init__(self, rng: random.Random, device="cpu", voxel_mm: tuple = VOXEL_MM):
        self.rng, self.device, self.voxel_mm = rng, device, voxel_mm
        self.voxel_ml = math.prod(voxel_mm) / 1000
        self.truth: torch.Tensor | None = None   # frames-shaped finding diameter in mm (0 = none)
        self.undo: list = []                     # (slices, mask, values before) of every finding drawn

    def _write(self, frames, sl, mask, values) -> None:
        """frames[sl][mask] = values (a number, or a tensor of the region's shape), keeping what was
        there (`DemoGenerator.counterfactual`). Dense and masked: no host sync on a GPU."""
        region = frames[sl] if sl is not None else frames
        mask = mask.to(region.device, non_blocking=True)
        self.undo.append((sl, region.clone()))
        if torch.is_tensor(values):
            region.copy_(torch.where(mask, values, region))
        else:
            region.masked_fill_(mask, values)

    def restore(self, frames) -> None:
        """Undo every write into ``frames`` (a copy of the frames they were made in), newest first."""
        for sl, before in reversed(self.undo):
            (frames[sl] if sl is not None else frames).copy_(before)

    def _mark(self, frames, sl, ball, value: float) -> None:
        if self.truth is None:
            self.truth = torch.zeros(frames.shape, device=frames.device)
        region = self.truth[sl] if sl is not None else self.truth
        region.masked_fill_(ball.to(region.device, non_blocking=True), value)

    def site(self, mask, shape, sizes):
        """Up to 12 tries: a voxel of ``mask`` and diameters from ``sizes()`` whose largest ball lies
        ≥ 80% inside the mask. Returns (centre, diameters, ball, slices of the largest) or None; the
        ball on the mask's device."""
        idx = voxels(mask)
        for _ in range(12):
            c = idx[self.rng.randrange(len(idx))].tolist()
            d = sizes()
            ball, sl = sphere_mask(shape, c, max(d) / 2, mask.device, self.voxel_mm)
            if float((ball & mask[sl]).sum()) / max(1, int(ball.sum())) >= 0.8:
                return c, d, ball, sl
        return None

    def add_lesion(self, frames, organs, organ, kind) -> Finding | None:
        got = self.site(organs[organ], frames.shape, lambda: (self.diameter(kind),))
        if got is None:
            return None
        c, (diam,), ball, sl = got
        vol_ml = self.paint(frames, sl, ball, diam, kind, self.level(kind))
        return Finding(kind, organ, tuple(c), round(diam), round(vol_ml, 1))

    def diameter(self, kind: str) -> float:
        """A new lesion's diameter (mm): 8–14 for lung nodules, 12–40 for the rest."""
        return self.rng.uniform(8, 14) if kind == "nodule" else self.rng.uniform(12, 40)

    def level(self, kind: str) -> float:
        """A lesion's intensity: absolute for cysts and nodules, an offset from the organ for solid ones."""
        rng = self.rng
        if kind == "cyst":
            return hu_to_unit(rng.uniform(-5, 15))
        if kind == "hypodense":
            return -rng.uniform(0.06, 0.12)
        if kind == "nodule":
            return hu_to_unit(rng.uniform(20, 80))
        return rng.uniform(0.08, 0.15)

    def paint(self, frames, sl, ball, diam: float, kind: str, level: float) -> float:
        """Draw a lesion into ``frames`` at ``ball`` (within slices ``sl``); returns its volume (ml).
        A solid lesion is an offset from the tissue it replaces (its mean; on a GPU a device scalar,
        so that nothing waits for the host)."""
        inside = ball.to(frames.device, non_blocking=True)
        val = level
        if kind in ("hypodense", "hyperdense"):
            region = frames[sl]
            val = (float(region[inside].mean()) + level if frames.device.type == "cpu"
                   else (region * inside).sum() / int(ball.sum()) + level)
        noise = torch.randn(ball.shape, device=frames.device) * 0.004
        self._write(frames, sl, inside, (val + noise).clamp(0, 1))
        self._mark(frames, sl, inside, diam)
        return float(ball.sum()) * self.voxel_ml

    def add_changing_lesion(self, prior, current, later: FindingSampler, organs, organ, kind,
                            change: str) -> tuple:
        """One lesion seen at two times: ``change`` is larger | smaller | stable | new | resolved.
        ``self`` marks the prior's truth, ``later`` the current's. Returns (prior Finding or None,
        current Finding or None), or None if no site fits the larger of the two sizes."""
        rng = self.rng

        def sizes():
            base = rng.uniform(6, 12) if kind == "nodule" else rng.uniform(12, 26)
            factor = {"larger": rng.uniform(1.3, 1.7), "smaller": rng.uniform(0.5, 0.75),
                      "stable": rng.uniform(0.97, 1.03)}.get(change, 1.0)
            return ((0.0, base) if change == "new" else (base, 0.0) if change == "resolved"
                    else (base, base * factor))

        got = self.site(organs[organ], prior.shape, sizes)
        if got is None:
            return None
        c, diameters, _, _ = got
        lvl = self.level(kind)
        out = []
        for frames, sampler, d in ((prior, self, diameters[0]), (current, later, diameters[1])):
            if d <= 0:
                out.append(None)
                continue
            ball, sl = sphere_mask(frames.shape, c, d / 2, organs[organ].device, self.voxel_mm)
            ml = sampler.paint(frames, sl, ball, d, kind, lvl)
            out.append(Finding(kind, organ, tuple(c), round(d), round(ml, 1)))
        return tuple(out)

    def add_effusion(self, frames, organs, lung) -> Finding | None:
        mask = organs[lung]
        idx = voxels(mask)
        hs = idx[:, 1]
        if len(hs) == 0:
            return None
        lo, hi = int(hs.min()), int(hs.max())
        cut = lo + int((hi - lo) * self.rng.uniform(0.2, 0.35))   # dependent (posterior) part
        below = idx[hs < cut]                                     # region.nonzero(), in its order
        if float(len(below)) * self.voxel_ml < 500 * math.prod(VOXEL_MM) / 1000:   # ≈ 2 ml
            return None
        region = mask.to(frames.device, copy=True)                # (made where the frames are)
        region[:, cut:, :] = False
        self._write(frames, None, region, hu_to_unit(self.rng.uniform(5, 20)))
        self._mark(frames, None, region, 1.0)
        vol_ml = float(len(below)) * self.voxel_ml
        c = below.float().mean(0).tolist()
        return Finding("effusion", lung, tuple(c), 0.0, round(vol_ml, 1))

    def add_enlargement(self, frames, organs, organ) -> Finding | None:
        """Organ enlargement: the organ grown about its centroid by a linear factor 1.15–1.3 (volume
        ×1.5–2.2, beyond the ±10% per-axis body deformation); the tissue it grows into is overwritten.
        Call before adding lesions (it resamples the organ's voxels). ``organs`` gets new masks
        (the pool's masks are shared, never edited in place); volume_ml is the enlarged organ's."""
        mask = organs[organ]
        idx = voxels(mask)
        if len(idx) == 0:
            return None
        s = self.rng.uniform(1.15, 1.3)
        c = idx.float().mean(0)
        shape = torch.tensor(frames.shape, device=idx.device)
        lo = (c + (idx.min(0).values - c) * s).floor().long().clamp(min=0)
        hi = torch.minimum((c + (idx.max(0).values - c) * s).ceil().long() + 1, shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        axes = [torch.arange(int(a), int(b), device=mask.device).float() for a, b in zip(lo, hi)]
        src = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        src = c + (src - c) / s                                           # voxel each one comes from
        grid = (src / (shape - 1) * 2 - 1).flip(-1)[None]                 # grid_sample wants (x, y, z)
        vals = F.grid_sample(frames[None, None], grid.to(frames.device), mode="bilinear",
                             align_corners=True)[0, 0]
        # (with the frames on a GPU the organ is resampled there too: the same grid, rounded by that device)
        on = frames.device
        inside = F.grid_sample(mask[None, None].to(on).float(), grid.to(on), mode="nearest",
                               align_corners=True)[0, 0].to(mask.device) > 0.5
        # it displaces tissue, not air or lung (a GPU stream reads that region of its frames back)
        inside &= mask[sl] | (frames[sl].to(mask.device) > hu_to_unit(-500))
        region = frames[sl]
        region.copy_(torch.where(inside.to(frames.device), vals, region))
        for name in list(organs):
            if name != organ and bool(organs[name][sl][inside].any()):
                organs[name] = organs[name].clone()
                organs[name][sl] &= ~inside
        grown = mask.clone()
        grown[sl] |= inside
        organs[organ] = grown
        vol_ml = float(grown.sum()) * self.voxel_ml
        return Finding("enlargement", organ, tuple(c.tolist()), 0.0, round(vol_ml, 1))
