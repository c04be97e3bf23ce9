"""Keep budgets: which visual tokens survive at the ITS layer, at inference.

Only the decision changes; ITS's saliency is always computed. ``auto`` is what Photon does (the
model's own θ); the manual modes override the decision (top-k or a share by ρ, a user θ, all);
``fastv`` / ``visionzip`` / ``random`` are pruning baselines at k tokens (`baselines.py`), computed
only for the rows that ask for them.

A manual budget never keeps fewer than `MIN_KEEP_TOKENS` visual tokens (`Budget` refuses counts and
shares below it; a user θ that would leave fewer keeps the most salient `MIN_KEEP_TOKENS`, see
`decide`). ``auto`` is Photon's own decision and is not floored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from photon_core.model.its import TEMPERATURE

BudgetMode = Literal["auto", "top_k", "ratio", "threshold", "full", "fastv", "visionzip", "random"]
MODES = ("auto", "top_k", "ratio", "threshold", "full", "fastv", "visionzip", "random")
COUNT_MODES = ("top_k", "fastv", "visionzip", "random")
BASELINE_MODES = ("fastv", "visionzip", "random")
SCAN_TOKENS = 1000            # visual tokens of one scan on the official geometry (10 × 10 × 10 blocks)
MIN_KEEP_TOKENS = 20
"""The fewest visual tokens a manual budget may keep: 20 tokens, 2 % of one scan's 1,000.

Each token is a block of about 36 mm a side (≈ 48 ml), so 20 tokens cover about a litre of the body:
less than one liver, and less than half of what Photon's own threshold kept on any of the demo test
split's 296 questions (at least 43, reports/demo_test). Below this an answer is formed from almost none
of the scan and reflects the question's wording more than the image, which the UI would still present
as an answer about the scan; 0 tokens (the budget '0') answers from the text alone. The floor is a
share of the official 1,000-token scan (`MIN_KEEP_RATIO`) for the ratio mode, whose token count is
only known at the ITS layer.
"""
MIN_KEEP_RATIO = MIN_KEEP_TOKENS / SCAN_TOKENS
MAX_COUNT = 1000 * SCAN_TOKENS  # a count budget above this is a typo, not a budget
# Modes that read the learned threshold θ: an S1 checkpoint (no ITS weights) cannot run them. Every
# other mode ranks by the ITS layer's saliency ρ (which needs only that layer's q/k) or by a baseline.
THRESHOLD_MODES = ("auto", "threshold")
S1_MESSAGE = ("{mode!r} needs a learned threshold θ, which only an S2 checkpoint has; this is an S1 "
              "checkpoint (no token-scheduling weights): use full, a token count (top_k), a percent, or a "
              "baseline")


@dataclass(frozen=True)
class Budget:
    """How the keep decision is made. Only the decision changes; saliency is always computed.

    auto: the model's own θ (what Photon does). top_k: the k most salient tokens. ratio: a fraction
    of the visual tokens (top by ρ). threshold: keep ρ > value (a user θ), and at least the
    `MIN_KEEP_TOKENS` most salient. full: keep everything. Counts and ratios below the floor raise
    ValueError; a θ cannot be checked before ρ is known, so its floor is applied in `decide`.
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
        value = None if self.value is None else float(self.value)
        if self.mode in COUNT_MODES:
            if value is None or not math.isfinite(value) or value < 0:
                raise ValueError(f"budget mode {self.mode!r} needs a token count >= {MIN_KEEP_TOKENS}")
            if value < MIN_KEEP_TOKENS:
                raise ValueError(_below_floor(f"{value:g} visual tokens"))
            if value > MAX_COUNT:                      # (a count above a scan's tokens keeps them all)
                raise ValueError(f"A token count of {value:.3g} is more than any scan has; a scan has "
                                 f"{SCAN_TOKENS:,} visual tokens ({2 * SCAN_TOKENS:,} with a prior scan).")
        if self.mode in ("auto", "full") and value is not None:
            raise ValueError(f"The budget {self.mode!r} takes no number; {self.mode}:{value:g} reads as a "
                             f"mistake for a count (300), a percent (25%) or a threshold (threshold:0.4).")
        if self.mode == "ratio":
            if value is None or not 0 <= value <= 1:
                raise ValueError("budget mode 'ratio' needs a fraction in [0, 1]")
            if value < MIN_KEEP_RATIO:                 # 1.99%, not "2.0%", is below the floor of 2%
                raise ValueError(_below_floor(f"{100 * value:g}% of the visual tokens"))
        if self.mode == "threshold" and (value is None or not 0 <= value <= 1):
            raise ValueError("budget mode 'threshold' needs θ in [0, 1]")

    @classmethod
    def parse(cls, text: str | Budget | None) -> Budget:
        """'auto' | 'full' | 'top_k:300' | 'ratio:0.25' | '25%' | 'threshold:0.4' | 'fastv:300'."""
        if text is None:
            return cls()
        if isinstance(text, Budget):
            return text
        text = str(text).strip().lower()
        if text in ("auto", "full"):
            return cls(text)  # type: ignore[arg-type]
        if text.endswith("%"):
            percent = _number(text[:-1], text)
            if not 0 <= percent <= 100:
                raise ValueError(f"A percent budget lies between {100 * MIN_KEEP_RATIO:g}% and 100%; "
                                 f"{text!r} does not.")
            return cls("ratio", percent / 100)
        if text.startswith("θ="):                         # a label (``label``) read back
            return cls("threshold", _number(text[2:], text))
        if ":" in text:
            mode, val = text.split(":", 1)
            return cls(mode.strip(), _number(val, text))  # type: ignore[arg-type]
        if text.isdigit():
            return cls("top_k", float(text))
        raise ValueError(_unreadable(text))

    def label(self) -> str:
        if self.mode in ("auto", "full"):
            return self.mode
        if self.mode == "ratio":
            return f"{100 * float(self.value):g}%"
        if self.mode == "threshold":
            return f"θ={float(self.value):g}"
        return f"{self.mode}:{int(self.value)}"


