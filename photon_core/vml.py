"""A guard against a oneMKL race that makes PyTorch's CPU math silently inaccurate, now and then.

ATen sends contiguous float unary ops (cos, sin, exp, log, sqrt, tanh, erf, …) to oneMKL's vector math
(VML), each intra-op thread calling it on its chunk with high accuracy asked for. oneMKL 2024.2 (the one
inside the PyTorch CPU wheels) settles each VML function's kernel on its first call; when that first call
runs on several threads at once, one thread may run the low-accuracy kernel for its whole chunk
(pytorch/pytorch#188792; the fix proposed upstream, #188791, is this same warm-up). Seen here: the vision
tower's rotary cos table, the first sizable cos of a process, came out with cos(0.1) = 0.99487 instead of
0.99500 (1.5e-4) in about 1 test run of 30, so the vision features were off by 1e-4 and the
reference-parity tests failed. Measured on the 2-core CPU box (`scripts/vml_race.py`: a cos of 7,680
values on 2 threads as a fresh process's first sizable op): 6 of 180 processes at low accuracy bare, 0 of
140 after a warm-up.

`warm_up` calls each of those functions once, on one element (one thread), in float32 and float64, so
that every kernel is settled before anything runs in parallel; `photon_core.model` and the preparation
call it on import. It costs a few milliseconds, once a process.
"""
from __future__ import annotations

import torch

# the unary ops ATen hands to oneMKL's VML (aten/src/ATen/cpu/vml.h, IMPLEMENT_VML_MKL), by their torch names
VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin",
           "sqrt", "tan", "tanh", "trunc")
_done = False


def warm_up() -> None:
    """Each VML-routed unary op once on a one-element tensor of each float dtype (idempotent)."""
    global _done
    if _done:
        return
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            x = torch.full((1,), 0.5, dtype=dtype)
            for name in VML_OPS:
                getattr(torch, name)(x)
    _done = True
