"""GPU checks (skipped without CUDA), on the reference-parity model (shared/parity):

* bf16 on CUDA against fp32 on the CPU, teacher-forced (both score the same token sequence, so one early
  near-tie cannot send the two greedy runs apart — why comparing greedy tokens was ill-posed);
* ITS keep masks agree outside a band around θ;
* the CUDA-graph decode step gives exactly the eager step's tokens and logits; the compiled step
  (fp32) the eager step's tokens; the graph-captured vision tower the eager tower's features; the
  served (compiled) tower is as close to the fp32 tower as the eager bf16 one;
* varlen FlashAttention prefill against the SDPA-mask prefill; varlen blocks against padded ones;
* the GPU model runs as the Predictor runs it (fused projections); fused against separate layers;
* the prefill's spans captured as CUDA graphs give exactly what they give eagerly, and agree with the
  plain varlen prefill within bf16;
* a prefill with ITS reads the device twice (the prompt's copy, the survivors' count), nothing more,
  with and without the captured spans.

Measured errors are printed (``pytest -s``): bench/gpu_run.sh keeps them in tests.log.
"""
import warnings

import pytest
import torch
from safetensors.torch import load_file
from test_engine import left_pad

from photon_core.inference.engine import PrefillEngine, release, vision_for
from photon_core.inference.generate import generate
from photon_core.model import attention, photon
from photon_core.model.attention import block_attention
from photon_core.model.checkpoint import load_model

pytestmark = pytest.mark.gpu

# bf16 keeps 8 significant bits: one rounding is ≤ 2^-9 ≈ 2e-3 relative. The parity model (8 decoder layers,
# 4 vision blocks, weights of std 0.25 so that its logits are not flat) rounds every matmul input, norm and
# residual sum, and the softmaxes amplify it. Measured on the H200 (2026-12-04, bench/gpu_run.sh): vision
# features 1.9e-2, teacher-forced logits 1.13e-1 of their scale over every position (7.7e-2 at the answer
# positions), argmax agreement 1.00. The bugs this test is for give 0.86-1.06 on the same model in fp32
# (positions off by one after the volume, one visual token wrong: tests/test_engine.py measures them against
# this bound), so 0.25 sits between the two with a margin of 2x on either side (the first bound, 5e-2, was
# set before any GPU run and was below what bf16 gives this model).
# ρ is a min-max of bf16 q·k sums (measured |Δρ| 2.6e-2, |Δθ| 5e-6): a decision can flip only where
# |ρ − θ| < |Δρ| + |Δθ|, so with that sum below the band no decision outside it may differ.
LOGIT_BOUND = 0.25
BAND = 0.05


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def fx(parity_dir):
    return load_file(str(parity_dir / "fixture.safetensors"))


@pytest.fixture(scope="module")
def cpu(parity_dir):
    return load_model(parity_dir / "model", "cpu")                # fp32 on the CPU


@pytest.fixture(scope="module")
def gpu(parity_dir):
    return load_model(parity_dir / "model", "cuda").fuse_projections()   # bf16 on CUDA, as the Predictor


@pytest.fixture(scope="module")
def inputs(fx):
    return fx["pixel_values_videos"].float(), fx["video_grid_thw"]


def _feats(model, pv, g):
    dev = next(model.parameters()).device
    with torch.inference_mode():
        return model.encode_volume(pv.to(dev), g.to(dev))


