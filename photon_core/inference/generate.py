"""Decoding: prefill once (ITS drops tokens there), then generate with a KV cache of the survivors.

`generate(model, ...)` is what the Predictor, the evaluator and the benchmarks call; the model file
holds the forward only (as gpt-fast keeps generate.py apart from model.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from photon_core.model.photon import PhotonModel


@torch.no_grad()
def generate(model: PhotonModel, input_ids, attention_mask=None, features=None, grid_thw=None, budget=None,
             max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None, use_its: bool = True,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
             return_step_logits: bool = False, on_prefill=None):
    """Greedy (or sampled) decoding with a KV cache that holds only the surviving tokens.

    Returns (tokens (B, T), prefill Output, step logits (B, T, vocab) or None). Rows that hit one of
    the ``eos_token_id`` ids continue with padding (the first eos id) until all are done.
    ``repetition_penalty`` (transformers' rule, over the prompt's ids — dropped visual tokens included,
    as the ids are — and the generated ones), then temperature, ``top_k``, ``top_p`` (as a checkpoint's
    generation_config.json asks: inference/prompt.GenerationSettings). Step logits are the raw ones.
    """
    out = model(input_ids, attention_mask, features=features, grid_thw=grid_thw, budget=budget,
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
        scores = repetition_penalised(logits.float(), seen, repetition_penalty)
        if do_sample:
            if top_k > 0:
                kth = scores.topk(min(int(top_k), scores.shape[-1]), -1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            probs = top_p_filter(F.softmax(scores / max(temperature, 1e-5), -1), top_p)
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
        h = model.model.embed_tokens(nxt[:, None])
        p = (out.next_position + step)[None, :, None].expand(3, B, 1)
        cos, sin = model.rope(p, h.dtype)
        key_valid = torch.cat([key_valid, torch.ones(B, 1, dtype=torch.bool, device=h.device)], 1)
        allowed = None if bool(key_valid.all()) else key_valid[:, None, None, :]
        new_cache = []
        for layer, kv in zip(model.model.layers, cache):
            h, kv = layer(h, cos, sin, allowed, False, cache=kv)
            new_cache.append(kv)
        cache = new_cache
        logits = model.lm_head(model.model.norm(h))[:, -1]
    toks = torch.stack(tokens, 1)
    return toks, out, (torch.stack(steps, 1) if return_step_logits else None)


def repetition_penalised(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the score of every id already in the row (``seen`` (B, L),
    −1 = padding) is divided by ``penalty`` if positive, multiplied by it if negative."""
    if penalty == 1.0:
        return scores
    hits = torch.zeros_like(scores).scatter_add(1, seen.clamp_min(0), (seen >= 0).to(scores.dtype)) > 0
    return torch.where(hits, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of a (B, vocab) distribution, renormalised."""
    if top_p >= 1.0:
        return probs
    sp, si = probs.sort(-1, descending=True)
    cut = sp.cumsum(-1) - sp > top_p
    sp = sp.masked_fill(cut, 0)
    return torch.zeros_like(probs).scatter(-1, si, sp) / sp.sum(-1, keepdim=True)
