"""Training-only targets the synthetic data's exact ground truth gives (not part of official Photon training).

A from-scratch demo model on a small budget sees a few thousand questions: one answer token each is
too little signal to teach a vision tower what organs and lesions look like. The generator knows the
exact organ and finding maps, so:

* `token_targets` — per token block: the share of each organ and of findings in it, and the finding
  diameter (for the training-only `AuxHead` read-out of the visual tokens, `train/aux_head.py`);
* `guide_target` — the blocks a question should look at (its organ's, or the findings' when it names
  none), for `losses.guide_loss` on the ITS saliency;
* `keep_target` — the blocks a question should keep (those, and the nearest ones up to a share), for
  `losses.keep_guide_loss` and `losses.contrast_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from photon_core.io.preprocess import TOKEN_GRID, block_fractions, blocks
from photon_core.organs import BLOCK_FRACTION, ORGANS, PAIRED, organs_in_question


def token_targets(organs: dict, truth: torch.Tensor | None, grid: tuple = TOKEN_GRID, share=None) -> dict:
    """Per-token targets of one scan: organ shares (V, n_organs), finding share, diameter (mm).
    ``share(mask)`` gives an organ's shares (default `block_fractions` on ``grid``; a stream passes a
    cached one, on its device)."""
    share = share or (lambda m: block_fractions(m, grid))
    fr = {o: share(organs[o]) if o in organs else None for o in ORGANS}
    n = grid[0] * grid[1] * grid[2]
    dev = truth.device if truth is not None else next((f.device for f in fr.values() if f is not None),
                                                      torch.device("cpu"))
    organ = torch.stack([fr[o] if fr[o] is not None else torch.zeros(n, device=dev) for o in ORGANS], -1)
    organ_known = torch.tensor([fr[o] is not None for o in ORGANS], device=dev)
    if truth is None:
        lesion = torch.zeros(n, device=dev)
        diam = torch.zeros(n, device=dev)
    else:
        lesion = block_fractions(truth > 0, grid)
        diam = blocks(truth, grid).amax((1, 3, 5)).flatten()
    return dict(organ=organ, organ_known=organ_known, lesion=lesion, diameter=diam)


def null_targets(grid: tuple = TOKEN_GRID, device="cpu") -> dict:
    """The targets of a volume that shows no body: no organ known, no finding."""
    n = grid[0] * grid[1] * grid[2]
    return dict(organ=torch.zeros(n, len(ORGANS), device=device),
                organ_known=torch.zeros(len(ORGANS), dtype=torch.bool, device=device),
                lesion=torch.zeros(n, device=device), diameter=torch.zeros(n, device=device))


def slab_targets(targets: dict, i: int, grid: tuple = TOKEN_GRID) -> dict:
    """The targets of depth slab ``i`` of a scan's token grid (tokens run depth-major)."""
    per = grid[1] * grid[2]
    return {k: v if k == "organ_known" else v[i * per:(i + 1) * per] for k, v in targets.items()}


def guide_target(question: str, targets: dict, floor: float = 0.0, halo: float = 0.0,
                 grid: tuple = TOKEN_GRID) -> torch.Tensor:
    """Weights over token blocks a question should look at (1 on the target blocks, ``floor``
    elsewhere; zeros = no guidance). ``halo`` > 0 adds 0.5·exp(−d / halo) to the other blocks, d the
    block distance (Chebyshev, on ``grid``) to the nearest target block: the tokens kept beyond the
    asked organ lie around it rather than wherever every question keeps them."""
    t = _guide_blocks(question, targets)
    other = (t == 0).float() * (t > 0).any().float()
    out = t + floor * other
    if halo > 0 and bool(t.any()):
        out = out + other * 0.5 * torch.exp(-_block_distance(t > 0, grid) / halo)
    return out


def keep_target(question: str, targets: dict, frac: float, grid: tuple = TOKEN_GRID) -> torch.Tensor:
    """The token blocks a question should keep: its target blocks (the asked organ's, or the findings'
    when it names none; see `guide_target`) and, nearest first (Euclidean, in blocks), the blocks
    around them until ``frac`` of all blocks are chosen. Zeros = no target (the row is skipped)."""
    t = _guide_blocks(question, targets) > 0
    if not bool(t.any()):
        return torch.zeros(t.shape[0], device=t.device)
    n = max(int(t.sum()), round(frac * t.numel()))
    zz, yy, xx = torch.meshgrid(*(torch.arange(g, device=t.device, dtype=torch.float32) for g in grid),
                                indexing="ij")
    pos = torch.stack([zz, yy, xx], -1).reshape(-1, 3)
    d = torch.cdist(pos, pos[t]).min(-1).values
    out = torch.zeros(t.shape[0], device=t.device)
    out[torch.sort(d, stable=True).indices[:n]] = 1.0
    return out


def _block_distance(mask: torch.Tensor, grid: tuple, reach: int = 6) -> torch.Tensor:
    """Chebyshev distance in blocks from each block of the flat ``mask`` (on ``grid``) to the nearest
    True block, by repeated 3×3×3 dilation; blocks farther than ``reach`` get ``reach`` + 1."""
    m = mask.float().reshape(1, 1, *grid)
    d = torch.full(grid, float(reach + 1), device=mask.device)
    d[m[0, 0] > 0] = 0.0
    for k in range(1, reach + 1):
        m2 = F.max_pool3d(m, 3, stride=1, padding=1)
        d[(m2[0, 0] > 0) & (m[0, 0] == 0)] = float(k)
        m = m2
    return d.reshape(-1)


def asked_organs(question: str) -> set:
    """The organs a question is about ('kidney' with no side: both kidneys; a pleural question: the
    lungs); empty when it names none (its guidance then goes to the findings)."""
    asked = set(organs_in_question(question, list(ORGANS)))
    if "pleural" in question.lower():
        asked |= set(PAIRED["lung"])
    return asked


def _guide_blocks(question: str, targets: dict) -> torch.Tensor:
    names = list(ORGANS)
    asked = asked_organs(question)
    organ = targets["organ"]
    if asked:
        cols = [names.index(o) for o in asked if bool(targets["organ_known"][names.index(o)])]
        if not cols:
            return torch.zeros(organ.shape[0], device=organ.device)
        share = organ[:, cols].sum(-1)
        chosen = share >= BLOCK_FRACTION
        if not bool(chosen.any()):
            chosen = share >= 0.5 * float(share.max())
        return (chosen & (share > 0)).float()
    return (targets["lesion"] > 0).float()
