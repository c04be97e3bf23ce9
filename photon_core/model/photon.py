"""Photon: Qwen2.5-VL with 14³ CT patches and instruction-conditioned token scheduling (ITS).

Our own implementation of the Qwen2.5-VL computation (vision tower, M-RoPE decoder) with the
official parameter names (transformers 4.51 layout), so official Photon checkpoints load unchanged.

Dimensions used in comments:
    B batch, L sequence (prompt) length, N sequence length after the hard drop, D hidden size,
    H / Hkv query / key-value heads, d head dim, P patches (4,000 for a CT), V visual tokens (P/4),
    C = in_chans·14·14·14 values per patch.

One forward at prefill:
    ids ─embed─▶ (B, L, D) ─merge visual features at <|video_pad|>─▶ layers 0..s−1
        ─ layer s (ITS): saliency from its q/k, threshold, keep decision; the layer runs on all
          tokens, then its OUTPUT, the KV cache of layers 0..s, positions, masks and labels are
          gathered to the survivors (original positions kept) ─▶ layers s+1.. ─▶ logits
Training phases (module ``phase``): 1 = ITS computed, not applied; 2 = soft (visual outputs × p);
3 = hard drop through the surrogate gradient (sgp.py). In eval mode ITS always drops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from photon_core.model import its
from photon_core.model.attention import attend, block_attention
from photon_core.model.config import PhotonConfig, VisionConfig
from photon_core.model.sgp import band_loss, flip_loss, gather_tokens, neg_entropy_loss, pack_indices, surrogate_gather


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _act(name: str):
    return {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
            "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}[name]


# =============================================================================================
# Vision tower
# =============================================================================================

class PatchEmbed3D(nn.Module):
    """(P, C) patch rows → (P, Dv). A Conv3d whose kernel is the whole patch, i.e. one matmul."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        k = (v.temporal_patch_size, v.patch_size, v.patch_size)
        self.proj = nn.Conv3d(v.in_chans, v.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.conv3d(x.to(w.dtype).view(-1, *w.shape[1:]), w, stride=w.shape[2:]).view(-1, w.shape[0])


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = _act(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cu_seqlens, cos, sin):
        P = x.shape[0]
        q, k, v = self.qkv(x).reshape(P, 3, self.heads, -1).permute(1, 0, 2, 3).unbind(0)  # (P, H, d)
        dtype = q.dtype
        c, s = cos[:, None].float(), sin[:, None].float()
        q = (q.float() * c + rotate_half(q.float()) * s).to(dtype)
        k = (k.float() * c + rotate_half(k.float()) * s).to(dtype)
        out = block_attention(q, k, v, cu_seqlens)
        return self.proj(out.reshape(P, -1))


class VisionBlock(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(v.hidden_size, v.rms_norm_eps)
        self.norm2 = RMSNorm(v.hidden_size, v.rms_norm_eps)
        self.attn = VisionAttention(v.hidden_size, v.num_heads)
        self.mlp = VisionMLP(v.hidden_size, v.intermediate_size, v.hidden_act)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
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

    @staticmethod
    def frequencies(v: VisionConfig) -> torch.Tensor:
        rot_dim = v.hidden_size // v.num_heads // 2
        return 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float, device="cpu") / rot_dim))

    def rot_pos_emb(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(P, d/2) rotary angles from each patch's (h, w) position, in merged-window row order."""
        m = self.cfg.spatial_merge_size
        pos = []
        for t, h, w in grid_thw.tolist():
            hpos = torch.arange(h)[:, None].expand(h, w).reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
            wpos = torch.arange(w)[None, :].expand(h, w).reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
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

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        unit = self.cfg.spatial_merge_size ** 2
        x = self.vision_patch_embed(pixel_values)                           # (P, Dv)
        rot = self.rot_pos_emb(grid_thw)                                    # (P, d/2)
        win, cu_win = self.window_index(grid_thw)
        P = x.shape[0]
        x = x.reshape(P // unit, unit, -1)[win.to(x.device)].reshape(P, -1)
        rot = rot.reshape(P // unit, unit, -1)[win.to(rot.device)].reshape(P, -1)
        emb = torch.cat([rot, rot], -1)
        cos, sin = emb.cos(), emb.sin()
        cu_full = F.pad(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).cumsum(0), (1, 0))
        cu_full, cu_win = cu_full.to(x.device), cu_win.to(x.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cu_full if i in self.cfg.fullatt_block_indexes else cu_win, cos, sin)
        x = self.merger(x)                                                  # (V, D)
        return x[torch.argsort(win.to(x.device))]


# =============================================================================================
# Multimodal RoPE
# =============================================================================================

def rope_index(input_ids: torch.Tensor, grid_thw: torch.Tensor | None, attention_mask: torch.Tensor | None,
               cfg: PhotonConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """3-axis position ids (3, B, L) and deltas (B, 1), exactly as transformers 4.51 computed them.

    Text runs count up on all three axes; a volume of grid (t, h, w) (merged h, w) gets
    t_index = i · second_per_grid_t · tokens_per_second, h_index, w_index offset by the text before
    it; text after the volume starts at (largest id so far) + 1. Padded slots get 1.
    """
    B, L = input_ids.shape
    m = cfg.vision.spatial_merge_size
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pos = torch.ones(3, B, L, dtype=torch.long, device=input_ids.device)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=input_ids.device)
    grids = grid_thw.tolist() if grid_thw is not None else []
    gi = 0
    step = cfg.second_per_grid_t * cfg.vision.tokens_per_second
    for b in range(B):
        ids = input_ids[b][attention_mask[b] == 1].tolist()
        parts, st = [], 0
        vis_id = {cfg.video_token_id, cfg.image_token_id}
        n_vis = sum(1 for i, t in enumerate(ids[:-1]) if t == cfg.vision_start_token_id and ids[i + 1] in vis_id)
        nxt = lambda: int(parts[-1].max()) + 1 if parts else 0  # noqa: E731
        for _ in range(n_vis):
            ed = next(i for i in range(st, len(ids)) if ids[i] in vis_id)
            t, h, w = grids[gi]
            gi += 1
            h, w = h // m, w // m
            s0 = nxt()
            parts.append(torch.arange(ed - st).expand(3, -1) + s0)
            t_idx = (torch.arange(t).view(-1, 1).expand(-1, h * w) * step).long().flatten()
            h_idx = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
            w_idx = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
            parts.append(torch.stack([t_idx, h_idx, w_idx]) + (ed - st) + s0)
            st = ed + t * h * w
        if st < len(ids):
            s0 = nxt()
            parts.append(torch.arange(len(ids) - st).expand(3, -1) + s0)
        p = torch.cat(parts, 1).to(input_ids.device)
        pos[:, b, attention_mask[b] == 1] = p
        deltas[b, 0] = int(p.max()) + 1 - L
    return pos, deltas


class MRoPE(nn.Module):
    def __init__(self, cfg: PhotonConfig):
        super().__init__()
        self.section = list(cfg.mrope_section) * 2
        self.register_buffer("inv_freq", self.frequencies(cfg), persistent=False)

    @staticmethod
    def frequencies(cfg: PhotonConfig) -> torch.Tensor:
        d = cfg.head_dim
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device="cpu") / d))

    def forward(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (3, B, L) → cos, sin (B, 1, L, d): axis i%3 feeds the i-th frequency section."""
        freqs = pos[..., None].float() * self.inv_freq                       # (3, B, L, d/2)
        emb = torch.cat([freqs, freqs], -1)                                 # (3, B, L, d)
        cos, sin = emb.cos(), emb.sin()
        pick = lambda t: torch.cat([c[i % 3] for i, c in enumerate(t.split(self.section, -1))], -1)  # noqa
        return pick(cos)[:, None].to(dtype), pick(sin)[:, None].to(dtype)


# =============================================================================================
# Decoder
# =============================================================================================

class TextAttention(nn.Module):
    def __init__(self, cfg: PhotonConfig):
        super().__init__()
        D, H, Hkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.Hkv, self.d = H, Hkv, d
        self.q_proj = nn.Linear(D, H * d, bias=True)
        self.k_proj = nn.Linear(D, Hkv * d, bias=True)
        self.v_proj = nn.Linear(D, Hkv * d, bias=True)
        self.o_proj = nn.Linear(H * d, D, bias=False)

    def qkv(self, x, cos, sin):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.H, self.d).transpose(1, 2)        # (B, H, L, d)
        k = self.k_proj(x).view(B, L, self.Hkv, self.d).transpose(1, 2)      # (B, Hkv, L, d)
        v = self.v_proj(x).view(B, L, self.Hkv, self.d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def out(self, q, k, v, allowed, causal):
        o = attend(q, k, v, allowed, causal)                                 # (B, H, Lq, d)
        B, _, Lq, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, Lq, -1))


class TextMLP(nn.Module):
    def __init__(self, cfg: PhotonConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _act(cfg.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: PhotonConfig, has_its: bool):
        super().__init__()
        self.self_attn = TextAttention(cfg)
        self.mlp = TextMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if has_its:
            self.atp = its.ITSModule(cfg.hidden_size)

    def forward(self, h, cos, sin, allowed, causal, cache=None, qkv_out=None):
        q, k, v = self.self_attn.qkv(self.input_layernorm(h), cos, sin)
        if qkv_out is not None:
            qkv_out.extend([q, k])
        if cache is not None:                  # decode: append the new key/value, attend to all
            k = torch.cat([cache[0], k], 2)
            v = torch.cat([cache[1], v], 2)
        h = h + self.self_attn.out(q, k, v, allowed, causal)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, (k, v)


class TextModel(nn.Module):
    def __init__(self, cfg: PhotonConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.has_its and i == cfg.its_layer)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# =============================================================================================
# Outputs
# =============================================================================================

@dataclass
class ITSState:
    """Per-sample ITS quantities at the ITS layer (V visual tokens, same V for every row)."""

    u: torch.Tensor            # (B, V) saliency
    rho: torch.Tensor          # (B, V) min-max of u
    theta: torch.Tensor        # (B,) model threshold
    p: torch.Tensor            # (B, V) σ((ρ − θ)/0.2)
    keep: torch.Tensor         # (B, V) bool: the applied decision
    descriptor: torch.Tensor   # (B, 12)
    fastv: torch.Tensor | None = None  # (B, V) attention of the last instruction token (baseline)
    merge: list | None = None  # per row: (V,) kept token each dropped token merges into (visionzip), or None
    u_graph: torch.Tensor | None = None  # (B, V) u with its graph (training-only guidance), else None

    @property
    def kept_count(self) -> torch.Tensor:
        return self.keep.sum(-1)


@dataclass
class Output:
    logits: torch.Tensor                      # (B, N, vocab) over surviving positions
    loss: torch.Tensor | None = None
    losses: dict = field(default_factory=dict)
    its: ITSState | None = None
    key_valid: torch.Tensor | None = None     # (B, N) bool: real (not padding) positions
    orig_index: torch.Tensor | None = None    # (B, N) original prompt index of each surviving slot
    labels: torch.Tensor | None = None        # (B, N) labels gathered to the survivors
    cache: list | None = None                 # per layer (k, v): (B, Hkv, N, d)
    next_position: torch.Tensor | None = None  # (B,) position id of the first generated token
    seq_len_per_layer: list = field(default_factory=list)  # attention length each layer saw
    scan_features: torch.Tensor | None = None  # (S·V, D) visual tokens encoded in this forward


def _allowed(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, Lk) valid keys → (B, 1, q_len, Lk) causal mask aligned to the end; padded rows see themselves."""
    B, Lk = key_valid.shape
    qi = torch.arange(Lk - q_len, Lk, device=key_valid.device)[:, None]
    kj = torch.arange(Lk, device=key_valid.device)[None]
    causal = kj <= qi                                                          # (q_len, Lk)
    allowed = causal[None] & key_valid[:, None, :]
    allowed = allowed | (kj == qi)[None]                                        # never an empty row
    return allowed[:, None]


class PhotonModel(nn.Module):
    """The whole model. Parameter names: ``visual.*``, ``model.*``, ``lm_head`` (tied by default)."""

    def __init__(self, cfg: PhotonConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTower(cfg.vision)
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = MRoPE(cfg)
        self.phase = 3               # training phase used in train mode (1, 2, 3)
        self.band = (0.3, 0.8)       # retention band (official values) for the mean keep probability
        self.guide_weight = 0.1      # weight of the optional training-only saliency guidance
        self.keep_guide_weight = 0.0  # weight of the optional training-only keep-set guidance
        self.contrast_guide_weight = 0.0  # weight of the optional training-only pairwise contrast of questions

    @property
    def its_layer(self) -> int:
        return int(self.config.its_layer)

    @property
    def its_module(self) -> its.ITSModule | None:
        """The threshold MLP's module at the ITS layer; None for an S1 checkpoint (no ITS weights)."""
        return getattr(self.model.layers[self.its_layer], "atp", None)

    def reset_buffers(self) -> None:
        """Recompute the (non-persistent) rotary frequencies in fp32 on the model's device."""
        dev = self.model.embed_tokens.weight.device
        self.visual.inv_freq = VisionTower.frequencies(self.config.vision).to(dev)
        self.rope.inv_freq = MRoPE.frequencies(self.config).to(dev)

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh initialisation (normal std, zero biases, unit norms), then the ITS init."""
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Conv3d)):
                nn.init.normal_(mod.weight, std=std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=std)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
        if self.its_module is not None:
            self.its_module.predictor.reset_its_init()

    # ------------------------------------------------------------------ inputs
    def encode_volume(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(P, C) patches → (V, D) visual tokens."""
        dtype = next(self.visual.parameters()).dtype
        return self.visual(pixel_values.to(dtype), grid_thw)

    def masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """vision_mask: image/video pads; question_mask: strictly between <|vision_end|> and <|im_end|>.

        With several volumes in one turn (prior + current) the question is the text after the turn's
        last <|vision_end|>: a span that holds another volume is not instruction. With one volume this
        is the reference's rule unchanged."""
        c = self.config
        valid = attention_mask.bool()
        vision = ((input_ids == c.video_token_id) | (input_ids == c.image_token_id)) & valid
        question = torch.zeros_like(vision)
        for b in range(input_ids.shape[0]):
            ends = (input_ids[b] == c.vision_end_token_id).nonzero().flatten().tolist()
            for e in ends:
                stop = (input_ids[b, e + 1:] == c.eos_token_id).nonzero()
                last = e + 1 + int(stop[0]) if len(stop) else input_ids.shape[1]
                if not bool(vision[b, e + 1:last].any()):
                    question[b, e + 1:last] = True
        return vision, question & valid

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        vis = (input_ids == self.config.video_token_id) | (input_ids == self.config.image_token_id)
        n_tok = int(vis.sum())
        n_feat = 0 if features is None else features.shape[0]
        if n_tok != n_feat:
            raise ValueError(f"Visual tokens and features do not match: the prompt has {n_tok} "
                             f"<|video_pad|> tokens but the volume gives {n_feat} features.")
        if n_tok:
            x = x.masked_scatter(vis[..., None].expand_as(x), features.to(x.dtype))
        return x

    # ------------------------------------------------------------------ ITS
    def _its(self, q, k, vision, question, key_valid, budgets, saliency_graph: bool = False) -> ITSState:
        # Saliency is a measurement, not a path for gradients: the loss reaches ITS only through θ
        # (the threshold MLP), as in the reference. ``saliency_graph`` keeps a differentiable copy
        # (``u_graph``) for the optional training-only guidance; the decision uses the detached u.
        if not saliency_graph:
            q, k = q.detach(), k.detach()
        B = q.shape[0]
        rep = q.shape[1] // k.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        us, fastv, dominance = [], [], []
        for b in range(B):
            vi = vision[b].nonzero().flatten()
            qi = question[b].nonzero().flatten()
            kb = k[b].repeat_interleave(rep, 0)                               # (H, L, d)
            us.append(its.saliency(q[b][:, qi], kb[:, qi], kb[:, vi]))
            qb, kb = q[b].detach().float(), kb.detach().float()
            last = qi[-1:] if len(qi) else key_valid[b].nonzero().flatten()[-1:]
            a = (qb[:, last] @ kb.transpose(-1, -2)) * scale
            allowed = torch.arange(kb.shape[1], device=q.device) <= last
            a = a.masked_fill(~(allowed & key_valid[b]), float("-inf")).softmax(-1)
            fastv.append(a[:, 0, vi].mean(0))
            if budgets[b].mode == "visionzip":     # attention each visual token receives from the others
                dominance.append(((qb[:, vi] @ kb[:, vi].transpose(-1, -2)) * scale).softmax(-1).mean((0, 1)))
            else:
                dominance.append(None)
        if len({u.numel() for u in us}) != 1:
            raise ValueError("every sample in a batch must carry the same number of visual tokens")
        u_graph = torch.stack(us) if saliency_graph else None
        u = torch.stack(us).detach()
        rho = its.minmax(u)
        # Phase 1 measures ITS without training it: keep the threshold MLP out of the graph.
        if self.its_module is None:        # S1: saliency without a learned threshold (θ undefined)
            theta, desc = torch.full((B,), float("nan"), device=u.device), its.descriptor(rho, u)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not (self.training and self.phase == 1)):
                theta, desc = self.its_module.threshold(rho, u)
        p = torch.sigmoid((rho - theta[:, None]) / its.TEMPERATURE)
        fv = torch.stack(fastv)
        keeps, merges = [], []
        for b in range(B):
            if dominance[b] is not None:
                vi = vision[b].nonzero().flatten()
                keys = k[b][:, vi].detach().float().transpose(0, 1).flatten(1)          # (V, Hkv·d)
                keep_b, merge_b = its.visionzip_plan(int(budgets[b].value), dominance[b], keys)
            else:
                keep_b, merge_b = its.decide(budgets[b], rho[b], theta[b], fv[b]), None
            keeps.append(keep_b)
            merges.append(merge_b)
        merge = merges if any(m is not None for m in merges) else None
        return ITSState(u=u, rho=rho, theta=theta, p=p, keep=torch.stack(keeps), descriptor=desc, fastv=fv,
                        merge=merge, u_graph=u_graph)

    # ------------------------------------------------------------------ prefill / training forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                features: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                grid_thw: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                budget: its.Budget | list | None = None, use_cache: bool = False,
                use_its: bool = True, flip: bool = False, robust: bool = False,
                row_scan: list | None = None, saliency_target: torch.Tensor | None = None,
                keep_target: torch.Tensor | None = None) -> Output:
        """Prefill (eval) or training forward. ``features`` = cached `encode_volume` output for the
        whole batch (concatenated in row order); else ``pixel_values``/``grid_thw`` are encoded.

        ``budget``: one Budget or one per row (eval only). ``use_its=False`` runs without ITS.
        ``flip``: keep the complement of the decision and use the flip loss (training).
        ``robust``: the volume was perturbed; the loss is −entropy of the answer (training).
        ``row_scan``: with ``pixel_values``/``grid_thw`` of S distinct scans, the scan of each row, or
        the scans of each row in prompt order (prior, current) (several questions on one scan encode
        it once, inside this forward, as DDP needs).
        ``saliency_target`` / ``keep_target`` (B, V): training-only guidance of ITS (a distribution for
        softmax(u); a 0/1 keep set for the keep probabilities, from phase 2 on, and — with ``row_scan`` — for
        the pairwise contrast of questions on the same scan); all-zero rows are skipped.
        """
        c = self.config
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        scan_features = None
        if features is None and pixel_values is not None:
            features = scan_features = self.encode_volume(pixel_values, grid_thw)
            if row_scan is not None:
                m2 = self.config.vision.spatial_merge_size ** 2
                per_scan = features.split([int(n) // m2 for n in grid_thw.prod(-1).tolist()])
                order = [i for r in row_scan for i in ([r] if isinstance(r, int) else r)]
                features = torch.cat([per_scan[i] for i in order])
                grid_thw = grid_thw[torch.as_tensor(order, device=grid_thw.device)]
        if grid_thw is None and features is not None:
            raise ValueError("grid_thw is needed to place the visual tokens")
        if grid_thw is not None and grid_thw.shape[0] == 1 and B > 1:
            grid_thw = grid_thw.expand(B, 3)
        if not isinstance(budget, list):
            budget = [its.Budget.parse(budget)] * B
        h = self.embed(input_ids, features)
        pos, _ = rope_index(input_ids, grid_thw, attention_mask, c)
        next_pos = pos.max(0).values.masked_fill(attention_mask == 0, -1).max(-1).values + 1   # (B,)
        cos, sin = self.rope(pos, h.dtype)
        key_valid = attention_mask.bool()
        vision, question = self.masks(input_ids, attention_mask)
        orig_index = torch.arange(L, device=h.device).expand(B, L)
        plain = bool(key_valid.all())
        allowed = None if plain else _allowed(key_valid, L)
        caches: list = []
        state: ITSState | None = None
        losses: dict = {}
        seq_lens = []
        run_its = use_its and bool(vision.any()) and bool(question.any())
        for i, layer in enumerate(self.model.layers):
            seq_lens.append(h.shape[1])
            if i == self.its_layer and run_its:
                qk: list = []
                h, kv = layer(h, cos, sin, allowed, plain, qkv_out=qk)
                if use_cache:
                    caches.append(kv)
                guide = self.training and saliency_target is not None
                keep_guide = (self.training and keep_target is not None and self.phase > 1
                              and self.keep_guide_weight > 0)
                contrast = (self.training and keep_target is not None and row_scan is not None
                            and self.contrast_guide_weight > 0)
                state = self._its(qk[0], qk[1], vision, question, key_valid, budget,
                                  saliency_graph=guide or keep_guide or contrast)
                if guide:
                    losses["guide"] = self._guide_loss(state.u_graph, saliency_target)
                if keep_guide:
                    losses["keep_guide"] = self._keep_guide_loss(state.u_graph, state.theta, keep_target)
                if contrast:
                    losses["contrast"] = self._contrast_loss(state.u_graph, keep_target, row_scan)
                h, kv_state = self._apply_its(h, state, vision, key_valid, flip, losses)
                if kv_state is not None:
                    idx, valid = kv_state
                    caches = [tuple(gather_tokens(t.transpose(1, 2), idx, valid).transpose(1, 2) for t in kv)
                              for kv in caches]
                    pos = torch.stack([gather_tokens(pp, idx, valid) for pp in pos])
                    cos, sin = self.rope(pos, h.dtype)
                    key_valid = valid
                    orig_index = gather_tokens(orig_index, idx, valid)
                    if labels is not None:
                        labels = gather_tokens(labels + 100, idx, valid) - 100   # padding -> -100
                    plain = bool(key_valid.all())
                    allowed = None if plain else _allowed(key_valid, h.shape[1])
            else:
                h, kv = layer(h, cos, sin, allowed, plain)
                if use_cache:
                    caches.append(kv)
        logits = self.lm_head(self.model.norm(h))
        out = Output(logits=logits, its=state, key_valid=key_valid, orig_index=orig_index, labels=labels,
                     cache=caches if use_cache else None, next_position=next_pos, seq_len_per_layer=seq_lens,
                     scan_features=scan_features)
        if labels is not None:
            if robust:
                main = neg_entropy_loss(logits, labels)
            elif flip:
                main = flip_loss(logits, labels)
            else:
                main = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)
            losses["lm"] = main
            out.loss = main + sum(v for k, v in losses.items() if k != "lm")
        out.losses = losses
        return out

    @staticmethod
    def _merge(h, vision, merges):
        """VisionZip-style merge: a contextual token's hidden state becomes the mean of itself and the
        dropped tokens assigned to it (from the ITS layer on; earlier layers' cache keeps its own)."""
        h = h.clone()
        for b, m in enumerate(merges):
            if m is None:
                continue
            vi = vision[b].nonzero().flatten()
            src = (m >= 0).nonzero().flatten()
            if not src.numel():
                continue
            hv = h[b, vi]
            total = hv.clone()
            count = torch.ones(hv.shape[0], 1, dtype=hv.dtype, device=hv.device)
            total.index_add_(0, m[src], hv[src])
            count.index_add_(0, m[src], torch.ones(src.numel(), 1, dtype=hv.dtype, device=hv.device))
            targets = torch.unique(m[src])
            hv[targets] = total[targets] / count[targets]
            h[b, vi] = hv
        return h

    def _guide_loss(self, u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of softmax(u) against a target distribution over visual tokens (training only);
        rows with an all-zero target are skipped."""
        t = target.to(u.device).float()
        rows = t.sum(-1) > 0
        if not bool(rows.any()):
            return u.new_zeros(())
        t = t[rows] / t[rows].sum(-1, keepdim=True)
        return self.guide_weight * -(t * u[rows].float().log_softmax(-1)).sum(-1).mean()

    def _keep_guide_loss(self, u: torch.Tensor, theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE of the keep probabilities σ((minmax(u) − θ)/T), u with its graph, against a 0/1 keep target
        over visual tokens (training only): it moves the ranking of the tokens as well as θ. Class-balanced;
        rows with an all-zero target are skipped."""
        t = target.to(u.device).float()
        rows = t.sum(-1) > 0
        if not bool(rows.any()):
            return u.new_zeros(())
        logit = (its.minmax(u[rows].float()) - theta[rows, None].float()) / its.TEMPERATURE
        t = t[rows]
        bce = F.binary_cross_entropy_with_logits(logit, t, reduction="none")
        # balanced: the target tokens and the others weigh half each, else θ rising above all is cheapest
        pos = (bce * t).sum(-1) / t.sum(-1)
        neg = (bce * (1 - t)).sum(-1) / (1 - t).sum(-1).clamp_min(1)
        return self.keep_guide_weight * 0.5 * (pos + neg).mean()

    def _contrast_loss(self, u: torch.Tensor, target: torch.Tensor, row_scan: list,
                       tau: float = 0.1) -> torch.Tensor:
        """Pairwise contrast of two questions on the same scan (training only): on the tokens the first
        question's keep target holds and the second's does not, the first's ρ = minmax(u) should be the
        higher (logistic, temperature ``tau``), and the other way round. What every question shares
        (the words they have in common, the tissue every target holds) cancels in the difference, so
        only what tells the questions apart learns. Rows with an all-zero target are skipped."""
        t = target.to(u.device).bool()
        rho = its.minmax(u.float())
        has = t.any(-1).tolist()                                   # one host sync for the whole batch
        groups: dict = {}
        for b, r in enumerate(row_scan):
            if has[b]:
                groups.setdefault(tuple(r) if isinstance(r, (list, tuple)) else (r,), []).append(b)
        total, count = u.new_zeros(()), u.new_zeros(())
        for rows in groups.values():
            if len(rows) < 2:
                continue
            g = torch.tensor(rows, device=u.device)
            tg, rg = t[g], rho[g]
            only = tg[:, None] & ~tg[None]                          # (i, j): tokens i's target holds, j's not
            loss = F.softplus(-(rg[:, None] - rg[None]) / tau)      # i's ρ should lead j's there
            n = only.sum(-1)                                       # every ordered pair = both directions
            total = total + ((loss * only).sum(-1) / n.clamp_min(1)).sum()
            count = count + (n > 0).sum()
        return self.contrast_guide_weight * total / count.clamp_min(1)   # mean over the pairs' terms

    def _apply_its(self, h, state: ITSState, vision, key_valid, flip, losses):
        """Apply the decision at the ITS layer output. Returns h and (idx, valid) if tokens dropped."""
        B, L, _ = h.shape
        keep_full = torch.zeros_like(vision)
        if self.training:
            phase = self.phase
            if phase == 1:
                return h, None
            p_full = torch.zeros(B, L, dtype=state.p.dtype, device=h.device)
            p_full = p_full.masked_scatter(vision, state.p)
            if not flip:
                losses["band"] = band_loss(state.p, lo=self.band[0], hi=self.band[1])
            if phase == 2:
                scale = torch.where(vision, p_full, torch.ones_like(p_full)).to(h.dtype)
                return h * scale[..., None], None
            keep = ~state.keep if flip else state.keep
            keep_full = keep_full.masked_scatter(vision, keep)
            presence = key_valid & (~vision | keep_full)
            idx, valid = pack_indices(presence, "right")
            return surrogate_gather(h, p_full.to(h.dtype), vision, idx, valid), (idx, valid)
        keep_full = keep_full.masked_scatter(vision, state.keep)
        if state.merge is not None:
            h = self._merge(h, vision, state.merge)
        presence = key_valid & (~vision | keep_full)
        idx, valid = pack_indices(presence, "right")
        return gather_tokens(h, idx, valid), (idx, valid)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, features=None, grid_thw=None, budget=None,
                 max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None, use_its: bool = True,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
                 return_step_logits: bool = False, on_prefill=None):
        """Greedy (or sampled) decoding with a KV cache that holds only the surviving tokens.

        Returns (tokens (B, T), prefill Output, step logits (B, T, vocab) or None). Rows that hit
        one of the ``eos_token_id`` ids continue with padding (the first eos id) until all are done.
        ``repetition_penalty`` (transformers' rule, over the prompt's ids — dropped visual tokens
        included, as the ids are — and the generated ones), then temperature, ``top_k``, ``top_p``.
        Step logits are the raw ones, before the penalty.
        """
        out = self.forward(input_ids, attention_mask, features=features, grid_thw=grid_thw, budget=budget,
                           use_cache=True, use_its=use_its)
        if on_prefill is not None:
            on_prefill(out)
        B = input_ids.shape[0]
        cache, key_valid = out.cache, out.key_valid
        logits = out.logits[:, -1]
        tokens, steps = [], []
        done = torch.zeros(B, dtype=torch.bool, device=logits.device)
        eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=logits.device).flatten()
        seen = input_ids.masked_fill(attention_mask == 0, -1) if attention_mask is not None else input_ids
        for step in range(max_new_tokens):
            if return_step_logits:
                steps.append(logits.float())
            scores = _penalise(logits.float(), seen, repetition_penalty)
            if do_sample:
                if top_k > 0:
                    kth = scores.topk(min(int(top_k), scores.shape[-1]), -1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                probs = _top_p(F.softmax(scores / max(temperature, 1e-5), -1), top_p)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                nxt = scores.argmax(-1)
            if eos is not None:
                nxt = torch.where(done, eos[0], nxt)
                done = done | torch.isin(nxt, eos)
            tokens.append(nxt)
            seen = torch.cat([seen, nxt[:, None]], 1)
            if (eos is not None and bool(done.all())) or step == max_new_tokens - 1:
                break
            h = self.model.embed_tokens(nxt[:, None])
            p = (out.next_position + step)[None, :, None].expand(3, B, 1)
            cos, sin = self.rope(p, h.dtype)
            key_valid = torch.cat([key_valid, torch.ones(B, 1, dtype=torch.bool, device=h.device)], 1)
            allowed = None if bool(key_valid.all()) else key_valid[:, None, None, :]
            new_cache = []
            for layer, kv in zip(self.model.layers, cache):
                h, kv = layer(h, cos, sin, allowed, False, cache=kv)
                new_cache.append(kv)
            cache = new_cache
            logits = self.lm_head(self.model.norm(h))[:, -1]
        toks = torch.stack(tokens, 1)
        return toks, out, (torch.stack(steps, 1) if return_step_logits else None)


def _penalise(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the score of every id already in the row (``seen`` (B, L),
    −1 = padding) is divided by ``penalty`` if positive, multiplied by it if negative."""
    if penalty == 1.0:
        return scores
    hits = torch.zeros_like(scores).scatter_add(1, seen.clamp_min(0), (seen >= 0).to(scores.dtype)) > 0
    return torch.where(hits, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sp, si = probs.sort(-1, descending=True)
    cut = sp.cumsum(-1) - sp > top_p
    sp = sp.masked_fill(cut, 0)
    return torch.zeros_like(probs).scatter(-1, si, sp) / sp.sum(-1, keepdim=True)
