"""Kernels a decode step and a prefill launch, counted on the CPU: what a CUDA-graph step pays per kernel
(~2 µs, 36 layers deep) and what a host-bound prefill pays per launch, before any GPU run.

    PYTHONPATH=. python bench/cpu_ops.py [--dtype bfloat16] [--separate]

Counts the aten operations dispatched (views, and casts that return their input, are not kernels and are
not counted) for one eager decode step and one prefill with ITS of the demo-sized model (random weights),
in the dtype given (bf16: the casts a GPU run does), fused as the Predictor runs it unless ``--separate``.
Prints JSON: totals, per decoder layer, and the operations by count.
"""
from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {"view", "transpose", "unsqueeze", "expand", "select", "slice", "reshape", "permute", "t", "alias",
         "split", "chunk", "unbind", "_unsafe_view", "as_strided", "detach", "squeeze", "flatten",
         "split_with_sizes", "_reshape_alias"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEWS and not (args and out is args[0] and name in ("to", "contiguous")):
            self.ops[name] += 1
        return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--separate", action="store_true", help="the projections unfused")
    args = ap.parse_args(argv)
    from photon_core.inference.engine import DecodeEngine
    from photon_core.model.config import preset_config
    from photon_core.model.photon import PhotonModel

    torch.manual_seed(0)
    cfg = preset_config("demo")
    dtype = getattr(torch, args.dtype)
    m = PhotonModel(cfg).eval()
    m.init_weights()
    m = m.to(dtype)
    m.reset_buffers()
    fused = hasattr(m, "fuse_projections") and not args.separate
    if fused:
        m.fuse_projections()
    V = 250
    ids = torch.tensor([[1, 2, 3, cfg.vision_start_token_id] + [cfg.video_token_id] * V
                        + [cfg.vision_end_token_id] + list(range(10, 30)) + [cfg.eos_token_id, 5, 6]])
    grid = torch.tensor([[10, 10, 10]])                   # 10 × 10 × 10 patches → 250 visual tokens
    feats = torch.randn(V, cfg.hidden_size).to(dtype)
    eng = DecodeEngine(m, "eager")
    kw = dict(features=feats, grid_thw=grid, use_cache=True, last_logits=True, budget="auto")
    with torch.inference_mode():
        eng.decode(m(ids, **kw), ids, None, 3)
        st = next(iter(eng.states.values()))
        step, prefill = Count(), Count()
        with step:
            eng._eager_step(st)
        with prefill:
            m(ids, **kw)
    n = cfg.num_hidden_layers
    total = sum(step.ops.values())
    matmuls = step.ops["linear"] + step.ops["matmul"]
    print(json.dumps(dict(dtype=args.dtype, fused=fused, layers=n, decode_step_ops=total,
                          decode_step_ops_per_layer=round(total / n, 1),
                          decode_step_matmuls_per_layer=round(matmuls / n, 1),
                          prefill_ops=sum(prefill.ops.values()), decode_step=dict(step.ops.most_common())),
                     indent=1))


if __name__ == "__main__":
    main()
