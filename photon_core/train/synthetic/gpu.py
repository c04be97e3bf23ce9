"""The demo stream in batches on a GPU: ``GpuStream("train", device="cuda").batch(32)`` → 32 `Scan`s.

It is `DemoGenerator` itself, split across devices (``frames_device``): every decision — body, mirror,
acquisition, where each finding goes and how large, the questions and their answers — is made by the
generator's own code on the organ masks on the CPU (indexed once per pool body), and the frames and
finding maps are made on the GPU without waiting for the host (deformation of the pool by
`grid_sample`, acquisition, findings painted, all in torch). So for a seed it gives the CPU
generator's bodies, findings, questions and answers, and its frames up to the acquisition noise the
device's random generator draws (`tests/test_gpu_data.py`).

A batch also holds what training reads from each scan: the token targets (organ shares per token
block, computed once per pool body; finding share and diameter), the scan's clean twin
(`DemoGenerator.counterfactual`) where asked, and null volumes — uniform noise, all air, smooth
noise — asked a drawn scan's questions with its finding questions answered as nothing seen
(`questions.nothing_seen`), so that such a volume gets a well-formed answer that does not come from a body.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from photon_core.io.preprocess import TOKEN_VOXELS, block_fractions, patchify
from photon_core.train.synthetic.findings import per_mask
from photon_core.train.synthetic.generator import FINDING_COUNTS, NULL_KINDS, DemoGenerator, null_frames
from photon_core.train.synthetic.questions import nothing_seen
from photon_core.train.targets import null_targets, token_targets


@dataclass
class Scan:
    frames: torch.Tensor            # (D, H, W) in [0, 1], on the stream's device
    qa: list                        # every question the scan supports, with its answer
    meta: dict                      # body, mirroring, findings (as DemoGenerator.sample gives them)
    targets: dict                   # token targets (`targets.token_targets`), on the device
    kind: str = "scan"              # scan | twin (the scan before it, without its findings) | NULL_KINDS
    organs: dict | None = None      # organ masks (CPU); None for a null volume


class GpuStream:
    """Batches of the demo stream of ``split`` on ``device`` (any device: the CPU runs the same code)."""

    def __init__(self, split: str = "train", seed: int = 0, pool: int = 6, device="cuda",
                 bodies: dict | None = None, downsample: float = 1.0, enlargement: float = 0.0,
                 pool_device=None, masks_device="cpu"):
        self.device = torch.device(device)
        # masks_device: where the decisions are made (the CPU; ``device`` itself runs the generator's
        # one-device path, every decision waiting for the GPU — slower, a fallback)
        self.gen = DemoGenerator(split, seed=seed, pool=pool, device=masks_device, backgrounds=bodies,
                                 downsample=downsample, enlargement=enlargement, frames_device=self.device,
                                 pool_device=self.device if pool_device is None else pool_device)
        self.shape = self.gen.shape
        self.grid = tuple(n // v for n, v in zip(self.shape, TOKEN_VOXELS))
        self.share = per_mask(lambda m: block_fractions(m.to(self.device, non_blocking=True), self.grid))
        self.choice = random.Random(seed * 7919 + 17)      # which scans are twins or null volumes
        self.scans, self.seconds = 0, 0.0                  # made so far, and the time it took

    @property
    def n_visual(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def scans_per_s(self) -> float:
        return self.scans / self.seconds if self.seconds else 0.0

    def scan(self, with_findings: float = 0.65, counts: tuple = FINDING_COUNTS) -> Scan:
        frames, qa, meta, organs = self.gen.sample(with_findings, counts)
        return Scan(frames, qa, meta, self._targets(organs, self.gen.last_truth), organs=organs)

    def twin(self, scan: Scan) -> Scan:
        """``scan`` (the last one drawn) without its findings — same body, acquisition and noise —
        asked its finding questions."""
        frames, qa = self.gen.counterfactual()
        kept = [f for f in scan.meta["findings"] if f["kind"] == "enlargement"]
        return Scan(frames, qa, scan.meta | {"findings": kept}, self._targets(scan.organs, None), "twin",
                    scan.organs)

    def null(self, kind: str, qa: list) -> Scan:
        """A volume that shows no body (``kind`` in NULL_KINDS), asked ``qa`` as nothing seen."""
        meta = {"background": kind, "mirrored": False, "findings": []}
        return Scan(null_frames(kind, self.shape, self.device), nothing_seen(qa), meta,
                    null_targets(self.grid, self.device), kind)

    def batch(self, n: int, counterfactual: float = 0.0, null: float = 0.0,
              counts: tuple = FINDING_COUNTS) -> list[Scan]:
        """``n`` scans: of them, pairs (a scan with findings, then its clean twin) with probability
        ``counterfactual`` each, and null volumes with probability ``null``; the rest as drawn. A scan
        with findings gets as many as a draw from ``counts``."""
        t0 = time.perf_counter()
        out: list[Scan] = []
        while len(out) < n:
            r = self.choice.random()
            if r < null:
                out.append(self.null(self.choice.choice(NULL_KINDS), self.scan(counts=counts).qa))
            elif r < null + counterfactual and n - len(out) >= 2:
                s = self.scan(with_findings=1.0, counts=counts)
                out += [s, self.twin(s)]
            else:
                out.append(self.scan(counts=counts))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        self.scans += len(out)
        return out

    def _targets(self, organs: dict, truth) -> dict:
        return token_targets(organs, truth, self.grid, self.share)


def pixels(scans: list[Scan]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scans as the model's input: (S·P, 14³) patch rows and (S, 3) grids, on their device."""
    rows = [patchify(s.frames[:, None]) for s in scans]
    return torch.cat([r for r, _ in rows]), torch.cat([g for _, g in rows]).to(scans[0].frames.device)
