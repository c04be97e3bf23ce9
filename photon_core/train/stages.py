"""The GPU runner's stages (`photon_core.train.gpu`): what each one trains, one step at a time.

* `vision_stage` — the vision tower alone on token supervision through the standardised read-out
  (`AuxHead`), counterfactual twins as negatives; each generated batch reused while the next is made.
* `fold` — the standardisation of the visual tokens folded into the merger (`fold_standardise`).
* `answer_stage` — the LLM and ITS (and, ``joint``, the tower) on the answers: `ask_rows` builds each
  step's questions, `KeepTargets` their keep targets; the losses are the CPU trainer's (`step_losses`).

Each stage runs by wall clock until ``until`` (at least one step), its learning rate warmed up by
steps and annealed by the stage's time (`lr_scale`), its progress printed by `Progress`.
"""
from __future__ import annotations

import json
import math
import random
import time
from typing import TYPE_CHECKING

import torch

from photon_core.inference.prompt import Tokenizer, batch_prompts
from photon_core.model.its import Schedule
from photon_core.model.photon import PhotonModel
from photon_core.train.aux_head import fold_standardise
from photon_core.train.config import TrainConfig
from photon_core.train.loop import (
    Trainee,
    counterfactual_questions,
    pick_questions,
    question_row,
    step_losses,
)
from photon_core.train.synthetic.generator import NULL_KINDS
from photon_core.train.synthetic.gpu import GpuStream, Scan, pixels
from photon_core.train.targets import asked_organs, keep_target

if TYPE_CHECKING:
    from photon_core.train.gpu import GpuConfig



