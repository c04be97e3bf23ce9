"""The decode engine on CPU: static cache + fixed-shape step against independent recomputation, batch rows
against single runs, stops, sampling, log-probabilities, the packed (varlen) prefill's bookkeeping, and
the import hygiene of what runs on the GPU machine."""
import logging
import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from photon_core.inference import engine as eng
from photon_core.inference.generate import generate
from photon_core.model import attention
from photon_core.model.budget import Budget
from photon_core.model.checkpoint import load_model
from photon_core.model.sgp import pack_indices


@pytest.fixture(scope="module")
def fx(parity_dir):
    return load_file(str(parity_dir / "fixture.safetensors"))


@pytest.fixture(scope="module")
def model(parity_dir):
    return load_model(parity_dir / "model", "cpu")


@pytest.fixture(scope="module")
def feats(model, fx):
    with torch.no_grad():
        return model.encode_volume(fx["pixel_values_videos"].float(), fx["video_grid_thw"])


def left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(r.numel() for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - r.numel():] = r
        mask[b, L - r.numel():] = 1
    return ids, mask


def test_step_logits_equal_a_fresh_prefill_of_the_continuation(model, fx, feats):
    """Teacher forcing: a prefill of prompt + generated[:-1] gives, at its last positions, the logits each
    decode step produced — the engine's cache slots, positions and masks are right. (Without ITS: with it,
    decode steps see the pruned cache in every layer, which a longer prefill would not; the ITS path is
    checked against the reference's own generation in test_parity.)"""
    ids, grid = fx["q1.input_ids"], fx["video_grid_thw"]
    g = generate(model, ids, features=feats, grid_thw=grid, use_its=False, max_new_tokens=6,
                 return_step_logits=True)
    full = torch.cat([ids, g.tokens[:, :-1]], 1)
    with torch.no_grad():
        out = model(full, features=feats, grid_thw=grid, use_its=False)
    T = g.tokens.shape[1]
    assert torch.allclose(out.logits[:, -T:], g.step_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.logits[:, -T:].argmax(-1), g.tokens)


