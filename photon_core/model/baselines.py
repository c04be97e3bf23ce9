"""Pruning baselines at k kept tokens, beside ITS: FastV, VisionZip-style, random.

They answer "what if another rule chose the same number of tokens?" and are computed only for the
rows whose budget asks for one (`select`); Photon's own path never runs them.

* FastV: the attention the last instruction token pays each visual token at the ITS layer (mean over
  heads, causal, padding excluded).
* VisionZip-style (text-agnostic): dominant tokens by the attention they receive from the other visual
  tokens, plus contextual tokens that each absorb (mean) the dropped tokens most similar to them.
* random: k tokens drawn with the budget's seed.
"""
from __future__ import annotations

import math

import torch

from photon_core.model.budget import Budget, top_k

VISIONZIP_DOMINANT = 54 / 64     # VisionZip's dominant : contextual split (54 + 10 tokens of 64)


def select(budget: Budget, q: torch.Tensor, k: torch.Tensor, vision: torch.Tensor, question: torch.Tensor,
           key_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep mask (V,) and, for VisionZip, the merge plan (V,) (else None) of one sample.

    q (H, L, d), k (H, L, d) (KV heads repeated) at the ITS layer after RoPE; vision / question /
    key_valid (L,) bool."""
    vi = vision.nonzero().flatten()
    n = int(budget.value)
    if budget.mode == "random":
        g = torch.Generator().manual_seed(int(budget.seed))
        return top_k(torch.rand(vi.numel(), generator=g).to(q.device), n), None
    qf, kf = q.detach().float(), k.detach().float()
    scale = 1.0 / math.sqrt(q.shape[-1])
    if budget.mode == "fastv":
        return top_k(fastv_scores(qf, kf, vi, question, key_valid, scale), n), None
    if budget.mode == "visionzip":
        dominance = ((qf[:, vi] @ kf[:, vi].transpose(-1, -2)) * scale).softmax(-1).mean((0, 1))
        keys = kf[:, vi].transpose(0, 1).flatten(1)                     # (V, H·d)
        return visionzip_plan(n, dominance, keys)
    raise ValueError(f"{budget.mode!r} is not a baseline")


def fastv_scores(q, k, vi, question, key_valid, scale) -> torch.Tensor:
    """(V,) attention of the last instruction token (the last real token if there is none) to each
    visual token, mean over heads."""
    qi = question.nonzero().flatten()
    last = qi[-1:] if len(qi) else key_valid.nonzero().flatten()[-1:]
    a = (q[:, last] @ k.transpose(-1, -2)) * scale                        # (H, 1, L)
    allowed = torch.arange(k.shape[1], device=q.device) <= last
    a = a.masked_fill(~(allowed & key_valid), float("-inf")).softmax(-1)
    return a[:, 0, vi].mean(0)


def visionzip_plan(k: int, dominance: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip-style selection of k of V tokens for one sample.

    dominance (V,): attention each visual token receives from the visual tokens; keys (V, d).
    Returns keep (V,) bool and merge_into (V,) long: for every dropped token, the kept contextual
    token whose hidden state absorbs it (mean), −1 for tokens not merged. Dominant tokens are the
    top ``round(k·54/64)`` by dominance; contextual targets are spread evenly over the remaining
    tokens in index order, and every other remaining token joins its most similar target (cosine
    of keys), as VisionZip merges the remainder into a few contextual tokens.
    """
    V = dominance.numel()
    k = int(max(0, min(k, V)))
    n_dom = int(round(k * VISIONZIP_DOMINANT)) if k > 1 else k
    keep = top_k(dominance, n_dom)
    merge_into = torch.full((V,), -1, dtype=torch.long, device=dominance.device)
    rest = (~keep).nonzero().flatten()
    n_ctx = min(k - n_dom, rest.numel())
    if n_ctx <= 0:
        return keep, merge_into
    targets = rest[torch.linspace(0, rest.numel() - 1, n_ctx, device=rest.device).round().long()]
    keep[targets] = True
    others = rest[~torch.isin(rest, targets)]
    if others.numel():
        kn = torch.nn.functional.normalize(keys.float(), dim=-1)
        sim = kn[others] @ kn[targets].T
        merge_into[others] = targets[sim.argmax(-1)]
    return keep, merge_into


def merge_dropped(h: torch.Tensor, vision: torch.Tensor, merges: list) -> torch.Tensor:
    """VisionZip-style merge at the ITS layer's output: a contextual token's hidden state becomes the
    mean of itself and the dropped tokens assigned to it (earlier layers' cache keeps its own)."""
    h = h.clone()
    for b, m in enumerate(merges):
        if m is None:
            continue
        vi = vision[b].nonzero().flatten()
        src = (m >= 0).nonzero().flatten()
        if not src.numel():
            continue
        hv = h[b, vi]
        total = hv.clone()
        count = torch.ones(hv.shape[0], 1, dtype=hv.dtype, device=hv.device)
        total.index_add_(0, m[src], hv[src])
        count.index_add_(0, m[src], torch.ones(src.numel(), 1, dtype=hv.dtype, device=hv.device))
        targets = torch.unique(m[src])
        hv[targets] = total[targets] / count[targets]
        h[b, vi] = hv
    return h
