"""Three-phase Photon training: no drop → soft scaling → hard drop with SGP, plus regularisers.

    python -m photon_core.train --out runs/demo --steps 3000            # one process, CPU or GPU
    torchrun --nproc_per_node 2 -m photon_core.train --out runs/demo    # DDP (gloo on CPU, nccl on GPU)

It trains on the built-in synthetic CT data (real anatomy with inserted findings, the demo model's
data); it reads no dataset of yours. Checkpoints (safetensors model folder + optimiser state) go to
``--out`` every ``save_every`` steps; ``--resume`` continues from the newest complete one with the
settings it was trained with (the run's length and pace may change). Progress lines report loss, keep
rate and throughput. The final folder is a complete model folder (config, weights, tokenizer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from photon_core.inference.prompt import Tokenizer, batch_prompts
from photon_core.io.preprocess import TOKEN_VOXELS, patchify
from photon_core.model.checkpoint import load_model, save_model
from photon_core.model.its import Schedule
from photon_core.model.photon import Output, PhotonModel
from photon_core.organs import ORGANS
from photon_core.train.aux_head import AuxHead, fold_standardise, tower_features
from photon_core.train.config import TrainConfig, add_arguments, from_arguments
from photon_core.train.distributed import init_distributed
from photon_core.train.losses import contrast_loss, guide_loss, keep_guide_loss, null_keep_loss, photon_loss
from photon_core.train.synthetic.generator import NULL_KINDS, null_frames
from photon_core.train.synthetic.questions import nothing_seen
from photon_core.train.targets import guide_target, keep_target, null_targets, slab_targets, token_targets
from photon_core.train.tokenizer import build_tokenizer, model_config, write_tokenizer

# ----------------------------------------------------------------------------------------------

def phase_at(step: int, cfg: TrainConfig) -> int:
    f = step / max(1, cfg.steps)
    return 1 if f < cfg.phase2_start else 2 if f < cfg.phase3_start else 3


def perturb(frames: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Robustness input: shuffle patches, drop 20% patches, zero 10% voxels, add noise, or zeros."""
    kind = rng.choice(["shuffle", "drop", "voxels", "noise", "zeros"])
    x = frames.clone()
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "noise":
        return torch.rand_like(x)
    if kind == "voxels":
        return x * (torch.rand_like(x) > 0.1)
    a, b, c = (n // 14 for n in x.shape)
    p = x.reshape(a, 14, b, 14, c, 14).permute(0, 2, 4, 1, 3, 5).reshape(a * b * c, -1)
    if kind == "shuffle":
        p = p[torch.randperm(p.shape[0], device=p.device)]
    else:
        p = p * (torch.rand(p.shape[0], 1, device=p.device) > 0.2).to(p.dtype)
    return p.reshape(a, b, c, 14, 14, 14).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)


def pick_questions(qa: list[dict], k: int, rng: random.Random) -> list[dict]:
    """Balance families, then answers: choose a family, then an answer value, then a question with it
    (so 'no' existence questions, one per visible organ, do not drown the 'yes' ones)."""
    fams: dict[str, dict[str, list]] = {}
    for q in qa:
        fams.setdefault(q["family"], {}).setdefault(q["answer"], []).append(q)
    out = []
    for _ in range(k):
        by_answer = fams[rng.choice(sorted(fams))]
        out.append(rng.choice(by_answer[rng.choice(sorted(by_answer))]))
    return out


def counterfactual_questions(qa: list[dict], clean_qa: list[dict], k: int, rng: random.Random) -> list[tuple]:
    """``k`` (question on the scan with findings, same question on the clean scan) pairs: every other
    one, where there is one, a question whose answer the findings change."""
    clean = {q["question"]: q for q in clean_qa}
    both = [(q, clean[q["question"]]) for q in qa if q["question"] in clean]
    differ = [p for p in both if p[0]["answer"] != p[1]["answer"]]
    return [rng.choice(differ if differ and i % 2 == 0 else both) for i in range(k)] if both else []


