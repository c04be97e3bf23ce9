"""GPU benchmark at the official 3B shape (random bf16 weights): A/B/C/D side by side.

    python bench/gpu_abcd.py [--repeats 10] [--json out.json]
    python bench/gpu_abcd.py --smoke          # the same code on CPU at a tiny shape (times mean nothing)

A  stock Qwen2.5-VL geometry (temporal patch 2, 3 channels → 7,000 visual tokens), no pruning
B  Photon geometry (14³ patches → 1,000 tokens), ITS off
C  Photon with ITS keeping 390 tokens (top-k at the paper's average), and 10% / 25% / 50%
D  FastV at the same kept count as C (attention of the last instruction token at the ITS layer)

Per row: the vision tower's time, prefill latency (vision included), time to first token, decode
tokens/s at batch 1 and 8 with the KV cache, peak memory of prefill + batch-1 decode and of the
whole row, and a training step (forward + backward with SGP, vision frozen, batch 1, same for every
row). Ratios to A and B and roofline fractions (prefill FLOPs / time vs bf16 peak; decode bytes /
time vs HBM bandwidth). CUDA events, warm-ups, medians. It measures and prints; it asserts nothing.
Needs CUDA; ``--smoke`` runs every row on CPU with a tiny model and a small volume (perf_counter
times, no memory or roofline figures), so a GPU lease is not spent finding a bug in this script.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch


from photon_core.model.attention import backend_name  # noqa: E402
from photon_core.model.config import PhotonConfig, VisionConfig  # noqa: E402
from photon_core.model.photon import PhotonModel  # noqa: E402
from photon_core.io.preprocess import patchify  # noqa: E402
from photon_core.model.budget import Budget  # noqa: E402
from photon_core.model.its import Schedule  # noqa: E402
from photon_core.train.losses import photon_loss  # noqa: E402
from photon_core.model.config import preset_config  # noqa: E402
from photon_core.inference.generate import generate  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
HBM = {"H100": 3.35e12, "H200": 4.8e12}


def model_cfg(temporal_patch: int, in_chans: int, smoke: bool = False) -> PhotonConfig:
    """The official 3B shape (the design brief's config), or a tiny one with the same vocabulary and
    special tokens for --smoke."""
    if smoke:   # the tests' tiny model, with the official vocabulary and special tokens (the defaults)
        return preset_config("tiny", vision=dict(temporal_patch_size=temporal_patch, in_chans=in_chans))
    return PhotonConfig(vision=VisionConfig(temporal_patch_size=temporal_patch, in_chans=in_chans,
                                            intermediate_size=3420))


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` (CUDA events; perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1000)
        else:
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def prompt_ids(cfg: PhotonConfig, n_vis: int, batch: int, device) -> torch.Tensor:
    q = list(range(1000, 1012))
    ids = ([151644, 8948, 198] + list(range(2000, 2007)) + [151645, 198, 151644, 872, 198, cfg.vision_start_token_id]
           + [cfg.video_token_id] * n_vis + [cfg.vision_end_token_id] + q + [151645, 198, 151644, 77091, 198])
    return torch.tensor([ids] * batch, device=device)


def run_row(name, model, frames, budget, use_its, repeats):
    cfg = model.config
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pv, grid = patchify(frames, temporal_patch=cfg.vision.temporal_patch_size)
    pv, grid = pv.to(dev, dtype), grid.to(dev)
    if cfg.vision.in_chans == 3:
        pv = pv.repeat(1, 3)      # rows are (channel, t, y, x): three identical channels, as stock RGB frames
    with torch.no_grad():
        feats = model.encode_volume(pv, grid)
    n_vis = feats.shape[0]
    out = {"row": name, "visual_tokens": n_vis}
    ids1 = prompt_ids(cfg, n_vis, 1, dev)

    def prefill():
        with torch.no_grad():
            f = model.encode_volume(pv, grid)
            return model(ids1, features=f, grid_thw=grid, budget=budget, use_its=use_its)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out["vision_s"] = timed(lambda: model.encode_volume(pv, grid), repeats)
    out["prefill_s"] = timed(prefill, repeats)
    o = prefill()
    out["kept"] = int(o.its.kept_count[0]) if o.its is not None else n_vis
    out["ttft_s"] = timed(lambda: (prefill().logits[:, -1].argmax(-1), sync()), repeats)
    for b in (1, 8):
        ids = prompt_ids(cfg, n_vis, b, dev)
        fb = feats.repeat(b, 1)
        t32 = timed(lambda: generate(model, ids, features=fb, grid_thw=grid, budget=budget, use_its=use_its,
                                           max_new_tokens=33), max(3, repeats // 3), 1)
        t1 = timed(lambda: generate(model, ids, features=fb, grid_thw=grid, budget=budget, use_its=use_its,
                                          max_new_tokens=1), max(3, repeats // 3), 1)
        out[f"decode_tok_s_b{b}"] = b * 32 / max(t32 - t1, 1e-9)
        if b == 1:
            out["prefill_plus_32_s"] = t32
            out["peak_mem_gib_b1"] = peak_gib()       # prefill + batch-1 decode (the paper's inference figure)
    out["peak_mem_gib"] = peak_gib()                  # the whole row, batch-8 decode included
    # training step: vision frozen, LLM + ITS trained, hard phase with SGP
    model.train()
    schedule = Schedule(phase=3)
    for p in model.visual.parameters():
        p.requires_grad_(False)
    labels = ids1.clone()
    labels[:, :-4] = -100

    def step():
        o = model(ids1, features=feats.detach(), grid_thw=grid, use_its=use_its, schedule=schedule)
        sum(photon_loss(o, labels, schedule).values()).backward()
        model.zero_grad(set_to_none=True)

    try:
        out["train_step_s"] = timed(step, max(3, repeats // 2), 1)
        # in training ITS keeps what its threshold θ keeps (budgets are an inference setting), so the
        # C and D rows train alike: record how many tokens the step kept
        o = model(ids1, features=feats.detach(), grid_thw=grid, use_its=use_its, schedule=schedule)
        out["train_kept"] = int(o.its.keep[0].sum()) if o.its is not None else n_vis
        model.zero_grad(set_to_none=True)
    except torch.cuda.OutOfMemoryError:
        out["train_step_s"] = None
        torch.cuda.empty_cache()
    model.eval()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, small volume: checks the script runs")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --smoke)")
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    # 140 × 280 × 280 voxels: 1,000 Photon tokens, 7,000 at the stock geometry (--smoke: 8 and 56)
    frames = torch.rand(28, 1, 56, 56) if args.smoke else torch.rand(140, 1, 280, 280)
    rows = []
    stock = PhotonModel(model_cfg(2, 3, args.smoke)).to(device, dtype).eval()
    stock.init_weights(0.02)
    stock.reset_buffers()
    rows.append(run_row("A stock geometry", stock, frames, None, False, args.repeats))
    del stock
    if device == "cuda":
        torch.cuda.empty_cache()
    photon = PhotonModel(model_cfg(14, 1, args.smoke)).to(device, dtype).eval()
    photon.init_weights(0.02)
    photon.reset_buffers()
    rows.append(run_row("B Photon, no ITS", photon, frames, None, False, args.repeats))
    k = max(1, round(0.39 * rows[1]["visual_tokens"]))      # the paper's average: 390 of 1,000
    rows.append(run_row(f"C ITS top-{k}", photon, frames, Budget("top_k", k), True, args.repeats))
    for r in (0.10, 0.25, 0.50):
        rows.append(run_row(f"C ITS {int(r * 100)}%", photon, frames, Budget("ratio", r), True, args.repeats))
    rows.append(run_row(f"D FastV top-{k}", photon, frames, Budget("fastv", k), True, args.repeats))
    a, b = rows[0], rows[1]
    params = sum(p.numel() for p in photon.model.parameters())
    for r in rows:
        r["prefill_speedup_vs_A"] = a["prefill_s"] / r["prefill_s"]
        r["prefill_speedup_vs_B"] = b["prefill_s"] / r["prefill_s"]
        if r.get("train_step_s") and a.get("train_step_s"):
            r["train_speedup_vs_A"] = a["train_step_s"] / r["train_step_s"]
            r["train_speedup_vs_B"] = b["train_step_s"] / r["train_step_s"] if b.get("train_step_s") else None
        if device == "cuda":
            gpu = "H200" if "H200" in torch.cuda.get_device_name() else "H100"
            flops = 2 * params * (r["kept"] + 40)           # the LLM's matmuls over the prompt's tokens
            r["prefill_llm_roofline_fraction"] = flops / r["prefill_s"] / PEAK_BF16[gpu]
            r["decode_bandwidth_fraction_b1"] = 2 * params * r["decode_tok_s_b1"] / HBM[gpu]   # bf16 weights per token
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (--smoke: times mean nothing)",
                torch=torch.__version__, cuda=torch.version.cuda, attention=backend_name(device),
                driver=_driver() if device == "cuda" else None, llm_params=params)
    print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def _driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    main()
