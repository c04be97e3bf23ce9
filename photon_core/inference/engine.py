"""The decode engine: a static KV cache, one fixed-shape decode step, captured as a CUDA graph; and the
prefill's decoder layers as captured spans.

After the prefill (where ITS drops tokens) every later token costs one step: embed the last token,
run the decoder layers against the cache of the survivors, choose the next token. Following
gpt-fast, the step has fixed shapes and no host synchronisation, so on CUDA it is captured once
and replayed per token:

    static state (one per (batch B, cache length S, sampling) bucket, reused across calls)
        k, v        per layer (B, Hkv, S, d)   slots [0, N) the prompt's survivors (right-aligned,
                                               padding in front), slot N + t the t-th fed token
        allowed     (B, S) bool                which slots each row may attend to
        tokens, pos (B,)                       the token to feed and its (3-axis, equal) position id
        slot, t     (1,)                       its cache slot; the output column being written
        done        (B,) bool                  rows that produced a stop id (then emit stop id 0)
        out_tokens, out_logprobs (B, S)        what was generated, and its log-probability
    step:  allowed[:, slot] = 1 → embed → RoPE(pos) → layers (write k/v at slot, attend) → norm →
           lm_head → choose (greedy, or sampling from pre-drawn Exp(1) noise) → record → advance

The host loop only replays the step (and, when sampling, draws the noise into a static buffer) and
reads ``done`` every ``check_every`` steps. Modes: ``eager`` (CPU default; the same step, run as
Python), ``graph`` (the eager step captured by hand as a `torch.cuda.CUDAGraph`), ``compile`` (CUDA
default: each decoder layer and the step's ends compiled with torch.compile — one compiled graph reused
by every layer — then the whole step captured by hand; 283 against 175 tokens/s for ``graph`` on the H200,
2026-12-04, after a one-time warm-up of 5.5 s), ``reduce-overhead`` (the whole step under
``torch.compile(mode="reduce-overhead")``). A compile that raises falls back to the captured eager step,
a capture that raises to the eager step; ``Decoded.stats['path']`` and ``['fallback']`` say what ran.

The prefill's decoder layers run the same way on CUDA (`PrefillEngine`): the layers before the ITS
decision and those after it are two spans, each captured once per (rows, length bucket) and replayed,
the decision itself between them as always.

Every row of a batch decodes exactly as it would alone (its own prompt length, positions, mask);
greedy tokens of a batch row equal the single run's. Sampling draws one noise tensor per step for
the whole batch, so a sampled row depends on its batch (as any batched sampler's does).
"""
from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from photon_core.inference.prompt import GenerationSettings as Sampling
from photon_core.model.attention import Packing
from photon_core.model.photon import Output, PhotonModel

log = logging.getLogger(__name__)
MODES = ("eager", "graph", "compile", "reduce-overhead")
SLOT_BUCKET = 64          # cache lengths are rounded up to a multiple of this (fewer graphs)


def choose(logits: torch.Tensor, sp: Sampling, noise: torch.Tensor | None = None,
           seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, vocab) logits → next token (B,) and its log-probability under the model's own distribution
    (B,). ``sp``: greedy unless ``do_sample``; transformers' order (repetition penalty, top-k,
    temperature, top-p). ``noise`` (B, vocab) Exp(1) draws when sampling (argmax of p/noise samples
    from p, with no host sync); ``seen`` (B, vocab) bool: ids already in the row, for the penalty."""
    scores = logits.float()
    logp_all = scores.log_softmax(-1)
    scores = repetition_penalised(scores, seen, sp.repetition_penalty)
    if sp.do_sample:
        if sp.top_k > 0:
            kth = scores.topk(min(int(sp.top_k), scores.shape[-1]), -1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = top_p_filter(F.softmax(scores / max(sp.temperature, 1e-5), -1), sp.top_p)
        nxt = (probs / noise.clamp_min(1e-20)).argmax(-1)
    else:
        nxt = scores.argmax(-1)
    return nxt, logp_all.gather(1, nxt[:, None])[:, 0]


def repetition_penalised(scores: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the score of every id already in the row is divided by ``penalty``
    if positive, multiplied by it if negative. ``seen``: (B, vocab) bool, or (B, L) ids (−1 = padding)."""
    if penalty == 1.0:
        return scores
    if seen.dtype != torch.bool:
        seen = seen_ids(seen, scores.shape[-1])
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def seen_ids(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, L) ids (−1 = padding) → (B, vocab) bool: which ids each row holds."""
    seen = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids.clamp_min(0), ids >= 0)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of a (B, vocab) distribution, renormalised."""
    if top_p >= 1.0:
        return probs
    sp, si = probs.sort(-1, descending=True)
    cut = sp.cumsum(-1) - sp > top_p
    sp = sp.masked_fill(cut, 0)
    return torch.zeros_like(probs).scatter(-1, si, sp) / sp.sum(-1, keepdim=True)


