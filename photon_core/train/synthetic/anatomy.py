"""Bodies for the synthetic demo data: the sample cases' anatomy in model space, deformed into new ones.

Everything happens in MODEL space (the (140, 280, 280) grid the model sees, voxel 2.6×1.3×1.3 mm) after
the official preparation of each case: a `Background` is a prepared body and its organ masks (carried
from the case's label map by nearest neighbour; the chest case's lungs found by density, `air_lungs`).
`deform` makes a new body (scale, small rotation, shift); `shrink` the same body on a coarser grid
(the training curriculum's 64-token stage), with voxel sizes scaled so sizes in mm stay exact.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from photon_core.io import samples
from photon_core.io.preprocess import MODEL_SHAPE, TOKEN_VOXELS, prepare
from photon_core.io.volume import load_label_map, load_volume
from photon_core.organs import ORGANS

VOXEL_MM = (364 / 140, 364 / 280, 364 / 280)      # model voxel size (d, h, w) in mm


def hu_to_unit(hu: float) -> float:
    """HU → the model's [0, 1] intensity (clip to ±1000, min-max; the prepared scans span the range)."""
    return (min(max(hu, -1000.0), 1000.0) + 1000.0) / 2000.0


@dataclass
class Background:
    name: str
    frames: torch.Tensor                     # (140, 280, 280) float in [0, 1] (smaller if downsampled)
    organs: dict = field(default_factory=dict)  # organ name -> bool mask, same shape as frames
    voxel_mm: tuple = VOXEL_MM               # voxel size (d, h, w) of this grid in mm

    @property
    def min_voxels(self) -> int:
        """Smallest organ kept, in voxels: 200 model voxels, scaled to this grid."""
        return max(4, int(200 * math.prod(VOXEL_MM) / math.prod(self.voxel_mm)))

    def to(self, device, frames_device=None) -> Background:
        """This body with its organ masks on ``device`` and its frames on ``frames_device`` (default
        ``device``); itself when everything is there already."""
        fd, md = torch.device(frames_device or device), torch.device(device)
        if _on(self.frames, fd) and all(_on(m, md) for m in self.organs.values()):
            return self
        return Background(self.name, self.frames.to(fd), {n: m.to(device) for n, m in self.organs.items()},
                          self.voxel_mm)


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """``t`` is on ``device`` (any index of its type when it names none)."""
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def downsample_shape(factor: float) -> tuple:
    """Model-space shape shrunk by ``factor``, kept divisible into whole token blocks."""
    return tuple(int(round(n / factor / m)) * m for n, m in zip(MODEL_SHAPE, TOKEN_VOXELS))


def shrink(bg: Background, shape: tuple) -> Background:
    """The same body on a coarser grid: intensities area-averaged, organs by majority."""
    if tuple(bg.frames.shape) == tuple(shape):
        return bg
    frames = F.interpolate(bg.frames[None, None], size=shape, mode="area")[0, 0]
    voxel = tuple(v * n / m for v, n, m in zip(bg.voxel_mm, bg.frames.shape, shape))
    out = Background(bg.name, frames, {}, voxel)
    for name, m in bg.organs.items():
        small = F.interpolate(m[None, None].float(), size=shape, mode="area")[0, 0] > 0.5
        if int(torch.count_nonzero(small)) > out.min_voxels:
            out.organs[name] = small
    return out


def _organ_masks(labels: torch.Tensor) -> dict:
    out = {}
    for name, ids in ORGANS.items():
        m = torch.zeros_like(labels, dtype=torch.bool)
        for i in ids:
            m |= labels == i
        if int(torch.count_nonzero(m)) > 200:      # (a bool sum: ≈ 25× slower)
            out[name] = m
    return out


