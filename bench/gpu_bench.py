"""GPU benchmark at the official 3B shape (random bf16 weights): ours and stock transformers in one run.

    PYTHONPATH=. python bench/gpu_bench.py --section ours --json OUT/bench_ours.json --profile OUT/profile.txt
    PYTHONPATH=. python bench/gpu_bench.py --section peer --json OUT/bench_peer.json
    PYTHONPATH=. python bench/gpu_bench.py --merge OUT/bench_ours.json OUT/bench_peer.json \
        --json OUT/gpu_bench.json
    PYTHONPATH=. python bench/gpu_bench.py --smoke --section all --json out.json   # CPU, tiny shapes (a test)

`bench/gpu_run.sh` runs the GPU tests and these sections, each in its own process under a time limit.

Section ``ours`` (the model fused as the Predictor runs it, `PhotonModel.fuse_projections`; in this
order, each part guarded: an error or the time budget skips it, recorded):
  C ITS top-390 (the paper's average keep): vision tower (as served: compiled + CUDA graph; eager),
    prefill (vision included; the decoder layers as captured spans, as `generate` serves them, and run
    one by one: ``_eager_layers``), TTFT, answer = prefill + 32 tokens (vision included, and on cached
    features), decode tok/s at batch 1 and 8 (CUDA-graph step) and batch 1 (eager step), peak memory
    against the weights' bytes;
  kernels and kernel time per graph decode step (``decode_step_profile``); as served on CUDA, the
    compiled decode step at batch 1 (``*_compile``, and the answer with it) and the tower compiled and
    only captured (``vision_compile_s``, ``vision_graph_s``, the prefill with each); the same row with
    separate projections (vision, prefill, decode b1 and its step profile: the fusion's effect, same
    run); decode b1 with each decode-attention kernel (matmul, sdpa) and their step profiles;
  service: one ask through the ask batcher vs 8 concurrent asks from 8 sessions (8 volumes);
  B Photon without ITS; torch profiler of prefill and of eager decode steps; D FastV at 390; C at 10 /
  25 / 50 %; A stock geometry (temporal patch 2, 3 channels → 7,000 tokens; its own model); training
  step (SGP, frozen tower) for B and C; the compiled step at batch 8 and its step profile; the whole
  step under torch.compile(mode="reduce-overhead").
Section ``peer``: stock transformers `Qwen2_5_VLForConditionalGeneration` (SDPA) at the same shape and
  prompt: vision tower, prefill, answer and decode tok/s eager (DynamicCache) and with static cache +
  torch.compile (generate's own compile of the decode step), peak memory; kernels and kernel time per
  decode step of the compiled peer (``decode_step_profile``, beside ours: where the step's time differs).
Times: CUDA events, warm-ups, medians; decode tok/s = 32·B / (t(33 tokens) − t(1 token)). Roofline:
prefill FLOPs / time vs bf16 dense peak, decode bytes (weights + KV read) / time vs HBM bandwidth.
It measures and records; it asserts nothing. A figure not measured is absent, never guessed.
``--smoke``: the same code on CPU with the tests' tiny model and a small volume (64 visual tokens, so that
39 % is above the budget floor; times mean nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from photon_core.inference.batching import AskBatcher
from photon_core.inference.engine import engine_for, prefill_for, release, vision_for
from photon_core.inference.generate import generate
from photon_core.inference.prompt import Tokenizer
from photon_core.io.preprocess import patchify
from photon_core.model.attention import backend_name
from photon_core.model.budget import Budget
from photon_core.model.config import PhotonConfig, VisionConfig, preset_config
from photon_core.model.its import Schedule
from photon_core.model.photon import PhotonModel

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "photon_core" / "demo_model"      # its tokenizer builds the prompts (ids set in the config)
QUESTION = "Is there a lesion in the liver?"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}     # dense bf16 tensor-core peak (SXM)
HBM = {"H100": 3.35e12, "H200": 4.8e12}
NEW = 32                                         # tokens of an answer
SMOKE = False                                    # --smoke: every timing runs once


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--section", choices=["ours", "peer", "all"], default="all")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", type=Path, help="write the profiler tables here (ours)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new parts after this long")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--merge", nargs="+", type=Path, help="merge section JSON files into --json")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, small volume: the code runs")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------- recording
class Record:
    """Results written to JSON after every part; a part that raises or would pass the budget is skipped
    and says why."""

    def __init__(self, path: Path | None, budget_s: float, meta: dict):
        self.path, self.t0, self.budget_s = path, time.perf_counter(), budget_s
        self.data = {"meta": meta, "parts": {}, "rows": {}}
        self.write()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def part(self, name: str, fn, est_s: float = 0.0):
        if self.left() < est_s:
            why = f"skipped: {self.left():.0f} s left of the budget, needs ~{est_s:.0f}"
            self.data["parts"][name] = {"status": why}
            self.write()
            return None
        t = time.perf_counter()
        try:
            out = fn()
            self.data["parts"][name] = {"status": "ok", "wall_s": round(time.perf_counter() - t, 2)}
            return out
        except Exception as e:  # noqa: BLE001 - record and go on
            self.data["parts"][name] = {"status": f"error: {type(e).__name__}: {str(e)[:500]}",
                                        "traceback": traceback.format_exc()[-3000:],
                                        "wall_s": round(time.perf_counter() - t, 2)}
            print(f"[{name}] {type(e).__name__}: {e}", flush=True)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return None
        finally:
            self.write()

    def row(self, name: str) -> dict:
        return self.data["rows"].setdefault(name, {"row": name})

    def write(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.path)


def meta(device: str, smoke: bool) -> dict:
    cuda = device == "cuda"
    return dict(device=torch.cuda.get_device_name() if cuda else "cpu (--smoke: times mean nothing)",
                driver=_driver() if cuda else None, torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), attention=backend_name(device, torch.bfloat16 if cuda
                                                                       else torch.float32),
                transformers=_version("transformers"), smoke=smoke)


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


def _driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_kind() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return "H200" if "H200" in name else "H100" if "H100" in name else ""


# ---------------------------------------------------------------------- timing
def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` (CUDA events; perf_counter on CPU)."""
    if SMOKE:
        repeats, warmup = 1, min(warmup, 1)
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(1, repeats)):
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


