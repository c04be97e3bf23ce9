"""Where does a from-scratch Photon fail to see a local finding? A small experiment that measures and prints.

Task: a 64-token volume (56×112×112, 0.4 ± 0.03) that holds, half of the time, one bright ball
(+0.5, radius 10 voxels, anywhere); question "Is there a lesion in the liver?", answer yes/no.
Four trainings from the same random init (tiny preset, AdamW lr 1e-3, batch 8), each scored on 64
held-out volumes:

  joint      the whole model through the answer loss, as the trainer does (phase 1, no drop);
  max-head   the vision tower alone with a linear score per visual token, max-pooled;
  mean-head  the same score mean-pooled (what an unselective read-out of the tokens sees);
  llm-after  the LLM through the answer loss on top of the max-head-trained vision tower (frozen).

    python research/ball_probe.py [--steps 600] [--preset tiny] [--radius 10 --contrast 0.5]
    python research/ball_probe.py --preset demo --radius 4 --contrast 0.1 --vision-width 256 --runs max-head
    python research/ball_probe.py --preset demo --radius 8 --contrast 0.1 --standardise \\
        --runs max-head llm-after
    python research/ball_probe.py --preset demo --radius 8 --contrast 0.1 --standardise --fold \\
        --runs max-head llm-after

``--fold`` folds a standardisation of the max-head-trained tower's tokens into its merger before
llm-after (`fold_standardise`); ``--spread`` adds a variance floor on the raw tokens (VICReg) to the
max-head's training.
"""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from photon_core.inference.prompt import batch_prompts
from photon_core.io.preprocess import patchify
from photon_core.model.its import Schedule
from photon_core.model.photon import PhotonModel
from photon_core.train.aux_head import fold_standardise, standardise_tokens
from photon_core.train.losses import lm_loss
from photon_core.train.tokenizer import build_tokenizer, model_config

SHAPE = (56, 112, 112)          # 4 × 4 × 4 = 64 visual tokens
QUESTION = "Is there a lesion in the liver?"
RUNS = ["joint", "mean-head", "max-head", "llm-after"]


class Balls:
    def __init__(self, seed: int, radius: float = 10.0, contrast: float = 0.5):
        self.rng, self.radius, self.contrast = random.Random(seed), radius, contrast
        self.grid = torch.meshgrid(*[torch.arange(n).float() for n in SHAPE], indexing="ij")

    def batch(self, n: int = 8):
        xs, ys = [], []
        for _ in range(n):
            x = 0.4 + 0.03 * torch.randn(SHAPE)
            yes = self.rng.random() < 0.5
            if yes:
                r = self.radius
                c = [self.rng.uniform(h, s - h) for s, h in zip(SHAPE, (r / 2, r, r))]
                z, y, w = self.grid
                x[((z - c[0]) * 2) ** 2 + (y - c[1]) ** 2 + (w - c[2]) ** 2 < r ** 2] += self.contrast
            xs.append(x.clamp(0, 1))
            ys.append(yes)
        scans = [patchify(x[:, None]) for x in xs]
        return torch.cat([p for p, _ in scans]), torch.cat([g for _, g in scans]), ys


PHASE1 = Schedule(phase=1)          # no drop: the answer loss alone


def new_model(preset: str, tok, seed: int = 0, width: int = 0) -> PhotonModel:
    """A fresh model of ``preset``; ``width`` > 0 widens its vision tower (MLP twice the width)."""
    torch.manual_seed(seed)
    vision = dict(hidden_size=width, intermediate_size=2 * width) if width else None
    m = PhotonModel(model_config(preset, tok.vocab_size, tok, vision=vision))
    m.init_weights(0.02)
    return m.train()


def answer_loss(m, tok, pv, grid, ys, frozen_vision: bool):
    rows, labels = [], []
    for y in ys:
        ids, a0 = tok.prompt(QUESTION, 64, "yes" if y else "no")
        rows.append(ids)
        labels.append([-100] * a0 + ids[a0:])
    ids, mask, lab = batch_prompts(rows, m.config.pad_token_id, labels)
    if frozen_vision:
        with torch.no_grad():
            feats = m.encode_volume(pv, grid)
        out = m(ids, mask, features=feats, grid_thw=grid, schedule=PHASE1)
    else:
        out = m(ids, mask, pixel_values=pv, grid_thw=grid, row_scan=list(range(len(ys))), schedule=PHASE1)
    return lm_loss(out.logits, out.gather(lab))


@torch.no_grad()
def answer_accuracy(m, tok, data: Balls) -> float:
    m.eval()
    yes, no = tok.encode("yes")[0], tok.encode("no")[0]
    right = 0
    for _ in range(8):
        pv, grid, ys = data.batch()
        ids, mask, _ = batch_prompts([tok.prompt(QUESTION, 64)[0]] * len(ys), m.config.pad_token_id)
        lg = m(ids, mask, features=m.encode_volume(pv, grid), grid_thw=grid, budget="full").logits[:, -1]
        right += sum(bool(a > b) == y for a, b, y in zip(lg[:, yes], lg[:, no], ys))
    m.train()
    return right / 64


