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
from typing import Literal

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
    q = torch.quantile(rho, torch.tensor([0.25, 0.5], dtype=rho.dtype, device=rho.device), dim=-1)
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


# --------------------------------------------------------------------------------------------
# Budgets: which tokens to keep at inference
# --------------------------------------------------------------------------------------------

BudgetMode = Literal["auto", "top_k", "ratio", "threshold", "full", "fastv", "visionzip", "random"]
MODES = ("auto", "top_k", "ratio", "threshold", "full", "fastv", "visionzip", "random")
COUNT_MODES = ("top_k", "fastv", "visionzip", "random")
# Modes that read the learned threshold θ: an S1 checkpoint (no ITS weights) cannot run them. Every
# other mode ranks by the ITS layer's saliency ρ (which needs only that layer's q/k) or by a baseline.
THRESHOLD_MODES = ("auto", "threshold")
S1_MESSAGE = ("{mode!r} needs a learned threshold θ, which only an S2 checkpoint has; this is an S1 checkpoint "
              "(no token-scheduling weights): use full, a token count (top_k), a percent, or a baseline")
VISIONZIP_DOMINANT = 54 / 64     # VisionZip's dominant : contextual split (54 + 10 tokens of 64)


@dataclass(frozen=True)
class Budget:
    """How the keep decision is made. Only the decision changes; saliency is always computed.

    auto: the model's own θ (what Photon does). top_k: the k most salient tokens. ratio: a fraction
    of the visual tokens (top by ρ). threshold: keep ρ > value (a user θ). full: keep everything.
    fastv / visionzip / random: pruning baselines at k tokens — FastV (attention of the last
    instruction token), VisionZip-style (text-agnostic: dominant tokens by attention received from
    the other visual tokens, plus contextual tokens that each merge the remaining tokens most similar
    to them), random.
    """

    mode: BudgetMode = "auto"
    value: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown budget mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.mode in COUNT_MODES and (self.value is None or self.value < 0):
            raise ValueError(f"budget mode {self.mode!r} needs a token count >= 0")
        if self.mode == "ratio" and (self.value is None or not 0 <= self.value <= 1):
            raise ValueError("budget mode 'ratio' needs a fraction in [0, 1]")
        if self.mode == "threshold" and (self.value is None or not 0 <= self.value <= 1):
            raise ValueError("budget mode 'threshold' needs θ in [0, 1]")

    @classmethod
    def parse(cls, text: str | "Budget" | None) -> "Budget":
        """'auto' | 'full' | 'top_k:300' | 'ratio:0.25' | '25%' | 'threshold:0.4' | 'fastv:300'."""
        if text is None:
            return cls()
        if isinstance(text, Budget):
            return text
        text = str(text).strip().lower()
        if text in ("auto", "full"):
            return cls(text)  # type: ignore[arg-type]
        if text.endswith("%"):
            return cls("ratio", float(text[:-1]) / 100)
        if ":" in text:
            mode, val = text.split(":", 1)
            return cls(mode, float(val))  # type: ignore[arg-type]
        if text.isdigit():
            return cls("top_k", float(text))
        raise ValueError(f"cannot read budget {text!r}; try auto, full, 300, 25%, top_k:300, ratio:0.25, "
                         f"threshold:0.4")

    def label(self) -> str:
        if self.mode in ("auto", "full"):
            return self.mode
        if self.mode == "ratio":
            return f"{100 * float(self.value):g}%"
        if self.mode == "threshold":
            return f"θ={float(self.value):g}"
        return f"{self.mode}:{int(self.value)}"


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    k = int(max(0, min(k, score.numel())))
    keep = torch.zeros_like(score, dtype=torch.bool)
    if k:
        order = torch.sort(score, descending=True, stable=True).indices
        keep[order[:k]] = True
    return keep


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
    keep = _top(dominance, n_dom)
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


def decide(budget: Budget, rho: torch.Tensor, theta: torch.Tensor,
           fastv_score: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask (V,) for one sample under ``budget`` (ρ (V,), θ scalar tensor).
    (``visionzip`` is planned by `visionzip_plan`, which also says how dropped tokens merge.)"""
    V = rho.numel()
    if budget.mode in THRESHOLD_MODES and bool(torch.isnan(theta).any()):
        raise ValueError(S1_MESSAGE.format(mode=budget.mode))
    if budget.mode == "auto":
        return torch.sigmoid((rho - theta) / TEMPERATURE) > 0.5
    if budget.mode == "full":
        return torch.ones(V, dtype=torch.bool, device=rho.device)
    if budget.mode == "threshold":
        return torch.sigmoid((rho - float(budget.value)) / TEMPERATURE) > 0.5
    if budget.mode == "top_k":
        return _top(rho, int(budget.value))
    if budget.mode == "ratio":
        return _top(rho, int(round(float(budget.value) * V)))
    if budget.mode == "fastv":
        if fastv_score is None:
            raise ValueError("fastv budget needs the last instruction token's attention")
        return _top(fastv_score, int(budget.value))
    if budget.mode == "random":
        g = torch.Generator().manual_seed(int(budget.seed))
        return _top(torch.rand(V, generator=g).to(rho.device), int(budget.value))
    raise AssertionError(budget.mode)
