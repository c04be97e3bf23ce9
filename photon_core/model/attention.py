"""Attention kernels, chosen in one place.

* `Packing` + `causal_attention` — the decoder's causal attention over a (left-padded) batch
  (B, H, L, d) × (B, Hkv, L, d). With ``varlen`` (inference on CUDA) the real tokens of every row are
  packed and ONE varlen FlashAttention call runs over explicit cumulative lengths (flash-attn's kernel
  when the package is installed, else torch's own ``varlen_attn``); otherwise PyTorch SDPA with a
  boolean "may attend" mask (CPU, training). Packing is derived from the validity mask, never from
  position ids: after the ITS drop the kept tokens keep gapped original positions.
* `decode_attention` — one new query per row against a static KV cache (B, Hkv, S, d) with a (B, S)
  validity mask, grouped by KV head (no repeat), fixed shapes, so the step can be captured as a CUDA
  graph or compiled; the same code runs on CPU. Two kernels (`set_decode_kernel`): ``matmul`` (two
  matmuls and an fp32 softmax, 7 kernels a layer) and ``sdpa`` (one fused SDPA call, the H/Hkv query
  heads of a KV head as its query rows); which is faster on a GPU is for bench/gpu_bench.py to say.
* `block_attention` — non-causal attention restricted to consecutive blocks given by cumulative
  lengths (the vision tower's windows and per-slice full attention): one varlen call on CUDA,
  else the blocks padded into one batched SDPA call (equal-length blocks need no mask).

`backend_name()` says which path runs, for benchmarks and the app's device line.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

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

# torch 2.11: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)),
# causal = window_size (-1, 0); a release with an ``is_causal`` keyword is accepted too.
_TORCH_VARLEN_CAUSAL = {}
if _torch_varlen is not None:
    try:
        _params = inspect.signature(_torch_varlen).parameters
    except (TypeError, ValueError):  # pragma: no cover
        _params = {}
    _TORCH_VARLEN_CAUSAL = {"is_causal": True} if "is_causal" in _params else {"window_size": (-1, 0)}


def varlen_available(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """A varlen FlashAttention kernel for this device and dtype (CUDA, fp16/bf16 only)."""
    return (torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and (_flash_varlen is not None or _torch_varlen is not None))


def backend_name(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str:
    if varlen_available(device, dtype):
        return "flash-attn varlen" if _flash_varlen is not None else "torch varlen_attn (FlashAttention)"
    return "PyTorch SDPA"


def _varlen(q, k, v, cu: torch.Tensor, max_len: int, causal: bool) -> torch.Tensor:
    """q (N, H, d), k/v (N, Hkv, d) packed, cu (n+1,) int32 → (N, H, d). One kernel call."""
    if _flash_varlen is not None:
        return _flash_varlen(q, k, v, cu, cu, max_len, max_len, causal=causal)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:                               # torch's kernel has no GQA switch in 2.11: repeat KV heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return _torch_varlen(q, k, v, cu, cu, max_len, max_len, **(_TORCH_VARLEN_CAUSAL if causal else {}))


# ---------------------------------------------------------------------- decoder prefill
@dataclass
class Packing:
    """Where the real tokens of a padded batch (B, L) are, in the form the chosen kernel needs.

    varlen: ``index`` (n,) flat positions b·L + l of the real tokens (None: every slot is packed in
    place), ``cu_seqlens`` int32 (B+1 from `build`, 2B+1 from `segments`) and ``max_len``. SDPA:
    ``allowed`` (B, 1, L, L) causal & valid keys, or None with ``plain`` (no padding: SDPA's own causal
    mask)."""

    key_valid: torch.Tensor
    varlen: bool
    plain: bool
    allowed: torch.Tensor | None = None
    index: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_len: int = 0

    @classmethod
    def build(cls, key_valid: torch.Tensor, varlen: bool, counts: list[int] | None = None) -> Packing:
        """``counts``: the real tokens of each row, when the caller has them on the host — then nothing
        here reads the device (a read would stall a GPU prefill until the queued layers finish)."""
        B, L = key_valid.shape
        if counts is None:
            counts = key_valid.sum(-1).tolist()
        plain = all(n == L for n in counts)
        if not varlen:
            return cls(key_valid, False, plain, None if plain else causal_mask(key_valid, L))
        cu = F.pad(key_valid.sum(-1).cumsum(0), (1, 0)).to(torch.int32)
        index = None
        if not plain:       # flat positions of the real tokens, in order: a stable sort puts them first
            index = torch.argsort((~key_valid).flatten().to(torch.uint8), stable=True)[:sum(counts)]
        return cls(key_valid, True, plain, index=index, cu_seqlens=cu, max_len=max(counts))

    @classmethod
    def segments(cls, key_valid: torch.Tensor) -> Packing:
        """Varlen packing of a left-padded batch with every slot in place: row b is two segments,
        [its padding, its real tokens], so the kernel runs over all B·L slots (no gather, no scatter)
        and the padding attends only to padding (finite, never seen by a real token). Reads nothing from
        the device and has fixed shapes: what a captured prefill graph runs (`engine.PrefillEngine`).
        Each row's real tokens must end the row; a row without padding gives an empty segment."""
        B, L = key_valid.shape
        real = key_valid.sum(-1)
        cu = F.pad(torch.stack((L - real, real), -1).flatten().cumsum(0), (1, 0)).to(torch.int32)
        return cls(key_valid, True, False, cu_seqlens=cu, max_len=L)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: Packing) -> torch.Tensor:
    """q (B, H, L, d), k/v (B, Hkv, L, d) → (B, H, L, d); padded query slots give 0 (varlen) or attend
    to themselves (SDPA): either way no real token ever sees a padded key."""
    if not pk.varlen:
        return attend(q, k, v, pk.allowed, causal=pk.plain)
    B, H, L, d = q.shape

    def packed(t):
        t = t.transpose(1, 2).reshape(B * L, t.shape[1], d)                   # (B·L, h, d)
        return t if pk.index is None else t.index_select(0, pk.index)          # (n, h, d)

    o = _varlen(packed(q), packed(k), packed(v), pk.cu_seqlens, pk.max_len, causal=True)
    if pk.index is not None:
        o = q.new_zeros(B * L, H, d).index_copy_(0, pk.index, o)
    return o.view(B, L, H, d).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
           causal: bool = False) -> torch.Tensor:
    """SDPA: q (B, H, Lq, d), k/v (B, Hkv, Lk, d), allowed (B, 1, Lq, Lk) bool or None → (B, H, Lq, d)."""
    gqa = q.shape[1] != k.shape[1]
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)


