"""An official checkpoint on a CPU: the official 3B shape, random fp32 weights (as the Predictor runs a
checkpoint on a CPU), one 140 × 280 × 280 volume (1,000 visual tokens). What a user without a GPU waits
for: the vision tower (once per scan, at load), an answer's prefill on the cached features (ITS keeping
390, and all 1,000 tokens), and each further token.

    PYTHONPATH=. python bench/cpu_official.py [--json OUT.json] [--repeats 1]
    PYTHONPATH=. python bench/cpu_official.py --smoke         # the tests' tiny shape: the code runs

Needs ≈ 17 GiB of memory at the official shape. Medians of ``--repeats`` runs after no warm-up (the
first run is what a user meets); it measures and prints JSON, it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_bench as gb  # noqa: E402  (the official shape and its random weights, as the GPU benchmark's)

from photon_core.inference.prompt import Tokenizer  # noqa: E402
from photon_core.model.budget import Budget  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="the tests' tiny shape and a small volume")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out = {"meta": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "dtype": "float32", "smoke": args.smoke}}
    t = time.perf_counter()
    m = gb.build(gb.model_cfg(14, 1, args.smoke), "cpu", torch.float32)
    out["build_s"] = time.perf_counter() - t
    frames = torch.rand(56, 1, 112, 112) if args.smoke else torch.rand(140, 1, 280, 280)
    t = time.perf_counter()
    x = gb.Inputs(m, frames, Tokenizer(gb.DEMO))          # encodes the volume once
    out["vision_s"] = time.perf_counter() - t
    out["visual_tokens"] = x.V
    keep = Budget.parse("25" if args.smoke else "390")
    one = timed(gb.answer_fn(m, x, keep, True, 1), args.repeats)
    nine = timed(gb.answer_fn(m, x, keep, True, 9), args.repeats)
    out[f"prefill_its_{keep.value:g}_s"] = one                    # the first token: the prefill chooses it
    out["decode_s_per_token"] = (nine - one) / 8
    out["answer_32_tokens_s"] = one + 31 * out["decode_s_per_token"]
    out["prefill_all_tokens_s"] = timed(gb.answer_fn(m, x, None, False, 1), args.repeats)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return out


if __name__ == "__main__":
    main()
