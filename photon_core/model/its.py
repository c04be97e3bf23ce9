"""Instruction-conditioned token scheduling (ITS): saliency, adaptive threshold, keep decision.

Shapes: H query heads, T instruction tokens, V visual tokens, d head dim.

Saliency (fp32, q/k after multimodal RoPE, K GQA-repeated, s = 1/√d):
    A_tt   = (q_T k_Tᵀ)·s with the diagonal zeroed                      (H, T, T)
    c_t    = mean_h Σ_t' relu(A_tt)                                      (T,)
    w_t    = c_t / max(Σ c, 1)                                           (T,)
    u_j    = mean_h Σ_t w_t (q_t · k_j)·s                                (V,)
    ρ      = (u − min u) / (max u − min u + 1e−8)
Threshold: 12-d descriptor of (ρ, u) → Linear(12, hidden/8) → GELU → Linear(·, 1) → sigmoid;
θ = 0.9 · that. Keep probability p_j = σ((ρ_j − θ)/0.2); keep if p_j > 0.5.

Every sample is scored on its own instruction and visual positions, so a batch row gives exactly
what the sample gives alone (the reference's batched scoring does not; see DESIGN.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

TEMPERATURE = 0.2     # p = σ((ρ − θ)/T)
THETA_SCALE = 0.9     # θ = 0.9 · MLP output


def saliency(q_text: torch.Tensor, k_text: torch.Tensor, k_vis: torch.Tensor) -> torch.Tensor:
    """Instruction-centrality-weighted saliency u for one sample.

    q_text (H, T, d), k_text (H, T, d), k_vis (H, V, d) → u (V,), all computed in fp32.
    """
    q_text, k_text, k_vis = q_text.float(), k_text.float(), k_vis.float()
    scale = 1.0 / math.sqrt(q_text.shape[-1])
    a_tt = (q_text @ k_text.transpose(-1, -2)) * scale                    # (H, T, T)
    eye = torch.eye(a_tt.shape[-1], dtype=torch.bool, device=a_tt.device)
    a_tt = a_tt.masked_fill(eye, 0.0)
    c = a_tt.clamp_min(0).sum(-1).mean(0)                                 # (T,)
    w = c / c.sum().clamp_min(1.0)
    a_tv = (q_text @ k_vis.transpose(-1, -2)) * scale                     # (H, T, V)
    return (w[None, :, None] * a_tv).sum(1).mean(0)                       # (V,)


def minmax(u: torch.Tensor) -> torch.Tensor:
    lo = u.min(-1, keepdim=True).values
    hi = u.max(-1, keepdim=True).values
    return (u - lo) / (hi - lo + 1e-8)


def descriptor(rho: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B, V), (B, V) → (B, 12): ρ mean/std/min/max/q25/median, u mean/std/min/max, slog mean/max."""
    # the levels made on the device (a torch.tensor from a list would be a blocking host-to-device copy)
    q = torch.quantile(rho, torch.linspace(0.25, 0.5, 2, dtype=rho.dtype, device=rho.device), dim=-1)
    slog = torch.sign(u) * torch.log1p(u.abs())
    feats = [rho.mean(-1), rho.std(-1, unbiased=False), rho.min(-1).values, rho.max(-1).values, q[0], q[1],
             u.mean(-1), u.std(-1, unbiased=False), u.min(-1).values, u.max(-1).values,
             slog.mean(-1), slog.max(-1).values]
    return torch.stack(feats, -1)


class ThresholdMLP(nn.Module):
    """Descriptor (12) → sigmoid scalar. Key names match the official `atp.predictor.mlp.{0,2}`."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(12, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, desc: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(desc))

    def reset_its_init(self) -> None:
        """The official ITS init (xavier, final bias −5: start by keeping almost everything)."""
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.mlp[2].bias, -5.0)


class ITSModule(nn.Module):
    """The parameters that live on the ITS decoder layer (`model.layers.<s>.atp`)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.predictor = ThresholdMLP(max(1, hidden_size // 8))
        # Present in official checkpoints, unused by the computation; kept so they load unchanged.
        self.pos_proj = nn.Linear(1, hidden_size, bias=False)

    def threshold(self, rho: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) ρ, u → θ (B,) and the descriptor (B, 12)."""
        desc = descriptor(rho, u)
        w = self.predictor.mlp[0].weight
        theta = THETA_SCALE * self.predictor(desc.to(w.dtype)).float().squeeze(-1)
        return theta, desc


@dataclass
class ITSState:
    """Per-sample ITS quantities at the ITS layer (V visual tokens, the same V for every row)."""

    u: torch.Tensor            # (B, V) saliency
    rho: torch.Tensor          # (B, V) min-max of u
    theta: torch.Tensor        # (B,) the model's threshold (0 where a checkpoint has no threshold MLP)
    p: torch.Tensor            # (B, V) σ((ρ − θ)/0.2)
    keep: torch.Tensor         # (B, V) bool: the applied decision
    descriptor: torch.Tensor   # (B, 12)
    merge: list | None = None  # per row: (V,) kept token each dropped token merges into (visionzip), or None
    u_graph: torch.Tensor | None = None  # (B, V) u with its graph (training-only guidance), else None

    @property
    def kept_count(self) -> torch.Tensor:
        return self.keep.sum(-1)


@dataclass(frozen=True)
class Schedule:
    """How ITS is applied in training mode (ignored in eval mode, where ITS always drops).

    phase 1: computed, not applied (the threshold MLP gets no gradient); 2: soft — the visual tokens'
    outputs are scaled by p; 3: hard drop through the surrogate gradient (`sgp.surrogate_gather`).
    ``flip``: keep the complement of the decision (the flip regulariser). ``saliency_graph``: keep u
    differentiable (``ITSState.u_graph``) for the trainer's optional guidance losses.
    """

    phase: int = 3
    flip: bool = False
    saliency_graph: bool = False