def test_batch_rows_with_different_kept_lengths_equal_single_runs(model, fx, feats):
    q1, q2, grid = fx["q1.input_ids"][0], fx["q2.input_ids"][0], fx["video_grid_thw"]
    V = feats.shape[0]
    budgets = [Budget("top_k", V // 4), Budget("top_k", 3 * V // 4), Budget("auto")]
    rows = [q1, q2, q2]
    ids, mask = left_pad(rows, model.config.pad_token_id)
    many = generate(model, ids, mask, features=feats.repeat(3, 1), grid_thw=grid.repeat(3, 1), budget=budgets,
                    max_new_tokens=8, return_step_logits=True)
    kept = many.prefill.its.kept_count.tolist()
    assert len(set(kept)) == 3 and len({r.numel() for r in rows}) == 2      # rows of different lengths
    for b, (r, bud) in enumerate(zip(rows, budgets)):
        one = generate(model, r[None], features=feats, grid_thw=grid, budget=bud, max_new_tokens=8,
                       return_step_logits=True)
        assert torch.equal(many.tokens[b], one.tokens[0]), b
        assert torch.allclose(many.step_logits[b], one.step_logits[0], atol=1e-4, rtol=1e-4), b
        assert torch.allclose(many.logprobs[b], one.logprobs[0], atol=1e-5), b


def test_logprobs_are_those_of_the_chosen_tokens(model, fx, feats):
    g = generate(model, fx["q2.input_ids"], features=feats, grid_thw=fx["video_grid_thw"], max_new_tokens=5,
                 return_step_logits=True)
    ref = g.step_logits.log_softmax(-1).gather(-1, g.tokens[..., None])[..., 0]
    assert torch.allclose(g.logprobs, ref, atol=1e-6)
    assert bool((g.logprobs <= 0).all())


def test_decoding_under_autocast_of_an_fp32_model(model, fx, feats):
    """A training run's checks decode its fp32 model under bf16 autocast: the step's keys and values
    (bf16) go into the static cache kept in the model's dtype (the first GPU run failed here)."""
    ids, grid = fx["q1.input_ids"], fx["video_grid_thw"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = generate(model, ids, features=feats, grid_thw=grid, max_new_tokens=4)
    assert g.tokens.shape == (1, 4) and bool(torch.isfinite(g.logprobs).all())


def test_decoding_stops_where_the_caller_says_and_reports_each_step(model, fx, feats):
    """``on_step(n)`` is told each step's token count before it runs (progress) and ends the decoding when
    it returns true; until then the tokens are those of an undisturbed run."""
    ids, grid = fx["q1.input_ids"], fx["video_grid_thw"]
    free = generate(model, ids, features=feats, grid_thw=grid, max_new_tokens=8)
    seen = []
    g = generate(model, ids, features=feats, grid_thw=grid, max_new_tokens=8,
                 on_step=lambda n: seen.append(n) or n == 3)
    assert seen == [1, 2, 3] and g.tokens.shape[1] == 3
    assert g.tokens[0].tolist() == free.tokens[0, :3].tolist()
    seen.clear()
    generate(model, ids, features=feats, grid_thw=grid, max_new_tokens=8, on_step=seen.append)
    assert seen == list(range(1, 8))


def test_rows_stop_at_a_stop_id_and_the_loop_ends(model, fx, feats):
    ids, grid = fx["q1.input_ids"], fx["video_grid_thw"]
    free = generate(model, ids, features=feats, grid_thw=grid, max_new_tokens=8)
    stop = int(free.tokens[0, 2])
    first = free.tokens[0].tolist().index(stop)
    g = generate(model, ids, features=feats, grid_thw=grid, max_new_tokens=8, eos_token_id=[999_999, stop])
    assert g.tokens[0, :first + 1].tolist() == free.tokens[0, :first + 1].tolist()
    assert g.tokens.shape[1] == first + 1            # CPU checks every step: nothing after the stop
    # a batch: the row that stops pads with the first stop id until the other stops too
    ids2, mask2 = left_pad([fx["q1.input_ids"][0], fx["q2.input_ids"][0]], model.config.pad_token_id)
    both = generate(model, ids2, mask2, features=feats.repeat(2, 1), grid_thw=grid.repeat(2, 1),
                    max_new_tokens=8, eos_token_id=stop)
    r0 = both.tokens[0].tolist()
    assert r0[:first + 1] == free.tokens[0, :first + 1].tolist() and set(r0[first:]) == {stop}


def test_engine_reuses_its_buffers_without_leaking_state(model, fx, feats):
    """A second prompt of another length in the same bucket gives what a fresh engine gives."""
    grid = fx["video_grid_thw"]
    e = eng.DecodeEngine(model, "eager")
    fresh = eng.DecodeEngine(model, "eager")
    outs = []
    for ids in (fx["q1.input_ids"], fx["q2.input_ids"]):
        with torch.no_grad():
            pre = model(ids, features=feats, grid_thw=grid, use_cache=True, last_logits=True)
        outs.append((e.decode(pre, ids, None, 6), pre, ids))
    assert len(e.states) == 1
    d2, pre2, ids2 = outs[1]
    ref = fresh.decode(pre2, ids2, None, 6)
    assert torch.equal(d2.tokens, ref.tokens) and torch.equal(d2.logprobs, ref.logprobs)


def _failing_compile(monkeypatch):
    def compile_(fn, **kw):
        def broken(*a, **k):
            raise RuntimeError("inductor is unavailable here")
        return broken
    monkeypatch.setattr(eng.torch, "compile", compile_)


def test_a_compile_that_fails_falls_back_and_says_so(model, fx, feats, monkeypatch):
    """On the CPU a failing compile leaves the eager step (on CUDA: the eager step captured, test_gpu);
    the tokens are the eager engine's and the stats name the failure."""
    ids, grid = fx["q1.input_ids"], fx["video_grid_thw"]
    with torch.no_grad():
        pre = model(ids, features=feats, grid_thw=grid, use_cache=True, last_logits=True)
    ref = eng.DecodeEngine(model, "eager").decode(pre, ids, None, 5)
    _failing_compile(monkeypatch)
    e = eng.DecodeEngine(model, "compile")
    d = e.decode(pre, ids, None, 5)
    assert torch.equal(d.tokens, ref.tokens) and torch.equal(d.logprobs, ref.logprobs)
    assert e.mode == "eager" and d.stats["path"] == "eager (fallback)"
    assert "compile failed: RuntimeError: inductor is unavailable here" in d.stats["fallback"]
    assert eng.DecodeEngine(model).mode == "eager"              # auto on the CPU


def test_choose_sampling_rules():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.1, 3.0, 2.9, 0.0]])
    greedy, lp = eng.choose(logits, eng.Sampling())
    assert greedy.tolist() == [0, 1]
    assert torch.allclose(lp, logits.log_softmax(-1).gather(1, greedy[:, None])[:, 0])
    noise = torch.empty(2, 4).exponential_()
    top1, _ = eng.choose(logits, eng.Sampling(do_sample=True, top_k=1), noise)
    assert top1.tolist() == [0, 1]                     # top-k 1 is greedy whatever the noise
    seen = torch.tensor([[True, False, False, False], [False, True, False, False]])
    pen, _ = eng.choose(logits, eng.Sampling(repetition_penalty=4.0), seen=seen)
    assert pen.tolist() == [1, 2]                      # the seen maxima are divided by 4
    # sampling frequencies follow the distribution (exponential race), temperature flattens it
    n = 20000
    p = torch.tensor([0.6, 0.3, 0.1])
    noise = torch.empty(n, 3).exponential_()
    draws, _ = eng.choose(p.log().expand(n, 3), eng.Sampling(do_sample=True), noise)
    freq = torch.bincount(draws, minlength=3).float() / n
    assert torch.allclose(freq, p, atol=0.02)
    hot, _ = eng.choose(p.log().expand(n, 3), eng.Sampling(do_sample=True, temperature=100.0),
                        torch.empty(n, 3).exponential_())
    assert float(torch.bincount(hot, minlength=3).float().min() / n) > 0.3


def test_repetition_penalty_sees_the_prompt_and_every_generated_token(model, fx, feats):
    ids, grid = fx["q1.input_ids"], fx["video_grid_thw"]
    pen = 1.8
    g = generate(model, ids, features=feats, grid_thw=grid, max_new_tokens=8, repetition_penalty=pen,
                 return_step_logits=True)
    seen = set(ids[0].tolist())
    for t in range(g.tokens.shape[1]):
        s = g.step_logits[0, t].clone()
        hit = torch.tensor([i in seen for i in range(s.numel())])
        s = torch.where(hit, torch.where(s < 0, s * pen, s / pen), s)
        assert int(g.tokens[0, t]) == int(s.argmax())
        seen.add(int(g.tokens[0, t]))
    plain = generate(model, ids, features=feats, grid_thw=grid, max_new_tokens=8)
    assert not torch.equal(plain.tokens, g.tokens)          # the penalty changed the choice somewhere