@dataclass
class Decoded:
    tokens: torch.Tensor                      # (B, T') ids, T' ≤ max_new_tokens; stop id 0 after a stop
    logprobs: torch.Tensor                    # (B, T') log-probability of each under the model
    step_logits: torch.Tensor | None = None   # (B, T', vocab) fp32 raw logits, when asked for
    stats: dict = field(default_factory=dict)  # path, fallback, bucket, steps


class _State:
    """Static buffers of one bucket (B rows, S cache slots, one sampling setting)."""

    def __init__(self, model: PhotonModel, B: int, S: int, sp: Sampling, step_logits: bool):
        c = model.config
        w = model.model.embed_tokens.weight
        dev, dt = w.device, w.dtype
        shape = (B, c.num_key_value_heads, S, c.head_dim)
        self.B, self.S, self.sampling = B, S, sp
        self.k = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(c.num_hidden_layers)]
        long = dict(device=dev, dtype=torch.long)
        self.allowed = torch.zeros(B, S, device=dev, dtype=torch.bool)
        self.tokens, self.pos = torch.zeros(B, **long), torch.zeros(B, **long)
        self.slot, self.t = torch.zeros(1, **long), torch.zeros(1, **long)
        self.done = torch.zeros(B, device=dev, dtype=torch.bool)
        self.out_tokens = torch.zeros(B, S, **long)
        self.out_logprobs = torch.zeros(B, S, device=dev, dtype=torch.float)
        self.stop = torch.tensor(sp.eos_token_ids, **long) if sp.eos_token_ids else None
        V = c.vocab_size
        self.noise = torch.ones(B, V, device=dev) if sp.do_sample else None
        self.seen = torch.zeros(B, V, device=dev, dtype=torch.bool) if sp.repetition_penalty != 1.0 else None
        self.step_logits = torch.zeros(B, S, V, device=dev) if step_logits else None
        self.graph = None            # torch.cuda.CUDAGraph once captured

    def tensors(self) -> list[torch.Tensor]:
        ts = [*self.k, *self.v, self.allowed, self.tokens, self.pos, self.slot, self.t, self.done,
              self.out_tokens, self.out_logprobs]
        return ts + [x for x in (self.stop, self.noise, self.seen, self.step_logits) if x is not None]


# ---------------------------------------------------------------------- the step, in three pieces
def _prologue(model: PhotonModel, st: _State):
    """Open the token's slot, embed it, RoPE at its position → h (B, 1, D), cos, sin."""
    st.allowed.index_fill_(1, st.slot, True)
    h = model.model.embed_tokens(st.tokens[:, None])
    cos, sin = model.rope(st.pos[None, :, None].expand(3, -1, 1), h.dtype)
    return h, cos, sin


def _layer(layer, h, cos, sin, k, v, slot, allowed):
    return layer.decode(h, cos, sin, k, v, slot, allowed)


def _record(st: _State, logits: torch.Tensor) -> None:
    """Choose from (B, vocab) logits, apply stops, write the outputs, advance pos / slot / t."""
    if st.step_logits is not None:
        st.step_logits.index_copy_(1, st.t, logits.float()[:, None])
    nxt, logp = choose(logits, st.sampling, st.noise, st.seen)
    if st.stop is not None:
        nxt = torch.where(st.done, st.stop[0], nxt)
        st.done.logical_or_((nxt[:, None] == st.stop[None, :]).any(-1))
    st.out_tokens.index_copy_(1, st.t, nxt[:, None])
    st.out_logprobs.index_copy_(1, st.t, logp[:, None])
    if st.seen is not None:
        st.seen.scatter_(1, nxt[:, None], True)
    st.tokens.copy_(nxt)
    st.pos.add_(1)
    st.slot.add_(1)
    st.t.add_(1)