def head_run(head, f, pool, standardise: bool = False):
    """Each volume's pooled token score from its tokens ``f`` (volumes, 64, D); ``standardise`` reads
    them as deviations from the volume's mean token, in units of their spread (a LayerNorm over tokens)."""
    if standardise:
        f = standardise_tokens(f)
    s = head(f)[..., 0]
    return s.amax(1) if pool == "max" else s.mean(1)


def spread_loss(f: torch.Tensor, floor: float = 1.0) -> torch.Tensor:
    """(volumes, tokens, D) → VICReg's variance term on raw tokens: mean over volumes and channels
    of relu(floor − std over the volume's tokens), so no channel is the same for every token."""
    return F.relu(floor - f.std(1)).mean()


def train_head(m, pool: str, steps: int, data: Balls, standardise: bool = False,
               spread: float = 0.0) -> float:
    head = torch.nn.Linear(m.config.hidden_size, 1)
    opt = torch.optim.AdamW(list(m.visual.parameters()) + list(head.parameters()), lr=1e-3)
    for _ in range(steps):
        pv, grid, ys = data.batch()
        f = m.visual(pv, grid).reshape(len(ys), 64, -1)
        loss = F.binary_cross_entropy_with_logits(head_run(head, f, pool, standardise),
                                                  torch.tensor(ys).float())
        if spread:
            loss = loss + spread * spread_loss(f)
        opt.zero_grad()
        loss.backward()
        opt.step()
    right = 0
    with torch.no_grad():
        for _ in range(8):
            pv, grid, ys = data.batch()
            score = head_run(head, m.visual(pv, grid).reshape(len(ys), 64, -1), pool, standardise)
            right += sum(bool(s > 0) == y for s, y in zip(score, ys))
    return right / 64


def train_answers(m, tok, steps: int, data: Balls, frozen_vision: bool) -> float:
    params = [p for n, p in m.named_parameters() if not (frozen_vision and n.startswith("visual."))]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(steps):
        pv, grid, ys = data.batch()
        loss = answer_loss(m, tok, pv, grid, ys, frozen_vision)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return answer_accuracy(m, tok, Balls(99, data.radius, data.contrast))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="answer-loss steps (the heads get half)")
    ap.add_argument("--preset", default="tiny", choices=("tiny", "demo"))
    ap.add_argument("--radius", type=float, default=10.0, help="ball radius (voxels in-plane; half in depth)")
    ap.add_argument("--contrast", type=float, default=0.5, help="ball brightness above the 0.4 background")
    ap.add_argument("--vision-width", type=int, default=0, help="vision tower width (0 = the preset's)")
    ap.add_argument("--standardise", action="store_true",
                    help="the heads read each token as its deviation from the volume's mean token (÷ spread)")
    ap.add_argument("--spread", type=float, default=0.0,
                    help="weight of a variance floor on the raw tokens while the max-head trains (VICReg)")
    ap.add_argument("--fold", action="store_true",
                    help="before llm-after, fold a standardisation of the tokens into the merger's "
                         "last Linear")
    ap.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS,
                    help="which trainings (default: all four)")
    args = ap.parse_args(argv)
    ball = dict(radius=args.radius, contrast=args.contrast)
    with tempfile.TemporaryDirectory() as folder:            # the tokenizer is read into memory
        tok = build_tokenizer(Path(folder), vocab_size=400)
    steps, runs = args.steps, set(args.runs)
    new = lambda: new_model(args.preset, tok, width=args.vision_width)  # noqa: E731
    if "joint" in runs:
        print(f"joint      held-out accuracy {train_answers(new(), tok, steps, Balls(1, **ball), False):.3f}")
    if "mean-head" in runs:
        acc = train_head(new(), "mean", steps // 2, Balls(2, **ball), args.standardise)
        print(f"mean-head  held-out accuracy {acc:.3f}")
    if runs & {"max-head", "llm-after"}:
        m = new()
        acc = train_head(m, "max", steps // 2, Balls(3, **ball), args.standardise, args.spread)
        print(f"max-head   held-out accuracy {acc:.3f}")
        if args.fold:
            with torch.no_grad():
                data = Balls(5, **ball)
                fold_standardise(m, torch.cat([m.visual(pv, grid)
                                               for pv, grid, _ in (data.batch() for _ in range(8))]))
        if "llm-after" in runs:
            print(f"llm-after  held-out accuracy {train_answers(m, tok, steps, Balls(4, **ball), True):.3f}")


if __name__ == "__main__":
    main()