def test_bf16_cuda_teacher_forced_logits_match_fp32_cpu(cpu, gpu, fx, inputs):
    pv, g = inputs
    f_cpu, f_gpu = _feats(cpu, pv, g), _feats(gpu, pv, g)
    r_vis = rel(f_gpu, f_cpu)
    print(f"\nvision features bf16 vs fp32: max rel err {r_vis:.2e}")
    assert r_vis < LOGIT_BOUND
    for case in ("q1", "q2"):
        ids = fx[f"{case}.input_ids"]
        cont = generate(cpu, ids, features=f_cpu, grid_thw=g, use_its=False, max_new_tokens=8).tokens
        seq = torch.cat([ids, cont[:, :-1]], 1)                    # the prompt and the fp32 answer
        with torch.inference_mode():
            a = cpu(seq, features=f_cpu, grid_thw=g, use_its=False).logits
            b = gpu(seq.cuda(), features=f_gpu, grid_thw=g.cuda(), use_its=False).logits
        r_all, r_ans = rel(b, a), rel(b[:, -8:], a[:, -8:])
        agree = float((b[:, -8:].argmax(-1).cpu() == a[:, -8:].argmax(-1)).float().mean())
        print(f"{case}: teacher-forced logits bf16 vs fp32 max rel err {r_all:.2e} (answer positions "
              f"{r_ans:.2e}); argmax agreement on the answer {agree:.2f}")
        assert r_all < LOGIT_BOUND and r_ans < LOGIT_BOUND


def test_keep_masks_agree_outside_a_band_around_theta(cpu, gpu, fx, inputs):
    pv, g = inputs
    f_cpu, f_gpu = _feats(cpu, pv, g), _feats(gpu, pv, g)
    for case in ("q1", "q2"):
        ids = fx[f"{case}.input_ids"]
        with torch.inference_mode():
            a = cpu(ids, features=f_cpu, grid_thw=g).its
            b = gpu(ids.cuda(), features=f_gpu, grid_thw=g.cuda()).its
        d_rho = float((b.rho.float().cpu() - a.rho).abs().max())
        d_theta = abs(float(b.theta[0]) - float(a.theta[0]))
        margin = (a.rho - a.theta[:, None]).abs()
        outside = margin > BAND
        differ = b.keep.cpu() != a.keep
        print(f"\n{case}: max |Δρ| {d_rho:.2e}, |Δθ| {d_theta:.2e}; {int(outside.sum())} of "
              f"{outside.numel()} tokens outside the band, {int(differ.sum())} decisions differ (all inside: "
              f"{not bool((differ & outside).any())})")
        assert d_rho + d_theta < BAND
        assert not bool((differ & outside).any())
        if not bool(differ.any()):                                  # same kept set: the logits must agree
            with torch.inference_mode():
                la = cpu(ids, features=f_cpu, grid_thw=g).logits
                lb = gpu(ids.cuda(), features=f_gpu, grid_thw=g.cuda()).logits
            assert rel(lb, la) < LOGIT_BOUND


def _two_rows(fx, pad):
    ids, mask = left_pad([fx["q1.input_ids"][0], fx["q2.input_ids"][0]], pad)
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("kernel", attention.DECODE_KERNELS)
def test_cuda_graph_decode_is_identical_to_eager_decode(gpu, fx, inputs, kernel):
    release(gpu)                                  # the steps are rebuilt with this decode-attention kernel
    attention.set_decode_kernel(kernel)
    try:
        _graph_equals_eager(gpu, fx, inputs)
    finally:
        attention.set_decode_kernel("matmul")
        release(gpu)


def test_a_failing_decode_compile_falls_back_to_the_captured_eager_step(gpu, fx, inputs, monkeypatch):
    """compile is the CUDA default; if inductor fails on a server, the step still runs captured (the
    eager step's graph), not eagerly, and says so."""
    from photon_core.inference import engine as eng

    pv, g = inputs
    f = _feats(gpu, pv, g)
    ids = fx["q1.input_ids"].cuda()
    with torch.inference_mode():
        pre = gpu(ids, features=f, grid_thw=g.cuda(), use_cache=True, last_logits=True)
    ref = eng.DecodeEngine(gpu, "eager").decode(pre, ids, None, 8, return_step_logits=True)

    def compile_(fn, **kw):
        def broken(*a, **k):
            raise RuntimeError("inductor is unavailable here")
        return broken
    monkeypatch.setattr(eng.torch, "compile", compile_)
    e = eng.DecodeEngine(gpu)
    d = e.decode(pre, ids, None, 8, return_step_logits=True)
    print(f"\nfailed compile: path {d.stats['path']}, fallback {d.stats['fallback']}")
    assert d.stats["path"] == "cuda-graph (fallback)" and "inductor is unavailable" in d.stats["fallback"]
    assert torch.equal(d.tokens, ref.tokens) and torch.equal(d.step_logits, ref.step_logits)


