"""Demo training data: real anatomy from the sample CTs, synthetic findings with exact ground truth.

Everything happens in MODEL space (the (140, 280, 280) grid the model sees, voxel 2.6×1.3×1.3 mm),
after the official preparation of each background, so generation is cheap enough to feed training
on a CPU and runs on the GPU when one is given (all tensor ops take ``device``).

* Backgrounds: each sample case with a label map is prepared once; a pool of new bodies is made
  from it by random affine deformation (scale, small rotation, shift = field-of-view change),
  with labels carried along (nearest neighbour). The chest CT's label map holds only vessels: its
  lungs are found by density (`air_lungs`), so every training body can carry a finding.
* Per sample: optional left-right mirror (label sides swapped), intensity jitter and noise, then
  0–3 findings: cysts (water, round), solid lesions (hypo/hyper-dense), lung nodules, pleural
  effusion — each with organ, side, diameter (mm) and volume (ml) known exactly; optionally
  (``enlargement`` > 0) an enlarged liver, spleen or kidney, asked about with yes/no and volume (ml)
  questions. Off by default: the shipped demo model was trained and evaluated without it.
* Questions: 3D-RAD-style families (existence, anomaly detection, image observation, measurement)
  and DeepTumorVQA-style counting/size questions, several phrasings each; the organ in the question
  decides the answer, so the model has a reason to keep instruction-dependent regions.
* Temporal pairs (`DemoGenerator.pair`): a prior and a current scan of one body (independent
  jitter and noise), each lesion grown, shrunk, stable, new or resolved between them, with
  3D-RAD-style longitudinal questions (change, growth, new lesion, prior size).

``downsample`` > 1 runs the whole stream on a coarser grid (a training curriculum: 2.5 → 56×112×112,
64 visual tokens): each body is shrunk once and findings are drawn there with the voxel size scaled,
so sizes in mm and volumes in ml stay exact and a sample costs milliseconds.

Splits are disjoint by seed and by background deformation: ``train``, ``val`` and ``test`` draw
different pool bodies and lesions (``val`` is for choosing between runs, so that the test split's
figures are not what a choice was fitted to); ``report`` uses a background never used in training
(dicom_ct).
Records follow an open JSONL layout: {image, question, answer, family, answer_type, organ, meta}
(+ ``prior_image`` for a temporal question).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from photon_core.io.preprocess import MODEL_SHAPE, TOKEN_VOXELS, prepare
from photon_core.io import samples
from photon_core.io.volume import load_label_map, load_volume

# each split's seed base: its own deformed bodies and findings (``report``: a body never trained on)
SPLITS = {"train": 0, "test": 1_000_003, "report": 2_000_003, "val": 3_000_003}

VOXEL_MM = (364 / 140, 364 / 280, 364 / 280)      # model voxel size (d, h, w) in mm
TRAIN_CASES = ("abdomen_ct", "chest_aorta_ct")
REPORT_CASES = ("dicom_ct",)

# Organs the questions talk about: name -> TotalSegmentator label ids (total class map).
ORGANS = {
    "liver": [5], "spleen": [1], "left kidney": [3], "right kidney": [2], "stomach": [6],
    "pancreas": [7], "gallbladder": [4], "urinary bladder": [21], "left lung": [10, 11],
    "right lung": [12, 13, 14], "aorta": [52],
}
MIRROR = {"left kidney": "right kidney", "right kidney": "left kidney", "left lung": "right lung",
          "right lung": "left lung"}
PAIRED = {"kidney": ("left kidney", "right kidney"), "lung": ("left lung", "right lung")}
NO_LESIONS = {"aorta"}                       # organs the generator draws no lesions into
CLEAN_ACQUISITION = 0.1                      # share of scans without acquisition jitter and noise


def lesion_sites(organs) -> tuple[list[str], list[str]]:
    """(lungs, solid organs) of ``organs`` a finding can be drawn in (nodules/effusion, solid lesions)."""
    lungs = [o for o in organs if o.endswith("lung")]
    return lungs, [o for o in organs if o not in lungs and o not in NO_LESIONS]


def hu_to_unit(hu: float) -> float:
    """HU → the model's [0, 1] intensity (clip to ±1000, min-max; the prepared scans span the range)."""
    return (min(max(hu, -1000.0), 1000.0) + 1000.0) / 2000.0


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
        return "left" if self.organ.startswith("left") else "right" if self.organ.startswith("right") else None


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
        if int(small.sum()) > out.min_voxels:
            out.organs[name] = small
    return out