def _epilogue(model: PhotonModel, st: _State, h: torch.Tensor) -> None:
    _record(st, model.lm_head(model.model.norm(h))[:, 0])


class DecodeEngine:
    """Decoding for one model: static state per bucket, the step (eager, captured or compiled)."""

    def __init__(self, model: PhotonModel, mode: str = "auto", check_every: int | None = None,
                 max_buckets: int = 4):
        cuda = model.lm_head.weight.is_cuda
        mode = ("compile" if cuda else "eager") if mode == "auto" else mode
        if mode not in MODES:
            raise ValueError(f"decode mode must be one of {MODES} or 'auto', not {mode!r}")
        if mode in ("graph", "reduce-overhead") and not cuda:
            raise ValueError(f"decode mode {mode!r} needs CUDA; the model is on the CPU")
        self.model, self.mode, self.cuda = model, mode, cuda
        self.check_every = check_every or (4 if cuda else 1)
        self.max_buckets = max_buckets
        self.states: dict = {}
        self.fallback: str | None = None
        self._lock = threading.Lock()
        self._prologue, self._layer, self._epilogue = _prologue, _layer, _epilogue
        self._whole = None
        if mode == "compile":
            kw = dict(fullgraph=True)         # a second shape (batch, cache length) compiles a dynamic graph
            self._prologue, self._layer, self._epilogue = (torch.compile(f, **kw) for f in
                                                           (_prologue, _layer, _epilogue))
        elif mode == "reduce-overhead":
            self._whole = torch.compile(self._eager_step, mode="reduce-overhead", fullgraph=True)

    @property
    def path(self) -> str:
        """What runs now (after a fallback: the mode fallen back to, marked so)."""
        p = {"eager": "eager", "graph": "cuda-graph", "compile": "compiled + cuda-graph" if self.cuda
             else "compiled", "reduce-overhead": "torch.compile reduce-overhead"}[self.mode]
        return f"{p} (fallback)" if self.fallback else p

    # ------------------------------------------------------------------ the step
    def _eager_step(self, st: _State) -> None:
        m = self.model
        h, cos, sin = self._prologue(m, st)
        for i, layer in enumerate(m.model.layers):
            h = self._layer(layer, h, cos, sin, st.k[i], st.v[i], st.slot, st.allowed)
        self._epilogue(m, st, h)

    def _run_step(self, st: _State) -> None:
        if st.graph is not None:
            st.graph.replay()
        elif self._whole is not None:
            self._whole(st)
        else:
            self._eager_step(st)

    def _fall_back(self, what: str, e: Exception) -> None:
        """One level down: a compiled step to the eager step captured (CUDA), a capture to the eager step.
        Every bucket's state is dropped, to be rebuilt (and captured) on its next use."""
        said = f"{what} failed: {type(e).__name__}: {str(e)[:300]}"
        self.fallback = f"{self.fallback}; {said}" if self.fallback else said
        self.mode = "graph" if self.cuda and self.mode in ("compile", "reduce-overhead") else "eager"
        log.warning("decode engine: %s; decoding with the %s step", said,
                    "captured eager" if self.mode == "graph" else "eager")
        self._prologue, self._layer, self._epilogue, self._whole = _prologue, _layer, _epilogue, None
        self.states.clear()

    def _capture(self, st: _State) -> None:
        """Warm up (compiles, if compiling) and capture the step as a CUDA graph; one level down on failure
        (a compiled step: the eager step captured; a capture: the eager step)."""
        st.slot.zero_()
        st.t.zero_()
        try:
            if self._whole is not None:          # reduce-overhead: torch's cudagraph trees record it
                for _ in range(3):
                    self._run_step(st)
                    st.slot.zero_()
                    st.t.zero_()
                torch.cuda.synchronize()
                return
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run_step(st)
                    st.slot.zero_()
                    st.t.zero_()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                self._eager_step(st)
            st.graph = g
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - any capture/compile error: one level down, say so
            torch.cuda.synchronize()
            self._fall_back("graph capture" if self.mode == "graph" else f"{self.mode} warm-up", e)
            if self.mode == "graph":
                self._capture(st)

    def _state(self, B: int, S: int, sp: Sampling, step_logits: bool) -> _State:
        key = (B, S, sp, step_logits)
        st = self.states.pop(key, None)
        if st is None:
            if len(self.states) >= self.max_buckets:
                self.states.pop(next(iter(self.states)))
            st = _State(self.model, B, S, sp, step_logits)
            if self.mode == "reduce-overhead":
                for x in st.tensors():
                    torch._dynamo.mark_static_address(x)
            if self.mode == "compile" and not self.cuda:
                try:                                   # CPU: compile on first use, no graph
                    self._run_step(st)
                except Exception as e:  # noqa: BLE001
                    self._fall_back("compile", e)
            elif self.cuda and self.mode != "eager":
                self._capture(st)
        self.states[key] = st                    # most recently used last
        return st

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def decode(self, prefill: Output, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               max_new_tokens: int, sampling: Sampling | None = None,
               generator: torch.Generator | None = None, return_step_logits: bool = False,
               on_step=None) -> Decoded:
        """Continue from a prefill run with ``use_cache=True`` (its logits' last position chooses the first
        token). ``input_ids``/``attention_mask``: the prompt (for the repetition penalty). ``sampling``:
        `prompt.GenerationSettings` (default greedy, no stop). ``on_step(n)``: called on the host before
        each step with the tokens chosen so far (no device sync); a true result ends the decoding there
        (the caller no longer wants the answer)."""
        if prefill.cache is None:
            raise ValueError("decode needs the prefill's KV cache (run the model with use_cache=True)")
        sampling = sampling or Sampling()
        T = int(max_new_tokens)
        B, N = prefill.key_valid.shape
        last = prefill.logits[:, -1]
        if T == 1:                         # the prefill chooses the only token: no step, no buffers
            V = last.shape[-1]
            noise = torch.empty(B, V, device=last.device).exponential_(generator=generator) \
                if sampling.do_sample else None
            seen = _seen(input_ids, attention_mask, V) if sampling.repetition_penalty != 1.0 else None
            nxt, logp = choose(last, sampling, noise, seen)
            return Decoded(nxt[:, None], logp[:, None], last.float()[:, None] if return_step_logits else None,
                           dict(path=self.path, fallback=self.fallback, bucket=None, steps=1))
        S = -(-(N + T) // SLOT_BUCKET) * SLOT_BUCKET
        with self._lock:
            st = self._state(B, S, sampling, return_step_logits)
            for i, (k, v) in enumerate(prefill.cache):
                st.k[i][:, :, :N].copy_(k)
                st.v[i][:, :, :N].copy_(v)
            st.allowed.zero_()
            st.allowed[:, :N] = prefill.key_valid
            st.pos.copy_(prefill.next_position - 1)     # the last prompt token's position and slot
            st.slot.fill_(N - 1)
            st.t.zero_()
            st.done.zero_()
            if st.seen is not None:
                st.seen.copy_(_seen(input_ids, attention_mask, st.seen.shape[1]))
            if st.noise is not None:
                st.noise.exponential_(generator=generator)
            _record(st, last)
            n = 1
            for i in range(1, T):
                if st.stop is not None and i % self.check_every == 0 and bool(st.done.all()):
                    break
                if on_step is not None and on_step(i):
                    break
                if st.noise is not None:
                    st.noise.exponential_(generator=generator)
                self._run_step(st)
                n = i + 1
            out = Decoded(st.out_tokens[:, :n].clone(), st.out_logprobs[:, :n].clone(),
                          st.step_logits[:, :n].clone() if st.step_logits is not None else None,
                          dict(path=self.path, fallback=self.fallback, bucket=[B, S], steps=n))
        return out


def _vision_block(blk, x, cu, cos, sin, longest: int):
    return blk(x, cu, cos, sin, longest)


class VisionEngine:
    """The vision tower for a fixed grid (a CT always has one): ``graph`` captures the whole tower
    (patch embed, 32 blocks with one varlen call each, merger) as one CUDA graph on a static input;
    ``compile`` (the CUDA default) first compiles the block (one compiled graph per attention kind,
    reused by every block), then captures; ``eager`` runs `VisionTower.forward`. A failing capture or
    compile falls back to eager, recorded in ``fallback``. Why compile: on the H200 (2026-12-04) the
    compiled tower took 22.8 ms against 36.1 ms captured (its fp32 rotary and norms fused; warm-up
    0.75 s), and once the prefill's layers no longer wait on the host the tower is most of its GPU time;
    bench/gpu_bench.py measures both modes in every run."""

    def __init__(self, model: PhotonModel, mode: str = "auto"):
        cuda = model.lm_head.weight.is_cuda
        self.mode = ("compile" if cuda else "eager") if mode == "auto" else mode
        if self.mode not in ("eager", "graph", "compile"):
            raise ValueError(f"vision mode must be eager, graph, compile or auto, not {mode!r}")
        if self.mode == "graph" and not cuda:
            raise ValueError("vision mode 'graph' needs CUDA")
        self.model, self.cuda = model, cuda
        self.fallback: str | None = None
        self.graphs: dict = {}
        self._lock = threading.Lock()
        self._block = torch.compile(_vision_block, fullgraph=True) if self.mode == "compile" else None

    @property
    def path(self) -> str:
        if self.fallback:
            return "eager (fallback)"
        return {"eager": "eager", "graph": "cuda-graph",
                "compile": "compiled + cuda-graph" if self.cuda else "compiled"}[self.mode]

    def _run(self, pv: torch.Tensor, lay: dict) -> torch.Tensor:
        vis = self.model.visual
        if self._block is None:
            return vis.run(pv, lay)
        unit = vis.cfg.spatial_merge_size ** 2
        x = vis.vision_patch_embed(pv)
        P = x.shape[0]
        x = x.reshape(P // unit, unit, -1)[lay["win"]].reshape(P, -1)
        for i, blk in enumerate(vis.blocks):
            cu, longest = lay["full"] if i in vis.cfg.fullatt_block_indexes else lay["window"]
            x = self._block(blk, x, cu, lay["cos"], lay["sin"], longest)
        return vis.merger(x)[lay["unwin"]]

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(P, C) patches → (V, D) visual tokens, as `PhotonModel.encode_volume`."""
        vis = self.model.visual
        pv = pixel_values.to(next(vis.parameters()).dtype)
        if self.mode == "eager" or self.fallback:
            return vis(pv, grid_thw)
        with self._lock:
            lay = vis.layout(grid_thw, pv.device)
            key = (tuple(tuple(int(x) for x in g) for g in grid_thw.tolist()), tuple(pv.shape), pv.dtype)
            if not self.cuda:                          # compile on CPU: no graph
                try:
                    return self._run(pv, lay)
                except Exception as e:  # noqa: BLE001
                    self._fail(e)
                    return vis(pv, grid_thw)
            if key not in self.graphs:
                try:
                    self.graphs[key] = self._capture(pv, lay)
                except Exception as e:  # noqa: BLE001
                    torch.cuda.synchronize()
                    self._fail(e)
                    return vis(pv, grid_thw)
            g, static_in, static_out, _ = self.graphs[key]
            static_in.copy_(pv)
            g.replay()
            return static_out.clone()

    def _capture(self, pv: torch.Tensor, lay: dict):
        static_in = pv.clone()
        g, static_out = _captured(lambda: self._run(static_in, lay))
        return g, static_in, static_out, lay          # the graph reads lay's tensors: keep them alive

    def _fail(self, e: Exception) -> None:
        self.fallback = f"vision {self.mode} failed: {type(e).__name__}: {str(e)[:300]}"
        log.warning("%s; encoding eagerly", self.fallback)
        self.graphs.clear()


# ---------------------------------------------------------------------- prefill
PREFILL_MODES = ("eager", "padded", "graph")
PREFILL_BUCKET = 64       # a span's length is padded up to a multiple of this (fewer graphs)


class _Span:
    """Static inputs (and, once captured, outputs) of one prefill span: layers [start, stop) over B
    rows of Lb slots; a call's L slots are the last L (left padding, as the prompt's)."""

    def __init__(self, model: PhotonModel, key: tuple):
        start, stop, qk_at, B, Lb, dtype = key
        c = model.config
        dev = model.lm_head.weight.device
        self.start, self.stop, self.qk_at = start, stop, qk_at
        self.h = torch.zeros(B, Lb, c.hidden_size, device=dev, dtype=dtype)
        self.cos = torch.ones(B, 1, Lb, c.head_dim, device=dev, dtype=dtype)     # padding: no rotation
        self.sin = torch.zeros(B, 1, Lb, c.head_dim, device=dev, dtype=dtype)
        self.valid = torch.zeros(B, Lb, device=dev, dtype=torch.bool)
        self.graph = None
        self.out = None

    def nbytes(self) -> int:
        """Device memory this span holds: its static inputs and, once captured, its outputs."""
        out = [] if self.out is None else [self.out[0], self.out[1], *(self.out[2] or [])]
        return sum(t.numel() * t.element_size() for t in (self.h, self.cos, self.sin, self.valid, *out))


class PrefillEngine:
    """The prefill's decoder layers as CUDA graphs: the layers before the ITS decision and the layers
    after it are two spans, each captured once per (rows, length bucket) and replayed; the ITS decision
    between them runs as it always does. Removes the host's per-kernel launch cost from the prefill
    (the 2026-12-04 profile: 5,094 launches, the GPU busy 60 of 200 ms).

    A span pads its L slots up to the bucket (at least one padding slot per row, in front, as the
    prompt's own) and packs every slot in place (`attention.Packing.segments`: each row's padding its
    own segment), so a real token's computation is the same as unpadded. Modes: ``graph`` (CUDA
    default), ``padded`` (what the graph runs, run eagerly: the CPU can test it), ``eager``
    (`PhotonModel.run_layers`, as without an engine). Used by `PhotonModel.forward` through ``layers=``,
    where the varlen kernel runs (inference on CUDA). A failing capture falls back to eager, recorded in
    ``fallback``. Outputs are copied out of the static buffers, so a returned cache outlives the next call.
    Spans are kept most recently used last, the oldest dropped beyond ``max_spans`` or ``max_bytes`` of
    static buffers (by their shapes at the 3B size with 1,000 visual tokens and ITS keeping ≈ 400: ≈ 30 MB
    for one row's two spans, ≈ 0.25 GB for a batch of 8).
    """

    def __init__(self, model: PhotonModel, mode: str = "auto", max_spans: int = 16, max_bytes: int = 1 << 30):
        cuda = model.lm_head.weight.is_cuda
        self.mode = ("graph" if cuda else "eager") if mode == "auto" else mode
        if self.mode not in PREFILL_MODES:
            raise ValueError(f"prefill mode must be one of {PREFILL_MODES} or 'auto', not {mode!r}")
        if self.mode == "graph" and not cuda:
            raise ValueError("prefill mode 'graph' needs CUDA")
        self.model, self.max_spans, self.max_bytes = model, max_spans, max_bytes
        self.spans: dict = {}                    # most recently used last
        self.fallback: str | None = None
        self.pool = None                         # one memory pool for every captured span
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        if self.fallback:
            return "eager (fallback)"
        return {"eager": "eager", "padded": "padded (eager)", "graph": "cuda-graph"}[self.mode]

    @torch.inference_mode()
    def __call__(self, model: PhotonModel, start: int, stop: int, h: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, key_valid: torch.Tensor, counts: list[int], qk_at: int | None = None):
        """`PhotonModel.run_layers` for layers [start, stop) over h (B, L, D), left-padded rows."""
        if model is not self.model:
            raise ValueError("this prefill engine belongs to another model")
        if self.mode == "eager" or self.fallback:
            return model.run_layers(start, stop, h, cos, sin, Packing.build(key_valid, True, counts), qk_at)
        B, L, _ = h.shape
        Lb = -(-(L + 1) // PREFILL_BUCKET) * PREFILL_BUCKET
        key = (start, stop, qk_at, B, Lb, h.dtype)
        o = Lb - L
        with self._lock:
            sp = self.spans.pop(key, None)
            if sp is None:
                sp = _Span(model, key)
            self.spans[key] = sp
            sp.h[:, o:].copy_(h)                  # slots before o keep earlier values: finite, never seen
            sp.cos[:, :, o:].copy_(cos)
            sp.sin[:, :, o:].copy_(sin)
            sp.valid[:, :o] = False
            sp.valid[:, o:].copy_(key_valid)
            if self.mode == "graph" and sp.graph is None:
                self._capture(sp)
                if self.fallback:
                    return model.run_layers(start, stop, h, cos, sin, Packing.build(key_valid, True, counts),
                                            qk_at)
            if sp.graph is not None:
                sp.graph.replay()
                out = sp.out
            else:
                out = self._body(sp)
            result = _read(out, o)
            self._evict()
            return result

    def _evict(self) -> None:
        """Drop the least recently used spans beyond the limits (never the one just used)."""
        while len(self.spans) > 1 and (len(self.spans) > self.max_spans
                                       or sum(sp.nbytes() for sp in self.spans.values()) > self.max_bytes):
            self.spans.pop(next(iter(self.spans)))

    def _body(self, sp: _Span):
        pk = Packing.segments(sp.valid)
        h, kvs, qk = self.model.run_layers(sp.start, sp.stop, sp.h, sp.cos, sp.sin, pk, sp.qk_at)
        kv = torch.stack([t for pair in kvs for t in pair])      # (2n, B, Hkv, Lb, d): copied out at once
        return h, kv, qk

    def _capture(self, sp: _Span) -> None:
        try:
            if self.pool is None:                # spans never run at once (the lock): they share a pool
                self.pool = torch.cuda.graph_pool_handle()
            sp.graph, sp.out = _captured(lambda: self._body(sp), self.pool)
        except Exception as e:  # noqa: BLE001 - any capture error: run the layers eagerly, say so
            torch.cuda.synchronize()
            self.fallback = f"prefill graph capture failed: {type(e).__name__}: {str(e)[:300]}"
            log.warning("%s; prefill runs eagerly", self.fallback)
            self.spans.clear()


def _read(out, o: int):
    """A span's outputs without its first ``o`` (bucket padding) slots, copied out of the static buffers:
    h (B, L, D), per layer (k, v) (B, Hkv, L, d), and the ITS layer's (q, k) or None."""
    h, kv, qk = out
    kv = kv[..., o:, :].clone()
    kvs = [(kv[i], kv[i + 1]) for i in range(0, kv.shape[0], 2)]
    return h[:, o:].clone(), kvs, [t[..., o:, :].clone() for t in qk] if qk else None


def _captured(run, pool=None):
    """``run()`` warmed up twice on a side stream, then captured as a CUDA graph (in ``pool`` if given)
    → (graph, what the captured call returned: the static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
        out = run()
    torch.cuda.synchronize()
    return g, out


def _seen(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, V: int) -> torch.Tensor:
    """(B, vocab) bool: the ids present in each row's prompt (padding excluded)."""
    ids = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -1)
    return seen_ids(ids, V)


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def _engine(model: PhotonModel, key, make):
    """The model's engine under ``key``, made by ``make(model)`` on first use (its buffers and graphs are
    then reused)."""
    with _ENGINES_LOCK:
        per_model = _ENGINES.setdefault(model, {})
        if key not in per_model:
            per_model[key] = make(model)
        return per_model[key]


def engine_for(model: PhotonModel, mode: str = "auto") -> DecodeEngine:
    """The model's decode engine (one per model and mode; a static state and graph per bucket)."""
    return _engine(model, mode, lambda m: DecodeEngine(m, mode))


def release(model: PhotonModel) -> None:
    """Drop the model's engines (their buffers and graphs hold the model and device memory)."""
    with _ENGINES_LOCK:
        _ENGINES.pop(model, None)


def prefill_for(model: PhotonModel, mode: str = "auto") -> PrefillEngine:
    """The model's prefill engine (one per model and mode; a CUDA graph per span and length bucket)."""
    return _engine(model, ("prefill", mode), lambda m: PrefillEngine(m, mode))


def vision_for(model: PhotonModel, mode: str = "auto") -> VisionEngine:
    """The model's vision engine (one per model and mode; a CUDA graph per grid)."""
    return _engine(model, ("vision", mode), lambda m: VisionEngine(m, mode))