# ---------------------------------------------------------------------- model and inputs
def model_cfg(temporal_patch: int, in_chans: int, smoke: bool) -> PhotonConfig:
    """The official 3B shape (or the tests' tiny one for --smoke) with the demo tokenizer's special ids,
    so that the Predictor (and its tokenizer) can drive it; the ids do not change the computation."""
    demo = PhotonConfig.from_file(DEMO / "config.json")
    ids = {k: getattr(demo, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "vision_token_id",
                                         "vision_start_token_id", "vision_end_token_id", "image_token_id",
                                         "video_token_id")}
    vision = dict(temporal_patch_size=temporal_patch, in_chans=in_chans)
    if smoke:                                    # the demo's vocabulary too: CPU time goes to the code path
        return preset_config("tiny", vision=vision, vocab_size=demo.vocab_size, **ids)
    return PhotonConfig(vision=VisionConfig(**vision), **ids)


def build(cfg: PhotonConfig, device: str, dtype: torch.dtype) -> PhotonModel:
    """Random weights, built on the meta device and materialised on ``device`` in ``dtype`` (no fp32 copy)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            m = PhotonModel(cfg)
    finally:
        torch.set_default_dtype(default)
    m = m.to_empty(device=device).eval()
    torch.manual_seed(0)
    m.init_weights(0.02)
    m.reset_buffers()
    return m.fuse_projections()                 # as the Predictor runs it (one matmul for q/k/v, gate/up)


class Inputs:
    def __init__(self, model: PhotonModel, frames: torch.Tensor, tok: Tokenizer):
        cfg = model.config
        self.dev = model.lm_head.weight.device
        dtype = model.lm_head.weight.dtype
        pv, grid = patchify(frames, temporal_patch=cfg.vision.temporal_patch_size)
        if cfg.vision.in_chans == 3:
            pv = pv.repeat(1, 3)          # rows are (channel, t, y, x): three equal channels, as RGB frames
        self.pv, self.grid = pv.to(self.dev, dtype), grid.to(self.dev)
        with torch.inference_mode():
            self.feats = model.encode_volume(self.pv, self.grid)
        self.V = self.feats.shape[0]
        self.prompt = tok.prompt(QUESTION, self.V)[0]

    def ids(self, batch: int = 1) -> torch.Tensor:
        return torch.tensor([self.prompt] * batch, device=self.dev)


def weights_bytes(module: torch.nn.Module) -> int:
    seen, n = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


def peak_reset():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# ---------------------------------------------------------------------- ours
def prefill_fn(model, x: Inputs, budget, use_its: bool, encode, layers: str = "auto"):
    """Vision (``encode``) + the prefill; ``layers``: the prefill engine's mode ('auto': CUDA graphs on
    the GPU, as `generate` serves it; 'eager': the layers run one by one)."""
    spans = prefill_for(model, layers)

    def run():
        with torch.inference_mode():
            f = encode(x.pv, x.grid)
            return model(x.ids(), features=f, grid_thw=x.grid, budget=budget, use_its=use_its, use_cache=True,
                         last_logits=True, layers=spans)
    return run


def answer_fn(model, x: Inputs, budget, use_its: bool, n: int, batch: int = 1, mode: str = "auto",
              encode=None):
    ids = x.ids(batch)

    def run():
        with torch.inference_mode():
            f = encode(x.pv, x.grid).repeat(batch, 1) if encode is not None else x.feats.repeat(batch, 1)
            g = generate(model, ids, features=f, grid_thw=x.grid, budget=budget, use_its=use_its,
                         max_new_tokens=n, mode=mode)
            g.tokens.cpu()            # the answer is on the host: what a caller waits for
            return g
    return run


def decode_rate(model, x, budget, use_its, batch, mode, repeats) -> dict:
    t33 = timed(answer_fn(model, x, budget, use_its, NEW + 1, batch, mode), repeats)
    t1 = timed(answer_fn(model, x, budget, use_its, 1, batch, mode), repeats)
    g = answer_fn(model, x, budget, use_its, NEW + 1, batch, mode)()
    return {f"decode_tok_s_b{batch}": batch * NEW / max(t33 - t1, 1e-9), f"decode_ms_per_step_b{batch}":
            1000 * (t33 - t1) / NEW, f"decode_path_b{batch}": g.stats["path"],
            f"decode_fallback_b{batch}": g.stats["fallback"]}


def llm_prefill_flops(model, out, L: int) -> float:
    """2·params·tokens per decoder layer (each layer at the length it saw) + the last position's head."""
    per_layer = weights_bytes(model.model.layers[0]) / model.lm_head.weight.element_size()
    D, V = model.config.hidden_size, model.config.vocab_size
    return sum(2 * per_layer * n for n in out.seq_len_per_layer) + 2 * D * V


