"""Photon: Qwen2.5-VL with 14³ CT patches and instruction-conditioned token scheduling (ITS).

Our own implementation of the Qwen2.5-VL computation with the official parameter names
(transformers 4.51 layout), so official Photon checkpoints load unchanged. This file holds the whole
model's forward; the parts live beside it (vision.py, decoder.py, its.py, budget.py, sgp.py).
The model computes; training (losses, phases, guidance) lives in `photon_core.train`, decoding in
`photon_core.inference.engine` (static KV cache, CUDA-graph decode step) behind `inference.generate`.

Dimensions used in comments:
    B batch, L sequence (prompt) length, N sequence length after the hard drop, D hidden size,
    H / Hkv query / key-value heads, d head dim, P patches (4,000 for a CT), V visual tokens (P/4).

One forward at prefill:
    ids ─embed─▶ (B, L, D) ─merge visual features at <|video_pad|>─▶ layers 0..s−1
        ─ layer s (ITS): saliency from its q/k, threshold, keep decision; the layer runs on all
          tokens, then its OUTPUT, the KV cache of layers 0..s, positions and masks are gathered to
          the survivors (original positions kept) ─▶ layers s+1.. ─▶ logits
In eval mode ITS always drops. In training mode an `its.Schedule` says how ITS is applied
(1 = computed, not applied; 2 = soft, visual outputs × p; 3 = hard drop through the surrogate gradient).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from photon_core.model import baselines, its
from photon_core.model.attention import Packing, varlen_available
from photon_core.model.budget import S1_MESSAGE, THRESHOLD_MODES, Budget, decide, is_baseline
from photon_core.model.config import PhotonConfig
from photon_core.model.decoder import MRoPE, TextModel, rope_index
from photon_core.model.its import ITSState, Schedule
from photon_core.model.layers import Fusable, RMSNorm
from photon_core.model.sgp import gather_tokens, pack_indices, surrogate_gather
from photon_core.model.vision import VisionTower


@dataclass
class Output:
    logits: torch.Tensor                      # (B, N, vocab) over surviving positions
    its: ITSState | None = None
    key_valid: torch.Tensor | None = None     # (B, N) bool: real (not padding) positions
    orig_index: torch.Tensor | None = None    # (B, N) original prompt index of each surviving slot
    cache: list | None = None                 # per layer (k, v): (B, Hkv, N, d)
    next_position: torch.Tensor | None = None  # (B,) position id of the first generated token
    seq_len_per_layer: list = field(default_factory=list)  # attention length each layer saw
    scan_features: torch.Tensor | None = None  # (S·V, D) visual tokens encoded in this forward

    def gather(self, per_position: torch.Tensor, fill: int = -100) -> torch.Tensor:
        """A (B, L) per-prompt-position tensor (e.g. labels) gathered to the surviving slots; ``fill``
        on padding slots."""
        out = per_position.gather(1, self.orig_index)
        return torch.where(self.key_valid, out, torch.full_like(out, fill))


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
        self.visual._layouts.clear()
        self.rope.inv_freq = MRoPE.frequencies(self.config).to(dev)

    def fuse_projections(self, on: bool = True) -> PhotonModel:
        """Inference: each decoder layer's q/k/v and each MLP's gate/up projections as one matmul each,
        the MLPs' hidden width padded for aligned matmuls (`layers.Fusable`; parameters become views).
        Call after the model is on its device and dtype (moving it unfuses). ``on=False`` unfuses.
        Returns the model. Graphs captured before a switch keep running the path they captured (the
        same weights in the same memory); `inference.engine.release` the model to capture the other."""
        for mod in self.modules():
            if isinstance(mod, Fusable) and on:
                mod.fuse()
            elif isinstance(mod, Fusable):
                mod.unfuse()
        return self

    @property
    def fused(self) -> bool:
        return self.model.layers[0].self_attn._active

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

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None, n_visual: int) -> torch.Tensor:
        """Token embeddings with the visual features at the <|video_pad|> slots; ``n_visual``: how many
        there are, counted by the caller on the host."""
        x = self.model.embed_tokens(input_ids)
        vis = (input_ids == self.config.video_token_id) | (input_ids == self.config.image_token_id)
        n_tok = n_visual
        n_feat = 0 if features is None else features.shape[0]
        if n_tok != n_feat:
            raise ValueError(f"Visual tokens and features do not match: the prompt has {n_tok} "
                             f"<|video_pad|> tokens but the volume gives {n_feat} features.")
        if n_tok:
            x = x.masked_scatter(vis[..., None].expand_as(x), features.to(x.dtype))
        return x

    # ------------------------------------------------------------------ ITS
    def _its(self, q, k, vision, question, key_valid, budgets: list[Budget],
             schedule: Schedule | None, rows: list) -> ITSState:
        """Saliency, threshold and keep decision of every row at the ITS layer (q (B, H, L, d),
        k (B, Hkv, L, d)); ``rows``: each row's (visual, question) positions, on the device.

        Saliency is a measurement, not a path for gradients: the loss reaches ITS only through θ (the
        threshold MLP), as in the reference. ``schedule.saliency_graph`` keeps a differentiable copy
        (``u_graph``) for the trainer's guidance; the decision uses the detached u."""
        graph = schedule is not None and schedule.saliency_graph
        if not graph:
            q, k = q.detach(), k.detach()
        B = q.shape[0]
        rep = q.shape[1] // k.shape[1]
        kr = k.repeat_interleave(rep, 1)                                       # (B, H, L, d)
        us = [its.saliency(q[b][:, qi], kr[b][:, qi], kr[b][:, vi]) for b, (vi, qi) in enumerate(rows)]
        if len({u.numel() for u in us}) != 1:
            raise ValueError("every sample in a batch must carry the same number of visual tokens")
        u_graph = torch.stack(us) if graph else None
        u = torch.stack(us).detach()
        rho = its.minmax(u)
        # Phase 1 measures ITS without training it: keep the threshold MLP out of the graph.
        frozen = self.training and schedule is not None and schedule.phase == 1
        if self.its_module is None:        # S1: saliency without a learned threshold (θ undefined)
            theta, desc = torch.full((B,), float("nan"), device=u.device), its.descriptor(rho, u)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                theta, desc = self.its_module.threshold(rho, u)
        p = torch.sigmoid((rho - theta[:, None]) / its.TEMPERATURE)
        keeps, merges = [], []
        for b in range(B):
            if is_baseline(budgets[b]):
                keep_b, merge_b = baselines.select(budgets[b], q[b], kr[b], vision[b], question[b],
                                                   key_valid[b])
            else:
                keep_b, merge_b = decide(budgets[b], rho[b], theta[b]), None
            keeps.append(keep_b)
            merges.append(merge_b)
        merge = merges if any(m is not None for m in merges) else None
        return ITSState(u=u, rho=rho, theta=theta, p=p, keep=torch.stack(keeps), descriptor=desc, merge=merge,
                        u_graph=u_graph)

    def _apply_its(self, h, state: ITSState, vision, key_valid, schedule: Schedule | None):
        """Apply the decision at the ITS layer's output. Returns h and, if tokens dropped, (idx, valid,
        survivors per row): the survivors are read on the host here, the prefill's one read after its
        first layers (the drop's length is the only thing the host must know)."""
        B, L, _ = h.shape
        keep_full = torch.zeros_like(vision)
        if self.training:
            schedule = schedule or Schedule()
            if schedule.phase == 1:
                return h, None
            p_full = torch.zeros(B, L, dtype=state.p.dtype, device=h.device).masked_scatter(vision, state.p)
            if schedule.phase == 2:
                scale = torch.where(vision, p_full, torch.ones_like(p_full)).to(h.dtype)
                return h * scale[..., None], None
            keep = ~state.keep if schedule.flip else state.keep
            keep_full = keep_full.masked_scatter(vision, keep)
            presence = key_valid & (~vision | keep_full)
            counts = presence.sum(-1).tolist()
            idx, valid = pack_indices(presence, "right", counts)
            return surrogate_gather(h, p_full.to(h.dtype), vision, idx, valid), (idx, valid, counts)
        keep_full = keep_full.masked_scatter(vision, state.keep)
        if state.merge is not None:
            h = baselines.merge_dropped(h, vision, state.merge)
        presence = key_valid & (~vision | keep_full)
        counts = presence.sum(-1).tolist()
        idx, valid = pack_indices(presence, "right", counts)
        return gather_tokens(h, idx, valid), (idx, valid, counts)

    def run_layers(self, start: int, stop: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   pk: Packing, qk_at: int | None = None) -> tuple[torch.Tensor, list, list | None]:
        """Decoder layers [start, stop) over h (B, L, D) with the `MRoPE` tables and the attention's
        `Packing` → h, each layer's (k, v) (B, Hkv, L, d), and layer ``qk_at``'s roped (q, k) (what ITS
        scores), else None."""
        kvs: list = []
        qk: list = []
        for i in range(start, stop):
            h, kv = self.model.layers[i](h, cos, sin, pk, qkv_out=qk if i == qk_at else None)
            kvs.append(kv)
        return h, kvs, qk or None

    # ------------------------------------------------------------------ prefill / training forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                features: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                grid_thw: torch.Tensor | None = None, budget: Budget | list | None = None,
                use_cache: bool = False, use_its: bool = True, row_scan: list | None = None,
                schedule: Schedule | None = None, last_logits: bool = False, layers=None) -> Output:
        """Prefill (eval) or training forward over a left-padded batch (B, L).

        ``features`` = cached `encode_volume` output for the whole batch (concatenated in row order);
        else ``pixel_values``/``grid_thw`` are encoded here. ``row_scan``: with ``pixel_values``/
        ``grid_thw`` of S distinct scans, the scan of each row, or the scans of each row in prompt order
        (prior, current), so several questions on one scan encode it once, inside this forward.
        ``budget``: one Budget or one per row (eval). ``use_its=False`` runs without ITS.
        ``schedule``: how ITS is applied in training mode (default: hard drop); ignored in eval mode.
        ``last_logits``: logits of the last position only (B, 1, vocab), what decoding needs.
        ``layers``: what runs a span of decoder layers at inference when the varlen kernel is in use
        (`inference.engine.PrefillEngine`: the span captured as a CUDA graph per length bucket), called
        as ``layers(model, start, stop, h, cos, sin, key_valid, counts, qk_at)`` and returning what
        `run_layers` returns; default (and in training, and without varlen): `run_layers`.
        Attention: in eval mode on CUDA one varlen FlashAttention call per layer over the packed real
        tokens (`attention.Packing`); otherwise (CPU, training) SDPA with a padding-aware causal mask.
        Returns logits over the surviving positions and what the trainer's losses need (`Output`).
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
        budgets = ([Budget.parse(b) for b in budget] if isinstance(budget, list)
                   else [Budget.parse(budget)] * B)
        # The prompt's structure (positions, visual and question spans, lengths) is worked out on the
        # host from ONE copy of the ids, and sent back without waiting: no device read per row or check.
        dev = input_ids.device
        ids_h, mask_h, grid_h = _host_copy(input_ids, attention_mask, grid_thw)
        vision_h, question_h = self.masks(ids_h, mask_h)
        n_visual = int(((ids_h == c.video_token_id) | (ids_h == c.image_token_id)).sum())
        h = self.embed(input_ids, features, n_visual)
        pos_h, _ = rope_index(ids_h, grid_h, mask_h, c)
        next_pos = _to(pos_h.max(0).values.masked_fill(mask_h == 0, -1).max(-1).values + 1, dev)   # (B,)
        pos = _to(pos_h, dev)
        cos, sin = self.rope(pos, h.dtype)
        key_valid = attention_mask.bool()
        vision, question = _to(vision_h, dev), _to(question_h, dev)
        orig_index = torch.arange(L, device=h.device).expand(B, L)
        varlen = not self.training and varlen_available(h.device, h.dtype)
        counts = mask_h.bool().sum(-1).tolist()
        caches: list = []
        state: ITSState | None = None
        run_its = use_its and bool(vision_h.any()) and bool(question_h.any())
        needs_theta = [b.mode for b in budgets if b.mode in THRESHOLD_MODES]
        if run_its and self.its_module is None and needs_theta:          # S1: no learned threshold θ
            raise ValueError(S1_MESSAGE.format(mode=needs_theta[0]))
        rows = [(_to(vision_h[b].nonzero().flatten(), dev), _to(question_h[b].nonzero().flatten(), dev))
                for b in range(B)] if run_its else None
        graphs = layers if (layers is not None and varlen) else None
        seq_lens: list = []                       # the attention length each layer saw

        def span(start, stop, h, cos, sin, key_valid, counts, qk_at=None):
            seq_lens.extend([h.shape[1]] * (stop - start))
            if start == stop:                     # ITS at the last layer: nothing after it
                return h, [], None
            if graphs is not None:
                return graphs(self, start, stop, h, cos, sin, key_valid, counts, qk_at)
            return self.run_layers(start, stop, h, cos, sin, Packing.build(key_valid, varlen, counts), qk_at)

        n_layers = len(self.model.layers)
        first = self.its_layer + 1 if run_its else n_layers
        h, kvs, qk = span(0, first, h, cos, sin, key_valid, counts, self.its_layer if run_its else None)
        if use_cache:
            caches.extend(kvs)
        if run_its:
            state = self._its(qk[0], qk[1], vision, question, key_valid, budgets, schedule, rows)
            h, dropped = self._apply_its(h, state, vision, key_valid, schedule)
            # After the survivors' count was read the device idles until the later layers are queued:
            # only what they need comes first (their rotary tables: the survivors' rows of the full ones).
            if dropped is not None:
                idx, valid, counts = dropped
                cos, sin = (gather_tokens(t[:, 0], idx, valid)[:, None] for t in (cos, sin))
                key_valid = valid
            h, kvs, _ = span(first, n_layers, h, cos, sin, key_valid, counts)
            if dropped is not None:
                caches = [tuple(gather_tokens(t.transpose(1, 2), idx, valid).transpose(1, 2) for t in kv)
                          for kv in caches]
                orig_index = gather_tokens(orig_index, idx, valid)
            if use_cache:
                caches.extend(kvs)
        logits = self.lm_head(self.model.norm(h[:, -1:] if last_logits else h))
        return Output(logits=logits, its=state, key_valid=key_valid, orig_index=orig_index,
                      cache=caches if use_cache else None, next_position=next_pos, seq_len_per_layer=seq_lens,
                      scan_features=scan_features)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto ``device`` without waiting for the device's queued work (pageable memory is
    staged at once, so the source may be freed after)."""
    return t.to(device, non_blocking=True)


def _host_copy(*ts: torch.Tensor | None) -> tuple:
    """CPU copies of small integer tensors (ids, mask, grid) with one device read in all; None stays None."""
    present = [t for t in ts if t is not None]
    if all(t.device.type == "cpu" for t in present):
        return ts
    flat = torch.cat([t.reshape(-1).long() for t in present]).cpu()
    out, i = [], 0
    for t in ts:
        if t is None:
            out.append(None)
            continue
        out.append(flat[i:i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return tuple(out)
