"""The Qwen2.5-VL language decoder: multimodal RoPE (3-axis positions) and the decoder layers.

B batch, L sequence length, D hidden size, H / Hkv query / key-value heads, d head dim.
Position ids follow transformers 4.51 (`rope_index`), which is what Photon was trained with.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from photon_core.model import its
from photon_core.model.attention import Packing, causal_attention, decode_attention
from photon_core.model.config import PhotonConfig
from photon_core.model.layers import FusedLinears, GatedMLP, RMSNorm, rope, signed_sin


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
        n_vis = sum(1 for i, t in enumerate(ids[:-1])
                    if t == cfg.vision_start_token_id and ids[i + 1] in vis_id)
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
        """pos (3, B, L) → cos, signed sin (B, 1, L, d) (`layers.signed_sin`, what `layers.rope` takes):
        axis i%3 feeds the i-th frequency section."""
        freqs = pos[..., None].float() * self.inv_freq                       # (3, B, L, d/2)
        emb = torch.cat([freqs, freqs], -1)                                 # (3, B, L, d)
        cos, sin = emb.cos(), emb.sin()
        pick = lambda t: torch.cat([c[i % 3] for i, c in enumerate(t.split(self.section, -1))], -1)  # noqa
        return pick(cos)[:, None].to(dtype), signed_sin(pick(sin))[:, None].to(dtype)


class TextAttention(FusedLinears):
    FUSED = ("q_proj", "k_proj", "v_proj")

    def __init__(self, cfg: PhotonConfig):
        super().__init__()
        D, H, Hkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.Hkv, self.d = H, Hkv, d
        self.q_proj = nn.Linear(D, H * d, bias=True)
        self.k_proj = nn.Linear(D, Hkv * d, bias=True)
        self.v_proj = nn.Linear(D, Hkv * d, bias=True)
        self.o_proj = nn.Linear(H * d, D, bias=False)

    def qkv(self, x, cos, sin):
        """x (B, L, D), `MRoPE` tables → q (B, H, L, d), k, v (B, Hkv, L, d); q and k rotated in one pass."""
        B, L, _ = x.shape
        H, Hkv, d = self.H, self.Hkv, self.d
        y = self.fused_linear(x)
        if y is not None:                                                    # one matmul for q, k and v
            y = y.view(B, L, H + 2 * Hkv, d).transpose(1, 2)                # (B, H + 2·Hkv, L, d)
            qk, v = rope(y[:, :H + Hkv].contiguous(), cos, sin), y[:, H + Hkv:]
        else:
            q = self.q_proj(x).view(B, L, H, d).transpose(1, 2)             # (B, H, L, d)
            k = self.k_proj(x).view(B, L, Hkv, d).transpose(1, 2)           # (B, Hkv, L, d)
            v = self.v_proj(x).view(B, L, Hkv, d).transpose(1, 2)
            qk = rope(torch.cat((q, k), 1), cos, sin)                        # (B, H + Hkv, L, d)
        return qk[:, :H], qk[:, H:], v

    def out(self, o):
        """(B, H, Lq, d) attention output → (B, Lq, D)."""
        B, _, Lq, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, Lq, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: PhotonConfig, has_its: bool):
        super().__init__()
        self.self_attn = TextAttention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if has_its:
            self.atp = its.ITSModule(cfg.hidden_size)

    def forward(self, h, cos, sin, pk: Packing, qkv_out=None):
        """Prefill / training: h (B, L, D) → h, (k, v) (B, Hkv, L, d) for the KV cache."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(h), cos, sin)
        if qkv_out is not None:
            qkv_out.extend([q, k])
        h = h + self.self_attn.out(causal_attention(q, k, v, pk))
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, (k, v)

    def decode(self, h, cos, sin, k_cache, v_cache, slot, allowed):
        """One decode step: h (B, 1, D); the new key/value go to cache slot ``slot`` ((1,) long) of the
        static cache (B, Hkv, S, d), in place; ``allowed`` (B, S) marks the slots this token may see."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(h), cos, sin)
        k_cache.index_copy_(2, slot, k.to(k_cache.dtype))      # (autocast computes k/v in bf16 over an
        v_cache.index_copy_(2, slot, v.to(v_cache.dtype))      #  fp32 model's cache: a no-op otherwise)
        h = h + self.self_attn.out(decode_attention(q, k_cache, v_cache, allowed))
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, cfg: PhotonConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.has_its and i == cfg.its_layer)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

