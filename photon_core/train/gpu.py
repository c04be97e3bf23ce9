"""The demo model trained on the GPU machine in short calls: staged by wall time, resumable, one command.

    python -m photon_core.train.gpu --out $OUT/demo --minutes 6 --bodies runs/bodies/bodies.safetensors.xz
    python -m photon_core.train.gpu --out $OUT/demo --minutes 6 --bodies ... --resume-from DIR  # later calls
    python -m photon_core.train.gpu --out runs/smoke --smoke --bodies ...    # the same code, tiny, on the CPU

Each call measures the GPU data stream (`synthetic.gpu.GpuStream`: scans a second, in its first
seconds), then runs the stages named by ``--stages`` (``name:share`` of the call's time after its
start-up), by wall clock:

* ``vision`` — the vision tower alone, on token-sized supervision through a standardised read-out
  (`AuxHead`: organ shares, finding share and diameter per token, and each scan's most finding-like
  token against "the scan has a finding"), half of the scans beside their counterfactual clean twin
  (research/LOG.md: without the standardised read-out a from-scratch tower flattens its tokens; the
  twin makes the lesion the only difference). The generator is the limit here, so each batch is
  reused for as many steps as fit in the time the next one takes to make (up to ``--max-reuse``).
* ``llm`` — the standardisation is folded into the merger (`fold_standardise`, once), the tower is
  frozen, and the LLM and ITS learn to answer from it: hard drop with SGP, the retention band, keep
  and contrast guidance (the shipped model's recipe), counterfactual pairs of questions, and null
  volumes (noise, air) answered as nothing seen, where ITS learns to keep nothing.
* ``joint`` — everything trains, the tower at a lower rate with its read-out still supervised.

A checkpoint is written at every stage end, every ``--save-every`` seconds and at the deadline, and
``OUT/metrics.json`` with it, so a run stopped at any point leaves weights and figures:
OUT/model/ holds config.json, model.safetensors (bf16 when fp32 would pass 16 MiB), the tokenizer,
train_state.json and the training-only head (aux_head.safetensors): 6 files, and metrics.json a 7th.
No optimiser state is kept (it would not fit what comes back from the GPU machine): ``--resume``
starts a fresh AdamW with a short warm-up on the saved weights, head and stage record. A resumed call
runs the stages not yet finished, or ``--more`` when all are. At the end: the detection probe after
the vision stage, and the held-out yes/no check, noise check and air/noise answers (`checks.py`).
The stages themselves are in `stages.py`; this file is one call: time, checkpoints, metrics.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from photon_core.inference.prompt import Tokenizer
from photon_core.model.checkpoint import MAX_SHARD_BYTES, load_model, save_model
from photon_core.model.config import PhotonConfig, VisionConfig
from photon_core.model.photon import PhotonModel
from photon_core.organs import ORGANS
from photon_core.train.aux_head import AuxHead
from photon_core.train.checks import answer_check, detection_probe, null_answers, stream_parity
from photon_core.train.config import add_arguments, from_arguments
from photon_core.train.loop import AUX_FILE
from photon_core.train.stages import Progress, answer_stage, fold, vision_stage
from photon_core.train.synthetic.gpu import GpuStream
from photon_core.train.tokenizer import model_config

DEMO = Path(__file__).resolve().parents[1] / "demo_model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STATE_FILE = "train_state.json"


@dataclass
class GpuConfig:
    out: str = "runs/gpu"                  # OUT/model (checkpoint) and OUT/metrics.json
    minutes: float = 6.0                   # this call's wall time, counted from the start of main()
    reserve_s: float = 20.0                # of it, kept for the final checks and save
    resume: bool = False                   # continue from OUT/model (weights, head, stage record)
    resume_from: str = ""                  # ... or from this folder (a model folder this runner wrote: on a
                                           # fresh GPU machine, the last call's OUT/model carried along)
    smoke: bool = False                    # the same code at a tiny size on the CPU (tests)
    device: str = "auto"
    seed: int = 0
    bodies: str = ""                       # prepared bodies (synthetic/bodies.py); "" = prepare the cases
    llm_from: str = str(DEMO)              # LLM + ITS weights and tokenizer from this folder ("" = fresh LLM)
    init_from: str = ""                    # or from this complete model folder (weights, config, tokenizer)
    preset: str = "demo"                   # LLM sizes when it starts fresh
    vision_width: int = 256                # the tower's sizes (Photon's architecture; only sizes change)
    vision_depth: int = 6
    vision_heads: int = 4
    vision_mlp: int = 512
    vision_full: str = "2,5"               # its full-attention blocks
    stages: str = "vision:0.5,llm:0.4,joint:0.1"   # name:share of this call's time after start-up
    more: str = "llm:0.6,joint:0.4"        # what a resumed call runs once every stage is done
    pool: int = 16                         # deformed bodies per training case
    enlargement: float = 0.2               # share of scans with an enlarged organ (and its questions)
    downsample: float = 1.0                # > 1: the coarse curriculum grid (2.5 → 64 tokens)
    vision_scans: int = 16                 # scans a vision step (twins included)
    vision_lr: float = 1e-3
    patch_embed_lr: float = 1.0            # × vision_lr for the patch embedding
    vision_counterfactual: float = 0.5     # chance that a draw is a (scan with findings, its twin) pair
    vision_null: float = 0.05              # chance that a draw is a null volume (no organ, no finding)
    vision_findings: str = "2,3,4"         # findings in a vision-stage scan that has some (one of these):
                                           # more positives for the read-out; detection is local
    vision_warmup: int = 100
    aux_findings: float = 1.0              # weight of the finding terms in the read-out's loss
    max_reuse: int = 4                     # steps on one vision batch at most
    llm_scans: int = 8                     # scans an answer step
    questions: int = 8                     # questions a scan
    llm_lr: float = 5e-4
    its_lr: float = 3e-3
    phase2: float = 0.0                    # share of the llm stage before soft scaling (a fresh LLM: 0.3)
    phase3: float = 0.0                    # ... before the hard drop with SGP (a fresh LLM: 0.5)
    joint_llm_lr: float = 2e-4             # the joint stage's LLM rate (it starts from the llm stage)
    joint_vision_lr: float = 1e-4
    joint_aux: float = 0.5                 # weight of the read-out's loss in the joint stage
    counterfactual: float = 0.5            # answer stages: chance of a (scan, twin) pair, asked alike
    null_volumes: float = 0.08             # answer stages: chance of a null volume
    band: tuple = (0.12, 0.25)             # retention band on the mean keep probability
    keep_guide: float = 1.0
    keep_guide_frac: float = 0.15
    contrast_guide: float = 3.0
    null_keep: float = 1.0
    warmup: int = 30                       # optimiser steps of linear warm-up in each stage
    fold_scans: int = 16                   # scans measured for the fold (0 = no fold)
    probe_pairs: int = 16                  # held-out pairs for the detection probe
    val_scans: int = 32                    # held-out scans for the yes/no check
    val_pool: int = 3                      # deformed bodies per case of the val split (as the evaluator)
    parity_scans: int = 3                  # scans of the GPU stream checked against the CPU generator
    save_every: float = 90.0               # seconds between checkpoints inside a stage
    log_every: float = 15.0                # seconds between progress lines
    save_dtype: str = "auto"               # auto (fp32 if it fits 16 MiB, else bf16) | fp32 | bf16
    autocast: str = "auto"                 # auto (bf16 on CUDA) | bf16 (also on the CPU: tests) | off


SMOKE = dict(device="cpu", minutes=0.4, reserve_s=8.0, llm_from="", preset="tiny", vision_width=32,
             vision_depth=2, vision_heads=2, vision_mlp=64, vision_full="1", pool=0, downsample=2.5,
             vision_scans=2, llm_scans=2,
             questions=2, fold_scans=2, probe_pairs=2, val_scans=2, val_pool=0, parity_scans=1, max_reuse=2,
             warmup=1,
             vision_warmup=1, save_every=4.0,
             log_every=2.0, enlargement=0.5, null_volumes=0.3, vision_null=0.3)


def parse_stages(spec: str) -> list[tuple[str, float]]:
    """"vision:0.5,llm:0.4" → [("vision", 0.5), ("llm", 0.4)] (shares normalised to sum to 1)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, share = part.partition(":")
        if name not in ("vision", "llm", "joint"):
            raise SystemExit(f"--stages: unknown stage {name!r}; the stages are vision, llm and joint")
        out.append((name, float(share or 1)))
    total = sum(s for _, s in out)
    if not out or total <= 0:
        raise SystemExit(f"--stages {spec!r}: give at least one stage with a positive share")
    return [(n, s / total) for n, s in out]