def test_sampling_is_seeded_and_top_k_one_is_greedy(model, fx, feats):
    ids, grid = fx["q1.input_ids"], fx["video_grid_thw"]
    kw = dict(features=feats, grid_thw=grid, max_new_tokens=6, do_sample=True, temperature=1.5)
    a = generate(model, ids, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, ids, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.tokens, b.tokens)
    greedy = generate(model, ids, features=feats, grid_thw=grid, max_new_tokens=6)
    k1 = generate(model, ids, generator=torch.Generator().manual_seed(3), top_k=1, **kw)
    assert torch.equal(k1.tokens, greedy.tokens)


@pytest.mark.slow
def test_compiled_step_equals_eager_on_cpu(model, fx, feats):
    """The compiled decode step (one compiled graph reused by every layer) — the GPU's `compile` mode
    without the graph capture — gives the eager step's tokens and logits."""
    ids, grid = fx["q1.input_ids"], fx["video_grid_thw"]
    free = generate(model, ids, features=feats, grid_thw=grid, max_new_tokens=6)
    stop = int(free.tokens[0, 4])                  # stop ids and the repetition penalty run in the step too
    kw = dict(features=feats, grid_thw=grid, max_new_tokens=6, return_step_logits=True, eos_token_id=[stop],
              repetition_penalty=1.3)
    a = generate(model, ids, mode="eager", **kw)
    b = generate(model, ids, mode="compile", **kw)
    assert b.stats["path"] == "compiled" and b.stats["fallback"] is None
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.step_logits, b.step_logits, atol=1e-4)
    s = dict(features=feats, grid_thw=grid, max_new_tokens=4, do_sample=True, top_k=20, top_p=0.9)
    c = generate(model, ids, mode="eager", generator=torch.Generator().manual_seed(1), **s)
    d = generate(model, ids, mode="compile", generator=torch.Generator().manual_seed(1), **s)
    assert d.stats["fallback"] is None and torch.equal(c.tokens, d.tokens)


@pytest.mark.slow
def test_compiled_step_compiles_the_layer_once_for_every_layer(tiny_model_dir):
    """`compile` compiles one decoder layer and calls it for each. Were it recompiled per layer (a Python
    attribute of the layer branched on, a guard on the module), every layer would cost a compile, and past
    dynamo's recompile limit (8; the 3B shape has 36 layers) the fullgraph compile fails and decoding falls
    back to the captured eager step (5.7 against 3.5 ms/token on the 2026-12-04 H200). Checked to fail
    so: a per-layer int branched on in `DecoderLayer.decode` gives 'eager (fallback)' here."""
    import dataclasses

    from torch._dynamo.utils import counters

    from photon_core.model.config import PhotonConfig
    from photon_core.model.photon import PhotonModel

    cfg = PhotonConfig.from_file(tiny_model_dir / "config.json")
    L = torch._dynamo.config.recompile_limit + 2
    cfg = dataclasses.replace(cfg, num_hidden_layers=L, its_layer=min(cfg.its_layer, L - 1))
    torch.manual_seed(0)
    m = PhotonModel(cfg).eval()
    m.init_weights(0.2)
    m.fuse_projections()                          # as served
    ids = torch.randint(10, cfg.vocab_size - 10, (1, 12))
    a = generate(m, ids, max_new_tokens=5, mode="eager")
    torch._dynamo.reset()
    counters.clear()
    b = generate(m, ids, max_new_tokens=5, mode="compile")
    assert b.stats["path"] == "compiled" and b.stats["fallback"] is None
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])   # prologue, layer, epilogue
    assert torch.equal(a.tokens, b.tokens)


def _reference_varlen(q, k, v, cu, max_len, causal):
    """The packed kernel's contract, in plain PyTorch: attention inside each [cu[i], cu[i+1])."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        out[a:b] = o.transpose(0, 1)
    return out


def test_packed_prefill_equals_the_masked_one(model, fx, feats, monkeypatch):
    """The varlen path's packing (explicit cu_seqlens from the validity mask, gapped positions after the
    drop) run through a reference kernel gives the SDPA-mask prefill's logits, before and after ITS."""
    q1, q2, grid = fx["q1.input_ids"][0], fx["q2.input_ids"][0], fx["video_grid_thw"]
    ids, mask = left_pad([q1, q2], model.config.pad_token_id)
    kw = dict(features=feats.repeat(2, 1), grid_thw=grid.repeat(2, 1), budget=[Budget("top_k", 20), "auto"])
    with torch.no_grad():
        ref = model(ids, mask, **kw)
        calls = []
        counted = lambda *a, **k: calls.append(1) or _reference_varlen(*a, **k)  # noqa: E731
        monkeypatch.setattr(attention, "_varlen", counted)
        monkeypatch.setattr("photon_core.model.photon.varlen_available", lambda device, dtype: True)
        out = model(ids, mask, **kw)
    assert len(calls) == model.config.num_hidden_layers
    assert torch.equal(out.key_valid, ref.key_valid)
    v = ref.key_valid
    assert torch.allclose(out.logits[v], ref.logits[v], atol=1e-4, rtol=1e-4)


