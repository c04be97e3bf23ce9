"""Three-phase Photon training: no drop → soft scaling → hard drop with SGP, plus regularisers.

    python -m photon_core.train --out runs/demo --steps 3000            # one process, CPU or GPU
    torchrun --nproc_per_node 2 -m photon_core.train --out runs/demo    # DDP (gloo on CPU, nccl on GPU)

Checkpoints (safetensors model folder + optimiser state) go to ``--out`` every ``save_every``
steps; ``--resume`` continues from the last one. Progress lines report loss, keep rate and
throughput. The final folder is a complete model folder (config, weights, tokenizer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from photon_core.model.checkpoint import load_model, save_model
from photon_core.model.config import PhotonConfig, VisionConfig
from photon_core.train.distributed import init_distributed
from photon_core.model.photon import PhotonModel
from photon_core.io.preprocess import TOKEN_GRID, TOKEN_VOXELS, block_fractions, blocks, patchify
from photon_core.inference.prompt import SPECIAL_TOKENS, Tokenizer, batch_prompts


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
    guide_halo: float = 0.0                # > 0: blocks near the asked organ weigh more in the guidance target
                                           # (0.5·exp(−distance / halo), distance in blocks), so what is kept
                                           # beyond the organ depends on the question too
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
    freeze_vision: bool = False            # keep the vision tower (and merger) fixed: the LLM learns to read it
    slabs: int = 0                         # --vision-only on this many random 14-slice depth slabs of each scan
                                           # (the tower attends within a slab, so a slab alone gives exactly its
                                           # tokens of the whole scan, at a fraction of the cost); 0 = whole scans
    aux_standardise: bool = False          # the aux head reads tokens as deviations from their scan's mean token
    aux_findings: float = 1.0              # weight of the finding terms in the token supervision (0 = organ
                                           # shares only: a stage for organ extent)
    fold_scans: int = 0                    # before training: fold a standardisation of the visual tokens,
                                           # measured on this many scans (a stream of its own), into the
                                           # merger's last Linear (`fold_standardise`; 0 = off)
    patch_embed_lr: float = 1.0            # learning-rate multiplier of the patch embedding (the model card's
                                           # organ-extent runs of the vision tower used 10)


def model_config(preset: str, vocab_size: int, tok: Tokenizer, vision: dict | None = None) -> PhotonConfig:
    """The preset's sizes with ``tok``'s special tokens; ``vision`` overrides vision-tower fields."""
    ids = tok.ids
    common = dict(vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                  eos_token_id=ids["<|im_end|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], vision_token_id=ids["<|vision_pad|>"],
                  image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  max_position_embeddings=4096, model_name="Photon demo (synthetic findings)")
    return preset_config(preset, vision=vision, **common)


def preset_config(preset: str, vision: dict | None = None, **kw) -> PhotonConfig:
    """The tiny (tests) or demo model's sizes; ``vision`` and ``kw`` add to / override them."""
    if preset == "tiny":
        llm = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                   num_key_value_heads=1, mrope_section=[2, 3, 3])
        vis = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32,
                   fullatt_block_indexes=[1])
    else:
        llm = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
                   num_key_value_heads=2, mrope_section=[4, 6, 6])
        vis = dict(depth=4, hidden_size=96, num_heads=4, intermediate_size=192, out_hidden_size=128,
                   fullatt_block_indexes=[1, 3])
    return PhotonConfig(**{**llm, **kw}, vision=VisionConfig(**{**vis, **(vision or {})}))