class Clock:
    """Wall time of this call: the deadline, and each stage's end within it."""

    def __init__(self, t0: float, minutes: float, reserve_s: float):
        self.t0, self.deadline = t0, t0 + 60 * minutes - reserve_s

    def now(self) -> float:
        return time.monotonic()

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ----------------------------------------------------------------------------------------------
# Model, checkpoint
# ----------------------------------------------------------------------------------------------

def build_model(cfg: GpuConfig) -> tuple[PhotonModel, Path]:
    """A fresh model and the folder its tokenizer comes from: the LLM (and ITS) of ``--llm-from`` with a
    new vision tower of the given sizes, or a fresh LLM of ``--preset``; or ``--init-from`` as it is."""
    if cfg.init_from:
        return load_model(cfg.init_from, "cpu", torch.float32).train(), Path(cfg.init_from)
    full = [int(i) for i in cfg.vision_full.split(",") if i.strip()]
    vision = dict(hidden_size=cfg.vision_width, depth=cfg.vision_depth, num_heads=cfg.vision_heads,
                  intermediate_size=cfg.vision_mlp, fullatt_block_indexes=full)
    src = Path(cfg.llm_from) if cfg.llm_from else DEMO
    tok = Tokenizer(src)
    torch.manual_seed(cfg.seed)
    if cfg.llm_from:
        llm = PhotonConfig.from_file(src / "config.json")
        tower = VisionConfig(**{**asdict(llm.vision), **vision, "out_hidden_size": llm.hidden_size})
        config = replace(llm, vision=tower, model_name="Photon demo (GPU-trained, synthetic findings)")
    else:
        config = model_config(cfg.preset, tok.vocab_size, tok, vision=vision)
        config.model_name = "Photon demo (GPU-trained, synthetic findings)"
    model = PhotonModel(config)
    model.init_weights(0.02)
    if cfg.llm_from:       # the LLM and ITS (`model.*`, lm_head tied) of that folder; the tower stays new
        theirs = load_model(src, "cpu", torch.float32).state_dict()
        own = model.state_dict()
        llm_keys = [k for k in own if not k.startswith("visual.")]
        bad = [k for k in llm_keys if k not in theirs or theirs[k].shape != own[k].shape]
        if bad:
            raise SystemExit(f"--llm-from {src}: its LLM does not match this configuration ({bad[:3]}…)")
        model.load_state_dict({k: theirs[k] for k in llm_keys}, strict=False)
    return model.train(), src