def question_row(tok: Tokenizer, q: dict, n_visual: int, prior_visual: int = 0) -> tuple[list, list]:
    """One training row: the prompt with its answer, and labels that score only the answer."""
    ids, a0 = tok.prompt(q["question"], n_visual, q["answer"], prior_visual=prior_visual)
    return ids, [-100] * a0 + ids[a0:]


class Trainee(torch.nn.Module):
    """The model plus the training-only head, as one module for DDP: the forward returns the model's
    `Output` (or None in the vision-only pre-stage) and the head's loss terms."""

    def __init__(self, model: PhotonModel, aux: AuxHead | None):
        super().__init__()
        self.model, self.aux = model, aux

    def forward(self, *args, token_targets=None, vision_only=False, **kw) -> tuple[Output | None, dict]:
        if vision_only:   # detection pre-stage: the vision tower and the head, nothing else
            feats = self.model.encode_volume(kw["pixel_values"], kw["grid_thw"])
            return None, {"aux": self.aux.loss(feats, token_targets, detect=True)}
        out = self.model(*args, **kw)
        if self.aux is not None and token_targets is not None and out.scan_features is not None:
            return out, {"aux": self.aux.loss(out.scan_features, token_targets)}
        return out, {}


def step_losses(out: Output | None, head: dict, labels, schedule: Schedule, cfg: TrainConfig, robust: bool,
                guides: torch.Tensor | None, keeps: torch.Tensor | None, row_scan: list | None,
                null_rows: list | None = None) -> dict:
    """Every loss term of one step, weighted (their sum is the loss): the official ones (`photon_loss`),
    then the demo recipe's training-only terms where they are switched on. ``null_rows``: per row,
    whether its volume shows no body (no retention band there; `null_keep_loss` instead)."""
    if out is None:                                            # the vision-only pre-stage
        return head
    nulls = torch.tensor(null_rows, device=labels.device) if null_rows and any(null_rows) else None
    losses = photon_loss(out, labels, schedule, band=cfg.band, robust=robust,
                         band_rows=None if nulls is None else ~nulls)
    st = out.its
    if nulls is not None and st is not None and cfg.null_keep > 0 and schedule.phase > 1:
        losses["null_keep"] = cfg.null_keep * null_keep_loss(st.p, nulls)
    if st is not None and st.u_graph is not None:
        if guides is not None:
            losses["guide"] = cfg.guide * guide_loss(st.u_graph, guides)
        if keeps is not None and cfg.keep_guide > 0 and schedule.phase > 1:
            losses["keep_guide"] = cfg.keep_guide * keep_guide_loss(st.u_graph, st.theta, keeps)
        if keeps is not None and cfg.contrast_guide > 0 and row_scan is not None:
            losses["contrast"] = cfg.contrast_guide * contrast_loss(st.u_graph, keeps, row_scan)
    if "aux" in head:
        losses["aux"] = cfg.aux * head["aux"]
    return losses