def build_tokenizer(folder: Path, vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE (Qwen-style) trained on the question templates, with ChatML/vision specials."""
    from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers

    from photon_core.train.synthetic.generator import all_template_text

    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = all_template_text() + ["system", "user", "assistant", "You are a helpful assistant.", "\n"]
    tok.train_from_iterator(corpus * 4, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "model_max_length": 4096}, indent=1))
    return Tokenizer(folder)


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


# ----------------------------------------------------------------------------------------------
# Training-only supervision (not part of official Photon training; nothing of it is saved).
#
# A from-scratch demo model on a CPU budget sees a few thousand questions: one answer token each
# is too little signal to teach a vision tower what organs and lesions look like. The generator
# knows the exact organ and finding maps, so two extra signals are used while training:
#  * token supervision: a linear head on the visual tokens predicts, per token block, the share
#    of each organ and of findings in it, and the finding diameter (the head is discarded);
#  * saliency guidance: the ITS saliency u of a question is pulled (cross-entropy of softmax u)
#    toward the blocks of the organs the question names (or the findings, if it names none),
#    so that what ITS keeps depends on the instruction from the start.
# ----------------------------------------------------------------------------------------------

def token_targets(organs: dict, truth: torch.Tensor | None, grid: tuple = TOKEN_GRID) -> dict:
    """Per-token targets of one scan: organ shares (V, n_organs), finding share, diameter (mm)."""
    from photon_core.train.synthetic.generator import ORGANS
    fr = {o: block_fractions(organs[o], grid) if o in organs else None for o in ORGANS}
    n = grid[0] * grid[1] * grid[2]
    dev = truth.device if truth is not None else next((m.device for m in organs.values()), torch.device("cpu"))
    organ = torch.stack([fr[o] if fr[o] is not None else torch.zeros(n, device=dev) for o in ORGANS], -1)
    organ_known = torch.tensor([fr[o] is not None for o in ORGANS], device=dev)
    if truth is None:
        lesion = torch.zeros(n, device=dev)
        diam = torch.zeros(n, device=dev)
    else:
        lesion = block_fractions(truth > 0, grid)
        diam = blocks(truth, grid).amax((1, 3, 5)).flatten()
    return dict(organ=organ, organ_known=organ_known, lesion=lesion, diameter=diam)


def slab_targets(targets: dict, i: int, grid: tuple = TOKEN_GRID) -> dict:
    """The targets of depth slab ``i`` of a scan's token grid (tokens run depth-major)."""
    per = grid[1] * grid[2]
    return {k: v if k == "organ_known" else v[i * per:(i + 1) * per] for k, v in targets.items()}


def guide_target(question: str, targets: dict, floor: float = 0.0, halo: float = 0.0,
                 grid: tuple = TOKEN_GRID) -> torch.Tensor:
    """Weights over token blocks a question should look at (1 on the target blocks, ``floor``
    elsewhere; zeros = no guidance). ``halo`` > 0 adds 0.5·exp(−d / halo) to the other blocks, d the
    block distance (Chebyshev, on ``grid``) to the nearest target block: the tokens kept beyond the
    asked organ lie around it rather than wherever every question keeps them."""
    t = _guide_blocks(question, targets)
    other = (t == 0).float() * (t > 0).any().float()
    out = t + floor * other
    if halo > 0 and bool(t.any()):
        out = out + other * 0.5 * torch.exp(-_block_distance(t > 0, grid) / halo)
    return out


def keep_target(question: str, targets: dict, frac: float, grid: tuple = TOKEN_GRID) -> torch.Tensor:
    """The token blocks a question should keep: its target blocks (the asked organ's, or the findings'
    when it names none; see `guide_target`) and, nearest first (Euclidean, in blocks), the blocks
    around them until ``frac`` of all blocks are chosen. Zeros = no target (the row is skipped)."""
    t = _guide_blocks(question, targets) > 0
    if not bool(t.any()):
        return torch.zeros(t.shape[0], device=t.device)
    n = max(int(t.sum()), round(frac * t.numel()))
    zz, yy, xx = torch.meshgrid(*(torch.arange(g, device=t.device, dtype=torch.float32) for g in grid),
                                indexing="ij")
    pos = torch.stack([zz, yy, xx], -1).reshape(-1, 3)
    d = torch.cdist(pos, pos[t]).min(-1).values
    out = torch.zeros(t.shape[0], device=t.device)
    out[torch.sort(d, stable=True).indices[:n]] = 1.0
    return out


def _block_distance(mask: torch.Tensor, grid: tuple, reach: int = 6) -> torch.Tensor:
    """Chebyshev distance in blocks from each block of the flat ``mask`` (on ``grid``) to the nearest
    True block, by repeated 3×3×3 dilation; blocks farther than ``reach`` get ``reach`` + 1."""
    m = mask.float().reshape(1, 1, *grid)
    d = torch.full(grid, float(reach + 1), device=mask.device)
    d[m[0, 0] > 0] = 0.0
    for k in range(1, reach + 1):
        m2 = F.max_pool3d(m, 3, stride=1, padding=1)
        d[(m2[0, 0] > 0) & (m[0, 0] == 0)] = float(k)
        m = m2
    return d.reshape(-1)


def _guide_blocks(question: str, targets: dict) -> torch.Tensor:
    from photon_core.inference.audit import BLOCK_FRACTION, organs_in_question
    from photon_core.train.synthetic.generator import ORGANS, PAIRED
    names = list(ORGANS)
    asked = set(organs_in_question(question, names))     # 'kidney' with no side → both kidneys
    if "pleural" in question.lower():
        asked |= set(PAIRED["lung"])
    organ = targets["organ"]
    if asked:
        cols = [names.index(o) for o in asked if bool(targets["organ_known"][names.index(o)])]
        if not cols:
            return torch.zeros(organ.shape[0], device=organ.device)
        share = organ[:, cols].sum(-1)
        chosen = share >= BLOCK_FRACTION
        if not bool(chosen.any()):
            chosen = share >= 0.5 * float(share.max())
        return (chosen & (share > 0)).float()
    return (targets["lesion"] > 0).float()


def standardise_tokens(f: torch.Tensor) -> torch.Tensor:
    """(scans, tokens, D) → each token as its deviation from its scan's mean token, over their spread."""
    return (f - f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-6)


@torch.no_grad()
def fold_standardise(model: PhotonModel, feats: torch.Tensor) -> None:
    """Re-parametrise the merger's last Linear so that the visual tokens ``feats`` (N, D), encoded by
    ``model`` as it is, would come out as deviations from their mean in units of each channel's spread.
    One fixed affine map, so the architecture (and an official loader) is unchanged. A tower trained
    through a standardised read-out (``--aux-standardise``) marks a finding as a small deviation of a
    large common vector; folded, the deviation is what an LLM stage sees (scripts/ball_probe.py --fold)."""
    feats = feats.float()
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    last = model.visual.merger.mlp[-1]
    last.weight.div_(sd.to(last.weight)[:, None])
    last.bias.sub_(mu.to(last.bias)).div_(sd.to(last.bias))


class AuxHead(torch.nn.Module):
    """Training-only linear read-out of the visual tokens (organ shares, finding share, diameter)."""

    def __init__(self, dim: int, n_organs: int, findings: float = 1.0, standardise: bool = False):
        super().__init__()
        self.n, self.findings = n_organs, findings     # findings: weight of the finding terms (0 = organs only)
        self.standardise = standardise                 # read each token as its deviation from the scan's mean token
        self.proj = torch.nn.Linear(dim, n_organs + 2)

    def loss(self, feats: torch.Tensor, tg: list[dict], detect: bool = False) -> torch.Tensor:
        """BCE on organ shares, weighted BCE on finding shares, MSE on diameters; ``detect``: also
        BCE of each scan's most finding-like token against "the scan has a finding" (a max-pooled
        read-out makes the vision tower mark finding tokens; a mean read-out does not — see
        scripts/ball_probe.py). With ``standardise`` the read-out sees each token as its deviation
        from its scan's mean token over their spread: a from-scratch tower's tokens are one large
        common vector plus small deviations, and through a raw read-out it learns to flatten them
        (every token the same) before it finds a lesion-sized change (scripts/ball_probe.py
        --standardise)."""
        f = feats.float().reshape(len(tg), -1, feats.shape[-1])
        if self.standardise:
            f = standardise_tokens(f)
        y = self.proj(f)
        organ = torch.stack([t["organ"] for t in tg])
        known = torch.stack([t["organ_known"] for t in tg])[:, None, :].expand_as(organ)
        lesion = torch.stack([t["lesion"] for t in tg])
        diam = torch.stack([t["diameter"] for t in tg])
        bce = F.binary_cross_entropy_with_logits
        lo = bce(y[..., :self.n][known], organ[known]) if bool(known.any()) else y.sum() * 0
        le = bce(y[..., self.n], (lesion * 8).clamp(max=1.0), pos_weight=torch.tensor(20.0, device=y.device))
        has = diam > 1.0
        ld = F.mse_loss(y[..., self.n + 1][has], diam[has] / 40.0) if bool(has.any()) else y.sum() * 0
        found = le + ld
        if detect:
            found = found + bce(y[..., self.n].amax(1), (lesion.amax(1) > 0).float())
        return lo + self.findings * found


@torch.no_grad()
def _tower_features(model: PhotonModel, cfg: TrainConfig) -> torch.Tensor:
    """Visual tokens of ``cfg.fold_scans`` train-split scans (a seed of their own, CPU), for the fold."""
    from photon_core.train.synthetic.generator import DemoGenerator
    gen = DemoGenerator("train", seed=cfg.seed + 7_777, pool=min(cfg.pool, 2), downsample=cfg.downsample)
    was = model.training
    model.eval()
    feats = torch.cat([model.encode_volume(*patchify(gen.sample()[0][:, None])) for _ in range(cfg.fold_scans)])
    model.train(was)
    return feats


class Trainee(torch.nn.Module):
    """The model plus the training-only head, as one module for DDP."""

    def __init__(self, model: PhotonModel, aux: AuxHead | None, aux_weight: float):
        super().__init__()
        self.model, self.aux, self.aux_weight = model, aux, aux_weight

    def forward(self, *args, token_targets=None, vision_only=False, **kw):
        if vision_only:   # detection pre-stage: the vision tower and the head, nothing else
            feats = self.model.encode_volume(kw["pixel_values"], kw["grid_thw"])
            loss = self.aux.loss(feats, token_targets, detect=True)
            return SimpleNamespace(loss=loss, losses={"aux": loss}, its=None)
        out = self.model(*args, **kw)
        if self.aux is not None and token_targets is not None and out.scan_features is not None:
            aux = self.aux_weight * self.aux.loss(out.scan_features, token_targets)
            out.losses["aux"] = aux
            out.loss = out.loss + aux
        return out


def train(cfg: TrainConfig) -> Path:
    from photon_core.train.synthetic.generator import DemoGenerator

    rank, world = init_distributed()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    out = Path(cfg.out)
    final = out / "model"
    torch.manual_seed(cfg.seed + rank)
    rng = random.Random(cfg.seed * 7919 + rank)
    ckpt = out / "last"
    if cfg.resume and (ckpt / "config.json").is_file():
        model = load_model(ckpt, "cpu", torch.float32)
        tok = Tokenizer(ckpt)
        state = json.loads((ckpt / "train_state.json").read_text())
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
        fold_standardise(model, _tower_features(model, cfg))
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
    from photon_core.train.synthetic.generator import ORGANS
    aux = (AuxHead(model.config.hidden_size, len(ORGANS), cfg.aux_findings, cfg.aux_standardise).to(device)
           if cfg.aux > 0 else None)
    if aux is not None and start and (ckpt / AUX_FILE).is_file():
        aux.load_state_dict(load_file(str(ckpt / AUX_FILE), device=str(device)))
    its_params = [p for p in model.its_module.predictor.parameters() if p.requires_grad]
    embed = [p for p in model.visual.vision_patch_embed.parameters() if p.requires_grad]
    special = {id(p) for p in its_params + embed}
    other = [p for p in model.parameters() if id(p) not in special and p.requires_grad]
    trained = other + its_params + embed
    groups = [(other, cfg.lr), (its_params, cfg.its_lr), (embed, cfg.lr * cfg.patch_embed_lr),
              (list(aux.parameters()) if aux is not None else [], cfg.lr)]
    opt = torch.optim.AdamW([{"params": ps, "lr": lr, "base_lr": lr} for ps, lr in groups],
                            weight_decay=cfg.weight_decay)
    if start and (ckpt / "optimizer.safetensors").is_file():
        _load_optimizer(opt, ckpt / "optimizer.safetensors")
    model.guide_weight = cfg.guide
    model.keep_guide_weight = cfg.keep_guide
    model.contrast_guide_weight = cfg.contrast_guide
    trainee = Trainee(model, aux, cfg.aux)
    ddp = torch.nn.parallel.DistributedDataParallel(trainee, find_unused_parameters=True) if world > 1 else trainee
    gen = DemoGenerator("train", seed=cfg.seed + 101 * rank + start, pool=cfg.pool, device=device,
                        downsample=cfg.downsample, enlargement=cfg.enlargement)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    t0, seen, log = time.time(), 0, []
    token_grid = tuple(n // v for n, v in zip(gen.shape, TOKEN_VOXELS))   # the stream's grid (curriculum)
    n_visual = token_grid[0] * token_grid[1] * token_grid[2]
    if cfg.slabs > token_grid[0]:
        raise SystemExit(f"--slabs {cfg.slabs}: the scans have {token_grid[0]} depth slabs")
    model.band = cfg.band
    for step in range(start, cfg.steps):
        model.phase = phase_at(step, cfg)
        lr_scale = min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * max(lr_scale, 0.05)
        rows, labels_list, row_scan, scans, tgs, guides, keeps = [], [], [], [], [], [], []
        robust = rng.random() < cfg.robust_prob
        flip = (model.phase == 3 and step >= cfg.flip_start * cfg.steps and rng.random() < cfg.flip_prob
                and not robust)
        temporal = cfg.temporal > 0 and rng.random() < cfg.temporal   # a whole step on pairs (equal token counts)
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
                        yield [frames, clean], [truth, None], organs, None, []   # hard negative of each finding token
                        continue
                    asked = counterfactual_questions(qa, clean_qa, cfg.questions_per_scan, rng)
                    if not asked:
                        yield [frames], [truth], organs, qa, None
                        continue
                    yield [frames], [truth], organs, None, [a for a, _ in asked]
                    yield [clean], [None], organs, None, [b for _, b in asked]
                else:
                    frames, qa, meta, organs = gen.sample()
                    yield [frames], [gen.last_truth], organs, qa, None

        for times, truths, organs, qa, questions in units():
            tg = [token_targets(organs, t, token_grid) for t in truths] if supervise else None
            if cfg.slabs:                  # the scans of one unit are cut at the same slabs
                chosen = rng.sample(range(token_grid[0]), cfg.slabs)
                if counterfactual and truths[0] is not None:       # a slab of the pair holds a finding
                    held = (tg[0]["lesion"].reshape(token_grid[0], -1) > 0).any(-1).nonzero().flatten().tolist()
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
                    guides.append(torch.cat([guide_target(q["question"], t, cfg.guide_floor, cfg.guide_halo, token_grid)
                                            for t in tg]))
                if tg is not None and not robust and keep_targets:
                    keeps.append(torch.cat([keep_target(q["question"], t, cfg.keep_guide_frac, token_grid)
                                           for t in tg]))
                ids, a0 = tok.prompt(q["question"], n_visual, q["answer"], prior_visual=n_visual if temporal else 0)
                rows.append(ids)
                labels_list.append([-100] * a0 + ids[a0:])
                row_scan.append(list(range(first, len(scans))))
        pv = torch.cat([p for p, _ in scans]).to(device)
        grid = torch.cat([g for _, g in scans]).to(device)
        if cfg.vision_only:
            kw = dict(pixel_values=pv, grid_thw=grid, token_targets=tgs, vision_only=True)
        else:
            ids, mask, labels = batch_prompts(rows, model.config.pad_token_id, labels_list)
            kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pv, grid_thw=grid,
                      row_scan=row_scan, labels=labels.to(device), flip=flip, robust=robust,
                      saliency_target=torch.stack(guides).to(device) if guides else None,
                      keep_target=torch.stack(keeps).to(device) if keeps else None,
                      token_targets=tgs if len(tgs) == len(scans) and aux is not None else None)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outp = ddp(**kw)
        loss = outp.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        seen += len(rows) if rows else len(scans)     # questions, or scans in the pre-stage
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            keep = float(outp.its.keep.float().mean()) if outp.its is not None else 1.0
            soft = float(outp.its.p.detach().mean()) if outp.its is not None else 1.0
            rate = seen / (time.time() - t0)
            line = dict(step=step, phase=model.phase, loss=round(loss.item(), 4),
                        **{k: round(v.item(), 4) for k, v in outp.losses.items()},
                        keep=round(keep, 3), p_mean=round(soft, 3), robust=robust, flip=flip, temporal=temporal,
                        counterfactual=counterfactual,
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
        save_file({k: v.detach().cpu().contiguous() for k, v in aux.state_dict().items()}, str(tmp / AUX_FILE))
    tok.tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "eos_token": "<|im_end|>"}))
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
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    tmp.rename(folder)


def _load_optimizer(opt, path: Path) -> None:
    tensors = load_file(str(path))
    for gi, g in enumerate(opt.param_groups):
        for pi, p in enumerate(g["params"]):
            st = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"{gi}.{pi}.")}
            if any(v.dim() and v.shape != p.shape for v in st.values()):
                raise SystemExit(f"{path}: optimiser state does not match the parameters (a checkpoint of "
                                 "another trainer version?); resume without it by --init-from its folder")
            if st:
                opt.state[p] = st


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        if f.type in ("bool", bool):
            ap.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", default=f.default)
        elif f.name == "band":
            ap.add_argument("--band", type=float, nargs=2, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=typ, default=f.default)
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", 1))))
    print(train(cfg))


if __name__ == "__main__":
    main()
