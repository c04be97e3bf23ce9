"""Building blocks shared by the vision tower and the decoder: RMSNorm, rotary embedding, activations,
the gated MLP, and the inference-only fused forms of several matmuls (`Fusable`).

Each is written for few kernel launches (a CUDA-graph decode step pays ~2 µs per kernel, 36 layers deep)
with the reference's rounding unchanged: `RMSNorm` normalises in fp32 and rounds once to the input dtype
before the weight, as transformers' Qwen2RMSNorm; `rope` gives bit for bit ``x·cos + rotate_half(x)·sin``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # == weight · (x.float() · rsqrt(mean(x²) + eps)).to(x.dtype): rms_norm computes in fp32 and rounds
        # once (one fused kernel on CUDA instead of six); ``.to`` keeps the dtype under autocast.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps).to(x.dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sin table for `rope`: its first half negated (the sign rotate_half puts on x's second half)."""
    h = sin.shape[-1] // 2
    return torch.cat((-sin[..., :h], sin[..., h:]), -1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, bit for bit, as x·cos + roll(x, d/2)·sin_signed (`signed_sin`):
    4 kernels instead of 5 (negation is exact, so the products and the sum round as the reference's)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed



def activation(name: str):
    return {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
            "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}[name]


class Fusable(nn.Module):
    """A module with an inference-only fused form (`fuse`): its Linear layers' weights are put into one
    larger tensor and the layers' parameters become views of it, so nothing is copied and the official
    parameter names, values and state_dict stay as they were (loading writes through the views; saving
    copies a view out). Training and anything with gradients takes the separate layers (the fused
    tensor is not a parameter). Moving or casting the module (``.to``, ``.half``, …) replaces the
    parameters, so it unfuses; fuse again after."""

    _fused: tuple | None = None       # the fused tensors, built once (the parameters are views of them)
    _active: bool = False

    def fuse(self) -> None:
        """Run fused. The fused tensors are built on the first call and kept: a CUDA graph captured on
        either path keeps reading live memory whatever is switched later."""
        if self._fused is None:
            self._fused = self._build()
            if self._fused[0].is_cuda:      # weights, not inputs: compiled CUDA graphs must not copy them
                for t in self._fused:
                    if t is not None:
                        torch._dynamo.mark_static_address(t, guard=False)
        self._active = True

    def _build(self) -> tuple:
        raise NotImplementedError

    def unfuse(self) -> None:
        """Back to the separate layers (their parameters stay views of the fused tensors: same values)."""
        self._active = False

    def _apply(self, fn, recurse=True):
        self._fused, self._active = None, False        # the parameters are being replaced
        return super()._apply(fn, recurse)

    def fused_ready(self) -> bool:
        return self._active and not torch.is_grad_enabled()


def _repoint(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Make ``lin``'s parameters views of the given (equal-valued) tensors."""
    lin.weight.data = weight
    if bias is not None:
        lin.bias.data = bias


class FusedLinears(Fusable):
    """Linear layers ``FUSED`` (attribute names) that read the same input, fused end to end into ONE
    matmul (`fused_linear`): one GEMV per decode step instead of several."""

    FUSED: tuple[str, ...] = ()

    def _build(self) -> tuple:
        lins = [getattr(self, n) for n in self.FUSED]
        sizes = [lin.out_features for lin in lins]
        with torch.no_grad():
            w = torch.cat([lin.weight for lin in lins])
            b = torch.cat([lin.bias for lin in lins]) if lins[0].bias is not None else None
            biases = b.split(sizes) if b is not None else [None] * len(lins)
            for lin, wi, bi in zip(lins, w.split(sizes), biases):
                _repoint(lin, wi, bi)
        return w, b

    def fused_linear(self, x: torch.Tensor) -> torch.Tensor | None:
        """All the fused layers' outputs side by side (…, Σ out_features), or None (not fused, or a
        gradient is wanted)."""
        return F.linear(x, *self._fused) if self.fused_ready() else None


class GatedMLP(Fusable):
    """down(act(gate(x)) · up(x)) — the decoder's MLP (no biases) and the vision tower's (biases).

    Fused: gate and up are one matmul, and the hidden width is zero-padded to a multiple of ``PAD`` so
    every matmul's rows stay 16-byte aligned (the 3B tower's 3,420 is not: cuBLAS then falls back to slow
    2-element-aligned kernels). The padded rows of gate/up and columns of down are zero, so the padded
    hidden units are act(0)·0 = 0 and add nothing."""

    PAD = 8

    def __init__(self, dim: int, hidden: int, act: str, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def _build(self) -> tuple:
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        n = g.out_features
        m = -(-n // self.PAD) * self.PAD
        with torch.no_grad():
            w = g.weight.new_zeros(2 * m, g.in_features)
            w[:n], w[m:m + n] = g.weight, u.weight
            b = None
            if g.bias is not None:
                b = g.bias.new_zeros(2 * m)
                b[:n], b[m:m + n] = g.bias, u.bias
            wd = d.weight.new_zeros(d.out_features, m)
            wd[:, :n] = d.weight
            _repoint(g, w[:n], None if b is None else b[:n])
            _repoint(u, w[m:m + n], None if b is None else b[m:m + n])
            _repoint(d, wd[:, :n], None)
        return w, b, wd

    def forward(self, x):
        if self.fused_ready():
            w, b, wd = self._fused
            gate, up = F.linear(x, w, b).chunk(2, -1)
            return F.linear(self.act(gate).mul_(up), wd, self.down_proj.bias)     # no gradient here: in place
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