def train(cfg: TrainConfig) -> Path:
    from photon_core.train.synthetic.generator import DemoGenerator

    rank, world = init_distributed()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                          else cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    out = Path(cfg.out)
    final = out / "model"
    torch.manual_seed(cfg.seed + rank)
    rng = random.Random(cfg.seed * 7919 + rank)
    ckpt = src = out / "last"           # saved to ``last``; resumed from ``src`` (see ``_resume_from``)
    if cfg.resume:
        src = _resume_from(out, cfg)
        model = load_model(src, "cpu", torch.float32)
        tok = Tokenizer(src)
        state = json.loads((src / "train_state.json").read_text())
        start = state["step"]
    else:
        if rank == 0 and cfg.init_from:
            final.mkdir(parents=True, exist_ok=True)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                (final / f).write_bytes((Path(cfg.init_from) / f).read_bytes())
        elif rank == 0:
            build_tokenizer(final)
        if world > 1:
            dist.barrier()
        tok = Tokenizer(final)
        torch.manual_seed(cfg.seed)
        if cfg.init_from:      # its weights and its configuration (e.g. rope_theta), not the preset's
            model = load_model(Path(cfg.init_from), "cpu", torch.float32)
        else:
            model = PhotonModel(model_config(cfg.preset, tok.vocab_size, tok))
            model.init_weights(0.02)
        start, state = 0, {}
    if cfg.fold_scans and not start:
        fold_standardise(model, tower_features(model, cfg))
    model.to(device).train()
    model.reset_buffers()
    if cfg.vision_only and cfg.aux <= 0:
        raise SystemExit("--vision-only trains on the token supervision: give --aux > 0")
    if cfg.slabs and not cfg.vision_only:
        raise SystemExit("--slabs trains the vision tower alone: give --vision-only")
    # --vision-only: the vision tower alone, LLM and ITS stay as they are; no questions are asked, so
    # no perturbed-input steps; a counterfactual step there trains on a scan with findings and its
    # clean twin (same slabs). (It wins over --freeze-vision.)
    if cfg.vision_only:
        cfg = replace(cfg, robust_prob=0.0)
        model.requires_grad_(False)
        model.visual.requires_grad_(True)
    elif cfg.freeze_vision:
        model.visual.requires_grad_(False)
    aux = (AuxHead(model.config.hidden_size, len(ORGANS), cfg.aux_findings, cfg.aux_standardise).to(device)
           if cfg.aux > 0 else None)
    if aux is not None and start and (src / AUX_FILE).is_file():
        aux.load_state_dict(load_file(str(src / AUX_FILE), device=str(device)))
    its_params = [p for p in model.its_module.predictor.parameters() if p.requires_grad]
    embed = [p for p in model.visual.vision_patch_embed.parameters() if p.requires_grad]
    special = {id(p) for p in its_params + embed}
    other = [p for p in model.parameters() if id(p) not in special and p.requires_grad]
    trained = other + its_params + embed
    groups = [(other, cfg.lr), (its_params, cfg.its_lr), (embed, cfg.lr * cfg.patch_embed_lr),
              (list(aux.parameters()) if aux is not None else [], cfg.lr)]
    opt = torch.optim.AdamW([{"params": ps, "lr": lr, "base_lr": lr} for ps, lr in groups],
                            weight_decay=cfg.weight_decay)
    if start and (src / "optimizer.safetensors").is_file():
        _load_optimizer(opt, src / "optimizer.safetensors")
    trainee = Trainee(model, aux)
    ddp = (torch.nn.parallel.DistributedDataParallel(trainee, find_unused_parameters=True) if world > 1
           else trainee)
    gen = DemoGenerator("train", seed=cfg.seed + 101 * rank + start, pool=cfg.pool, device=device,
                        downsample=cfg.downsample, enlargement=cfg.enlargement)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    t0, seen, log = time.time(), 0, []
    token_grid = tuple(n // v for n, v in zip(gen.shape, TOKEN_VOXELS))   # the stream's grid (curriculum)
    n_visual = token_grid[0] * token_grid[1] * token_grid[2]
    if cfg.slabs > token_grid[0]:
        raise SystemExit(f"--slabs {cfg.slabs}: the scans have {token_grid[0]} depth slabs")
    for step in range(start, cfg.steps):
        phase = phase_at(step, cfg)
        warm = min(1.0, (step + 1) / max(1, cfg.warmup))
        lr_scale = warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * max(lr_scale, 0.05)
        rows, labels_list, row_scan, scans, tgs, guides, keeps, null_rows = [], [], [], [], [], [], [], []
        robust = rng.random() < cfg.robust_prob
        flip = (phase == 3 and step >= cfg.flip_start * cfg.steps and rng.random() < cfg.flip_prob
                and not robust)
        temporal = cfg.temporal > 0 and rng.random() < cfg.temporal   # a whole step on pairs
                                                                      # (equal token counts)
        counterfactual = (cfg.counterfactual > 0 and not (temporal or robust)
                          and rng.random() < cfg.counterfactual)
        keep_targets = cfg.keep_guide > 0 or cfg.contrast_guide > 0
        supervise = cfg.aux > 0 or cfg.guide > 0 or keep_targets

        def units():
            """(scans of one prompt, their finding maps, organs, qa to pick from or the questions),
            made one at a time (the stream's random draws keep their order)."""
            for _ in range(max(1, cfg.scans_per_step // 2) if counterfactual else cfg.scans_per_step):
                if temporal:
                    prior, frames, qa, meta, organs = gen.pair()
                    yield [prior, frames], gen.last_truths, organs, qa, None
                elif counterfactual:   # one scan with findings and the same scan without: same questions
                    frames, qa, meta, organs = gen.sample(with_findings=1.0)
                    truth = gen.last_truth
                    clean, clean_qa = gen.counterfactual()
                    if cfg.vision_only:        # one unit, so the clean twin is cut at the same slabs: the
                        yield [frames, clean], [truth, None], organs, None, []   # hard negative of each
                                                                                 # finding token
                        continue
                    asked = counterfactual_questions(qa, clean_qa, cfg.questions_per_scan, rng)
                    if not asked:
                        yield [frames], [truth], organs, qa, None
                        continue
                    yield [frames], [truth], organs, None, [a for a, _ in asked]
                    yield [clean], [None], organs, None, [b for _, b in asked]
                elif cfg.null_volumes and rng.random() < cfg.null_volumes:   # no body: nothing seen
                    qa = nothing_seen(gen.sample()[1])
                    yield [null_frames(rng.choice(NULL_KINDS), gen.shape, device)], [None], {}, qa, None
                else:
                    frames, qa, meta, organs = gen.sample()
                    yield [frames], [gen.last_truth], organs, qa, None

        for times, truths, organs, qa, questions in units():
            null = not organs            # a volume that shows no body: zero targets (its rows are skipped)
            tg = None
            if supervise:
                tg = [null_targets(token_grid, device)] if null else [token_targets(organs, t, token_grid)
                                                                       for t in truths]
            if cfg.slabs:                  # the scans of one unit are cut at the same slabs
                chosen = rng.sample(range(token_grid[0]), cfg.slabs)
                if counterfactual and truths[0] is not None:       # a slab of the pair holds a finding
                    held = ((tg[0]["lesion"].reshape(token_grid[0], -1) > 0).any(-1)
                            .nonzero().flatten().tolist())
                    if held and not set(held) & set(chosen):
                        chosen[0] = rng.choice(held)
                picks = [(f, t, i) for f, t in zip(times, tg) for i in chosen]
                times = [f[i * TOKEN_VOXELS[0]:(i + 1) * TOKEN_VOXELS[0]] for f, _, i in picks]
                tg = [slab_targets(t, i, token_grid) for _, t, i in picks]
            if robust:
                times = [perturb(f, rng) for f in times]
            elif tg is not None:
                tgs += tg
            first = len(scans)
            scans += [patchify(f[:, None]) for f in times]
            if cfg.vision_only:
                continue
            for q in questions if questions is not None else pick_questions(qa, cfg.questions_per_scan, rng):
                if tg is not None and not robust and cfg.guide > 0:
                    guides.append(torch.cat([guide_target(q["question"], t, cfg.guide_floor, cfg.guide_halo,
                                                          token_grid)
                                            for t in tg]))
                if tg is not None and not robust and keep_targets:
                    keeps.append(torch.cat([keep_target(q["question"], t, cfg.keep_guide_frac, token_grid)
                                           for t in tg]))
                ids, labels_row = question_row(tok, q, n_visual, prior_visual=n_visual if temporal else 0)
                rows.append(ids)
                labels_list.append(labels_row)
                row_scan.append(list(range(first, len(scans))))
                null_rows.append(null)
        pv = torch.cat([p for p, _ in scans]).to(device)
        grid = torch.cat([g for _, g in scans]).to(device)
        schedule = Schedule(phase=phase, flip=flip, saliency_graph=bool(guides or keeps))
        labels = None
        if cfg.vision_only:
            kw = dict(pixel_values=pv, grid_thw=grid, token_targets=tgs, vision_only=True)
        else:
            ids, mask, labels = batch_prompts(rows, model.config.pad_token_id, labels_list)
            labels = labels.to(device)
            kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pv,
                      grid_thw=grid, row_scan=row_scan, schedule=schedule,
                      token_targets=tgs if len(tgs) == len(scans) and aux is not None else None)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outp, head = ddp(**kw)
            losses = step_losses(outp, head, labels, schedule, cfg, robust,
                                 torch.stack(guides).to(device) if guides else None,
                                 torch.stack(keeps).to(device) if keeps else None, row_scan, null_rows)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            done = ckpt / "train_state.json"
            kept = (f"the checkpoint of step {json.loads(done.read_text())['step']} is kept in {ckpt}"
                    if done.is_file() else "no checkpoint was written")
            raise SystemExit(f"The loss is {loss.item()} at step {step} (too high a learning rate?); "
                             f"training stopped and {kept}.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        seen += len(rows) if rows else len(scans)     # questions, or scans in the pre-stage
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            st = outp.its if outp is not None else None
            keep = float(st.keep.float().mean()) if st is not None else 1.0
            soft = float(st.p.detach().mean()) if st is not None else 1.0
            rate = seen / (time.time() - t0)
            line = dict(step=step, phase=phase, loss=round(loss.item(), 4),
                        **{k: round(v.item(), 4) for k, v in losses.items()},
                        keep=round(keep, 3), p_mean=round(soft, 3), robust=robust, flip=flip,
                        temporal=temporal, counterfactual=counterfactual,
                        samples_per_s=round(rate, 2), lr=round(opt.param_groups[0]["lr"], 6))
            print(json.dumps(line), flush=True)
            log.append(line)
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step == cfg.steps - 1):
            _save(model, tok, opt, ckpt, step + 1, cfg, aux)
    if rank == 0:
        model.eval()
        save_model(model, final)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (final / f).write_bytes((ckpt / f).read_bytes()) if (ckpt / f).exists() else None
        with open(out / "train_log.jsonl", "a") as f:
            for line in log:
                f.write(json.dumps(line) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


AUX_FILE = "aux_head.safetensors"     # the training-only head, kept with a checkpoint for --resume


def _save(model, tok: Tokenizer, opt, folder: Path, step: int, cfg: TrainConfig, aux: AuxHead | None) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    save_model(model, tmp)
    if aux is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in aux.state_dict().items()},
                  str(tmp / AUX_FILE))
    write_tokenizer(tok.tok, tmp)
    tensors, layout = {}, []
    for gi, g in enumerate(opt.param_groups):
        for pi, p in enumerate(g["params"]):
            st = opt.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{gi}.{pi}.{k}"] = v.detach().cpu().contiguous()
            layout.append([gi, pi])
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "train_state.json").write_text(json.dumps({"step": step, "config": asdict(cfg),
                                                      "optimizer_layout": layout}))
    # the complete new folder takes the old one's place, which goes only then: an interrupt at any point
    # leaves a complete checkpoint (`_resume_from` takes the newest complete one of the three names)
    old = folder.with_name(folder.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


# what a resumed run may change (the length of the run, its pace, its log, the stream's seed; --init-from
# has done its work, and --vision-only saves robust_prob as 0); any other setting shapes the model, what
# trains or the optimiser's groups, and must stay as the checkpoint was trained
RESUME_MAY_CHANGE = {"out", "steps", "lr", "its_lr", "weight_decay", "warmup", "save_every", "log_every",
                     "resume", "device", "grad_checkpointing", "seed", "init_from", "robust_prob"}


def _resume_from(out: Path, cfg: TrainConfig) -> Path:
    """The newest complete checkpoint of ``out`` (a folder whose train_state.json, written last, is there:
    ``last``, or ``last.tmp`` / ``last.old`` left by an interrupted save), checked against ``cfg``."""
    found = []
    for name in ("last", "last.tmp", "last.old"):
        state = out / name / "train_state.json"
        if state.is_file() and (out / name / "config.json").is_file():
            try:
                found.append((json.loads(state.read_text()), out / name))
            except ValueError:
                continue
    if not found:
        raise SystemExit(f"--resume: {out} holds no checkpoint to resume (no last/ with its "
                         f"train_state.json); check --out, or start the run without --resume.")
    state, folder = max(found, key=lambda f: f[0].get("step", 0))
    saved = state.get("config", {})
    changed = [k for k, v in asdict(cfg).items()
               if k in saved and k not in RESUME_MAY_CHANGE and _plain(saved[k]) != _plain(v)]
    if changed:
        now = asdict(cfg)
        said = ", ".join(f"--{k.replace('_', '-')} {_plain(now[k])} (the checkpoint: {_plain(saved[k])})"
                         for k in changed[:4])
        raise SystemExit(f"--resume: {said}: a resumed run keeps the settings it was trained with; start "
                         f"a new run from its weights with --init-from {folder} (a fresh optimiser) instead.")
    return folder


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _load_optimizer(opt, path: Path) -> None:
    tensors = load_file(str(path))
    for gi, g in enumerate(opt.param_groups):
        for pi, p in enumerate(g["params"]):
            st = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items()
                  if k.startswith(f"{gi}.{pi}.")}
            if any(v.dim() and v.shape != p.shape for v in st.values()):
                raise SystemExit(f"{path}: optimiser state does not match the parameters (a checkpoint of "
                                 "another trainer version?); resume without it by --init-from its folder")
            if st:
                opt.state[p] = st