def _graph_equals_eager(gpu, fx, inputs):
    pv, g = inputs
    f = _feats(gpu, pv, g)
    ids, mask = _two_rows(fx, gpu.config.pad_token_id)
    kw = dict(features=f.repeat(2, 1), grid_thw=g.cuda().repeat(2, 1), budget=["top_k:30", "auto"],
              max_new_tokens=12, return_step_logits=True)
    e = generate(gpu, ids, mask, mode="eager", **kw)
    c = generate(gpu, ids, mask, mode="graph", **kw)
    c2 = generate(gpu, ids, mask, mode="graph", **kw)               # a replay of the captured graph
    d = float((e.step_logits - c.step_logits).abs().max())
    print(f"\ngraph decode: path {c.stats['path']}, fallback {c.stats['fallback']}; tokens equal "
          f"{torch.equal(e.tokens, c.tokens)}, logits max |Δ| {d:.2e}")
    assert c.stats["path"] == "cuda-graph" and c.stats["fallback"] is None
    for x in (c, c2):
        assert torch.equal(x.tokens, e.tokens)
        assert torch.equal(x.step_logits, e.step_logits)
        assert torch.equal(x.logprobs, e.logprobs)


def test_a_graph_decode_told_each_step_gives_the_same_tokens_and_stops_where_told(gpu, fx, inputs):
    """The served decode (compiled + captured) with the app's per-step callback (progress, give-up): the
    callback runs on the host between replays, changes no token, and a true result ends the decoding."""
    pv, g = inputs
    f = _feats(gpu, pv, g)
    ids, mask = _two_rows(fx, gpu.config.pad_token_id)
    kw = dict(features=f.repeat(2, 1), grid_thw=g.cuda().repeat(2, 1), budget=["top_k:30", "auto"],
              max_new_tokens=12)
    plain = generate(gpu, ids, mask, **kw)
    seen = []
    told = generate(gpu, ids, mask, on_step=seen.append, **kw)
    assert told.stats["path"] == plain.stats["path"] and torch.equal(told.tokens, plain.tokens)
    assert seen == list(range(1, told.tokens.shape[1]))
    cut = generate(gpu, ids, mask, on_step=lambda n: n == 4, **kw)
    assert torch.equal(cut.tokens, plain.tokens[:, :4])


def test_graph_captured_vision_tower_equals_eager(gpu, inputs):
    pv, g = inputs
    eng = vision_for(gpu, "graph")
    with torch.inference_mode():
        a = gpu.encode_volume(pv.cuda(), g.cuda())
        b = eng(pv.cuda(), g.cuda())
        b2 = eng(pv.cuda(), g.cuda())
    print(f"\nvision graph: path {eng.path}; bitwise equal {torch.equal(a, b)}, max rel {rel(b, a):.2e}")
    assert eng.path == "cuda-graph" and eng.fallback is None
    assert rel(b, a) < 1e-3 and torch.equal(b, b2)


def test_served_vision_tower_is_as_close_to_fp32_as_the_eager_one(cpu, gpu, inputs):
    """The tower as served on CUDA (`vision_for` auto: compiled blocks, then captured) against the fp32 CPU
    tower: no further than twice the eager bf16 tower's own distance (the compiled kernels keep the
    fused rotary and norms in fp32, so it should be as close or closer), and a replay gives the same."""
    pv, g = inputs
    ref, eager = _feats(cpu, pv, g), _feats(gpu, pv, g)
    eng = vision_for(gpu)
    with torch.inference_mode():
        a = eng(pv.cuda(), g.cuda())
        b = eng(pv.cuda(), g.cuda())
    print(f"\nserved vision: path {eng.path}, fallback {eng.fallback}; max rel vs fp32 CPU {rel(a, ref):.2e} "
          f"(eager bf16: {rel(eager, ref):.2e}), vs eager bf16 {rel(a, eager):.2e}")
    assert eng.path == "compiled + cuda-graph" and eng.fallback is None
    assert torch.equal(a, b) and rel(a, ref) <= 2 * rel(eager, ref)


