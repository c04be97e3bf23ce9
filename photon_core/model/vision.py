"""The Qwen2.5-VL vision tower with a 3-D patch embed: (P, C) patch rows → (V, D) LLM tokens.

P patches (4,000 for a CT), C = in_chans·14·14·14 values per patch, Dv the tower's width, V = P/4
visual tokens after the 2×2 merger, D the LLM's hidden size. Windowed attention runs inside windows
of merge units; the blocks in ``fullatt_block_indexes`` attend within each temporal slice.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from photon_core.model.attention import block_attention
from photon_core.model.config import VisionConfig
from photon_core.model.layers import GatedMLP, RMSNorm, rope, signed_sin


class PatchEmbed3D(nn.Module):
    """(P, C) patch rows → (P, Dv). A Conv3d whose kernel is the whole patch (the official parameter), run
    as the one matmul it is: the same products and sums as the convolution (cuDNN ran it as an implicit
    3-D convolution GEMM, 1.5 ms of the H200 prefill, for a 4,000 × 2,744 × 1,280 matmul)."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        k = (v.temporal_patch_size, v.patch_size, v.patch_size)
        self.proj = nn.Conv3d(v.in_chans, v.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(x.to(w.dtype).reshape(-1, w[0].numel()), w.view(w.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cu_seqlens, cos, sin, max_len: int | None = None):
        """x (P, Dv); cos and the signed sin (`layers.signed_sin`) (P, d) fp32, in the window order."""
        P = x.shape[0]
        qkv = self.qkv(x).reshape(P, 3, self.heads, -1)
        c, s = cos[:, None, None], sin[:, None, None]
        qk = rope(qkv[:, :2].float(), c, s).to(qkv.dtype)                  # q and k in one pass, in fp32
        q, k = qk.unbind(1)                                                 # (P, H, d)
        out = block_attention(q, k, qkv[:, 2], cu_seqlens, max_len)
        return self.proj(out.reshape(P, -1))


class VisionBlock(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(v.hidden_size, v.rms_norm_eps)
        self.norm2 = RMSNorm(v.hidden_size, v.rms_norm_eps)
        self.attn = VisionAttention(v.hidden_size, v.num_heads)
        self.mlp = GatedMLP(v.hidden_size, v.intermediate_size, v.hidden_act, bias=True)

    def forward(self, x, cu_seqlens, cos, sin, max_len: int | None = None):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin, max_len)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.unit = v.spatial_merge_size ** 2
        hidden = v.hidden_size * self.unit
        self.ln_q = RMSNorm(v.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, v.out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


class VisionTower(nn.Module):
    """Qwen2.5-VL vision transformer with a 3-D patch embed: (P, C) patches → (V, D) LLM tokens."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.cfg = v
        self.vision_patch_embed = PatchEmbed3D(v)
        self.blocks = nn.ModuleList(VisionBlock(v) for _ in range(v.depth))
        self.merger = PatchMerger(v)
        self.register_buffer("inv_freq", self.frequencies(v), persistent=False)
        self._layouts: dict = {}          # grid → `layout` (window order, rotary tables, block lengths)

    @staticmethod
    def frequencies(v: VisionConfig) -> torch.Tensor:
        rot_dim = v.hidden_size // v.num_heads // 2
        return 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float, device="cpu") / rot_dim))

    def rot_pos_emb(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(P, d/2) rotary angles from each patch's (h, w) position, in merged-window row order."""
        m = self.cfg.spatial_merge_size
        pos = []
        for t, h, w in grid_thw.tolist():
            hpos = (torch.arange(h)[:, None].expand(h, w)
                    .reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten())
            wpos = (torch.arange(w)[None, :].expand(h, w)
                    .reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten())
            pos.append(torch.stack([hpos, wpos], -1).repeat(t, 1))
        pos = torch.cat(pos).to(self.inv_freq.device)
        n = int(grid_thw[:, 1:].max())
        table = torch.outer(torch.arange(n, device=self.inv_freq.device, dtype=torch.float), self.inv_freq)
        return table[pos].flatten(1)

    def window_index(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Permutation of merge units into attention windows, and window cu_seqlens (in patches)."""
        m = self.cfg.spatial_merge_size
        unit = m * m
        ws = self.cfg.window_size // m // self.cfg.patch_size      # window side in merge units
        index, cu, offset = [], [0], 0
        for t, h, w in grid_thw.tolist():
            gh, gw = h // m, w // m
            idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
            ph, pw = ws - gh % ws, ws - gw % ws
            nh, nw = (gh + ph) // ws, (gw + pw) // ws
            padded = F.pad(idx, (0, pw, 0, ph), value=-100)
            padded = padded.reshape(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, ws, ws)
            seqlens = (padded != -100).sum([2, 3]).reshape(-1)
            flat = padded.reshape(-1)
            index.append(flat[flat != -100] + offset)
            cu.extend((seqlens.cumsum(0) * unit + cu[-1]).tolist())
            offset += t * gh * gw
        cu_t = torch.unique_consecutive(torch.tensor(cu, dtype=torch.int32))
        return torch.cat(index), cu_t

    def layout(self, grid_thw: torch.Tensor, device: torch.device) -> dict:
        """What the blocks need that depends on the grid alone, built once per grid (on the CPU, then
        kept on ``device``): the window permutation and its inverse, rotary cos and signed sin
        (`layers.signed_sin`) in window order, the windows' and the slices' cumulative lengths and longest
        block (no device reads later)."""
        grids = tuple(tuple(int(x) for x in g) for g in grid_thw.tolist())
        key = (grids, str(device))
        if key in self._layouts:
            return self._layouts[key]
        g = torch.tensor(grids)
        unit = self.cfg.spatial_merge_size ** 2
        rot = self.rot_pos_emb(g).to(device)                                # (P, d/2)
        win, cu_win = self.window_index(g)
        P = rot.shape[0]
        rot = rot.reshape(P // unit, unit, -1)[win.to(device)].reshape(P, -1)
        emb = torch.cat([rot, rot], -1)
        cu_full = F.pad(torch.repeat_interleave(g[:, 1] * g[:, 2], g[:, 0]).cumsum(0), (1, 0)).to(torch.int32)
        longest = lambda cu: int((cu[1:] - cu[:-1]).max())  # noqa: E731
        lay = dict(win=win.to(device), unwin=torch.argsort(win).to(device),
                   cos=emb.cos(), sin=signed_sin(emb.sin()),
                   full=(cu_full.to(device), longest(cu_full)), window=(cu_win.to(device), longest(cu_win)))
        if len(self._layouts) >= 8:
            self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = lay
        return lay

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.run(pixel_values, self.layout(grid_thw, pixel_values.device))

    def run(self, pixel_values: torch.Tensor, lay: dict) -> torch.Tensor:
        """The tower's device work for a prepared `layout` (no host reads: a CUDA graph can capture it)."""
        unit = self.cfg.spatial_merge_size ** 2
        x = self.vision_patch_embed(pixel_values)                           # (P, Dv)
        P = x.shape[0]
        x = x.reshape(P // unit, unit, -1)[lay["win"]].reshape(P, -1)
        for i, blk in enumerate(self.blocks):
            cu, longest = lay["full"] if i in self.cfg.fullatt_block_indexes else lay["window"]
            x = blk(x, cu, lay["cos"], lay["sin"], longest)
        x = self.merger(x)                                                  # (V, D)
        return x[lay["unwin"]]
