"""`Predictor`: encode a volume once, ask many questions under any keep budget.

    p = Predictor()                       # the embedded demo model, CPU or CUDA
    p = Predictor("Alibaba-DAMO-Academy/Photon-S2", subfolder="3D-RAD")   # official weights (HF cache)
    p.checkpoint.label(), p.checkpoint.stage   # where they came from; S1 (no ITS) or S2
    p.set_volume(load_volume("scan.nii.gz"))
    a = p.ask("Is there a lesion in the liver?", budget="auto")
    a.text, a.kept, a.total, a.keep_grid    # answer, token counts, (10, 10, 10) kept mask
    p.set_volume(current, prior=earlier)  # a follow-up: both scans in one prompt (prior first)
    p.ask("Has the liver lesion grown since the prior scan?").prior_kept

What the app, the CLI, the evaluator and the benchmark all call.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from photon_core.inference.answers import readable
from photon_core.inference.engine import vision_for
from photon_core.inference.generate import Generation, generate
from photon_core.inference.prompt import GenerationSettings, Tokenizer, batch_prompts, clean_question
from photon_core.io.preprocess import MODEL_SHAPE, TOKEN_GRID, Geometry, Prepared, patchify, prepare
from photon_core.io.volume import Volume
from photon_core.model import hub
from photon_core.model.budget import S1_MESSAGE, THRESHOLD_MODES, Budget, applied_cut
from photon_core.model.checkpoint import CheckpointInfo, load_model

DEMO_MODEL = hub.DEMO_MODEL
MAX_NEW_TOKENS_LIMIT = 256


@dataclass
class Query:
    """One row of a batched ask: a question and a budget (None: the checkpoint's default) on a volume's
    encoded features (and a prior's). ``volume`` / ``prior``: (features (V, D), grid_thw (1, 3)) as
    `Predictor.encode` returns them."""

    question: str
    budget: str | Budget | None
    volume: tuple[torch.Tensor, torch.Tensor]
    prior: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Answer:
    text: str
    budget: str                      # label of the budget mode that produced it
    keep_grid: np.ndarray            # (10, 10, 10) bool, token (a, b, c) over model (d, h, w)
    kept_indices: list[int]          # flat token indices a·100 + b·10 + c
    rho: np.ndarray                  # (10, 10, 10) saliency ρ in [0, 1]
    theta: float                     # the model's own threshold θ
    total: int                       # visual tokens before the drop
    kept: int                        # visual tokens kept
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float
    peak_memory_mb: float
    device: str
    extra: dict = field(default_factory=dict)
    prior_keep_grid: np.ndarray | None = None   # the prior scan's kept mask, when one was given
    prior_kept: int = 0                          # of ``kept``, tokens of the prior scan
    prior_total: int = 0                         # of ``total``, tokens of the prior scan
    prior_rho: np.ndarray | None = None          # (10, 10, 10) the prior scan's ρ, when one was given
    checkpoint: dict = field(default_factory=dict)   # CheckpointInfo.to_dict() of the model that answered
    readable: bool = True                        # the text parses as an answer of the question's type
    probability: float | None = None             # exp(mean log-prob) of the answer's tokens and its stop id

    @property
    def keep_fraction(self) -> float:
        return self.kept / max(1, self.total)

    @property
    def cut(self) -> float | None:
        """`applied_cut` of the answer's budget over every visual token it was cut from: with a prior
        scan, the prior's tokens compete for the same count or share, and may be the lowest kept."""
        rho, keep = self.rho.ravel(), self.keep_grid.ravel()
        if self.prior_rho is not None and self.prior_keep_grid is not None:
            rho = np.concatenate([self.prior_rho.ravel(), rho])
            keep = np.concatenate([self.prior_keep_grid.ravel(), keep])
        return applied_cut(self.budget, rho, keep, self.theta)

    def to_dict(self) -> dict:
        theta = round(self.theta, 4) if np.isfinite(self.theta) else None     # an S1 checkpoint has no θ
        return dict(text=self.text, budget=self.budget, theta=theta, total=self.total, kept=self.kept,
                    keep_fraction=round(self.keep_fraction, 4), prompt_tokens=self.prompt_tokens,
                    generated_tokens=self.generated_tokens, prefill_s=round(self.prefill_s, 4),
                    decode_s=round(self.decode_s, 4), peak_memory_mb=round(self.peak_memory_mb, 1),
                    device=self.device, kept_indices=self.kept_indices, checkpoint=self.checkpoint,
                    readable=self.readable,
                    probability=None if self.probability is None else round(self.probability, 4),
                    **(dict(prior_total=self.prior_total, prior_kept=self.prior_kept) if self.prior_total
                       else {}))


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no GPU is available; use --device cpu.")
    return torch.device(device)


class Predictor:
    """``model``: None (the embedded demo model), a checkpoint folder, or a hub id (ORG/NAME, fetched into
    the HF cache; ``subfolder`` / ``revision`` pick a task's weights). S1 or S2 is read from the weights."""

    def __init__(self, model: str | Path | None = None, *, subfolder: str | None = None,
                 revision: str | None = None, device: str | None = "auto", dtype: torch.dtype | None = None):
        where = hub.resolve(model, subfolder, revision)
        self.device = resolve_device(device)
        self.model = load_model(where.path, self.device, dtype).fuse_projections()
        has_its = self.model.config.has_its
        self.checkpoint: CheckpointInfo = replace(where, stage="S2" if has_its else "S1", has_its=has_its)
        self.model_dir = where.path
        self.tokenizer = Tokenizer(self.model_dir)
        self.tokenizer.check_config(self.model.config)
        self.generation = GenerationSettings.from_folder(self.model_dir, self.model.config.eos_token_id,
                                                         self.tokenizer)
        self.features: torch.Tensor | None = None
        self.grid_thw: torch.Tensor | None = None
        self.geometry: Geometry | None = None
        self.prior: tuple[torch.Tensor, torch.Tensor] | None = None   # (features, grid_thw) of a prior scan
        self.encode_calls = 0
        self.encode_s = 0.0

    @property
    def name(self) -> str:
        """The model's name (its config's for our own checkpoints) and, for official ones, where it came
        from."""
        if self.checkpoint.source == "embedded" or self.model.config.model_name != "Photon":
            return self.model.config.model_name
        return f"Photon {self.checkpoint.label()}"

    @property
    def default_budget(self) -> Budget:
        """What Photon does: the model's own θ (S2); every visual token for an S1 checkpoint."""
        return Budget("auto") if self.checkpoint.has_its else Budget("full")

    def supports(self, budget: str | Budget | None) -> str | None:
        """None if ``budget`` can run on this checkpoint, else the message saying why not."""
        b = self.default_budget if budget is None else Budget.parse(budget)
        if b.mode in THRESHOLD_MODES and not self.checkpoint.has_its:
            return S1_MESSAGE.format(mode=b.mode)
        return None

    def warm_up(self, max_new_tokens: int = 32, always: bool = False) -> float:
        """On CUDA, build what a first ask needs before any user asks — the vision tower compiled and
        captured for the CT grid, the prefill's spans and the decode step (compiled) at one row — by one
        ask on a blank volume (its largest parts, measured on the H200 on 2026-12-04: the decode step's
        compile 5.5 s, the tower's 0.75 s), so the first question is answered as fast as the later ones.
        ``max_new_tokens``: the answers' length the server uses (its decode cache size). Nothing to build
        on the CPU: returns 0 there unless ``always``. Leaves the loaded volume as it was. Returns the
        seconds it took."""
        if self.device.type != "cuda" and not always:
            return 0.0
        t = time.perf_counter()
        feats, grid, _ = self.encode(torch.zeros(MODEL_SHAPE[0], 1, *MODEL_SHAPE[1:]))
        self.encode_calls -= 1                      # not a user's volume
        self.answer([Query("Is there a lesion?", None, (feats, grid))], max_new_tokens=max_new_tokens)
        return time.perf_counter() - t

    # ------------------------------------------------------------------ volume
    def prepare(self, volume: Volume) -> Prepared:
        return prepare(volume, self.device)

    def set_volume(self, volume: Volume | Prepared | torch.Tensor,
                   prior: Volume | Prepared | torch.Tensor | None = None) -> None:
        """Encode a volume once; later asks reuse the cached visual features.

        Accepts a `Volume` (prepared here), a `Prepared`, or model frames (140, 1, 280, 280) /
        (140, 280, 280).
        ``prior``: an earlier scan of the same patient, for questions about change; every question
        then sees both (prior first). Setting a volume without a prior clears the prior.
        """
        t = time.perf_counter()
        self.prior = self.encode(prior)[:2] if prior is not None else None
        self.features, self.grid_thw, self.geometry = self.encode(volume)
        self.encode_s = time.perf_counter() - t

    def encode(
        self, volume: Volume | Prepared | torch.Tensor, step=None
    ) -> tuple[torch.Tensor, torch.Tensor, Geometry | None]:
        """(visual features, grid_thw, geometry or None) of one volume. ``step(i, n)``: called before each
        of the tower's n blocks on the CPU (the official tower takes ≈ 33 s on 2 cores; on CUDA it
        is one captured graph of milliseconds), in this thread's encoding only; it may raise to stop."""
        if isinstance(volume, Volume):
            volume = self.prepare(volume)
        if isinstance(volume, Prepared):
            pv, grid, geometry = volume.pixel_values, volume.grid_thw, volume.geometry
        else:
            frames = volume if volume.ndim == 4 else volume[:, None]
            (pv, grid), geometry = patchify(frames.float()), None
        # on CUDA the tower runs compiled and captured per grid (engine.VisionEngine; eager on failure)
        encode = vision_for(self.model) if self.device.type == "cuda" else self.model.encode_volume
        cpu_step = None if self.device.type == "cuda" else step   # (hooks would break the compiled tower)
        with torch.inference_mode(), _each_block(self.model.visual.blocks, cpu_step):
            features = encode(pv.to(self.device), grid.to(self.device))
        self.encode_calls += 1
        return features, grid.to(self.device), geometry

    def set_features(self, features: torch.Tensor, grid_thw: torch.Tensor, geometry: Geometry | None = None,
                     prior: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Reuse features encoded earlier (e.g. a per-session cache); ``prior`` = (features, grid_thw)."""
        self.features, self.grid_thw, self.geometry = features, grid_thw.to(self.device), geometry
        self.prior = (prior[0], prior[1].to(self.device)) if prior is not None else None

    # ------------------------------------------------------------------ asking
    def ask(self, question: str, budget: str | Budget | None = None, max_new_tokens: int = 32,
            do_sample: bool | None = None, temperature: float | None = None, top_p: float | None = None,
            seed: int = 0) -> Answer:
        return self.ask_many([question], [budget], max_new_tokens, do_sample, temperature, top_p, seed)[0]

    def ask_many(self, questions: list[str] | str, budgets: list | str | Budget | None = None,
                 max_new_tokens: int = 32, do_sample: bool | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int = 0) -> list[Answer]:
        """Several questions and/or budgets on the current volume in ONE batched forward.

        ``questions`` and ``budgets`` broadcast: one question × many budgets (the Compare view),
        many questions × one budget, or pairwise lists of equal length. A budget of None is
        `default_budget`; decoding settings left None come from the checkpoint's generation config.
        """
        if self.features is None:
            raise ValueError("No volume is loaded; call set_volume() first.")
        qs = [questions] if isinstance(questions, str) else list(questions)
        bs = budgets if isinstance(budgets, list) else [budgets]
        n = max(len(qs), len(bs))
        if len(qs) not in (1, n) or len(bs) not in (1, n):
            raise ValueError("questions and budgets must have equal lengths or length 1")
        qs, bs = (qs * n if len(qs) == 1 else qs), (bs * n if len(bs) == 1 else bs)
        return self.answer([self.query(q, b) for q, b in zip(qs, bs)], max_new_tokens, do_sample, temperature,
                           top_p, seed)

    def query(self, question: str, budget: str | Budget | None = None) -> Query:
        """A question on the current volume (and prior), as a row for `answer`."""
        if self.features is None:
            raise ValueError("No volume is loaded; call set_volume() first.")
        return Query(question, budget, (self.features, self.grid_thw), self.prior)

    def answer(self, queries: list[Query], max_new_tokens: int = 32, do_sample: bool | None = None,
               temperature: float | None = None, top_p: float | None = None, seed: int = 0,
               on_step=None, on_layer=None) -> list[Answer]:
        """Rows of (question, budget, volume features, prior) — possibly of different volumes, e.g. the
        asks of several users (`batching.AskBatcher`) — answered in ONE batched forward. Every row
        must carry as many visual tokens as the others; each gives exactly what it gives alone.
        Decoding settings left None come from the checkpoint's generation config. ``on_step(n)``: called
        before each decode step with the tokens chosen so far; a true result ends the answers there
        (cut short: for a caller that no longer wants them). ``on_layer(i, n)``: called before each of
        the prefill's n decoder layers on the CPU (an official model's prefill takes ≈ 22 s there); it may
        raise to stop."""
        if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}.")
        n = len(queries)
        bs = [self.default_budget if q.budget is None else Budget.parse(q.budget) for q in queries]
        for b in bs:
            if (why := self.supports(b)) is not None:
                raise ValueError(why)
        qs = [clean_question(q.question) for q in queries]
        ids, mask, feats, grid, P, V = self._inputs(queries)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)
        g = self.generation
        sampling = replace(g, do_sample=g.do_sample if do_sample is None else bool(do_sample),
                           temperature=g.temperature if temperature is None else float(temperature),
                           top_p=g.top_p if top_p is None else float(top_p))
        gen = torch.Generator(device=self.device).manual_seed(seed) if sampling.do_sample else None
        t0 = time.perf_counter()
        with torch.inference_mode():
            timing = {}
            res = self._generate(ids, mask, feats, grid, bs, max_new_tokens, sampling, gen, timing, on_step,
                                 None if cuda else on_layer)
        total_s = time.perf_counter() - t0
        prefill_s = timing.get("prefill", total_s)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else peak_rss_mb()
        answers = []
        st = res.prefill.its
        stops = set(sampling.eos_token_ids)
        toks, logps = res.tokens.tolist(), res.logprobs.float().cpu().numpy()
        for b in range(n):
            row = toks[b]
            end = next((i for i, t in enumerate(row) if t in stops), None)
            gen_ids = row if end is None else row[:end]
            used = len(gen_ids) + (end is not None)          # the answer's tokens and the stop that ended it
            if st is not None:
                keep_all = st.keep[b].cpu().numpy().astype(bool)
                rho_all = st.rho[b].float().cpu().numpy()
                theta = float(st.theta[b])
            else:
                keep_all, rho_all, theta = np.ones(P + V, bool), np.zeros(P + V, np.float32), 0.0
            rho = rho_all[P:]
            keep, prior_keep = keep_all[P:], keep_all[:P]
            text = self.tokenizer.decode(gen_ids)
            answers.append(Answer(
                text=text, budget=bs[b].label(), keep_grid=keep.reshape(TOKEN_GRID),
                kept_indices=np.flatnonzero(keep).tolist(), rho=rho.reshape(TOKEN_GRID), theta=theta,
                total=P + V, kept=int(keep_all.sum()), prompt_tokens=int(mask[b].sum()),
                generated_tokens=used, prefill_s=prefill_s, decode_s=total_s - prefill_s, peak_memory_mb=peak,
                device=str(self.device), extra={"batch": n, "decode": res.stats.get("path")},
                checkpoint=self.checkpoint.to_dict(),
                prior_keep_grid=prior_keep.reshape(TOKEN_GRID) if P else None,
                prior_kept=int(prior_keep.sum()), prior_total=P, readable=readable(qs[b], text),
                prior_rho=rho_all[:P].reshape(TOKEN_GRID) if P else None,
                probability=float(np.exp(logps[b, :used].mean())) if used else None))
        return answers

    def answer_logprobs(self, questions: list[str], budget: str | Budget | None = None) -> torch.Tensor:
        """(len(questions), vocab) log-probabilities of each question's first answer token on the
        current volume, in one batched prefill (a diagnostic read-out: e.g. P("yes") vs P("no"))."""
        if self.features is None:
            raise ValueError("No volume is loaded; call set_volume() first.")
        ids, mask, feats, grid, _, _ = self._inputs([self.query(q) for q in questions])
        with torch.inference_mode():
            b = self.default_budget if budget is None else Budget.parse(budget)
            out = self.model(ids, mask, features=feats, grid_thw=grid, budget=[b] * len(ids))
        return out.logits[:, -1].float().log_softmax(-1)       # left-padded: the last position answers

    def _inputs(self, queries: list[Query]):
        """Batched prompt ids/mask and visual features of the rows (each row: its prior's tokens, then its
        volume's); also the prior's and the volume's token counts, which every row must share."""
        counts = {(q.prior[0].shape[0] if q.prior is not None else 0, q.volume[0].shape[0]) for q in queries}
        if len(counts) != 1:
            raise ValueError(f"rows of one forward must carry the same visual token counts (prior, volume); "
                             f"got {sorted(counts)}")
        (P, V), = counts
        prompts = [self.tokenizer.prompt(clean_question(q.question), V, prior_visual=P)[0] for q in queries]
        ids, mask, _ = batch_prompts(prompts, self.model.config.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        vols = [v for q in queries for v in ([q.prior] if q.prior is not None else []) + [q.volume]]
        feats = torch.cat([f.to(self.device) for f, _ in vols])
        grid = torch.cat([g.to(self.device).reshape(-1, 3) for _, g in vols])
        return ids, mask, feats, grid, P, V

    def _generate(self, ids, mask, feats, grid, budgets, max_new_tokens, sampling: GenerationSettings, gen,
                  timing, on_step=None, on_layer=None) -> Generation:
        t0 = time.perf_counter()
        with _each_block(self.model.model.layers, on_layer) as prefill_done:
            def mark(_out):
                prefill_done()                  # (the decode steps run the same layers: not reported)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                timing["prefill"] = time.perf_counter() - t0

            return generate(self.model, ids, mask, features=feats, grid_thw=grid, budget=budgets,
                            max_new_tokens=max_new_tokens, eos_token_id=list(sampling.eos_token_ids),
                            do_sample=sampling.do_sample, temperature=sampling.temperature,
                            top_p=sampling.top_p, top_k=sampling.top_k,
                            repetition_penalty=sampling.repetition_penalty, generator=gen, on_prefill=mark,
                            on_step=on_step)


@contextlib.contextmanager
def _each_block(blocks, step):
    """``step(i, n)`` before each block's forward run by this thread (forward pre-hooks, removed after, or
    earlier by calling what it yields; another thread's forward through the same blocks is not seen)."""
    if step is None:
        yield lambda: None
        return
    me, n = threading.get_ident(), len(blocks)

    def hook(i):
        def pre(module, args) -> None:          # (a value returned here would replace the block's inputs)
            if threading.get_ident() == me:
                step(i, n)
        return pre
    handles = [blk.register_forward_pre_hook(hook(i)) for i, blk in enumerate(blocks)]

    def remove() -> None:
        for h in handles:
            h.remove()
    try:
        yield remove
    finally:
        remove()


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MiB; Linux reports KiB)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:  # pragma: no cover
        return float("nan")