def test_varlen_prefill_equals_masked_sdpa_prefill(gpu, fx, inputs, monkeypatch):
    """Left-padded rows of different lengths: packed varlen FlashAttention vs SDPA with the boolean mask."""
    pv, g = inputs
    f = _feats(gpu, pv, g)
    ids, mask = _two_rows(fx, gpu.config.pad_token_id)
    kw = dict(features=f.repeat(2, 1), grid_thw=g.cuda().repeat(2, 1), use_its=False)
    with torch.inference_mode():
        a = gpu(ids, mask, **kw)
        monkeypatch.setattr(photon, "varlen_available", lambda device, dtype: False)
        b = gpu(ids, mask, **kw)
    v = a.key_valid
    r = rel(a.logits[v], b.logits[v])
    print(f"\nvarlen vs masked SDPA prefill (bf16): max rel err {r:.2e}")
    assert r < LOGIT_BOUND


def test_varlen_blocks_equal_padded_blocks():
    torch.manual_seed(0)
    lengths = [64, 64, 32, 16, 64, 48]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 4, 32) for _ in range(3))
    ref = block_attention(q, k, v, cu)                              # CPU: padded SDPA path
    out = block_attention(q.cuda().half(), k.cuda().half(), v.cuda().half(), cu.cuda(), max(lengths))
    assert float((out.float().cpu() - ref).abs().max()) < 2e-2


def test_compiled_decode_gives_the_eager_tokens_in_fp32(parity_dir, fx, inputs):
    """The compiled step (one compiled graph for every layer, then captured) in fp32, where rounding
    differences stay far below the parity model's smallest top-1/top-2 logit gap."""
    pv, g = inputs
    m = load_model(parity_dir / "model", "cuda", torch.float32)
    f = _feats(m, pv, g)
    kw = dict(features=f, grid_thw=g.cuda(), max_new_tokens=8, return_step_logits=True)
    ids = fx["q1.input_ids"].cuda()
    e = generate(m, ids, mode="eager", **kw)
    c = generate(m, ids, mode="compile", **kw)
    print(f"\ncompiled decode: path {c.stats['path']}, fallback {c.stats['fallback']}, logits max rel "
          f"{rel(c.step_logits, e.step_logits):.2e}")
    assert c.stats["fallback"] is None and c.stats["path"] == "compiled + cuda-graph"
    assert torch.equal(c.tokens, e.tokens)
    assert rel(c.step_logits, e.step_logits) < 1e-4


def test_fused_projections_match_separate_layers_on_cuda(parity_dir, gpu, fx, inputs):
    """One matmul for q/k/v and gate/up (the tower's MLP padded) against the separate layers, both bf16 on
    CUDA: only the matmuls' summation order differs, so the logits agree within the bf16 bound (a wrong
    slice or padding gives errors of order one) and the keep decisions outside the band are the same."""
    sep = load_model(parity_dir / "model", "cuda")
    pv, g = inputs
    f_sep, f_fused = _feats(sep, pv, g), _feats(gpu, pv, g)
    r_vis = rel(f_fused, f_sep)
    assert gpu.fused and not sep.fused
    for case in ("q1", "q2"):
        ids = fx[f"{case}.input_ids"].cuda()
        with torch.inference_mode():
            a = sep(ids, features=f_sep, grid_thw=g.cuda(), use_its=False).logits
            b = gpu(ids, features=f_fused, grid_thw=g.cuda(), use_its=False).logits
            ka, kb = (m(ids, features=f, grid_thw=g.cuda()).its for m, f in ((sep, f_sep), (gpu, f_fused)))
        outside = (ka.rho - ka.theta[:, None]).abs() > BAND
        differ = ka.keep != kb.keep
        print(f"\n{case}: fused vs separate (bf16, CUDA): vision features {r_vis:.2e}, logits "
              f"{rel(b, a):.2e}; {int(differ.sum())} keep decisions differ")
        assert r_vis < LOGIT_BOUND and rel(b, a) < LOGIT_BOUND
        assert not bool((differ & outside).any())


