"""Attention kernels, chosen in one place.

* `attend` — decoder attention on a padded batch (B, H, Lq, d) × (B, Hkv, Lk, d) with a boolean
  "may attend" mask; PyTorch SDPA (GQA via ``enable_gqa``), on CPU and GPU.
* `block_attention` — non-causal attention restricted to consecutive blocks given by cumulative
  lengths (the vision tower's windows and per-slice full attention). On CUDA it makes ONE call of
  flash-attn's varlen kernel when the package is installed, else torch's own varlen FlashAttention
  (`torch.nn.attention.varlen.varlen_attn`) when present; elsewhere the blocks are padded into one
  batched SDPA call (equal-length blocks need no mask).

`backend_name()` says which path runs, for benchmarks and the app's device line.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional, GPU servers only
    from flash_attn import flash_attn_varlen_func as _flash_varlen  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    _flash_varlen = None

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen  # type: ignore
except Exception:  # pragma: no cover - older torch
    _torch_varlen = None


def backend_name(device: torch.device | str) -> str:
    if torch.device(device).type == "cuda":
        if _flash_varlen is not None:
            return "flash-attn varlen"
        if _torch_varlen is not None:
            return "torch varlen_attn (FlashAttention)"
    return "PyTorch SDPA"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
           causal: bool = False) -> torch.Tensor:
    """q (B, H, Lq, d), k/v (B, Hkv, Lk, d), allowed (B, 1, Lq, Lk) bool or None → (B, H, Lq, d)."""
    gqa = q.shape[1] != k.shape[1]
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """q/k/v (N, H, d) packed; attention only inside each block [cu[i], cu[i+1]) → (N, H, d)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if q.is_cuda and (_flash_varlen is not None or _torch_varlen is not None):
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        m = max(lengths)
        if _flash_varlen is not None:
            return _flash_varlen(q, k, v, cu, cu, m, m)
        return _torch_varlen(q, k, v, cu, cu, m, m)
    N, H, d = q.shape
    if len(set(lengths)) == 1:  # equal blocks: a plain batch
        n = lengths[0]
        qb, kb, vb = (t.reshape(-1, n, H, d).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(N, H, d)
    m = max(lengths)
    starts = cu_seqlens[:-1].to(q.device)
    lens = torch.tensor(lengths, device=q.device)
    pos = torch.arange(m, device=q.device)
    valid = pos[None] < lens[:, None]                                   # (nb, m)
    src = (starts[:, None] + pos[None]).clamp(max=N - 1)
    qb, kb, vb = (t[src].transpose(1, 2) for t in (q, k, v))            # (nb, H, m, d)
    mask = valid[:, None, None, :] | ~valid[:, None, :, None]           # padded queries see all (unused)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)    # (nb, H, m, d)
    return out.transpose(1, 2)[valid]                                   # (N, H, d) in block order