def _strict_varlen(monkeypatch):
    """The reference kernel, holding the caller to what a real kernel needs: no segment longer than
    ``max_len``, no empty segment."""
    def kernel(q, k, v, cu, max_len, causal):
        lens = cu[1:] - cu[:-1]
        assert int(lens.max()) <= max_len and int(lens.min()) > 0, lens.tolist()
        return _reference_varlen(q, k, v, cu, max_len, causal)
    monkeypatch.setattr(attention, "_varlen", kernel)
    monkeypatch.setattr("photon_core.model.photon.varlen_available", lambda device, dtype: True)


def _same_prefill(a, b, atol=1e-5):
    v = b.key_valid
    assert torch.equal(a.key_valid, v) and torch.equal(a.orig_index, b.orig_index)
    assert torch.equal(a.its.keep, b.its.keep) and a.seq_len_per_layer == b.seq_len_per_layer
    assert torch.allclose(a.logits[v], b.logits[v], atol=atol, rtol=atol)
    assert len(a.cache) == len(b.cache)
    for (ka, va), (kb, vb) in zip(a.cache, b.cache):        # (B, Hkv, N, d): compare the real slots
        for x, y in ((ka, kb), (va, vb)):
            assert torch.allclose(x.transpose(1, 2)[v], y.transpose(1, 2)[v], atol=atol, rtol=atol)