def causal_mask(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, Lk) valid keys → (B, 1, q_len, Lk) causal mask aligned to the end; padded rows see themselves."""
    B, Lk = key_valid.shape
    qi = torch.arange(Lk - q_len, Lk, device=key_valid.device)[:, None]
    kj = torch.arange(Lk, device=key_valid.device)[None]
    causal = kj <= qi                                                          # (q_len, Lk)
    allowed = causal[None] & key_valid[:, None, :]
    allowed = allowed | (kj == qi)[None]                                        # never an empty row
    return allowed[:, None]


# ---------------------------------------------------------------------- decode
DECODE_KERNELS = ("matmul", "sdpa")
_decode_kernel = "matmul"


def set_decode_kernel(name: str) -> None:
    """Choose `decode_attention`'s kernel for steps built from now on (captured graphs and compiled steps
    keep theirs: `inference.engine.release` the model to rebuild them)."""
    global _decode_kernel
    if name not in DECODE_KERNELS:
        raise ValueError(f"decode kernel must be one of {DECODE_KERNELS}, not {name!r}")
    _decode_kernel = name


def decode_kernel() -> str:
    return _decode_kernel


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     allowed: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, d), static cache k/v (B, Hkv, S, d), allowed (B, S) bool → (B, H, 1, d).

    Each KV head serves its H/Hkv query heads without a repeat (they are its r query rows). ``matmul``:
    scores and softmax in fp32; ``sdpa``: PyTorch's fused kernel (fp32 accumulation inside)."""
    B, H, _, d = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, d)                                         # (B, Hkv, r, d)
    if _decode_kernel == "sdpa":
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=allowed[:, None, None, :])
        return o.reshape(B, H, 1, d)
    s = torch.matmul(qg, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(d))     # (B, Hkv, r, S)
    s = torch.where(allowed[:, None, None, :], s, float("-inf"))              # one kernel, no negation
    p = torch.softmax(s, -1).to(v.dtype)
    return torch.matmul(p, v).reshape(B, H, 1, d)


# ---------------------------------------------------------------------- vision tower
def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    max_len: int | None = None) -> torch.Tensor:
    """q/k/v (N, H, d) packed; attention only inside each block [cu[i], cu[i+1]) → (N, H, d).

    ``max_len`` (the longest block) spares the CUDA path a device-to-host read."""
    if varlen_available(q.device, q.dtype):
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        return _varlen(q, k, v, cu, max_len, causal=False)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
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