def _same_outputs(a, b):
    assert torch.equal(a.logits, b.logits) and torch.equal(a.its.keep, b.its.keep)
    assert torch.equal(a.key_valid, b.key_valid) and torch.equal(a.orig_index, b.orig_index)
    for (ka, va), (kb, vb) in zip(a.cache, b.cache):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_graph_captured_prefill_equals_its_eager_body(gpu, fx, inputs):
    """The layers before and after the ITS decision, captured as two CUDA graphs (rows of different
    lengths and budgets, padded to a length bucket), give exactly what the same spans give run eagerly
    (`padded`), on the capturing call and on a replay; the padded spans agree with the plain varlen
    prefill within the bf16 bound (the same sums over more rows: only the matmuls' tiling differs), with
    the same keep decisions outside the band around θ."""
    pv, g = inputs
    f = _feats(gpu, pv, g)
    ids, mask = _two_rows(fx, gpu.config.pad_token_id)
    kw = dict(features=f.repeat(2, 1), grid_thw=g.cuda().repeat(2, 1), budget=["top_k:30", "auto"],
              use_cache=True, last_logits=True)
    graph, padded = PrefillEngine(gpu, "graph"), PrefillEngine(gpu, "padded")
    with torch.inference_mode():
        a = gpu(ids, mask, **kw, layers=padded)
        b = gpu(ids, mask, **kw, layers=graph)                        # captures both spans
        b2 = gpu(ids, mask, **kw, layers=graph)                       # replays them
        plain = gpu(ids, mask, **kw)
    r = rel(a.logits, plain.logits)
    outside = (plain.its.rho - plain.its.theta[:, None]).abs() > BAND
    differ = plain.its.keep != a.its.keep
    print(f"\nprefill graphs: path {graph.path}, fallback {graph.fallback}, spans {len(graph.spans)}; "
          f"logits equal to the eager spans {torch.equal(a.logits, b.logits)}; padded vs plain max rel "
          f"{r:.2e}, "
          f"{int(differ.sum())} keep decisions differ")
    assert graph.path == "cuda-graph" and graph.fallback is None
    assert len(graph.spans) == 2 and all(sp.graph is not None for sp in graph.spans.values())
    _same_outputs(b, a)
    _same_outputs(b2, a)
    assert r < LOGIT_BOUND and not bool((differ & outside).any())


@pytest.mark.parametrize("spans", ["eager", "graph"])
def test_a_prefill_with_its_reads_the_device_twice(gpu, fx, inputs, spans):
    """Every device read stalls the host until the queued layers finish, and the GPU then idles while the
    host issues the next work. A prefill needs two: one copy of the prompt's ids (its structure is worked
    out on the host) and the survivors' count after the ITS decision (the drop's length); the captured
    spans add none."""
    pv, g = inputs
    f = _feats(gpu, pv, g)
    ids, grid = fx["q2.input_ids"].cuda(), g.cuda()
    layers = PrefillEngine(gpu, spans)
    with torch.inference_mode():
        gpu(ids, features=f, grid_thw=grid, use_cache=True, last_logits=True, layers=layers)   # warm, capture
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = gpu(ids, features=f, grid_thw=grid, use_cache=True, last_logits=True, layers=layers)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    print(f"\nprefill with ITS ({spans} spans, kept {int(out.its.kept_count[0])}): {len(syncs)} device "
          f"reads: {syncs}")
    assert out.its is not None and layers.fallback is None and len(syncs) <= 2
