"""Decoding: prefill once (ITS drops tokens there), then the decode engine continues from the KV cache
of the survivors (`engine.py`: static cache, the step captured as a CUDA graph on GPU).

`generate(model, ...)` is what the Predictor, the evaluator and the benchmarks call; the model file
holds the forward only (as gpt-fast keeps generate.py apart from model.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from photon_core.inference.engine import Sampling, engine_for, prefill_for, repetition_penalised, top_p_filter
from photon_core.model.photon import Output, PhotonModel

__all__ = ["Generation", "Sampling", "generate", "repetition_penalised", "top_p_filter"]


class Generation(NamedTuple):
    tokens: torch.Tensor                 # (B, T) generated ids; rows that stopped continue with the stop id
    prefill: Output                      # the prefill's output (ITS state, kept positions, cache)
    step_logits: torch.Tensor | None     # (B, T, vocab) raw logits of every step, when asked for
    logprobs: torch.Tensor               # (B, T) log-probability of each generated token under the model
    stats: dict                          # decode path (eager / cuda-graph / ...), fallback, bucket, steps


@torch.inference_mode()
def generate(model: PhotonModel, input_ids, attention_mask=None, features=None, grid_thw=None, budget=None,
             max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None, use_its: bool = True,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
             return_step_logits: bool = False, on_prefill=None, mode: str = "auto",
             prefill_mode: str = "auto", on_step=None) -> Generation:
    """Greedy (or sampled) decoding with a KV cache that holds only the surviving tokens.

    Rows that produce one of the ``eos_token_id`` ids continue with the first of them until all are
    done (checked every few steps on CUDA, so a finished batch may carry a few more stop ids).
    ``mode``: the decode engine's (`engine.MODES`; 'auto' = compiled and captured on GPU, eager on CPU);
    ``prefill_mode``: the prefill layers' (`engine.PREFILL_MODES`; 'auto' = CUDA graphs on GPU).
    ``on_step(n)``: see `DecodeEngine.decode` (progress; a true result stops the decoding).
    """
    out = model(input_ids, attention_mask, features=features, grid_thw=grid_thw, budget=budget,
                use_cache=True, use_its=use_its, last_logits=True, layers=prefill_for(model, prefill_mode))
    if on_prefill is not None:
        on_prefill(out)
    stops = () if eos_token_id is None else tuple(int(i) for i in torch.as_tensor(eos_token_id).flatten())
    sp = (Sampling(True, float(temperature), int(top_k), float(top_p), float(repetition_penalty), stops)
          if do_sample else Sampling(repetition_penalty=float(repetition_penalty), eos_token_ids=stops))
    dec = engine_for(model, mode).decode(out, input_ids, attention_mask, max_new_tokens, sp, generator,
                                         return_step_logits, on_step)
    return Generation(dec.tokens, out, dec.step_logits, dec.logprobs, dec.stats)