def check(cfg: TrainConfig) -> str | None:
    """What is wrong with the settings, in words, before anything is written or built; None if nothing."""
    out = Path(cfg.out)
    if not all(math.isfinite(x) and x >= 0 for x in (cfg.lr, cfg.its_lr)):
        return f"--lr {cfg.lr} / --its-lr {cfg.its_lr}: a learning rate is a finite number, 0 or more"
    if cfg.steps < 1 or cfg.warmup < 0 or cfg.save_every < 1 or cfg.log_every < 1:
        return "--steps, --save-every and --log-every count steps: 1 or more; --warmup: 0 or more"
    if cfg.preset not in ("demo", "tiny"):
        return f"--preset {cfg.preset!r}: demo or tiny"
    if not 0 <= cfg.phase2_start <= cfg.phase3_start <= 1:
        return (f"--phase2-start {cfg.phase2_start} and --phase3-start {cfg.phase3_start}: fractions of the "
                f"run with 0 ≤ phase 2 ≤ phase 3 ≤ 1")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        return f"--device {cfg.device!r}: auto, cpu, cuda or cuda:N"
    if cfg.vision_only and cfg.aux <= 0:
        return "--vision-only trains on the token supervision: give --aux > 0"
    if cfg.slabs and not cfg.vision_only:
        return "--slabs trains the vision tower alone: give --vision-only"
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; name a folder for the run"
    if not cfg.resume and any((out / n).exists() for n in ("model", "last")):
        return (f"--out {out} holds a run already (model/, last/): give --resume to continue it, or another "
                f"--out (its weights would be overwritten)")
    if cfg.init_from and not (Path(cfg.init_from) / "config.json").is_file():
        return f"--init-from {cfg.init_from}: not a model folder (no config.json there)"
    if cfg.init_from and not (Path(cfg.init_from) / "tokenizer.json").is_file():
        return f"--init-from {cfg.init_from}: no tokenizer.json there (a run's model/ folder has one)"
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="photon-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, TrainConfig)
    cfg = from_arguments(TrainConfig, ap.parse_args(argv))
    if why := check(cfg):
        ap.error(why)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", 1))))
    print(train(cfg))


if __name__ == "__main__":
    main()
