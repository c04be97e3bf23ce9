"""Surrogate-gradient pruning (SGP): the hard token drop and the gradient it sends to the keep probabilities.

`SurrogateGather` — forward: hard gather of the surviving tokens; backward: the surrogate rule that
lets the loss reach the keep probabilities p of the visual tokens.

    forward   out[b, n] = x[b, idx[b, n]]·valid[b, n]                       (B, N, D)
    backward  g        = ∂L/∂out scattered back to the source positions      (B, L, D)
              ∂L/∂x    = g                                  (0 for dropped tokens)
              imp_j    = ⟨x_j, g_j⟩                          visual tokens j only
              z_j      = clip((imp_j − μ)/max(σ, 3e−3), ±1.5)   μ, σ (biased) over the visual tokens
              dir_j    = (0.5 − (0.5 + 0.5·tanh z_j)) − mean_j(·)
              scale_j  = clip(Σ_d|x_j g_j| / (mean_j Σ_d|x g| + 1e−6), 0.5, 2)
              sat_j    = max(p_j(1 − p_j), 5e−3)
              ∂L/∂p_j  = 0.8 · dir_j · scale_j · sat_j              (0 on non-visual positions)

Sign convention: the reference's default ("non-strict") rule — a token whose ⟨x, g⟩ is larger gets
a negative gradient on p, so gradient descent raises its keep probability. The reference's optional
"strict" rule uses −⟨x, g⟩ instead and favours the opposite tokens; we reproduce the default.
"""
from __future__ import annotations

import torch

MIN_SIGMA = 3e-3
Z_CLIP = 1.5
BETA = 0.8
SCALE_MIN, SCALE_MAX = 0.5, 2.0
SAT_FLOOR = 5e-3
EPS = 1e-6


def pack_indices(presence: torch.Tensor, align: str = "left",
                 counts_host: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Survivor mask (B, L) → gather indices (B, N) and validity (B, N), N = max survivors.

    Survivors keep their order. ``align='left'`` puts them first (padding at the end);
    ``'right'`` puts them last (padding in front, so the last real token ends every row).
    ``counts_host``: the survivors per row, read by the caller already (else read here).
    """
    counts = presence.sum(-1)
    if counts_host is None:
        counts_host = counts.tolist()
    N = max(counts_host, default=0)
    B, L = presence.shape
    ar = torch.arange(L, device=presence.device).expand(B, L)
    # Survivors sorted first, in order: key = position for survivors, L + position otherwise.
    key = torch.where(presence, ar, ar + L)
    order = key.argsort(-1)[:, :N]
    valid = torch.arange(N, device=presence.device)[None] < counts[:, None]
    if align == "right":
        shift = (N - counts)[:, None]
        src = (torch.arange(N, device=presence.device)[None] - shift).clamp_min(0)
        order = order.gather(1, src)
        valid = torch.arange(N, device=presence.device)[None] >= shift
    order = torch.where(valid, order, torch.zeros_like(order))
    return order, valid


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) gathered along dim 1 with idx (B, N); invalid slots are zero."""
    shape = idx.shape + x.shape[2:]
    ix = idx.view(*idx.shape, *([1] * (x.ndim - 2))).expand(shape)
    out = x.gather(1, ix)
    return out * valid.view(*valid.shape, *([1] * (x.ndim - 2))).to(out.dtype)


class SurrogateGather(torch.autograd.Function):
    """Hard token gather whose backward also produces a surrogate gradient for p (see module doc)."""

    @staticmethod
    def forward(ctx, x, p_full, vision_mask, idx, valid):
        # x (B, L, D), p_full (B, L) (0 off-vision), vision_mask (B, L) bool, idx/valid (B, N)
        ctx.save_for_backward(x, p_full, vision_mask, idx, valid)
        return gather_tokens(x, idx, valid)

    @staticmethod
    def backward(ctx, grad_out):
        x, p_full, vision_mask, idx, valid = ctx.saved_tensors
        g = torch.zeros_like(x)
        src = grad_out * valid[..., None].to(grad_out.dtype)
        g.scatter_add_(1, idx[..., None].expand_as(src), src)                 # (B, L, D)
        grad_x = g
        vis = vision_mask.to(torch.bool)
        xf, gf = x.float(), g.float()
        imp = (xf * gf).sum(-1)                                                # (B, L)
        mag = (xf * gf).abs().sum(-1)                                          # (B, L)
        n_vis = vis.sum(-1, keepdim=True).clamp_min(1)
        visf = vis.float()
        mu = (imp * visf).sum(-1, keepdim=True) / n_vis
        var = (((imp - mu) ** 2) * visf).sum(-1, keepdim=True) / n_vis
        sigma = var.sqrt().clamp_min(MIN_SIGMA)
        z = ((imp - mu) / sigma).clamp(-Z_CLIP, Z_CLIP)
        direction = 0.5 - (0.5 + 0.5 * torch.tanh(z))
        direction = direction - (direction * visf).sum(-1, keepdim=True) / n_vis
        mag_mean = (mag * visf).sum(-1, keepdim=True) / n_vis
        scale = (mag / (mag_mean + EPS)).clamp(SCALE_MIN, SCALE_MAX)
        pf = p_full.float()
        sat = (pf * (1 - pf)).clamp_min(SAT_FLOOR)
        grad_p = BETA * direction * scale * sat * visf
        return grad_x, grad_p.to(p_full.dtype), None, None, None


def surrogate_gather(x, p_full, vision_mask, idx, valid):
    return SurrogateGather.apply(x, p_full, vision_mask, idx, valid)