def write_checkpoint(model: PhotonModel, folder: Path, tok_src: Path, aux: AuxHead | None, state: dict,
                     dtype: str) -> None:
    """OUT/model: the model folder plus the stage record and the training-only head. Each file is
    written beside its place and renamed into it, so a run stopped mid-save leaves the last whole file."""
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    bf16 = dtype == "bf16" or (dtype == "auto" and fp32_bytes > MAX_SHARD_BYTES)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model(copy.deepcopy(model).to(torch.bfloat16) if bf16 else model, tmp)
        for f in TOKENIZER_FILES:
            shutil.copyfile(tok_src / f, tmp / f)
        if aux is not None:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in aux.state_dict().items()},
                      str(tmp / AUX_FILE))
        state = {**state, "weights_dtype": "bf16" if bf16 else "fp32"}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        names = {f.name for f in tmp.iterdir()}
        for f in tmp.iterdir():
            part = folder / (f.name + ".partial")
            shutil.copyfile(f, part)
            os.replace(part, folder / f.name)
    for f in folder.iterdir():
        if f.name not in names:
            f.unlink()


def write_json(path: Path, data: dict) -> None:
    part = path.with_name(path.name + ".partial")
    part.write_text(json.dumps(data, indent=1, default=float))
    os.replace(part, path)


