"""The training-only token read-out (`AuxHead`) and the token standardisation folded into the merger.

Nothing of it is saved with a model: the head is discarded, the fold is one fixed affine map in the
merger's last Linear (the architecture, and an official loader, unchanged).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from photon_core.io.preprocess import patchify
from photon_core.model.photon import PhotonModel


def standardise_tokens(f: torch.Tensor) -> torch.Tensor:
    """(scans, tokens, D) → each token as its deviation from its scan's mean token, over their spread."""
    return (f - f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-6)


@torch.no_grad()
def fold_standardise(model: PhotonModel, feats: torch.Tensor) -> None:
    """Re-parametrise the merger's last Linear so that the visual tokens ``feats`` (N, D), encoded by
    ``model`` as it is, would come out as deviations from their mean in units of each channel's spread.
    One fixed affine map, so the architecture (and an official loader) is unchanged. A tower trained
    through a standardised read-out (``--aux-standardise``) marks a finding as a small deviation of a
    large common vector; folded, the deviation is what an LLM stage sees (research/ball_probe.py --fold)."""
    feats = feats.float()
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    last = model.visual.merger.mlp[-1]
    last.weight.div_(sd.to(last.weight)[:, None])
    last.bias.sub_(mu.to(last.bias)).div_(sd.to(last.bias))


class AuxHead(torch.nn.Module):
    """Training-only linear read-out of the visual tokens (organ shares, finding share, diameter)."""

    def __init__(self, dim: int, n_organs: int, findings: float = 1.0, standardise: bool = False):
        super().__init__()
        self.n, self.findings = n_organs, findings     # findings: weight of the finding terms (0 = organs only)
        self.standardise = standardise                 # read each token as its deviation from the scan's mean token
        self.proj = torch.nn.Linear(dim, n_organs + 2)

    def read(self, feats: torch.Tensor, n_scans: int) -> torch.Tensor:
        """(n_scans·V, D) visual tokens → (n_scans, V, n_organs + 2) logits: organ shares, finding,
        diameter."""
        f = feats.float().reshape(n_scans, -1, feats.shape[-1])
        return self.proj(standardise_tokens(f) if self.standardise else f)

    def finding_logits(self, feats: torch.Tensor, n_scans: int) -> torch.Tensor:
        """(n_scans, V): how much each token looks like a finding, as the head reads it."""
        return self.read(feats, n_scans)[..., self.n]

    def loss(self, feats: torch.Tensor, tg: list[dict], detect: bool = False) -> torch.Tensor:
        """BCE on organ shares, weighted BCE on finding shares, MSE on diameters; ``detect``: also
        BCE of each scan's most finding-like token against "the scan has a finding" (a max-pooled
        read-out makes the vision tower mark finding tokens; a mean read-out does not — see
        research/ball_probe.py). With ``standardise`` the read-out sees each token as its deviation
        from its scan's mean token over their spread: a from-scratch tower's tokens are one large
        common vector plus small deviations, and through a raw read-out it learns to flatten them
        (every token the same) before it finds a lesion-sized change (research/ball_probe.py
        --standardise)."""
        y = self.read(feats, len(tg))
        organ = torch.stack([t["organ"] for t in tg])
        known = torch.stack([t["organ_known"] for t in tg])[:, None, :].expand_as(organ)
        lesion = torch.stack([t["lesion"] for t in tg])
        diam = torch.stack([t["diameter"] for t in tg])
        bce = F.binary_cross_entropy_with_logits
        lo = bce(y[..., :self.n][known], organ[known]) if bool(known.any()) else y.sum() * 0
        le = bce(y[..., self.n], (lesion * 8).clamp(max=1.0), pos_weight=torch.tensor(20.0, device=y.device))
        has = diam > 1.0
        ld = F.mse_loss(y[..., self.n + 1][has], diam[has] / 40.0) if bool(has.any()) else y.sum() * 0
        found = le + ld
        self.parts = dict(organ=lo.detach(), finding=le.detach(), diameter=ld.detach())   # (progress lines)
        if detect:
            scan_term = bce(y[..., self.n].amax(1), (lesion.amax(1) > 0).float())
            found = found + scan_term
            self.parts["scan"] = scan_term.detach()
        return lo + self.findings * found


@torch.no_grad()
def tower_features(model: PhotonModel, cfg) -> torch.Tensor:
    """Visual tokens of ``cfg.fold_scans`` train-split scans (a seed of their own, CPU), for the fold."""
    from photon_core.train.synthetic.generator import DemoGenerator
    gen = DemoGenerator("train", seed=cfg.seed + 7_777, pool=min(cfg.pool, 2), downsample=cfg.downsample)
    was = model.training
    model.eval()
    feats = torch.cat([model.encode_volume(*patchify(gen.sample()[0][:, None])) for _ in range(cfg.fold_scans)])
    model.train(was)
    return feats