def test_padded_prefill_spans_equal_the_plain_prefill(model, fx, feats, monkeypatch):
    """What a captured prefill graph runs (`engine.PrefillEngine`: the layers before and after the ITS
    decision as two spans, padded to a length bucket, every slot packed in place), run eagerly: the same
    logits, keep decisions, survivors and cache as the plain varlen prefill, for a batch of rows of
    different lengths and budgets; later prompts reuse a bucket's buffers without leaking into them."""
    _strict_varlen(monkeypatch)
    q1, q2, grid = fx["q1.input_ids"][0], fx["q2.input_ids"][0], fx["video_grid_thw"]
    V = feats.shape[0]
    ids, mask = left_pad([q2, q1, q1], model.config.pad_token_id)
    kw = dict(features=feats.repeat(3, 1), grid_thw=grid.repeat(3, 1), use_cache=True,
              budget=[Budget("top_k", V // 4), Budget("top_k", 3 * V // 4), Budget("auto")])
    e = eng.PrefillEngine(model, "padded")
    with torch.no_grad():
        _same_prefill(model(ids, mask, **kw, layers=e), model(ids, mask, **kw))
        first = model.its_layer + 1
        assert sorted(k[:2] for k in e.spans) == [(0, first), (first, model.config.num_hidden_layers)]
        one = dict(features=feats, grid_thw=grid, use_cache=True, budget="auto")
        for r in (q2, q1, q2):                         # longer, shorter, longer: stale slots in between
            _same_prefill(model(r[None], **one, layers=e), model(r[None], **one))
        plain = model(q1[None], features=feats, grid_thw=grid, use_its=False, use_cache=True)
        padded = model(q1[None], features=feats, grid_thw=grid, use_its=False, use_cache=True, layers=e)
    assert padded.its is None and torch.allclose(padded.logits, plain.logits, atol=1e-5, rtol=1e-5)
    assert any(k[:3] == (0, model.config.num_hidden_layers, None) for k in e.spans)   # no ITS: one span
    assert e.path == "padded (eager)" and e.fallback is None


def test_its_at_the_last_layer_leaves_an_empty_second_span(model, fx, feats, monkeypatch):
    import dataclasses

    from photon_core.model.photon import PhotonModel

    _strict_varlen(monkeypatch)
    n, its = model.config.num_hidden_layers, model.its_layer
    last = PhotonModel(dataclasses.replace(model.config, its_layer=n - 1)).eval()
    last.load_state_dict({k.replace(f"layers.{its}.atp.", f"layers.{n - 1}.atp."): v
                          for k, v in model.state_dict().items()})
    kw = dict(features=feats, grid_thw=fx["video_grid_thw"], use_cache=True)
    e = eng.PrefillEngine(last, "padded")
    with torch.no_grad():
        _same_prefill(last(fx["q1.input_ids"], **kw, layers=e), last(fx["q1.input_ids"], **kw))
    assert [k[:2] for k in e.spans] == [(0, n)]


def test_generation_through_the_padded_prefill_equals_the_plain_one(model, fx, feats, monkeypatch):
    _strict_varlen(monkeypatch)
    ids, mask = left_pad([fx["q1.input_ids"][0], fx["q2.input_ids"][0]], model.config.pad_token_id)
    kw = dict(features=feats.repeat(2, 1), grid_thw=fx["video_grid_thw"].repeat(2, 1), max_new_tokens=6,
              budget=["top_k:20", "auto"], return_step_logits=True)
    a = generate(model, ids, mask, prefill_mode="padded", **kw)
    b = generate(model, ids, mask, prefill_mode="eager", **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.step_logits, b.step_logits, atol=1e-5, rtol=1e-5)
    assert eng.prefill_for(model, "padded").spans            # the engine ran


def test_prefill_spans_are_dropped_oldest_first_beyond_the_limits(model, fx, feats, monkeypatch):
    _strict_varlen(monkeypatch)
    grid = fx["video_grid_thw"]
    e = eng.PrefillEngine(model, "padded", max_spans=3)
    with torch.no_grad():
        for B in (1, 2, 3):                     # two spans (before / after ITS) per batch size
            ids, mask = left_pad([fx["q1.input_ids"][0]] * B, model.config.pad_token_id)
            model(ids, mask, features=feats.repeat(B, 1), grid_thw=grid.repeat(B, 1), layers=e)
        assert len(e.spans) == 3 and [k[3] for k in e.spans] == [2, 3, 3]     # rows of the spans kept
        e.max_bytes = 1
        out = model(fx["q1.input_ids"], features=feats, grid_thw=grid, layers=e, use_cache=True)
    assert len(e.spans) == 1 and next(iter(e.spans))[3] == 1 and out.cache is not None


def test_segment_packing_keeps_every_slot_in_place(model):
    valid = torch.tensor([[False, False, True, True, True], [False, True, True, True, True]])
    pk = attention.Packing.segments(valid)
    assert pk.varlen and pk.index is None and pk.max_len == 5
    assert pk.cu_seqlens.tolist() == [0, 2, 5, 6, 10]       # row 0: 2 padding, 3 real; row 1: 1, 4
    with pytest.raises(ValueError, match="needs CUDA"):
        eng.PrefillEngine(model, "graph")
    assert eng.PrefillEngine(model).mode == "eager"             # auto on the CPU


def test_packing_reads_the_validity_mask_not_positions():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    pk = attention.Packing.build(valid, varlen=True)
    assert pk.cu_seqlens.tolist() == [0, 3, 8] and pk.max_len == 5
    assert pk.index.tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    idx, ok = pack_indices(torch.tensor([[True, False, True, False, True]]), "right")
    assert attention.Packing.build(ok, varlen=True).cu_seqlens.tolist() == [0, 3]


def test_block_attention_varlen_route_equals_padded(monkeypatch):
    torch.manual_seed(0)
    lengths = [16, 16, 8, 4, 16]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    ref = attention.block_attention(q, k, v, cu)
    monkeypatch.setattr(attention, "varlen_available", lambda device, dtype: True)
    monkeypatch.setattr(attention, "_varlen", _reference_varlen)
    assert torch.allclose(attention.block_attention(q, k, v, cu, max(lengths)), ref, atol=1e-6)


def test_decode_attention_equals_sdpa():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 8)
    k, v = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    allowed = torch.rand(2, 10) > 0.3
    allowed[:, -1] = True
    ref = attention.attend(q, k, v, allowed[:, None, None, :])
    try:
        for kernel in attention.DECODE_KERNELS:
            attention.set_decode_kernel(kernel)
            assert torch.allclose(attention.decode_attention(q, k, v, allowed), ref, atol=1e-6), kernel
    finally:
        attention.set_decode_kernel("matmul")
    with pytest.raises(ValueError, match="decode kernel"):
        attention.set_decode_kernel("flash-decoding")


def test_answer_probability(tiny_model_dir):
    from photon_core.inference.predictor import Predictor

    p = Predictor(tiny_model_dir, device="cpu")
    g = torch.Generator().manual_seed(0)
    p.set_volume(torch.rand(140, 1, 280, 280, generator=g))
    a = p.ask("Is there a lesion in the liver?", max_new_tokens=4)
    assert 0 < a.probability <= 1 and a.to_dict()["probability"] == round(a.probability, 4)
    ids, _ = p.tokenizer.prompt("Is there a lesion in the liver?", p.features.shape[0])
    gen = generate(p.model, torch.tensor([ids]), features=p.features, grid_thw=p.grid_thw, max_new_tokens=4,
                   eos_token_id=p.model.config.eos_token_id)
    assert math.isclose(a.probability, math.exp(float(gen.logprobs[0, :a.generated_tokens].mean())),
                        rel_tol=1e-5)


BLOCKER = """
import importlib.abc, sys
BLOCKED = {"gradio", "pyvista", "nibabel", "pydicom", "plotly", "vtk"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not on the GPU machine")
        return None
sys.meta_path.insert(0, Block())
for m in list(sys.modules):
    if m.split(".")[0] in BLOCKED:
        del sys.modules[m]
"""


def test_gpu_bench_and_gpu_tests_import_without_ui_or_io_packages():
    """The GPU image has no gradio, pyvista, nibabel, pydicom: the benchmark and the GPU tests must import
    (and the benchmark's smoke plan must be built) with them blocked."""
    code = BLOCKER + """
sys.path[:0] = ["tests", "."]
import bench.gpu_bench as gb, test_gpu
gb.parse_args(["--smoke", "--section", "ours"])
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    # and the blocker does block: importing the app must fail under it
    r = subprocess.run([sys.executable, "-c", BLOCKER + "import gradio"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "not on the GPU machine" in r.stderr


# ---------------------------------------------------------------------- serving several users
@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from photon_core.inference.predictor import Predictor

    p = Predictor(tiny_model_dir, device="cpu")
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    vols = [p.encode(torch.rand(140, 1, 280, 280, generator=g))[:2] for g in gens]
    return p, vols


def _same(a, b):
    assert a.text == b.text and a.kept_indices == b.kept_indices and a.budget == b.budget
    assert np.allclose(a.rho, b.rho, atol=1e-5) and math.isclose(a.probability, b.probability, rel_tol=1e-4)


def test_warm_up_builds_on_cuda_only_and_leaves_the_session_as_it_was(served):
    """On the CPU there is nothing to compile (0 s, nothing run); forced, the warm-up runs a whole ask on a
    blank volume of the CT grid and leaves the loaded volume, the encode count and later answers as
    they were."""
    p, (v1, _, _) = served
    p.set_features(*v1)
    before = p.ask("Is there a lesion in the liver?", "auto", max_new_tokens=6)
    calls = p.encode_calls
    assert p.warm_up() == 0.0 and p.encode_calls == calls
    assert p.warm_up(4, always=True) > 0
    assert p.encode_calls == calls and p.features is v1[0]
    after = p.ask("Is there a lesion in the liver?", "auto", max_new_tokens=6)
    assert after.text == before.text and after.kept_indices == before.kept_indices


def test_concurrent_asks_from_several_sessions_equal_single_runs(served, caplog):
    """Asks from threads that arrive together (different volumes, priors, budgets; one Compare ask of
    three budgets) are answered in shared forwards, each exactly as it is alone."""
    from photon_core.inference.batching import AskBatcher
    from photon_core.inference.predictor import Query

    p, (v1, v2, v3) = served
    asks = [[Query("Is there a lesion in the liver?", "auto", v1)],
            [Query("How many lesions are in the left kidney?", "top_k:100", v2)],
            [Query("Is the spleen enlarged?", b, v3) for b in ("auto", "25%", "full")],
            [Query("Is there a lesion in the liver?", "ratio:0.1", v2)],
            [Query("Has the liver lesion grown since the prior scan?", "auto", v1, prior=v3)],  # 2,000 tokens
            [Query("Is there a lesion in the liver?", "top_k:300", v2, prior=v1)]]
    singles = [[p.answer([q], max_new_tokens=4)[0] for q in qs] for qs in asks]
    batcher = AskBatcher(p, window_s=0.5, max_rows=8)
    results, barrier = [None] * len(asks), threading.Barrier(len(asks))

    def user(i):
        barrier.wait()
        results[i] = batcher.ask(asks[i], max_new_tokens=4, tag=f"user{i}")

    with caplog.at_level(logging.INFO, logger="photon_core.inference.batching"):
        threads = [threading.Thread(target=user, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    batcher.close()
    for got, want in zip(results, singles):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _same(a, b)
    # 6 rows of 1,000 tokens + 2 rows of 2,000 tokens: two forwards, not six
    assert batcher.stats["asks"] == 6 and batcher.stats["batches"] == 2 and batcher.stats["max_rows"] == 6
    assert any(a.extra["batch"] == 6 for r in results for a in r)
    assert "ask batch: 4 asks" in caplog.text and "still queued" in caplog.text


def test_an_ask_given_up_is_not_run_and_a_batch_given_up_by_all_stops(served, caplog):
    """An ask on an official model on a CPU takes minutes; a caller that left (its page closed, its
    request cancelled) kept the model busy for nobody. A waiting caller now follows its ask (``tick``:
    queued, reading, writing the n-th token) and gives it up by raising there: queued, it never runs;
    running, its batch stops at the next token once every ask in it was given up; another user's ask
    in the same batch runs to its end, as it would alone."""
    from photon_core.inference.batching import AskBatcher
    from photon_core.inference.predictor import Query

    p, (v1, v2, _) = served
    q1 = [Query("Is there a lesion in the liver?", "auto", v1)]
    q2 = [Query("Is the spleen enlarged?", "auto", v2)]
    real_answer, ran = p.answer, []

    def slow_answer(rows, *a, on_step=None, on_layer=None, **k):   # 0.1 s a token and a prefill layer
        ran.append([r.question for r in rows])

        def step(n):
            time.sleep(0.1)
            return on_step(n)

        def layer(i, n):
            time.sleep(0.1 if slow_prefill else 0.0)
            return on_layer(i, n)
        return real_answer(rows, *a, on_step=step, on_layer=layer, **k)

    class Leave(Exception):
        pass

    slow_prefill = False
    p.answer = slow_answer
    try:
        batcher = AskBatcher(p, window_s=0.0)
        seen = []

        def leave_when_writing(where):
            seen.append(where)
            if where["phase"] == "writing" and where["tokens"] >= 3:
                raise Leave
        with caplog.at_level(logging.INFO, logger="photon_core.inference.batching"):
            t0 = time.perf_counter()
            with pytest.raises(Leave):
                batcher.ask(q1, max_new_tokens=30, tick=leave_when_writing)
            left = time.perf_counter() - t0
            # queued behind a running ask, given up at once: never run
            other = {}
            runner = threading.Thread(target=lambda: other.update(a=batcher.ask(q2, max_new_tokens=12)))
            runner.start()
            while not ran or ran[-1] != [q2[0].question]:
                time.sleep(0.01)
            with pytest.raises(Leave):
                batcher.ask(q1, max_new_tokens=5, tick=lambda where: (_ for _ in ()).throw(Leave()))
            runner.join(timeout=120)
            time.sleep(0.3)
            # given up while the prefill reads (0.1 s a layer): it stops at the next layer
            slow_prefill, reading = True, []

            def leave_when_reading(where):
                reading.append(where)
                if where["phase"] == "reading" and where.get("layer", 0) >= 2:
                    raise Leave
            with pytest.raises(Leave):
                batcher.ask(q2, max_new_tokens=5, tick=leave_when_reading)
            time.sleep(0.5)
        batcher.close()
    finally:
        p.answer = real_answer
    n_layers = len(p.model.model.layers)
    assert reading[-1]["layers"] == n_layers and 2 <= reading[-1]["layer"] < n_layers
    assert caplog.text.count("given up by every caller") == 2
    phases = [w["phase"] for w in seen]
    assert "writing" in phases and "queued" not in phases[phases.index("writing"):]
    assert 0.3 < left < 2.0                          # left after ≈ 3 tokens of 0.1 s, not 30
    assert "given up by every caller" in caplog.text and "given up before it ran" in caplog.text
    assert ran == [[q1[0].question], [q2[0].question], [q2[0].question]]   # the queued ask never ran
    _same(other["a"][0], p.answer(q2, max_new_tokens=12)[0])  # the other user's answer, whole


class _Stopped(Exception):
    pass


def _stop_at(k: int):
    """A progress step ``step(i, n)`` that stops the work when it reaches block (or layer) k."""
    def step(i, total):
        if i == k:
            raise _Stopped
    return step


def test_encoding_reports_each_vision_block_of_its_own_thread_and_stops_where_told(served):
    """The official tower takes ≈ 33 s on a 2-core CPU, as one step a load could neither report nor stop
    inside: ``step(i, n)`` now comes before each block (forward pre-hooks, this thread's forward only,
    removed after; what the step returns changes nothing), and what it raises stops the encoding."""
    p, _ = served
    frames = torch.rand(140, 1, 280, 280, generator=torch.Generator().manual_seed(5))
    plain = p.encode(frames)[0]
    n = len(p.model.visual.blocks)
    seen = []
    feats = p.encode(frames, lambda i, total: seen.append((i, total)) or 0.5)[0]
    assert seen == [(i, n) for i in range(n)] and torch.equal(feats, plain)

    with pytest.raises(_Stopped):
        p.encode(frames, _stop_at(1))
    assert all(not blk._forward_pre_hooks for blk in p.model.visual.blocks)
    other: list = []                                     # another thread's encoding is not reported
    seen.clear()
    thread = threading.Thread(target=lambda: other.append(p.encode(frames)[0]))

    def start_the_other(i, total):
        seen.append(i)
        if i == 0:
            thread.start()
            thread.join(timeout=120)
    p.encode(frames, start_the_other)
    assert seen == list(range(n)) and torch.equal(other[0], plain)


def test_the_prefill_reports_each_decoder_layer_once_and_stops_where_told(served):
    """An official model's prefill takes ≈ 22 s on a 2-core CPU, one step nobody could follow or cut:
    ``on_layer(i, n)`` now comes before each decoder layer of the prefill (not of the decode steps,
    which run the same layers), changes no answer, and what it raises stops the ask there."""
    from photon_core.inference.predictor import Query

    p, (v1, _, _) = served
    q = [Query("Is there a lesion in the liver?", "auto", v1)]
    plain = p.answer(q, max_new_tokens=6)[0]
    n = len(p.model.model.layers)
    seen = []
    got = p.answer(q, max_new_tokens=6, on_layer=lambda i, total: seen.append((i, total)) or 1)[0]
    assert seen == [(i, n) for i in range(n)]
    _same(got, plain)

    with pytest.raises(_Stopped):
        p.answer(q, max_new_tokens=6, on_layer=_stop_at(1))
    assert all(not layer._forward_pre_hooks for layer in p.model.model.layers)
    _same(p.answer(q, max_new_tokens=6)[0], plain)


def test_a_faulty_ask_fails_alone(served):
    from photon_core.inference.batching import AskBatcher
    from photon_core.inference.predictor import Query

    p, (v1, v2, _) = served
    batcher = AskBatcher(p, window_s=0.5)
    good, bad = [Query("Is there a lesion in the liver?", "auto", v1)], [Query("Is it?", "nonsense", v2)]
    out, barrier = {}, threading.Barrier(2)

    def user(name, qs):
        barrier.wait()
        try:
            out[name] = batcher.ask(qs, max_new_tokens=3)
        except ValueError as e:
            out[name] = e

    threads = [threading.Thread(target=user, args=a) for a in (("good", good), ("bad", bad))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    batcher.close()
    assert isinstance(out["bad"], ValueError)
    _same(out["good"][0], p.answer(good, max_new_tokens=3)[0])


def test_the_gpu_logit_bound_is_far_below_what_a_bug_gives(model, fx, feats, monkeypatch):
    """tests/test_gpu.py compares bf16 CUDA logits with fp32 CPU ones within LOGIT_BOUND of their scale:
    the bugs it guards against (positions off by one after the volume, a wrong visual token) must
    exceed that bound by far, here in fp32 on the CPU."""
    from test_gpu import LOGIT_BOUND

    from photon_core.model import photon

    ids, grid = fx["q1.input_ids"], fx["video_grid_thw"]
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    with torch.inference_mode():
        ref = model(ids, features=feats, grid_thw=grid, use_its=False).logits
        wrong = feats.clone()
        wrong[len(wrong) // 2] = 0
        token_bug = rel(model(ids, features=wrong, grid_thw=grid, use_its=False).logits, ref)
        rope = photon.rope_index

        def shifted(*args, **kw):
            pos, deltas = rope(*args, **kw)
            pos = pos.clone()
            pos[:, :, -12:] += 1
            return pos, deltas

        monkeypatch.setattr(photon, "rope_index", shifted)
        position_bug = rel(model(ids, features=feats, grid_thw=grid, use_its=False).logits, ref)
    assert min(token_bug, position_bug) > 2 * LOGIT_BOUND, (token_bug, position_bug)


# ---------------------------------------------------------------------- fewer kernels, same numbers
def test_rmsnorm_and_rope_round_as_the_reference_formulas():
    """RMSNorm (one rms_norm) and rope (roll + signed sin) give, bit for bit, transformers' Qwen2RMSNorm and
    ``x·cos + rotate_half(x)·sin`` in fp32 and bf16 (their rounding is what official weights were trained
    with)."""
    from photon_core.model.layers import RMSNorm, rope, signed_sin

    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        norm = RMSNorm(64, 1e-6)
        norm.weight.data = torch.randn(64)
        norm = norm.to(dt)
        x = (torch.randn(3, 7, 64) * 5).to(dt)
        xf = x.float()
        ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt)
        assert torch.equal(norm(x), ref), dt
        cos, sin = torch.randn(1, 1, 7, 64).to(dt), torch.randn(1, 1, 7, 64).to(dt)
        q = torch.randn(3, 4, 7, 64).to(dt)
        rotated = torch.cat((-q[..., 32:], q[..., :32]), -1)
        assert torch.equal(rope(q, cos, signed_sin(sin)), q * cos + rotated * sin), dt


def test_fused_projections_equal_separate_layers_and_stay_official(parity_dir, fx, feats, tmp_path):
    """One matmul for q/k/v and for gate/up (inference): the same prefill, ITS decision and decode as the
    separate layers; the state_dict keeps its official names and values and saves; moving the model
    unfuses; with gradients the separate layers run (their weights get the gradient)."""
    from photon_core.model.checkpoint import save_model

    m = load_model(parity_dir / "model", "cpu")                   # its own copy: this test changes it
    ids, grid = fx["q2.input_ids"], fx["video_grid_thw"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sep = generate(m, ids, features=feats, grid_thw=grid, max_new_tokens=6, return_step_logits=True)
    assert not m.fused
    m.fuse_projections()
    attn = m.model.layers[0].self_attn
    storage = attn._fused[0].untyped_storage().data_ptr()
    assert m.fused and attn.k_proj.weight.untyped_storage().data_ptr() == storage     # views: no copy
    m.fuse_projections(False)
    assert not m.fused
    m.fuse_projections(True)            # built once: a graph captured on either path reads live memory
    assert m.fused and attn._fused[0].untyped_storage().data_ptr() == storage
    fused = generate(m, ids, features=feats, grid_thw=grid, max_new_tokens=6, return_step_logits=True)
    eng.release(m)
    with torch.inference_mode():
        assert torch.allclose(m.encode_volume(fx["pixel_values_videos"].float(), grid), feats, atol=1e-5)
    assert torch.equal(fused.prefill.its.keep, sep.prefill.its.keep)
    assert torch.allclose(fused.prefill.its.u, sep.prefill.its.u, atol=1e-6, rtol=1e-5)
    assert torch.equal(fused.tokens, sep.tokens)
    assert torch.allclose(fused.step_logits, sep.step_logits, atol=1e-5, rtol=1e-5)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    save_model(m, tmp_path / "saved")
    again = load_model(tmp_path / "saved", "cpu")
    assert all(torch.equal(again.state_dict()[k], before[k]) for k in before)
    # gradients: the separate layers run, so q_proj's weight gets one
    m.train()
    out = m(ids, features=feats.clone(), grid_thw=grid, use_its=False)
    out.logits.float().pow(2).mean().backward()
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)
    m.eval()
    m.to(torch.float64)                       # a move or cast replaces the parameters: no stale fused weight
    assert not m.fused


def test_fused_mlps_pad_an_unaligned_hidden_width_without_changing_the_output():
    """The 3B tower's MLP width (3,420) is not a multiple of 8; fused, it runs padded with zeros — the
    tower's features and the decoder's output equal the separate layers', and the padded matmul is what
    runs."""
    from photon_core.model.config import preset_config
    from photon_core.model.photon import PhotonModel

    torch.manual_seed(0)
    m = PhotonModel(preset_config("tiny", vision=dict(intermediate_size=60), intermediate_size=66)).eval()
    m.init_weights(0.2)
    v = m.config.vision
    pv = torch.randn(64, v.in_chans * v.temporal_patch_size * v.patch_size ** 2)
    grid = torch.tensor([[1, 8, 8]])
    x = torch.randn(2, 9, m.config.hidden_size)
    layer = m.model.layers[-1]
    with torch.inference_mode():
        f_sep, y_sep = m.encode_volume(pv, grid), layer.mlp(x)
        m.fuse_projections()
        f_fused, y_fused = m.encode_volume(pv, grid), layer.mlp(x)
    w, _, wd = m.visual.blocks[0].mlp._fused
    assert w.shape[0] == 2 * 64 and wd.shape[1] == 64                                    # 60 → 64
    assert bool((w[60:64] == 0).all()) and bool((wd[:, 60:] == 0).all())
    assert layer.mlp._fused[0].shape[0] == 2 * 72                                        # 66 → 72
    assert torch.allclose(f_fused, f_sep, atol=1e-5, rtol=1e-5)
    assert torch.allclose(y_fused, y_sep, atol=1e-5, rtol=1e-5)