def vision_flops(model, P: int) -> float:
    n = sum(p.numel() for p in model.visual.parameters())
    return 2 * n * P


def core_row(rec: Record, name: str, model, x: Inputs, budget, use_its: bool, repeats: int,
             modes=("graph",), batches=(1, 8), detail: bool = True, memory: bool = True):
    """Vision, prefill, TTFT, answer, decode tok/s and memory of one row; modes after the first: decode
    tok/s at batch 1 only."""
    cuda = x.dev.type == "cuda"
    r = rec.row(name)
    r["visual_tokens"] = x.V
    eager_enc = model.encode_volume
    graph_enc = vision_for(model, "auto")
    pre = prefill_fn(model, x, budget, use_its, graph_enc)
    sync()
    t0 = time.perf_counter()
    out = pre()                                       # captures the tower's graph and the prefill's spans
    sync()
    r["prefill_first_call_s"] = time.perf_counter() - t0
    r["kept"] = int(out.its.kept_count[0]) if out.its is not None else x.V
    r["prompt_tokens"] = len(x.prompt)
    with torch.inference_mode():
        r["vision_s"] = timed(lambda: graph_enc(x.pv, x.grid), repeats)
        r["vision_path"] = graph_enc.path
        if detail:
            r["vision_eager_s"] = timed(lambda: eager_enc(x.pv, x.grid), repeats)
    r["prefill_s"] = timed(pre, repeats)
    r["prefill_path"] = prefill_for(model, "auto").path
    r["prefill_fallback"] = prefill_for(model, "auto").fallback
    if detail:
        eager_layers = prefill_fn(model, x, budget, use_its, graph_enc, "eager")
        r["prefill_eager_layers_s"] = timed(eager_layers, repeats)
        r["prefill_eager_vision_s"] = timed(prefill_fn(model, x, budget, use_its, eager_enc), repeats)
        r["ttft_s"] = timed(lambda: pre().logits[:, -1].argmax(-1).cpu(), repeats)
    rec.write()
    L = len(x.prompt)
    flops = llm_prefill_flops(model, out, L) + vision_flops(model, x.pv.shape[0])
    if cuda and gpu_kind():
        r["prefill_flops"] = flops
        r["prefill_roofline_fraction"] = flops / r["prefill_s"] / PEAK_BF16[gpu_kind()]
    for i, mode in enumerate(modes):                  # the first mode's figures carry no suffix
        key = "" if i == 0 else f"_{mode}"
        for b in batches if i == 0 else (1,):
            if b == 1 and i == 0:
                peak_reset()
                ans = answer_fn(model, x, budget, use_its, NEW, 1, mode, graph_enc)
                r[f"answer_s{key}"] = timed(ans, repeats)
                if detail:
                    cached = answer_fn(model, x, budget, use_its, NEW, 1, mode)
                    r[f"answer_cached_features_s{key}"] = timed(cached, repeats)
                if cuda and memory:
                    wb = weights_bytes(model)
                    r["weights_gib"] = wb / 2**30
                    r["peak_mem_gib_b1"] = peak_gib()          # prefill (vision included) + batch-1 decode
                    r["peak_over_weights_gib_b1"] = r["peak_mem_gib_b1"] - wb / 2**30
                    r["reserved_gib_b1"] = torch.cuda.max_memory_reserved() / 2**30   # graph pools included
            reps = max(3, repeats // 2) if i == 0 and detail else 2
            rate = decode_rate(model, x, budget, use_its, b, mode, reps)
            r.update({k if not key else k.replace(f"_b{b}", f"_b{b}{key}"): v for k, v in rate.items()})
            if cuda and gpu_kind() and b == 1:
                c = model.config
                kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (r["kept"] + L) * 2
                head = 0 if c.tie_word_embeddings else weights_bytes(model.lm_head)
                llm = weights_bytes(model.model) + head
                bw = (llm + kv) * rate["decode_tok_s_b1"]
                r[f"decode_bandwidth_fraction_b1{key}"] = bw / HBM[gpu_kind()]
            rec.write()
    if cuda and memory:
        r["peak_mem_gib_row"] = peak_gib()


def train_step(rec: Record, name: str, model, x: Inputs, use_its: bool, repeats: int):
    r = rec.row(name)
    ids = x.ids()
    labels = ids.clone()
    labels[:, :-4] = -100
    schedule = Schedule(phase=3)
    from photon_core.train.losses import photon_loss

    feats = x.feats.clone()                            # a normal tensor (x.feats came from inference mode)
    model.train()
    req = [p.requires_grad for p in model.visual.parameters()]
    model.visual.requires_grad_(False)
    try:
        def step():
            o = model(ids, features=feats, grid_thw=x.grid, use_its=use_its, schedule=schedule)
            sum(photon_loss(o, labels, schedule).values()).backward()
            model.zero_grad(set_to_none=True)
        r["train_step_s"] = timed(step, max(2, repeats // 2), 1)
    finally:
        for p, q in zip(model.visual.parameters(), req):
            p.requires_grad_(q)
        model.zero_grad(set_to_none=True)
        model.eval()


def profile(rec: Record, model, x: Inputs, budget, path: Path | None):
    """Where the time goes: prefill (graph vision; decoder layers eager, then as captured spans) and eager
    decode steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.dev.type == "cuda" else [])
    out_txt, summary = [], {}
    pre = prefill_fn(model, x, budget, True, vision_for(model, "auto"), "eager")
    spans = prefill_fn(model, x, budget, True, vision_for(model, "auto"))
    eng = engine_for(model, "eager")
    gen = answer_fn(model, x, budget, True, 9, 1, "eager")
    for what, fn in (("prefill", pre), ("prefill, captured spans", spans),
                     ("eager decode, 8 steps (prefill included)", gen)):
        fn()
        sync()
        t = time.perf_counter()
        with tprofile(activities=acts) as prof:
            fn()
            sync()
        wall = time.perf_counter() - t
        ka = prof.key_averages()
        dev_t = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa
        kernels = sum(dev_t(e) for e in ka) / 1e6
        top = sorted(ka, key=dev_t, reverse=True)[:12]
        summary[what] = dict(wall_s=wall, gpu_busy_s=kernels, ops=len(ka),
                             launches=sum(e.count for e in ka if dev_t(e) > 0),
                             top=[(e.key, round(dev_t(e) / 1e3, 3), e.count) for e in top])
        sort = "self_cuda_time_total" if x.dev.type == "cuda" else "self_cpu_time_total"
        with contextlib.suppress(Exception):
            out_txt.append(f"==== {what}: wall {wall * 1e3:.1f} ms\n" + ka.table(sort_by=sort, row_limit=25))
    del eng
    rec.data["profile"] = summary
    if path is not None:
        path.write_text("\n\n".join(out_txt))


def step_profile(run_n, run_1, steps: int, top: int = 15) -> dict:
    """Per decode step: device kernels launched and their time, from a profile of ``run_n`` (``steps`` more
    decode steps) less one of ``run_1``; the kernels by time per step. On the CPU (smoke) it counts aten
    ops and their CPU time instead (``unit`` says which)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def kernels(fn) -> dict:
        fn()
        sync()
        with tprofile(activities=acts) as prof:
            fn()
            sync()
        out: dict = {}
        for e in prof.key_averages():
            if cuda and e.device_type != DeviceType.CUDA:
                continue
            if not cuda and not e.key.startswith("aten::"):
                continue
            t = (getattr(e, "self_device_time_total", 0) or 0) if cuda else e.self_cpu_time_total
            n, tt = out.get(e.key, (0, 0.0))
            out[e.key] = (n + e.count, tt + t)
        return out

    a, b = kernels(run_n), kernels(run_1)
    per = {k: ((n - b.get(k, (0, 0))[0]) / steps, (t - b.get(k, (0, 0.0))[1]) / steps / 1e3)
           for k, (n, t) in a.items()}
    per = {k: v for k, v in per.items() if v[0] > 0}
    return dict(unit="CUDA kernels" if cuda else "CPU aten ops (smoke)",
                launches_per_step=round(sum(n for n, _ in per.values()), 1),
                ms_per_step=round(sum(t for _, t in per.values()), 4),
                top=[(k[:90], round(n, 2), round(t, 4)) for k, (n, t) in
                     sorted(per.items(), key=lambda kv: -kv[1][1])[:top]])


def ours_step_profile(m, x: Inputs, budget, mode: str, steps: int = 8) -> dict:
    """`step_profile` of our engine's decode step, batch 1, in ``mode``."""
    return step_profile(answer_fn(m, x, budget, True, steps + 1, 1, mode),
                        answer_fn(m, x, budget, True, 1, 1, mode), steps)


def ours_step_profiles(rec: Record, m, x: Inputs, budget, modes):
    """Kernels and kernel time per decode step of our engine, batch 1, per mode."""
    prof = rec.data.setdefault("decode_step_profile", {})
    for mode in modes:
        prof[f"ours {mode}"] = ours_step_profile(m, x, budget, mode)
        rec.write()


def fused_vs_separate(rec: Record, name: str, m, x: Inputs, budget, rep: int):
    """The same row with the projections unfused (separate q/k/v, gate/up; the tower's MLP unpadded):
    vision tower (graph), prefill and batch-1 decode, so the fusion's effect is measured in this run."""
    r = rec.row(name)
    release(m)
    m.fuse_projections(False)
    try:
        enc = vision_for(m, "auto")
        with torch.inference_mode():
            r["vision_s_separate"] = timed(lambda: enc(x.pv, x.grid), rep)
        r["prefill_s_separate"] = timed(prefill_fn(m, x, budget, True, enc), rep)
        mode = "eager" if SMOKE else "graph"
        rate = decode_rate(m, x, budget, True, 1, mode, max(3, rep // 2))
        r["decode_tok_s_b1_separate"] = rate["decode_tok_s_b1"]
        r["decode_path_b1_separate"] = rate["decode_path_b1"]
        prof = ours_step_profile(m, x, budget, mode)
        rec.data.setdefault("decode_step_profile", {})[f"ours {mode}, separate projections"] = prof
    finally:
        release(m)
        m.fuse_projections(True)
    rec.write()


def decode_kernel_ab(rec: Record, name: str, m, x: Inputs, budget, rep: int):
    """Batch-1 decode with each decode-attention kernel (`attention.set_decode_kernel`), steps rebuilt for
    each, and its step profile: which one the default should be."""
    from photon_core.model import attention

    r = rec.row(name)
    mode = "eager" if SMOKE else "graph"
    default = attention.decode_kernel()
    try:
        for kernel in attention.DECODE_KERNELS:
            release(m)
            attention.set_decode_kernel(kernel)
            rate = decode_rate(m, x, budget, True, 1, mode, max(3, rep // 2))
            r[f"decode_tok_s_b1_{kernel}_kernel"] = rate["decode_tok_s_b1"]
            prof = ours_step_profile(m, x, budget, mode)
            rec.data.setdefault("decode_step_profile", {})[f"ours {mode}, {kernel} decode attention"] = prof
            rec.write()
    finally:
        attention.set_decode_kernel(default)
        release(m)


def service(rec: Record, model, frames_list, repeats: int, new: int):
    """One ask through the ask batcher vs 8 concurrent asks from 8 sessions (each its own volume)."""
    import photon_core.inference.predictor as predictor_mod
    from photon_core.inference.predictor import Query

    folder = Path(tempfile.mkdtemp(prefix="bench_model_"))
    try:
        model.config.save(folder / "config.json")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(DEMO / f, folder / f)
        real = predictor_mod.load_model
        predictor_mod.load_model = lambda *a, **k: model           # the in-memory random model
        try:
            pred = predictor_mod.Predictor(folder, device=str(model.lm_head.weight.device))
        finally:
            predictor_mod.load_model = real
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    vols = [pred.encode(f)[:2] for f in frames_list]
    k = max(1, round(0.39 * vols[0][0].shape[0]))
    queries = [[Query(QUESTION, Budget("top_k", k), v)] for v in vols]
    batcher = AskBatcher(pred, max_rows=len(vols))
    r = rec.data.setdefault("service", {})
    r.update(sessions=len(vols), kept=k, max_new_tokens=new, window_s=batcher.window_s)

    def one():
        t = time.perf_counter()
        batcher.ask(queries[0], max_new_tokens=new)
        return time.perf_counter() - t

    def together():
        barrier, done = threading.Barrier(len(vols) + 1), []

        def user(i):
            barrier.wait()
            done.append(batcher.ask(queries[i], max_new_tokens=new, tag=f"session{i}"))

        ts = [threading.Thread(target=user, args=(i,)) for i in range(len(vols))]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        return time.perf_counter() - t0, done

    one(), one(), together()                                   # warm-ups (graphs for batch 1 and 8)
    r["one_ask_s"] = statistics.median(one() for _ in range(repeats))
    runs = [together() for _ in range(max(3, repeats // 2))]
    r["eight_concurrent_s"] = statistics.median(t for t, _ in runs)
    r["ratio_eight_to_one"] = r["eight_concurrent_s"] / r["one_ask_s"]
    r["batch_sizes_seen"] = sorted({a[0].extra["batch"] for _, done in runs for a in done})
    t = time.perf_counter()
    for q in queries:                                          # what one lock per ask did: one after another
        pred.answer(q, max_new_tokens=new)
    r["eight_one_after_another_s"] = time.perf_counter() - t
    r["batcher_stats"] = dict(batcher.stats)
    r["decode_path"] = runs[-1][1][0][0].extra.get("decode")
    batcher.close()


def section_ours(args, rec: Record):
    smoke = args.smoke
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    frames = torch.rand(56, 1, 112, 112) if smoke else torch.rand(140, 1, 280, 280)   # smoke: 64 tokens
    tok = Tokenizer(DEMO)
    state = {}

    def setup():
        state["m"] = build(model_cfg(14, 1, smoke), device, dtype)
        state["x"] = Inputs(state["m"], frames, tok)
        rec.data["meta"]["llm_params"] = sum(p.numel() for p in state["m"].model.parameters())
        rec.data["meta"]["weights_gib"] = weights_bytes(state["m"]) / 2**30
    rec.part("build model", setup, 5)
    if "m" in state:
        photon_parts(args, rec, state["m"], state["x"], frames, tok)
        release(state.pop("m"))
        state.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
    rows = rec.data["rows"]
    b = rows.get("B Photon, no ITS", {})
    a = rows.get("A stock geometry", {})
    for r in rows.values():
        if r.get("prefill_s") and a.get("prefill_s"):
            r["prefill_speedup_vs_A"] = a["prefill_s"] / r["prefill_s"]
        if r.get("prefill_s") and b.get("prefill_s"):
            r["prefill_speedup_vs_B"] = b["prefill_s"] / r["prefill_s"]
    rec.write()


def photon_parts(args, rec: Record, m: PhotonModel, x: Inputs, frames: torch.Tensor, tok: Tokenizer):
    """Rows C, B, D, the service, the profile, row A (its own model) and the compiled variants, in order
    of importance (the section's time limit may cut the tail)."""
    smoke = args.smoke
    rep = 1 if smoke else args.repeats
    modes = ("eager",) if smoke else ("graph",)           # CPU: the eager step (no graphs)
    k = max(1, round(0.39 * x.V))                         # the paper's average: 390 of 1,000
    c390, top = f"C ITS top-{k}", Budget("top_k", k)
    c_modes = modes if smoke else ("graph", "eager")
    rec.part("C core (graph, eager decode)", lambda: core_row(rec, c390, m, x, top, True, rep, c_modes), 15)
    rec.part("decode step profile (graph)", lambda: ours_step_profiles(rec, m, x, top, modes), 4)
    if not smoke:                 # as served on CUDA: the compiled decode step and the compiled tower
        rec.part("compiled decode, batch 1 (warm-up included)",
                 lambda: _compiled(rec, c390, m, x, top, rep, 1), 40)
        rec.part("vision tower: compiled and captured", lambda: _compiled_vision(rec, c390, m, x, rep), 10)
    rec.part("fused vs separate projections", lambda: fused_vs_separate(rec, c390, m, x, top, rep), 10)
    rec.part("decode attention kernels", lambda: decode_kernel_ab(rec, c390, m, x, top, rep), 8)
    frames_list = [torch.rand(140, 1, 280, 280) for _ in range(8)]       # 8 sessions' CTs (1,000 tokens each)
    rec.part("service: 1 ask vs 8 concurrent",
             lambda: service(rec, m, frames_list, 1 if smoke else 5, NEW), 15)
    rec.part("B core", lambda: core_row(rec, "B Photon, no ITS", m, x, None, False, rep, modes=modes,
                                        detail=False), 8)
    rec.part("profile", lambda: profile(rec, m, x, top, args.profile), 6)
    small = dict(modes=modes, batches=(1,), detail=False)
    few = min(rep, 3)
    name = f"D FastV top-{k}"
    rec.part(name, lambda: core_row(rec, name, m, x, Budget("fastv", k), True, few, **small), 4)
    for r in (0.10,) if smoke else (0.10, 0.25, 0.50):
        n = f"C ITS {int(r * 100)}%"
        rec.part(n, lambda n=n, r=r: core_row(rec, n, m, x, Budget("ratio", r), True, few, **small), 4)

    def row_a():                                      # its own model; memory figures would count both
        device, dtype = m.lm_head.weight.device.type, m.lm_head.weight.dtype
        a = build(model_cfg(2, 3, smoke), device, dtype)
        try:
            xa = Inputs(a, frames, tok)
            core_row(rec, "A stock geometry", a, xa, None, False, few, memory=False, **small)
        finally:
            release(a)
            del a
            if device == "cuda":
                torch.cuda.empty_cache()
    rec.part("A stock geometry", row_a, 15)
    for name, use_its in (("B Photon, no ITS", False), (c390, True)):
        rec.part(f"train step {name}", lambda n=name, u=use_its: train_step(rec, n, m, x, u, few), 6)
    if smoke:
        rec.data["parts"]["compiled decode"] = {"status": "skipped: --smoke (test_engine compiles on CPU)"}
        return
    rec.part("compiled decode, batch 8 (warm-up included)",
             lambda: _compiled(rec, c390, m, x, top, rep, 8), 30)
    rec.part("decode step profile (compiled)", lambda: ours_step_profiles(rec, m, x, top, ("compile",)), 5)
    rec.part("reduce-overhead decode (warm-up included)",
             lambda: _reduce_overhead(rec, c390, m, x, top, rep), 40)


def _compiled(rec, name, m, x, budget, rep, batch: int):
    """The compiled step (each layer compiled once for all, then the step captured): decode tok/s at
    ``batch`` (its first call compiles; batch 8 after 1 compiles a graph with a dynamic batch) and, at
    batch 1, the answer latency."""
    r = rec.row(name)
    t = time.perf_counter()
    answer_fn(m, x, budget, True, NEW + 1, batch, "compile")()
    sync()
    r[f"compile_warmup_s_b{batch}"] = time.perf_counter() - t
    rate = decode_rate(m, x, budget, True, batch, "compile", max(3, rep // 2))
    r.update({kk + "_compile": v for kk, v in rate.items()})
    rec.write()
    if batch == 1:
        r["answer_cached_features_s_compile"] = timed(answer_fn(m, x, budget, True, NEW, 1, "compile"), rep)
        ans = answer_fn(m, x, budget, True, NEW, 1, "compile", vision_for(m, "auto"))
        r["answer_s_compile"] = timed(ans, rep)
        # the graph-mode rate again, right after: does the order (warm clocks) matter?
        r["decode_tok_s_b1_graph_again"] = decode_rate(m, x, budget, True, 1, "graph", 3)["decode_tok_s_b1"]


def _compiled_vision(rec, name, m, x, rep):
    r = rec.row(name)
    enc = vision_for(m, "compile")
    t = time.perf_counter()
    enc(x.pv, x.grid)
    sync()
    r["vision_compile_warmup_s"] = time.perf_counter() - t
    with torch.inference_mode():
        r["vision_compile_s"] = timed(lambda: enc(x.pv, x.grid), rep)
        ref = m.encode_volume(x.pv, x.grid).float()
        err = (enc(x.pv, x.grid).float() - ref).abs().max() / ref.abs().max()
        r["vision_compile_rel_err_vs_eager"] = float(err)
    r["vision_compile_path"] = enc.path
    r["prefill_s_vision_compiled"] = timed(prefill_fn(m, x, Budget("top_k", r["kept"]), True, enc), rep)
    graph = vision_for(m, "graph" if x.dev.type == "cuda" else "eager")      # the other mode, same run
    with torch.inference_mode():
        r["vision_graph_s"] = timed(lambda: graph(x.pv, x.grid), rep)
    r["vision_graph_path"] = graph.path
    r["prefill_s_vision_graph"] = timed(prefill_fn(m, x, Budget("top_k", r["kept"]), True, graph), rep)


def _reduce_overhead(rec, name, m, x, budget, rep):
    r = rec.row(name)
    t = time.perf_counter()
    answer_fn(m, x, budget, True, NEW + 1, 1, "reduce-overhead")()
    sync()
    r["reduce_overhead_warmup_s"] = time.perf_counter() - t
    rate = decode_rate(m, x, budget, True, 1, "reduce-overhead", max(3, rep // 2))
    r.update({kk + "_reduce_overhead": v for kk, v in rate.items()})


# ---------------------------------------------------------------------- the peer
def section_peer(args, rec: Record):
    """Stock transformers Qwen2.5-VL (SDPA) at the same shape and prompt, random bf16 weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    smoke = args.smoke
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    rep = 1 if smoke else args.repeats
    cfg = model_cfg(14, 1, smoke)
    rec.data["meta"]["peer"] = "transformers Qwen2_5_VLForConditionalGeneration, attn_implementation=sdpa"
    state = {}

    def setup():
        hf = Qwen2_5_VLConfig.from_dict(cfg.to_hf_dict())
        torch.manual_seed(0)
        with torch.device(device):
            state["m"] = Qwen2_5_VLForConditionalGeneration._from_config(hf, dtype=dtype,
                                                                         attn_implementation="sdpa").eval()
        torch.manual_seed(0)
        frames = torch.rand(56, 1, 112, 112) if smoke else torch.rand(140, 1, 280, 280)   # smoke: 64 tokens
        pv, grid = patchify(frames, temporal_patch=14)
        state["pv"], state["grid"] = pv.to(device, dtype), grid.to(device)
        n = int(grid.prod()) // 4
        ids = torch.tensor([Tokenizer(DEMO).prompt(QUESTION, n)[0]], device=device)
        state["kw"] = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values_videos=state["pv"], video_grid_thw=state["grid"])
        rec.data["meta"]["peer_params"] = sum(p.numel() for p in state["m"].parameters())
    rec.part("peer: build", setup, 5)
    if "m" not in state:
        return
    m, kw = state["m"], state["kw"]
    r = rec.row("stock transformers, Photon geometry (no drop)")
    r["visual_tokens"] = int(state["grid"].prod()) // 4

    def gen(n, **extra):
        def run():
            with torch.inference_mode():
                out = m.generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)
                out.cpu()
        return run

    def eager():
        with torch.inference_mode():
            r["vision_s"] = timed(lambda: m.model.get_video_features(state["pv"], state["grid"]), rep)
            r["prefill_s"] = timed(lambda: m(**kw, logits_to_keep=1), rep)
        peak_reset()
        r["answer_s_eager"] = timed(gen(NEW), max(3, rep // 2))
        r["peak_mem_gib_b1"] = peak_gib()
        t33, t1 = timed(gen(NEW + 1), max(3, rep // 2)), timed(gen(1), max(3, rep // 2))
        r["decode_tok_s_b1_eager"] = NEW / max(t33 - t1, 1e-9)
    rec.part("peer: eager", eager, 15)

    def static_compiled():
        t = time.perf_counter()
        gen(NEW + 1, cache_implementation="static")()               # generate compiles the decode step
        sync()
        r["static_compile_warmup_s"] = time.perf_counter() - t
        t33 = timed(gen(NEW + 1, cache_implementation="static"), max(3, rep // 2))
        t1 = timed(gen(1, cache_implementation="static"), max(3, rep // 2))
        r["decode_tok_s_b1_static_compile"] = NEW / max(t33 - t1, 1e-9)
        r["answer_s_static_compile"] = t33 - (t33 - t1) / NEW        # 33 tokens less one decode step
        r["static_compile_note"] = ("generate(cache_implementation='static') compiles the decode forward on "
                                    "CUDA (transformers' auto-compile); on CPU it runs uncompiled")
    rec.part("peer: static cache + torch.compile", static_compiled, 30)

    def peer_steps():
        prof = rec.data.setdefault("decode_step_profile", {})
        extra = {} if smoke else dict(cache_implementation="static")
        prof["peer static + compile" if not smoke else "peer eager"] = step_profile(gen(9, **extra),
                                                                                   gen(1, **extra), 8)
    rec.part("peer: decode step profile", peer_steps, 5)


# ---------------------------------------------------------------------- merge and main
def merge(paths: list[Path], out: Path | None) -> dict:
    merged: dict = {"meta": {}, "parts": {}, "rows": {}, "sections": []}
    for p in paths:
        if not p.is_file():
            merged["sections"].append({"file": p.name, "status": "missing (the section did not start)"})
            continue
        d = json.loads(p.read_text())
        merged["sections"].append({"file": p.name, "status": "ok"})
        merged["meta"].update(d.get("meta", {}))
        merged["parts"].update({f"{p.stem}: {k}": v for k, v in d.get("parts", {}).items()})
        merged["rows"].update(d.get("rows", {}))
        for k in ("service", "profile"):
            if k in d:
                merged[k] = d[k]
        merged.setdefault("decode_step_profile", {}).update(d.get("decode_step_profile", {}))
    c = next((v for k, v in merged["rows"].items() if k.startswith("C ITS top-")), {})
    peer = merged["rows"].get("stock transformers, Photon geometry (no drop)", {})
    t = merged["targets"] = {}
    if c.get("decode_tok_s_b1"):
        best = max(c.get(k) or 0 for k in ("decode_tok_s_b1", "decode_tok_s_b1_compile",
                                            "decode_tok_s_b1_reduce_overhead"))
        t["decode_b1_tok_s (≥ 400)"] = best
        if peer.get("decode_tok_s_b1_static_compile"):
            t["decode_b1_vs_stock_compiled (≥ 2.4)"] = best / peer["decode_tok_s_b1_static_compile"]
    if c.get("prefill_s"):
        t["prefill_s (≤ 0.025)"] = min(c.get(k) or 1e9 for k in ("prefill_s", "prefill_s_vision_compiled"))
    if c.get("answer_s"):
        t["answer_s (≤ 0.100)"] = min(c.get(k) or 1e9 for k in ("answer_s", "answer_s_compile"))
    if merged.get("service", {}).get("ratio_eight_to_one"):
        t["eight_concurrent_over_one (≤ 1.5)"] = merged["service"]["ratio_eight_to_one"]
    if c.get("peak_over_weights_gib_b1") is not None:
        t["peak_over_weights_gib (≤ 1)"] = c["peak_over_weights_gib_b1"]
    if out is not None:
        out.write_text(json.dumps(merged, indent=1, default=str))
    return merged


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        print(json.dumps(merge(args.merge, args.json)["targets"], indent=1))
        return
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --smoke)")
    if args.smoke:
        global SMOKE, NEW
        SMOKE, NEW = True, 4
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    rec = Record(args.json, args.budget_s, meta("cpu" if args.smoke else "cuda", args.smoke))
    if args.section in ("ours", "all"):
        section_ours(args, rec)
    if args.section in ("peer", "all"):
        section_peer(args, rec)
    rec.data["meta"]["wall_s"] = round(time.perf_counter() - rec.t0, 1)
    rec.write()
    print(json.dumps({"parts": {k: v["status"] for k, v in rec.data["parts"].items()}}, indent=1))


if __name__ == "__main__":
    main()
