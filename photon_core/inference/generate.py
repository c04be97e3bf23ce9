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
             max_new_tokens: int = 32, eos_token_id: int | None = None, use_its: bool = True,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, return_step_logits: bool = False, on_prefill=None):
    """Greedy (or sampled) decoding with a KV cache that holds only the surviving tokens.

    Returns (tokens (B, T), prefill Output, step logits (B, T, vocab) or None). Rows that hit
    ``eos_token_id`` continue with padding (eos) until all are done.
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
    for step in range(max_new_tokens):
        if return_step_logits:
            steps.append(logits.float())
        if do_sample:
            probs = top_p_filter(F.softmax(logits.float() / max(temperature, 1e-5), -1), top_p)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt == eos_token_id)
        tokens.append(nxt)
        if (eos_token_id is not None and bool(done.all())) or step == max_new_tokens - 1:
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


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of a (B, vocab) distribution, renormalised."""
    if top_p >= 1.0:
        return probs
    sp, si = probs.sort(-1, descending=True)
    cut = sp.cumsum(-1) - sp > top_p
    sp = sp.masked_fill(cut, 0)
    return torch.zeros_like(probs).scatter(-1, si, sp) / sp.sum(-1, keepdim=True)
