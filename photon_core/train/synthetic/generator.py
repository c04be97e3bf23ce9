"""The demo data stream: real anatomy from the sample CTs, synthetic findings with exact ground truth.

`DemoGenerator(split)` yields (frames, qa, meta, organs): a pool body (`anatomy`), mirrored half of the
time, one acquisition (intensity jitter and noise), 0–3 findings (`findings`) and every question their
truth supports (`questions`); `pair()` a prior and a current scan with lesions that changed between
them; `counterfactual()` the last scan without its findings, asked the same questions; `records()`
writes scans and JSONL records {image, question, answer, family, answer_type, organ, meta}.

Everything happens in model space (140, 280, 280), so generation is cheap enough to feed training on a
CPU and runs on the GPU when one is given (all tensor ops take ``device``). With ``frames_device`` the
work splits: where findings go is decided on the organ masks on ``device`` (the CPU: a pool body's
masks are indexed once), and the frames and finding maps are made on ``frames_device`` (a GPU) with
no host sync — the same decisions, so the same findings, questions and answers
(`photon_core.train.synthetic.gpu` batches that stream). ``downsample`` > 1 runs the
whole stream on a coarser grid (a training curriculum: 2.5 → 56×112×112, 64 visual tokens), sizes in mm
and volumes in ml kept exact. Splits are disjoint by seed and by body deformation: ``train``, ``val``
(to choose between runs) and ``test`` draw different pool bodies and lesions; ``report`` uses a body
never used in training (dicom_ct).
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from photon_core.io.preprocess import MODEL_SHAPE, TOKEN_VOXELS
from photon_core.organs import MIRROR
from photon_core.train.synthetic.anatomy import VOXEL_MM, Background, deform, downsample_shape, load_background, shrink
from photon_core.train.synthetic.findings import NO_LESIONS, Finding, FindingSampler, lesion_sites
from photon_core.train.synthetic.splits import REPORT_CASES, SPLITS, TRAIN_CASES
from photon_core.train.synthetic.questions import (CHANGES, ENLARGE_ORGANS, FINDING_FAMILIES, make_questions,
                                                   make_temporal_questions)

CLEAN_ACQUISITION = 0.1                      # share of scans without acquisition jitter and noise
FINDING_COUNTS = (1, 1, 1, 2, 3)             # findings drawn into a scan that has some (one of these)
NULL_KINDS = ("noise", "air", "smooth")      # volumes that show no body (`null_frames`)


def null_frames(kind: str, shape: tuple, device="cpu") -> torch.Tensor:
    """A volume that shows no body, in the model's unit: ``noise`` uniform in [0, 1] (what the evaluator
    asks on in place of a scan), ``air`` all zeros (an all-air scan as the official preparation makes
    it: min-max of a constant), ``smooth`` one uniform value per token-sized block, blended."""
    if kind == "noise":
        return torch.rand(shape, device=device)
    if kind == "air":
        return torch.zeros(shape, device=device)
    if kind == "smooth":
        coarse = torch.rand(1, 1, *(n // v for n, v in zip(shape, TOKEN_VOXELS)), device=device)
        return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0]
    raise ValueError(f"unknown null volume {kind!r}; expected one of {', '.join(NULL_KINDS)}")


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------

class DemoGenerator:
    """Deterministic stream of (frames, record) for a split; backgrounds deformed into a pool."""

    def __init__(self, split: str = "train", seed: int = 0, pool: int = 6, device="cpu",
                 backgrounds: dict | None = None, downsample: float = 1.0, enlargement: float = 0.0,
                 frames_device=None, pool_device=None):
        self.split, self.device = split, torch.device(device)     # organ masks: where findings go
        self.frames_device = torch.device(frames_device or device)  # frames and finding maps
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
        # the pool's deformations run on ``pool_device`` (a GPU: fast; the CPU: the reference, exact)
        self.pool = []
        for c in cases:
            src = bgs[c].to(pool_device or self.device)
            self.pool.append(bgs[c].to(self.device, self.frames_device))
            for _ in range(pool if split != "report" else 0):
                self.pool.append(deform(src, self.rng).to(self.device, self.frames_device))
        self._mirrored: dict = {}           # id(pool body) -> its organs mirrored (made once, kept)

    def _body(self):
        """A pool body, mirrored left-right half of the time (label sides swapped)."""
        rng = self.rng
        bg = rng.choice(self.pool)
        frames = bg.frames.clone()
        organs = dict(bg.organs)
        mirrored = rng.random() < 0.5
        if mirrored:
            frames = frames.flip(-1)
            key = id(bg)
            if key not in self._mirrored:
                self._mirrored[key] = {MIRROR.get(n, n): m.flip(-1) for n, m in organs.items()}
            organs = dict(self._mirrored[key])
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

    def sample(self, with_findings: float = 0.65, counts: tuple = FINDING_COUNTS):
        """One scan: (frames, qa, meta, organs). With probability ``with_findings`` it gets findings, as
        many as a draw from ``counts`` (tries; a finding with no site that fits is skipped)."""
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
            for _ in range(rng.choice(counts)):
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
        sampler.restore(frames)
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