def load_background(case: str, device="cpu") -> Background:
    """Prepare a sample case and carry its label map into model space (nearest neighbour)."""
    entry = samples.case(case)
    vol = load_volume(samples.path(entry["file"]))
    prep = prepare(vol, device=device)
    labels, _ = load_label_map(samples.path(entry["label_map"]))
    geom = prep.geometry
    d, h, w = MODEL_SHAPE
    grid = torch.stack(torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    m = torch.as_tensor(geom.model_to_orig, dtype=torch.float32)
    ijk = torch.round(grid.reshape(-1, 3).float() @ m[:3, :3].T + m[:3, 3]).long()
    lab = torch.as_tensor(labels.astype(np.int64))
    inside = ((ijk >= 0) & (ijk < torch.tensor(lab.shape))).all(-1)
    ijk = ijk.clamp(min=0)
    ijk = torch.minimum(ijk, torch.tensor(lab.shape) - 1)
    model_labels = torch.where(inside, lab[ijk[:, 0], ijk[:, 1], ijk[:, 2]], torch.zeros_like(ijk[:, 0]))
    model_labels = model_labels.reshape(d, h, w).to(device)
    frames = prep.frames[:, 0].to(device)
    organs = _organ_masks(model_labels)
    if case in DENSITY_LUNGS and "left lung" not in organs and "right lung" not in organs:
        # +w toward the patient's left when the w axis points to −x in world RAS (x toward the right)
        organs.update(air_lungs(frames, left_high_w=geom.model_to_world[0, 2] < 0))
    return Background(case, frames, organs)


LUNG_HU = (-980.0, -400.0)    # aerated lung: below soft tissue, above the air around the body
# Cases whose lungs are found by density. Only these: in an abdominal scan (dicom_ct) the lungs are
# small bases and the partial-volume rim between the body and the air passes the same test.
DENSITY_LUNGS = ("chest_aorta_ct",)


def air_lungs(frames: torch.Tensor, left_high_w: bool = True) -> dict:
    """Left and right lung masks found by density, for a chest case whose label map has none
    (`DENSITY_LUNGS`: chest_aorta_ct labels only its vessels): voxels between −980 and −400 HU,
    opened (noise, small vessels), the components ≥ 20% of the largest kept, closed and holes
    filled slice by slice, split at the emptiest column of the middle third (the mediastinum).
    Empty when the result is not lung-sized (0.5–8 l, both sides ≥ 100 ml)."""
    from scipy import ndimage

    f = frames.detach().float().cpu().numpy()
    lo, hi = (hu_to_unit(v) for v in LUNG_HU)
    m = ndimage.binary_opening((f > lo) & (f < hi), iterations=2)
    lab, n = ndimage.label(m)
    if n == 0:
        return {}
    sizes = ndimage.sum(m, lab, range(1, n + 1))
    m = np.isin(lab, [i + 1 for i in range(n) if sizes[i] >= 0.2 * sizes.max()])
    m = ndimage.binary_closing(m, iterations=2)
    for k in range(m.shape[0]):
        m[k] = ndimage.binary_fill_holes(m[k])
    cols = m.sum((0, 1))
    W = len(cols)
    mid = W // 3 + int(np.argmin(cols[W // 3: 2 * W // 3]))
    high, low = m.copy(), m.copy()
    high[:, :, :mid] = False
    low[:, :, mid:] = False
    ml = math.prod(VOXEL_MM) / 1000
    if not 500 <= m.sum() * ml <= 8000 or min(high.sum(), low.sum()) * ml < 100:
        return {}
    left, right = (high, low) if left_high_w else (low, high)
    return {"left lung": torch.as_tensor(left, device=frames.device),
            "right lung": torch.as_tensor(right, device=frames.device)}


def deform(bg: Background, rng: random.Random) -> Background:
    """A new body: random anisotropic scale (±10%), rotation (±8° in-plane), shift (±8% FOV)."""
    dev = bg.frames.device
    ang = math.radians(rng.uniform(-8, 8))
    s = [rng.uniform(0.9, 1.1) for _ in range(3)]
    t = [rng.uniform(-0.08, 0.08) for _ in range(3)]
    # affine_grid works in (x, y, z) = (w, h, d) normalised coordinates.
    rot = torch.tensor([[math.cos(ang), -math.sin(ang), 0], [math.sin(ang), math.cos(ang), 0], [0, 0, 1]])
    A = rot @ torch.diag(torch.tensor([s[2], s[1], s[0]]))
    theta = torch.cat([A, torch.tensor([[t[2]], [t[1]], [t[0]]])], 1)[None].to(dev)
    grid = F.affine_grid(theta, (1, 1, *bg.frames.shape), align_corners=False)
    frames = F.grid_sample(bg.frames[None, None], grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)[0, 0]
    organs = {}
    if bg.organs:            # nearest neighbour at the frames' own float32 coordinates, on every device
        names = list(bg.organs)
        stack = torch.stack([bg.organs[n].float() for n in names])[None]
        warped = F.grid_sample(stack, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
        warped = warped > 0.5
        sizes = [int(torch.count_nonzero(w)) for w in warped]          # (a dim= count: ≈ 25× slower)
        organs = {n: warped[i] for i, n in enumerate(names) if sizes[i] > bg.min_voxels}
    return Background(bg.name + "*", frames, organs, bg.voxel_mm)
