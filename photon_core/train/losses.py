"""Every training loss: the answer, Photon's regularisers, and the demo model's optional guidance.

The model's forward returns logits over the surviving positions and the ITS state (`Output`); the
trainer computes from them:

* `photon_loss` — what the official recipe trains: cross-entropy of the answer (labels gathered to the
  survivors), plus the retention band on the mean keep probability from phase 2 on; on a perturbed
  volume (robustness) −entropy of the answer instead of cross-entropy; with the flip regulariser
  (complement mask kept) −log(1 − p_y) and no band.
* Guidance (training-only, not part of official Photon training; the demo model's recipe, off by
  default): `guide_loss` (saliency toward target blocks), `keep_guide_loss` (keep probabilities toward a
  keep set), `contrast_loss` (two questions on one scan), `null_keep_loss` (nothing kept of a volume
  that shows no body).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from photon_core.model.its import TEMPERATURE, Schedule, minmax
from photon_core.model.photon import Output

OFFICIAL_BAND = (0.3, 0.8)      # the reference's retention band on the mean keep probability


def photon_loss(out: Output, labels: torch.Tensor, schedule: Schedule, band: tuple = OFFICIAL_BAND,
                robust: bool = False, band_rows: torch.Tensor | None = None) -> dict:
    """The official losses of one training forward: {"lm": …, "band": … (phase ≥ 2, not flip)}.

    ``labels`` (B, L) over the prompt positions (−100 where not scored); ``band_rows`` (B,) bool: the
    rows the retention band applies to (default all)."""
    labels = out.gather(labels)
    if robust:
        losses = {"lm": neg_entropy_loss(out.logits, labels)}
    elif schedule.flip:
        losses = {"lm": flip_loss(out.logits, labels)}
    else:
        losses = {"lm": lm_loss(out.logits, labels)}
    if out.its is not None and schedule.phase > 1 and not schedule.flip:
        p = out.its.p if band_rows is None else out.its.p[band_rows]
        if p.shape[0]:
            losses["band"] = band_loss(p, lo=band[0], hi=band[1])
    return losses


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next token, mean over the scored positions (shifted by one)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def band_loss(p: torch.Tensor, valid: torch.Tensor | None = None, lo: float = 0.3,
              hi: float = 0.8) -> torch.Tensor:
    """Retention band: r = mean keep probability; relu(r − hi) + relu(lo − r), mean over the batch."""
    if valid is None:
        r = p.mean(-1)
    else:
        r = (p * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    return (F.relu(r - hi) + F.relu(lo - r)).mean()


def neg_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Robustness: −entropy of the predicted distribution at the answer positions (shifted)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    m = labels != -100
    logp = F.log_softmax(logits[m].float(), -1)
    ent = -(logp.exp() * logp).sum(-1)
    return -ent.mean() if ent.numel() else logits.sum() * 0


def flip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Complement-mask loss: −log(1 − p_y) at the answer positions (the answer must not survive)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    m = labels != -100
    p_y = F.softmax(logits[m].float(), -1).gather(-1, labels[m][:, None]).squeeze(-1)
    return -torch.log1p(-p_y.clamp(max=1 - 1e-6)).mean() if p_y.numel() else logits.sum() * 0


# ----------------------------------------------------------------------------------------------
# Training-only guidance of ITS (the demo model's recipe; weights are the trainer's)
# ----------------------------------------------------------------------------------------------

def guide_loss(u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax(u) against a target distribution over visual tokens (training only);
    rows with an all-zero target are skipped."""
    t = target.to(u.device).float()
    rows = t.sum(-1) > 0
    if not bool(rows.any()):
        return u.new_zeros(())
    t = t[rows] / t[rows].sum(-1, keepdim=True)
    return -(t * u[rows].float().log_softmax(-1)).sum(-1).mean()


def keep_guide_loss(u: torch.Tensor, theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of the keep probabilities σ((minmax(u) − θ)/T), u with its graph, against a 0/1 keep target
    over visual tokens (training only): it moves the ranking of the tokens as well as θ. Class-balanced;
    rows with an all-zero target are skipped."""
    t = target.to(u.device).float()
    rows = t.sum(-1) > 0
    if not bool(rows.any()):
        return u.new_zeros(())
    logit = (minmax(u[rows].float()) - theta[rows, None].float()) / TEMPERATURE
    t = t[rows]
    bce = F.binary_cross_entropy_with_logits(logit, t, reduction="none")
    # balanced: the target tokens and the others weigh half each, else θ rising above all is cheapest
    pos = (bce * t).sum(-1) / t.sum(-1)
    neg = (bce * (1 - t)).sum(-1) / (1 - t).sum(-1).clamp_min(1)
    return 0.5 * (pos + neg).mean()


def contrast_loss(u: torch.Tensor, target: torch.Tensor, row_scan: list,
                   tau: float = 0.1) -> torch.Tensor:
    """Pairwise contrast of two questions on the same scan (training only): on the tokens the first
    question's keep target holds and the second's does not, the first's ρ = minmax(u) should be the
    higher (logistic, temperature ``tau``), and the other way round. What every question shares
    (the words they have in common, the tissue every target holds) cancels in the difference, so
    only what tells the questions apart learns. Rows with an all-zero target are skipped."""
    t = target.to(u.device).bool()
    rho = minmax(u.float())
    has = t.any(-1).tolist()                                   # one host sync for the whole batch
    groups: dict = {}
    for b, r in enumerate(row_scan):
        if has[b]:
            groups.setdefault(tuple(r) if isinstance(r, (list, tuple)) else (r,), []).append(b)
    total, count = u.new_zeros(()), u.new_zeros(())
    for rows in groups.values():
        if len(rows) < 2:
            continue
        g = torch.tensor(rows, device=u.device)
        tg, rg = t[g], rho[g]
        only = tg[:, None] & ~tg[None]                          # (i, j): tokens i's target holds, j's not
        loss = F.softplus(-(rg[:, None] - rg[None]) / tau)      # i's ρ should lead j's there
        n = only.sum(-1)                                       # every ordered pair = both directions
        total = total + ((loss * only).sum(-1) / n.clamp_min(1)).sum()
        count = count + (n > 0).sum()
    return total / count.clamp_min(1)   # mean over the pairs' terms


def null_keep_loss(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """On the rows whose volume shows no body (noise, air; training only): −log(1 − p) of every keep
    probability — nothing there is worth keeping, so ITS keeps only the token it must (ρ = 1). The
    gradient reaches θ (ρ is a measurement), so the threshold learns what a body's saliency looks like."""
    return -torch.log1p(-p[rows].float().clamp(max=1 - 1e-6)).mean()