def lr_scale(step: int, frac: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, cosine over the stage's time (``frac`` of it gone), ≥ 0.05."""
    return max(0.05, min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


class Progress:
    """Running means of a stage's loss terms and figures, printed every ``every`` seconds."""

    def __init__(self, name: str, every: float):
        self.name, self.every, self.last, self.trace = name, every, time.monotonic(), []
        self.sums: dict = {}

    def add(self, **values) -> None:
        for k, v in values.items():
            s, n = self.sums.get(k, (0.0, 0))
            self.sums[k] = (s + float(v), n + 1)

    def maybe_print(self, step: int, extra: dict, force: bool = False) -> None:
        if not self.sums or not (force or time.monotonic() - self.last >= self.every):
            return
        means = {k: round(s / n, 4) for k, (s, n) in self.sums.items()}
        line = dict(stage=self.name, step=step, **means, **extra)
        print(json.dumps(line), flush=True)
        self.trace.append(line)
        self.sums, self.last = {}, time.monotonic()


def vision_stage(model, aux, stream: GpuStream, cfg: GpuConfig, until: float, log: Progress, dtype,
                 on_save) -> dict:
    """The tower alone on token supervision through the standardised read-out, twins as negatives."""
    model.requires_grad_(False)
    model.visual.requires_grad_(True)
    embed = list(model.visual.vision_patch_embed.parameters())
    rest = [p for p in model.visual.parameters() if all(p is not e for e in embed)]
    readout = list(aux.parameters())
    groups = [(rest, cfg.vision_lr), (embed, cfg.vision_lr * cfg.patch_embed_lr), (readout, cfg.vision_lr)]
    opt = torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in groups], weight_decay=0.01)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    trainee, trained = Trainee(model, aux), rest + embed + readout
    start, step, reuse, scans_seen = time.monotonic(), 0, 1, 0
    counts = tuple(int(c) for c in cfg.vision_findings.split(","))
    while step == 0 or time.monotonic() < until:        # (at least one step: a stage that ran says so)
        t0 = time.monotonic()
        scans = stream.batch(cfg.vision_scans, cfg.vision_counterfactual, cfg.vision_null, counts)
        t_gen = time.monotonic() - t0
        pv, grid = pixels(scans)
        targets = [s.targets for s in scans]
        t1 = time.monotonic()
        done = 0
        for _ in range(reuse):
            frac = (time.monotonic() - start) / max(1e-6, until - start)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_scale(step, frac, cfg.vision_warmup)
            with torch.autocast(pv.device.type, dtype=dtype, enabled=dtype is not None):
                _, head = trainee(pixel_values=pv, grid_thw=grid, token_targets=targets, vision_only=True)
            loss = head["aux"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            step, done = step + 1, done + 1
            log.add(aux=loss.item(), **{k: float(v) for k, v in aux.parts.items()})
            if time.monotonic() >= until:
                break
        t_step = (time.monotonic() - t1) / done
        reuse = max(1, min(cfg.max_reuse, round(t_gen / max(t_step, 1e-6))))
        scans_seen += len(scans)
        log.maybe_print(step, dict(scans=scans_seen, reuse=reuse, gen_s=round(t_gen, 3),
                                   step_s=round(t_step, 3), lr=round(opt.param_groups[0]["lr"], 6)))
        on_save(step)
    log.maybe_print(step, {}, force=True)
    return dict(steps=step, scans=scans_seen)


class KeepTargets:
    """`keep_target` of a question on a scan, kept for the pool's bodies: a question that names an organ
    asks the same blocks of every scan of one (mirrored) body, so it is computed once."""

    def __init__(self, frac: float, grid: tuple):
        self.frac, self.grid, self.cache = frac, grid, {}

    def __call__(self, question: str, scan: Scan) -> torch.Tensor:
        grown = any(f["kind"] == "enlargement" for f in scan.meta["findings"])
        if scan.organs is None or grown or not asked_organs(question):   # this scan's own organs or findings
            return keep_target(question, scan.targets, self.frac, self.grid)
        key = (question, tuple((o, id(m)) for o, m in scan.organs.items()))
        if key not in self.cache:
            self.cache[key] = keep_target(question, scan.targets, self.frac, self.grid)
        return self.cache[key]


def ask_rows(scans: list[Scan], tok: Tokenizer, n_visual: int, keep: KeepTargets, cfg: GpuConfig,
             rng: random.Random):
    """Training rows of an answer step: each scan's questions (balanced by family, then answer), the
    same questions on a scan and its twin, nothing-seen answers on null volumes; with each row's scan,
    keep target and whether its volume shows no body."""
    rows, labels, row_scan, keeps, nulls = [], [], [], [], []
    units, i = [], 0
    while i < len(scans):
        s = scans[i]
        if s.kind == "scan" and i + 1 < len(scans) and scans[i + 1].kind == "twin":
            asked = counterfactual_questions(s.qa, scans[i + 1].qa, cfg.questions, rng)
            if asked:
                units += [(i, [a for a, _ in asked]), (i + 1, [b for _, b in asked])]
            else:
                units += [(i, pick_questions(s.qa, cfg.questions, rng)),
                          (i + 1, pick_questions(scans[i + 1].qa, cfg.questions, rng))]
            i += 2
        else:
            units.append((i, pick_questions(s.qa, cfg.questions, rng)))
            i += 1
    for j, questions in units:
        null = scans[j].kind in NULL_KINDS
        for q in questions:
            ids, lab = question_row(tok, q, n_visual)
            rows.append(ids)
            labels.append(lab)
            row_scan.append(j)
            keeps.append(keep(q["question"], scans[j]))
            nulls.append(null)
    return rows, labels, row_scan, keeps, nulls


def answer_stage(model, aux, tok, stream: GpuStream, cfg: GpuConfig, until: float, log: Progress, dtype,
                 on_save, joint: bool, rng: random.Random) -> dict:
    """The LLM and ITS (and in ``joint`` the tower, its read-out still supervised) on the answers."""
    model.requires_grad_(True)
    model.visual.requires_grad_(joint)
    its = list(model.its_module.predictor.parameters())
    visual = list(model.visual.parameters())
    special = {id(p) for p in its + visual}
    llm = [p for p in model.parameters() if id(p) not in special]
    groups = [(llm, cfg.joint_llm_lr if joint else cfg.llm_lr), (its, cfg.its_lr)]
    if joint:
        groups += [(visual, cfg.joint_vision_lr), (list(aux.parameters()), cfg.joint_vision_lr)]
    opt = torch.optim.AdamW([{"params": ps, "lr": lr, "base_lr": lr} for ps, lr in groups], weight_decay=0.01)
    trained = [p for ps, _ in groups for p in ps]
    tcfg = TrainConfig(band=cfg.band, keep_guide=cfg.keep_guide, keep_guide_frac=cfg.keep_guide_frac,
                       contrast_guide=cfg.contrast_guide, null_keep=cfg.null_keep,
                       aux=cfg.joint_aux if joint else 0.0)
    trainee = Trainee(model, aux if joint else None)
    pad = model.config.pad_token_id
    keep = KeepTargets(cfg.keep_guide_frac, stream.grid)
    start, step, scans_seen, asked = time.monotonic(), 0, 0, 0
    while step == 0 or time.monotonic() < until:        # (at least one step: a stage that ran says so)
        frac = (time.monotonic() - start) / max(1e-6, until - start)
        phase = 1 if frac < cfg.phase2 else 2 if frac < cfg.phase3 else 3
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_scale(step, frac, cfg.warmup)
        scans = stream.batch(cfg.llm_scans, cfg.counterfactual, cfg.null_volumes)
        rows, labels, row_scan, keeps, nulls = ask_rows(scans, tok, stream.n_visual, keep, cfg, rng)
        ids, mask, labels = batch_prompts(rows, pad, labels)
        dev = stream.device
        pv, grid = pixels(scans)
        schedule = Schedule(phase=phase, saliency_graph=True)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out, head = trainee(input_ids=ids.to(dev), attention_mask=mask.to(dev), pixel_values=pv,
                                grid_thw=grid, row_scan=row_scan, schedule=schedule,
                                token_targets=[s.targets for s in scans] if joint else None)
            losses = step_losses(out, head, labels.to(dev), schedule, tcfg, False, None, torch.stack(keeps),
                                 row_scan, nulls)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step, scans_seen, asked = step + 1, scans_seen + len(scans), asked + len(rows)
        kept = out.its.keep.float().mean(-1).tolist() if out.its is not None else [1.0] * len(nulls)
        on_body = [k for k, n in zip(kept, nulls) if not n]
        on_null = [k for k, n in zip(kept, nulls) if n]
        log.add(loss=loss.item(), **{k: v.item() for k, v in losses.items()},
                **({"keep": sum(on_body) / len(on_body)} if on_body else {}),
                **({"keep_null": sum(on_null) / len(on_null)} if on_null else {}))
        log.maybe_print(step, dict(phase=phase, scans=scans_seen, questions=asked,
                                   lr=round(opt.param_groups[0]["lr"], 6)))
        on_save(step)
    log.maybe_print(step, {}, force=True)
    return dict(steps=step, scans=scans_seen, questions=asked)


@torch.no_grad()
def fold(model: PhotonModel, stream: GpuStream, n: int, dtype) -> None:
    """Fold the standardisation of the visual tokens, measured on ``n`` stream scans, into the merger."""
    model.eval()
    feats = []
    for s in stream.batch(n):
        with torch.autocast(s.frames.device.type, dtype=dtype, enabled=dtype is not None):
            feats.append(model.encode_volume(*pixels([s])).float())
    fold_standardise(model, torch.cat(feats))
    model.train()
