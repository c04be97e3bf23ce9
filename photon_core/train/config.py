"""The trainer's settings: one dataclass, every field a command-line flag
(`python -m photon_core.train --help`).

The official recipe is the default; the rest are the demo model's training-only switches (guidance,
token supervision, curriculum, counterfactual twins), each off by default.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class TrainConfig:
    out: str = "runs/demo"                 # output folder (checkpoints, final model)
    preset: str = "demo"                   # model size: demo | tiny
    steps: int = 3000                      # optimiser steps
    scans_per_step: int = 2                # scans encoded per step (per process)
    questions_per_scan: int = 2            # questions asked on each scan
    lr: float = 1e-3
    its_lr: float = 3e-3                   # threshold MLP learning rate
    weight_decay: float = 0.01
    warmup: int = 100
    phase2_start: float = 0.45             # fraction of steps: soft scaling from here
    phase3_start: float = 0.65             # hard drop with SGP from here
    flip_start: float = 0.85               # complement-mask loss allowed from here
    flip_prob: float = 0.05
    robust_prob: float = 0.15
    band: tuple = (0.15, 0.45)             # retention band for the mean keep probability
    pool: int = 6                          # deformed bodies per background
    seed: int = 0
    device: str = "auto"
    grad_checkpointing: bool = False
    save_every: int = 250
    log_every: int = 10
    resume: bool = False
    guide: float = 0.0                     # training-only saliency guidance weight (0 = off; demo: 0.1)
    guide_floor: float = 0.0               # weight of every other block in the guidance target, so the
                                           # pull toward the asked organ stays bounded (ρ not too peaky)
    guide_halo: float = 0.0                # > 0: blocks near the asked organ weigh more in the guidance
                                           # target (0.5·exp(−distance / halo), distance in blocks), so what
                                           # is kept beyond the organ depends on the question too
    keep_guide: float = 0.0                # training-only weight of a BCE pulling the keep probabilities
                                           # σ((ρ − θ)/T) of each question toward its keep target (0 = off)
    keep_guide_frac: float = 0.15          # that target: the asked organ's blocks and the blocks nearest
                                           # them, this share of the visual tokens in all
    contrast_guide: float = 0.0            # training-only weight of a pairwise contrast of two questions on
                                           # one scan: where one's keep target holds and the other's not,
                                           # its ρ should be the higher (what they share cancels; 0 = off)
    aux: float = 0.0                       # training-only token supervision weight (0 = off; demo: 0.5)
    downsample: float = 1.0                # curriculum: shrink the model-space volume by this factor
                                           # (2.5 → 56×112×112, 64 visual tokens); 1 = the real geometry
    init_from: str = ""                    # start from this model folder's weights (fresh optimiser)
    enlargement: float = 0.0               # share of scans with an enlarged organ (+ its questions; 0 = off)
    temporal: float = 0.0                  # share of steps on temporal pairs (prior + current in each
                                           # prompt, longitudinal questions; 0 = off)
    counterfactual: float = 0.0            # share of steps on counterfactual pairs: a scan with findings and
                                           # the same scan without, asked the same yes/no questions (0 = off)
    vision_only: bool = False              # detection pre-stage: only the vision tower, trained on the token
                                           # supervision (aux) plus a max-pooled "any finding" per scan
    freeze_vision: bool = False            # keep the vision tower (and merger) fixed: the LLM learns to
                                           # read it
    slabs: int = 0                         # --vision-only on this many random 14-slice depth slabs of each
                                           # scan (the tower attends within a slab, so a slab alone gives
                                           # exactly its tokens of the whole scan, at a fraction of the cost);
                                           # 0 = whole scans
    aux_standardise: bool = False          # the aux head reads tokens as deviations from their scan's
                                           # mean token
    aux_findings: float = 1.0              # weight of the finding terms in the token supervision (0 = organ
                                           # shares only: a stage for organ extent)
    fold_scans: int = 0                    # before training: fold a standardisation of the visual tokens,
                                           # measured on this many scans (a stream of its own), into the
                                           # merger's last Linear (`fold_standardise`; 0 = off)
    patch_embed_lr: float = 1.0            # learning-rate multiplier of the patch embedding (the model card's
                                           # organ-extent runs of the vision tower used 10)
    null_volumes: float = 0.0              # share of scans replaced by a volume that shows no body (noise,
                                           # air, smooth noise), its finding questions answered "nothing seen"
    null_keep: float = 1.0                 # weight of `losses.null_keep_loss` on those rows (keep nothing)


def add_arguments(ap, cls) -> None:
    """One command-line flag per field of the dataclass ``cls`` (``--a-b`` for ``a_b``; bools are switches,
    tuples take two numbers), its help the field's comment in the source (one place says what it does)."""
    helps = field_comments(cls)
    for f in fields(cls):
        flag = f"--{f.name.replace('_', '-')}"
        said = helps.get(f.name, "").replace("%", "%%")          # argparse formats help with %
        text = f"{said} (default: %(default)s)".strip()
        if f.type in ("bool", bool):
            ap.add_argument(flag, action="store_true", default=f.default, help=said or None)
        elif f.type in ("tuple", tuple):
            ap.add_argument(flag, type=float, nargs=2, default=f.default, help=text)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            ap.add_argument(flag, type=typ, default=f.default, help=text)


def field_comments(cls) -> dict[str, str]:
    """Each field's trailing comment in ``cls``'s source, with the comment lines that continue it."""
    import inspect
    import re

    out, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        field_line = re.match(r"\s+(\w+): [^=#]+(?:=[^#]*)?(?:#\s?(.*))?$", line)
        if field_line and not line.lstrip().startswith("#"):
            name = field_line.group(1)
            out[name] = (field_line.group(2) or "").strip()
        elif name and (more := re.match(r"\s+#\s?(.*)$", line)) and out.get(name):
            out[name] += " " + more.group(1).strip()
        else:
            name = None
    return {k: v for k, v in out.items() if v}


def from_arguments(cls, args):
    """The dataclass ``cls`` from parsed arguments (`add_arguments`)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