def _organ_masks(labels: torch.Tensor) -> dict:
    out = {}
    for name, ids in ORGANS.items():
        m = torch.zeros_like(labels, dtype=torch.bool)
        for i in ids:
            m |= labels == i
        if int(m.sum()) > 200:
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
    if bg.organs:
        names = list(bg.organs)
        stack = torch.stack([bg.organs[n].half() for n in names])[None]
        warped = F.grid_sample(stack, grid.half() if dev.type == "cuda" else grid, mode="nearest",
                               padding_mode="zeros", align_corners=False)[0] if dev.type == "cuda" else \
            F.grid_sample(stack.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
        organs = {n: warped[i] > 0.5 for i, n in enumerate(names)
                  if int((warped[i] > 0.5).sum()) > bg.min_voxels}
    return Background(bg.name + "*", frames, organs, bg.voxel_mm)


def _sphere(shape, center, radius_mm, device, voxel_mm=VOXEL_MM):
    """Bool ellipsoid (in voxels) of a sphere of radius_mm, and its bounding slices."""
    r = [radius_mm / v for v in voxel_mm]
    lo = [max(0, int(math.floor(c - ri))) for c, ri in zip(center, r)]
    hi = [min(n, int(math.ceil(c + ri)) + 1) for n, c, ri in zip(shape, center, r)]
    axes = [((torch.arange(a, b, device=device).float() - c) / ri) ** 2 for a, b, c, ri in zip(lo, hi, center, r)]
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
        """frames[sl][mask] = values, keeping what was there (`DemoGenerator.counterfactual`)."""
        region = frames[sl] if sl is not None else frames
        self.undo.append((sl, mask, region[mask].clone()))
        region[mask] = values

    def _mark(self, frames, sl, ball, value: float) -> None:
        if self.truth is None:
            self.truth = torch.zeros(frames.shape, device=frames.device)
        region = self.truth[sl] if sl is not None else self.truth
        region[ball] = value

    def site(self, mask, shape, device, sizes):
        """Up to 12 tries: a voxel of ``mask`` and diameters from ``sizes()`` whose largest ball lies
        ≥ 80% inside the mask. Returns (centre, diameters, ball, slices of the largest) or None."""
        idx = mask.nonzero()
        for _ in range(12):
            c = idx[self.rng.randrange(len(idx))].tolist()
            d = sizes()
            ball, sl = _sphere(shape, c, max(d) / 2, device, self.voxel_mm)
            if float((ball & mask[sl]).sum()) / max(1, int(ball.sum())) >= 0.8:
                return c, d, ball, sl
        return None

    def add_lesion(self, frames, organs, organ, kind) -> Finding | None:
        got = self.site(organs[organ], frames.shape, frames.device, lambda: (self.diameter(kind),))
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
        """Draw a lesion into ``frames`` at ``ball`` (within slices ``sl``); returns its volume (ml)."""
        val = float(frames[sl][ball].mean()) + level if kind in ("hypodense", "hyperdense") else level
        noise = torch.randn(ball.shape, device=frames.device) * 0.004
        self._write(frames, sl, ball, (val + noise[ball]).clamp(0, 1))
        self._mark(frames, sl, ball, diam)
        return float(ball.sum()) * self.voxel_ml

    def add_changing_lesion(self, prior, current, later: "FindingSampler", organs, organ, kind,
                            change: str) -> tuple:
        """One lesion seen at two times: ``change`` is larger | smaller | stable | new | resolved.
        ``self`` marks the prior's truth, ``later`` the current's. Returns (prior Finding or None,
        current Finding or None), or None if no site fits the larger of the two sizes."""
        rng = self.rng

        def sizes():
            base = rng.uniform(6, 12) if kind == "nodule" else rng.uniform(12, 26)
            factor = {"larger": rng.uniform(1.3, 1.7), "smaller": rng.uniform(0.5, 0.75),
                      "stable": rng.uniform(0.97, 1.03)}.get(change, 1.0)
            return (0.0, base) if change == "new" else (base, 0.0) if change == "resolved" else (base, base * factor)

        got = self.site(organs[organ], prior.shape, prior.device, sizes)
        if got is None:
            return None
        c, diameters, _, _ = got
        lvl = self.level(kind)
        out = []
        for frames, sampler, d in ((prior, self, diameters[0]), (current, later, diameters[1])):
            if d <= 0:
                out.append(None)
                continue
            ball, sl = _sphere(frames.shape, c, d / 2, frames.device, self.voxel_mm)
            ml = sampler.paint(frames, sl, ball, d, kind, lvl)
            out.append(Finding(kind, organ, tuple(c), round(d), round(ml, 1)))
        return tuple(out)

    def add_effusion(self, frames, organs, lung) -> Finding | None:
        mask = organs[lung]
        hs = mask.nonzero()[:, 1]
        if len(hs) == 0:
            return None
        lo, hi = int(hs.min()), int(hs.max())
        cut = lo + int((hi - lo) * self.rng.uniform(0.2, 0.35))   # dependent (posterior) part
        region = mask.clone()
        region[:, cut:, :] = False
        if float(region.sum()) * self.voxel_ml < 500 * math.prod(VOXEL_MM) / 1000:   # ≈ 2 ml
            return None
        self._write(frames, None, region, hu_to_unit(self.rng.uniform(5, 20)))
        self._mark(frames, None, region, 1.0)
        vol_ml = float(region.sum()) * self.voxel_ml
        c = region.nonzero().float().mean(0).tolist()
        return Finding("effusion", lung, tuple(c), 0.0, round(vol_ml, 1))

    def add_enlargement(self, frames, organs, organ) -> Finding | None:
        """Organ enlargement: the organ grown about its centroid by a linear factor 1.15–1.3 (volume
        ×1.5–2.2, beyond the ±10% per-axis body deformation); the tissue it grows into is overwritten.
        Call before adding lesions (it resamples the organ's voxels). ``organs`` gets new masks
        (the pool's masks are shared, never edited in place); volume_ml is the enlarged organ's."""
        mask = organs[organ]
        idx = mask.nonzero()
        if len(idx) == 0:
            return None
        s = self.rng.uniform(1.15, 1.3)
        c = idx.float().mean(0)
        shape = torch.tensor(frames.shape, device=idx.device)
        lo = (c + (idx.min(0).values - c) * s).floor().long().clamp(min=0)
        hi = torch.minimum((c + (idx.max(0).values - c) * s).ceil().long() + 1, shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        axes = [torch.arange(int(a), int(b), device=frames.device).float() for a, b in zip(lo, hi)]
        src = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        src = c.to(frames.device) + (src - c.to(frames.device)) / s          # voxel each one comes from
        grid = (src / (shape.to(frames.device) - 1) * 2 - 1).flip(-1)[None]   # grid_sample wants (x, y, z)
        vals = F.grid_sample(frames[None, None], grid, mode="bilinear", align_corners=True)[0, 0]
        inside = F.grid_sample(mask[None, None].float(), grid, mode="nearest", align_corners=True)[0, 0] > 0.5
        inside &= mask[sl] | (frames[sl] > hu_to_unit(-500))          # it displaces tissue, not air or lung
        frames[sl][inside] = vals[inside]
        for name in list(organs):
            if name != organ and bool(organs[name][sl][inside].any()):
                organs[name] = organs[name].clone()
                organs[name][sl] &= ~inside
        grown = mask.clone()
        grown[sl] |= inside
        organs[organ] = grown
        vol_ml = float(grown.sum()) * self.voxel_ml
        return Finding("enlargement", organ, tuple(c.tolist()), 0.0, round(vol_ml, 1))


# ----------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------

EXIST = ["Is there a lesion in the {o}?", "Does the {o} contain a lesion?", "Is any focal lesion seen in the {o}?",
         "Are there lesions in the {o}?"]
NORMAL_QUESTION = "Is this scan normal?"       # the one closed question whose "yes" means no finding
ANOMALY = ["Is there any abnormality in this scan?", "Does this CT show an abnormal finding?", NORMAL_QUESTION]
FINDING_FAMILIES = ("existence", "anomaly_detection")   # yes/no questions a finding decides
WHICH = ["Which organ contains the lesion?", "Where is the lesion located?", "In which organ is the abnormality?",
         "Which organ shows the abnormality?"]
# The bundled cases' suggested questions in the generator's words (so the demo model answers them in kind)
CYST = ["Is there a cyst in the {o}?"]
NODULE = ["Is there a nodule in the {o}?"]
ORGAN_ABNORMAL = ["Is there an abnormality of the {o}?"]
LARGER = ["Which {p} is larger?"]
LARGER_RATIO = 1.15                      # asked only when one organ of the pair is this much larger
SIDE = ["Which side is the {p} lesion on?", "Is the {p} lesion on the left or the right?"]
SIZE = ["What is the diameter of the lesion in the {o} in mm?", "How large is the {o} lesion in millimetres?",
        "Measure the largest {o} lesion (mm)."]
COUNT = ["How many lesions are in the {o}?", "Count the lesions in the {o}.", "What is the number of {o} lesions?"]
TYPE = ["Is the {o} lesion a cyst or a solid lesion?", "Is the lesion in the {o} cystic or solid?"]
EFFUSION = ["Is there a pleural effusion?", "Is pleural fluid present?"]
EFFUSION_SIDE = ["Which side is the pleural effusion on?"]
ENLARGED = ["Is the {o} enlarged?", "Does the {o} look enlarged?", "Is there enlargement of the {o}?"]
ORGAN_VOLUME = ["What is the volume of the {o} in ml?", "Estimate the {o} volume (ml)."]
ENLARGE_ORGANS = ("liver", "spleen", "left kidney", "right kidney")
# Longitudinal (prior + current scan)
CHANGE = ["Compared with the prior scan, is the {o} lesion larger, smaller or stable?",
          "How has the {o} lesion changed since the prior scan: larger, smaller or stable?"]
GROWN = ["Has the {o} lesion grown since the prior scan?", "Is the {o} lesion larger than on the prior scan?"]
NEW = ["Is there a new lesion in the {o} since the prior scan?", "Has a new {o} lesion appeared since the prior?"]
RESOLVED = ["Has the {o} lesion seen on the prior scan resolved?"]
PRIOR_SIZE = ["What was the diameter of the {o} lesion on the prior scan in mm?"]
CHANGES = ("larger", "smaller", "stable", "new", "resolved")


def make_questions(findings: list[Finding], organs: dict, rng: random.Random, enlargement: bool = False,
                   voxel_ml: float = math.prod(VOXEL_MM) / 1000) -> list[dict]:
    """All question/answer records that the findings and the visible organs support (one scan).
    ``enlargement``: also ask whether organs are enlarged and their volumes (ml)."""
    qa = []
    lesions = [f for f in findings if f.focal]
    effusions = [f for f in findings if f.kind == "effusion"]
    by_organ: dict[str, list[Finding]] = {}
    for f in lesions:
        by_organ.setdefault(f.organ, []).append(f)
    visible = list(organs)
    for o in visible:
        yes = o in by_organ
        qa.append(dict(family="existence", answer_type="closed", organ=o,
                       question=rng.choice(EXIST).format(o=o), answer="yes" if yes else "no"))
    if "lung" in " ".join(organs):
        qa.append(dict(family="existence", answer_type="closed", organ="lung",
                       question=rng.choice(EFFUSION), answer="yes" if effusions else "no"))
    normal_q = rng.choice(ANOMALY)
    abnormal = bool(findings)
    ans = ("no" if abnormal else "yes") if normal_q == NORMAL_QUESTION else ("yes" if abnormal else "no")
    qa.append(dict(family="anomaly_detection", answer_type="closed", organ=None, question=normal_q, answer=ans))
    # the bundled cases' suggested questions (before any draw that depends on the findings, so that
    # counterfactual() replays these words)
    lungs, solid = lesion_sites(visible)
    if solid:
        o = rng.choice(solid)
        yes = any(f.kind == "cyst" for f in by_organ.get(o, []))
        qa.append(dict(family="existence", answer_type="closed", organ=o, question=rng.choice(CYST).format(o=o),
                       answer="yes" if yes else "no"))
    if lungs:
        o = rng.choice(lungs + ["lung"])
        hit = [f for f in lesions if f.kind == "nodule" and (f.organ == o or o == "lung")]
        qa.append(dict(family="existence", answer_type="closed", organ=o, question=rng.choice(NODULE).format(o=o),
                       answer="yes" if hit else "no"))
    if visible:
        o = rng.choice(visible)
        hit = [f for f in findings if f.organ == o]
        qa.append(dict(family="anomaly_detection", answer_type="closed", organ=o,
                       question=rng.choice(ORGAN_ABNORMAL).format(o=o), answer="yes" if hit else "no"))
    left, right = PAIRED["kidney"]             # (the lungs: only their bases are in the abdomen scans)
    if left in organs and right in organs:
        vl, vr = float(organs[left].sum()), float(organs[right].sum())
        if max(vl, vr) >= LARGER_RATIO * min(vl, vr):
            qa.append(dict(family="image_observation", answer_type="open", organ="kidney",
                           question=rng.choice(LARGER).format(p="kidney"), answer="left" if vl > vr else "right"))
    if len(by_organ) == 1:
        o = next(iter(by_organ))
        qa.append(dict(family="image_observation", answer_type="open", organ=o, question=rng.choice(WHICH),
                       answer=o))
    for pair, (left, right) in PAIRED.items():
        hits = [s for s in (left, right) if s in by_organ]
        if len(hits) == 1:
            qa.append(dict(family="image_observation", answer_type="open", organ=hits[0],
                           question=rng.choice(SIDE).format(p=pair), answer=hits[0].split()[0]))
    if len(effusions) == 1:
        qa.append(dict(family="image_observation", answer_type="open", organ=effusions[0].organ,
                       question=EFFUSION_SIDE[0], answer=effusions[0].side))
    for o, fs in by_organ.items():
        qa.append(dict(family="counting", answer_type="numeric", organ=o,
                       question=rng.choice(COUNT).format(o=o), answer=str(len(fs))))
        big = max(fs, key=lambda f: f.diameter_mm)
        qa.append(dict(family="measurement", answer_type="numeric", organ=o,
                       question=rng.choice(SIZE).format(o=o), answer=f"{int(big.diameter_mm)} mm"))
        if len(fs) == 1 and fs[0].kind in ("cyst", "hypodense", "hyperdense"):
            qa.append(dict(family="image_observation", answer_type="choice", organ=o,
                           question=rng.choice(TYPE).format(o=o), answer="cyst" if fs[0].kind == "cyst" else "solid"))
    if enlargement:
        grown = {f.organ for f in findings if f.kind == "enlargement"}
        for o in (o for o in ENLARGE_ORGANS if o in organs):
            qa.append(dict(family="existence", answer_type="closed", organ=o,
                           question=rng.choice(ENLARGED).format(o=o), answer="yes" if o in grown else "no"))
            if o in grown or rng.random() < 0.25:
                ml = float(organs[o].sum()) * voxel_ml
                qa.append(dict(family="measurement", answer_type="numeric", organ=o,
                               question=rng.choice(ORGAN_VOLUME).format(o=o), answer=f"{round(ml)} ml"))
    return qa


def make_temporal_questions(changes: list[dict], organs: dict, rng: random.Random) -> list[dict]:
    """Longitudinal questions (3D-RAD's temporal family) about lesions seen on a prior and a current
    scan; ``changes``: {organ, change, prior_mm, current_mm} per lesion. Asked only where the answer
    is unambiguous (one lesion in the organ)."""
    qa = []
    by_organ: dict[str, list[dict]] = {}
    for c in changes:
        by_organ.setdefault(c["organ"], []).append(c)
    q = lambda templates, o, answer, atype: dict(family="temporal", answer_type=atype, organ=o,  # noqa: E731
                                                 question=rng.choice(templates).format(o=o), answer=answer)
    for o in organs:
        cs = by_organ.get(o, [])
        if not cs:
            if o not in NO_LESIONS and rng.random() < 0.3:
                qa.append(q(NEW, o, "no", "closed"))
            continue
        qa.append(q(NEW, o, "yes" if any(c["change"] == "new" for c in cs) else "no", "closed"))
        if len(cs) != 1:
            continue
        c = cs[0]
        if c["change"] in ("larger", "smaller", "stable"):
            qa.append(q(CHANGE, o, c["change"], "choice"))
            qa.append(q(GROWN, o, "yes" if c["change"] == "larger" else "no", "closed"))
            qa.append(q(PRIOR_SIZE, o, f"{int(c['prior_mm'])} mm", "numeric"))
            if rng.random() < 0.5:                      # "resolved?" is asked of lesions that persist too
                qa.append(q(RESOLVED, o, "no", "closed"))
        elif c["change"] == "resolved":
            qa.append(q(RESOLVED, o, "yes", "closed"))
            qa.append(q(PRIOR_SIZE, o, f"{int(c['prior_mm'])} mm", "numeric"))
    return qa


def all_template_text() -> list[str]:
    """Every phrasing and answer word, to train the demo tokenizer."""
    words = list(ORGANS) + ["lung", "kidney", "yes", "no", "left", "right", "cyst", "solid", "mm", "ml"] + \
        [str(i) for i in range(100)]
    texts = EXIST + ANOMALY + WHICH + SIDE + SIZE + COUNT + TYPE + EFFUSION + EFFUSION_SIDE + ENLARGED + \
        ORGAN_VOLUME + CYST + NODULE + ORGAN_ABNORMAL + LARGER + CHANGE + GROWN + NEW + RESOLVED + PRIOR_SIZE + \
        list(CHANGES) + words
    return [t.format(o=o, p=p) for t in texts for o in list(ORGANS) + list(PAIRED) for p in PAIRED]


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------

class DemoGenerator:
    """Deterministic stream of (frames, record) for a split; backgrounds deformed into a pool."""

    def __init__(self, split: str = "train", seed: int = 0, pool: int = 6, device="cpu",
                 backgrounds: dict | None = None, downsample: float = 1.0, enlargement: float = 0.0):
        self.split, self.device = split, torch.device(device)
        self.enlargement = enlargement      # share of scans with an enlarged organ (0 = off, no such questions)
        base = SPLITS[split]
        self.rng = random.Random(seed + base)
        torch.manual_seed(seed + base)
        cases = REPORT_CASES if split == "report" else TRAIN_CASES
        bgs = backgrounds or {c: load_background(c, self.device) for c in cases}
        # Curriculum: the whole stream on a coarser grid (bodies shrunk once, findings drawn there),
        # so a 64-token stage costs little more than the model itself.
        self.shape = downsample_shape(downsample) if downsample != 1 else MODEL_SHAPE
        bgs = {c: shrink(bgs[c], self.shape) for c in cases}
        self.pool = []
        for c in cases:
            self.pool.append(bgs[c])
            for _ in range(pool if split != "report" else 0):
                self.pool.append(deform(bgs[c], self.rng))

    def _body(self):
        """A pool body, mirrored left-right half of the time (label sides swapped)."""
        rng = self.rng
        bg = rng.choice(self.pool)
        frames = bg.frames.clone()
        organs = dict(bg.organs)
        mirrored = rng.random() < 0.5
        if mirrored:
            frames = frames.flip(-1)
            organs = {MIRROR.get(n, n): m.flip(-1) for n, m in organs.items()}
        return bg, frames, organs, mirrored

    def acquire(self, frames, bg: Background):
        """One acquisition of a body: intensity jitter and noise — or, one time in ten, the body as
        it is (a prepared scan as the app gives it: without them a model can read an unjittered,
        noiseless volume as a perturbed one, see the model card)."""
        rng = self.rng
        if rng.random() < CLEAN_ACQUISITION:
            return frames.clamp(0, 1)          # (a copy; the coarse grid's area means may pass 1 by an ulp)
        frames = (frames * rng.uniform(0.95, 1.05) + rng.uniform(-0.02, 0.02)).clamp(0, 1)
        # Noise as it would survive area-averaging onto a coarser grid (1 on the model grid).
        fine = math.sqrt(math.prod(VOXEL_MM) / math.prod(bg.voxel_mm))
        return (frames + torch.randn_like(frames) * rng.uniform(0.0, 0.01) * fine).clamp(0, 1)

    def sample(self, with_findings: float = 0.65):
        rng = self.rng
        bg, frames, organs, mirrored = self._body()
        frames = self.acquire(frames, bg)
        sampler = FindingSampler(rng, self.device, bg.voxel_mm)
        findings: list[Finding] = []
        if self.enlargement and rng.random() < self.enlargement:      # first: it resamples the organ
            grow = [o for o in ENLARGE_ORGANS if o in organs]
            f = sampler.add_enlargement(frames, organs, rng.choice(grow)) if grow else None
            if f:
                findings.append(f)
        before = list(findings)                  # (an enlargement) kept by counterfactual()
        if organs and rng.random() < with_findings:
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                lungs, solid = lesion_sites(organs)
                r = rng.random()
                if lungs and r < 0.2:
                    f = sampler.add_lesion(frames, organs, rng.choice(lungs), "nodule")
                elif lungs and r < 0.3 and not any(x.kind == "effusion" for x in findings):
                    f = sampler.add_effusion(frames, organs, rng.choice(lungs))
                elif solid:
                    o = rng.choice(solid)
                    if findings and rng.random() < 0.5 and findings[0].focal:
                        o = findings[0].organ if findings[0].organ in solid else o
                    f = sampler.add_lesion(frames, organs, o, rng.choice(["cyst", "hypodense", "hyperdense"]))
                elif lungs:                      # a chest body: lungs (and the aorta) only
                    f = sampler.add_lesion(frames, organs, rng.choice(lungs), "nodule")
                else:
                    f = None
                if f:
                    findings.append(f)
        self._last = (frames, organs, before, sampler, rng.getstate())   # for counterfactual()
        qa = make_questions(findings, organs, rng, bool(self.enlargement), sampler.voxel_ml)
        self.last_truth = sampler.truth   # finding map of this scan (training-only supervision)
        meta = dict(background=bg.name, mirrored=mirrored,
                    findings=[dict(kind=f.kind, organ=f.organ, side=f.side, diameter_mm=f.diameter_mm,
                                   volume_ml=f.volume_ml, center_model_voxel=[round(x, 1) for x in f.center])
                              for f in findings])
        return frames, qa, meta, organs

    def counterfactual(self) -> tuple:
        """The last `sample()` without its lesions and effusion (same body, acquisition and any
        enlargement): (frames, qa), the frames rebuilt from the sample's frames (left unmodified by
        the caller) and what its findings overwrote. ``qa`` holds the last sample's existence and
        anomaly questions, word for word (its question draws are replayed, so the main stream is
        untouched), answered for the clean scan — asked of both scans, only the image tells the
        answers apart."""
        frames, organs, before, sampler, qa_state = self._last
        frames = frames.clone()
        for sl, mask, values in reversed(sampler.undo):
            (frames[sl] if sl is not None else frames)[mask] = values
        replay = random.Random()
        replay.setstate(qa_state)
        qa = make_questions(before, organs, replay, bool(self.enlargement), sampler.voxel_ml)
        return frames, [q for q in qa if q["family"] in FINDING_FAMILIES]

    def pair(self, with_findings: float = 0.85):
        """A temporal pair: (prior, current, qa, meta, organs) of one body acquired twice, 1–2 lesions
        each grown, shrunk, stable, new or resolved in between. ``qa`` holds the longitudinal
        questions and a few about the current scan alone. Training-only maps: ``last_truths``."""
        rng = self.rng
        bg, frames, organs, mirrored = self._body()
        prior, current = self.acquire(frames, bg), self.acquire(frames, bg)
        early, late = FindingSampler(rng, self.device, bg.voxel_mm), FindingSampler(rng, self.device, bg.voxel_mm)
        changes, now = [], []
        sites = [o for o in organs if o not in NO_LESIONS]
        if sites and rng.random() < with_findings:
            for _ in range(rng.choice([1, 1, 2])):
                o = rng.choice(sites)
                kind = "nodule" if o.endswith("lung") else rng.choice(["cyst", "hypodense", "hyperdense"])
                change = rng.choice(CHANGES)
                got = early.add_changing_lesion(prior, current, late, organs, o, kind, change)
                if got:
                    before, after = got
                    changes.append(dict(organ=o, kind=kind, change=change,
                                        prior_mm=before.diameter_mm if before else 0,
                                        current_mm=after.diameter_mm if after else 0,
                                        center_model_voxel=list((before or after).center)))
                    now += [after] if after else []
        qa = make_temporal_questions(changes, organs, rng)
        current_qa = make_questions(now, organs, rng)
        qa += rng.sample(current_qa, min(2, len(current_qa)))
        self.last_truths = (early.truth, late.truth)
        self.last_truth = late.truth
        meta = dict(background=bg.name, mirrored=mirrored, changes=changes)
        return prior, current, qa, meta, organs

    def records(self, n_scans: int, out_dir: Path | None = None, per_scan: int = 3, pairs: int = 0):
        """Write ``n_scans`` scans (float16 .npy in model space), then ``pairs`` temporal pairs (prior and
        current files), and their QA as JSONL records (``prior_image`` on a pair's questions)."""
        recs = []
        for i in range(n_scans + pairs):
            name = f"{self.split}_{i:05d}.npy"
            if i < n_scans:
                (frames, qa, meta, _), prior, files = self.sample(), None, {"image": name}
            else:
                prior, frames, qa, meta, _ = self.pair()
                files = {"image": name, "prior_image": f"{self.split}_{i:05d}_prior.npy"}
            if out_dir is not None:
                for key, vol in (("image", frames), ("prior_image", prior)):
                    if key in files:
                        np.save(out_dir / files[key], vol.cpu().numpy().astype(np.float16))
            for q in self.rng.sample(qa, min(per_scan, len(qa))):
                recs.append(dict(**files, space="model", question=q["question"], answer=q["answer"],
                                 family=q["family"], answer_type=q["answer_type"], organ=q["organ"], meta=meta))
        return recs