# ----------------------------------------------------------------------------------------------
# One call
# ----------------------------------------------------------------------------------------------

def run(cfg: GpuConfig, t0: float) -> dict:
    clock = Clock(t0, cfg.minutes, cfg.reserve_s)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True        # the patch embedding is a Conv3d of fixed batch shapes
    out = Path(cfg.out)
    folder = out / "model"
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("**/*.partial"):                 # a write a stopped run left half done
        f.unlink()
    state: dict = {"done": [], "calls": 0, "seconds": {}, "steps": {}, "folded": False}
    since = Path(cfg.resume_from) if cfg.resume_from else folder if cfg.resume else None
    if since is not None and not (since / STATE_FILE).is_file():
        raise SystemExit(f"--resume: {since} holds no checkpoint of this runner (no {STATE_FILE})")
    if since is not None:
        model = load_model(since, "cpu", torch.float32).train()
        state = {**state, **json.loads((since / STATE_FILE).read_text())}
        tok_src = since
    else:
        model, tok_src = build_model(cfg)
    tok = Tokenizer(tok_src)
    model.to(device)
    model.reset_buffers()
    aux = AuxHead(model.config.hidden_size, len(ORGANS), cfg.aux_findings, standardise=True).to(device)
    if since is not None and (since / AUX_FILE).is_file():
        aux.load_state_dict(load_file(str(since / AUX_FILE), device=str(device)))
    call = int(state["calls"])
    state["calls"] = call + 1
    torch.manual_seed(cfg.seed + 1009 * call)
    rng = random.Random(cfg.seed * 31 + call)
    bodies = None
    if cfg.bodies:
        from photon_core.train.synthetic.bodies import load_bodies
        bodies = load_bodies(cfg.bodies)
    def make_stream(masks_device="cpu"):
        return GpuStream("train", seed=cfg.seed + 1009 * call, pool=cfg.pool, device=device, bodies=bodies,
                         downsample=cfg.downsample, enlargement=cfg.enlargement, masks_device=masks_device)

    stream = make_stream()
    params = sum(p.numel() for p in model.parameters())
    vision_params = sum(p.numel() for p in model.visual.parameters())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    sizes = dict(parameters=params, vision_parameters=vision_params, vision=asdict(model.config.vision))
    metrics = dict(device=str(device), gpu=gpu, call=call + 1, config=asdict(cfg), model=sizes,
                   setup_s=round(time.monotonic() - t0, 1), stages={}, done_before=list(state["done"]))
    # the data stream's speed, first thing (a batch with pairs and null volumes, as the vision stage draws)
    t = time.monotonic()
    try:
        first = stream.batch(cfg.vision_scans, cfg.vision_counterfactual, cfg.vision_null)
    except Exception:       # the split stream failed here: the generator's one-device path (slower)
        if device.type == "cpu":
            raise
        metrics["generator_fallback"] = traceback.format_exc()[-3000:]
        print(metrics["generator_fallback"], flush=True)
        stream = make_stream(masks_device=device)
        t = time.monotonic()
        first = stream.batch(cfg.vision_scans, cfg.vision_counterfactual, cfg.vision_null)
    metrics["generator"] = dict(first_batch_scans=len(first), first_batch_s=round(time.monotonic() - t, 3),
                                scans_per_s_first=round(len(first) / (time.monotonic() - t), 2),
                                pool_bodies=len(stream.gen.pool), shape=list(stream.shape))
    del first
    print(json.dumps({"generator": metrics["generator"], "setup_s": metrics["setup_s"]}), flush=True)
    if cfg.parity_scans:            # the stream against the CPU generator, on this device (a few seconds)
        try:
            metrics["parity"] = stream_parity(bodies, device, cfg.parity_scans, seed=cfg.seed,
                                              downsample=cfg.downsample)
        except Exception:
            metrics["parity"] = dict(error=traceback.format_exc()[-3000:])
        print(json.dumps({"parity": metrics["parity"]}), flush=True)
    write_json(out / "metrics.json", metrics)

    todo = [(n, s) for n, s in parse_stages(cfg.stages) if n not in state["done"]] or parse_stages(cfg.more)
    total = sum(s for _, s in todo)
    budget = clock.left()
    last_save = [time.monotonic()]

    def save(stage: str | None = None) -> None:
        record = {**state, "config": asdict(cfg), "in_stage": stage}
        write_checkpoint(model, folder, tok_src, aux, record, cfg.save_dtype)
        metrics["generator"]["scans_per_s"] = round(stream.scans_per_s, 2)
        metrics["wall_s"] = round(time.monotonic() - t0, 1)
        write_json(out / "metrics.json", metrics)
        last_save[0] = time.monotonic()

    elapsed_share = 0.0
    for name, share in todo:
        elapsed_share += share
        until = clock.deadline - budget * (1 - elapsed_share / total)   # (a late stage still takes a step)
        if name != "vision" and not state["folded"] and "vision" in state["done"] and cfg.fold_scans:
            fold(model, stream, cfg.fold_scans, dtype)
            state["folded"] = True
        log = Progress(name, cfg.log_every)
        t_stage = time.monotonic()
        on_save = lambda step, n=name: save(n) if time.monotonic() - last_save[0] > cfg.save_every else None  # noqa: E731
        try:
            if name == "vision":
                got = vision_stage(model, aux, stream, cfg, until, log, dtype, on_save)
            else:
                got = answer_stage(model, aux, tok, stream, cfg, until, log, dtype, on_save, name == "joint",
                                   rng)
        except Exception:               # keep what was learnt and say what broke, then stop
            metrics["error"] = dict(stage=name, traceback=traceback.format_exc()[-4000:])
            metrics["stages"][name] = dict(wall_s=round(time.monotonic() - t_stage, 1), trace=log.trace)
            save(name)
            raise
        seconds = time.monotonic() - t_stage
        finished = time.monotonic() >= until
        if finished and name not in state["done"]:
            state["done"].append(name)
        state["seconds"][name] = round(state["seconds"].get(name, 0) + seconds, 1)
        state["steps"][name] = state["steps"].get(name, 0) + got["steps"]
        metrics["stages"][name] = dict(**got, wall_s=round(seconds, 1), finished=finished, trace=log.trace)
        if name == "vision":
            val = GpuStream("val", seed=cfg.seed, pool=cfg.val_pool, device=device, bodies=bodies,
                            downsample=cfg.downsample, masks_device=stream.gen.device)
            metrics["vision_probe"] = detection_probe(model, aux, val, cfg.probe_pairs)
            print(json.dumps({"vision_probe": metrics["vision_probe"]}), flush=True)
        save(None)
    # the checks (in the reserved time) and the last save
    val = GpuStream("val", seed=cfg.seed + 1, pool=cfg.val_pool, device=device, bodies=bodies,
                    downsample=cfg.downsample, masks_device=stream.gen.device)
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            metrics["val"] = answer_check(model, tok, val, cfg.val_scans)
            metrics["null_answers"] = null_answers(model, tok, stream.shape, device)
        malformed = metrics["null_answers"]["malformed"]
        print(json.dumps({"val": metrics["val"], "malformed": malformed}), flush=True)
    except Exception:
        metrics["error"] = dict(stage="checks", traceback=traceback.format_exc()[-4000:])
        raise
    finally:
        save(None)
    return metrics


def main(argv=None) -> None:
    t0 = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, GpuConfig)
    args = ap.parse_args(argv)
    cfg = from_arguments(GpuConfig, args)
    if cfg.smoke:        # the smoke sizes, except what the command line set itself
        words = argv if argv is not None else sys.argv[1:]
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in words if a.startswith("--")}
        cfg = replace(cfg, **{k: v for k, v in SMOKE.items() if k not in given})
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run(cfg, t0)


if __name__ == "__main__":
    main()