def _unreadable(text: str) -> str:
    shown = text if len(text) <= 40 else text[:40] + "…"
    return f"cannot read budget {shown!r}; try auto, full, 300, 25%, top_k:300, ratio:0.25, threshold:0.4"


def _number(value: str, text: str) -> float:
    """The number of a budget's text, or the budget refused in words (not Python's float error)."""
    try:
        return float(value)
    except ValueError:
        raise ValueError(_unreadable(text)) from None


BASELINE_NAMES = {"fastv": "FastV", "visionzip": "VisionZip-style", "random": "random"}


def describe(budget: Budget | str) -> str:
    """A budget in words, as the app shows it: "Photon's own θ", "390 tokens", "25% of the tokens",
    "θ = 0.3 (yours)", "all tokens", "FastV, 390 tokens"."""
    b = Budget.parse(budget)
    if b.mode == "auto":
        return "Photon's own θ"
    if b.mode == "full":
        return "all tokens"
    if b.mode == "ratio":
        return f"{100 * float(b.value):g}% of the tokens"
    if b.mode == "threshold":
        return f"θ = {float(b.value):g} (yours)"
    count = f"{int(b.value)} tokens"
    return f"{BASELINE_NAMES[b.mode]}, {count}" if is_baseline(b) else count


def applied_cut(budget: Budget | str, rho, keep, theta: float) -> float | None:
    """Where the kept tokens were cut on the saliency ρ: the model's θ for ``auto``, the user's θ for
    ``threshold`` (the lowest kept ρ when the floor kept more), the lowest kept ρ for a count or share;
    None where nothing was cut by ρ (``full``, the baselines, an S1 checkpoint's ``auto``)."""
    import numpy as np

    b = Budget.parse(budget)
    if b.mode == "auto":
        return float(theta) if np.isfinite(theta) else None
    if b.mode == "full" or is_baseline(b):
        return None
    kept = np.asarray(rho, np.float64).ravel()[np.asarray(keep, bool).ravel()]
    if kept.size == 0:
        return None
    if b.mode == "threshold" and kept.min() > float(b.value):
        return float(b.value)
    return float(kept.min())


def floor_note(budget: Budget | str, cut: float | None) -> str:
    """Words for a user θ that the floor overrode (its ``applied_cut`` lies below it), else ''."""
    b = Budget.parse(budget)
    if b.mode == "threshold" and cut is not None and cut < float(b.value):
        return (f": fewer than {MIN_KEEP_TOKENS} tokens pass it, so the {MIN_KEEP_TOKENS} most salient were "
                f"kept")
    return ""


def _below_floor(what: str) -> str:
    return (f"A budget of {what} is below the floor of {MIN_KEEP_TOKENS} tokens ({MIN_KEEP_RATIO:.0%} of a "
            f"scan): an answer from so little of the scan would rest on the question alone. Keep at least "
            f"{MIN_KEEP_TOKENS} tokens or {MIN_KEEP_RATIO:.0%}.")


def is_baseline(budget: Budget) -> bool:
    """A pruning baseline (FastV, VisionZip-style, random), selected by `baselines.select`."""
    return budget.mode in BASELINE_MODES


def decide(budget: Budget, rho: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Keep mask (V,) for one sample under an ITS budget (ρ (V,), θ scalar tensor). θ must be a model's
    (an S2 checkpoint's): `PhotonModel.forward` refuses threshold budgets on S1 before it gets here."""
    V = rho.numel()
    if budget.mode == "auto":
        return torch.sigmoid((rho - theta) / TEMPERATURE) > 0.5
    if budget.mode == "full":
        return torch.ones(V, dtype=torch.bool, device=rho.device)
    if budget.mode == "threshold":      # a θ that leaves fewer than the floor keeps the floor's top tokens
        keep = torch.sigmoid((rho - float(budget.value)) / TEMPERATURE) > 0.5
        floor = top_k(rho, MIN_KEEP_TOKENS)
        return torch.where(keep.sum() < floor.sum(), floor, keep)
    if budget.mode == "top_k":
        return top_k(rho, int(budget.value))
    if budget.mode == "ratio":
        return top_k(rho, int(round(float(budget.value) * V)))
    raise ValueError(f"budget mode {budget.mode!r} is a baseline: select it with baselines.select")


def top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k highest scores (ties: the earlier token first)."""
    k = int(max(0, min(k, score.numel())))
    keep = torch.zeros_like(score, dtype=torch.bool)
    if k:
        order = torch.sort(score, descending=True, stable=True).indices
        keep[order[:k]] = True
    return keep
