"""Plain functions behind the app and its API: load a scan, ask, audit, compare, export. No Gradio here.

One `Engine` per server holds the model (loaded lazily, once) and an LRU cache of encoded volumes.
A `Session` is one loaded scan: its volume, geometry, label map and the last answer — the domain
state only (what the browser shows of it is cached in `app.view.View`). Asks (and Compare's budgets)
from different sessions that arrive together run as one batched forward
(`photon_core.inference.batching.AskBatcher`, each row with its own session's encoded volume); a lock
guards only the encoded-volume cache and encoding.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from photon_core import organs
from photon_core.inference.answers import question_type, readable
from photon_core.inference.audit import export_audit, kept_outside, organ_retention
from photon_core.inference.prompt import clean_question
from photon_core.io import samples
from photon_core.io.dicom import CHOOSE_SERIES
from photon_core.io.orientation import reorient
from photon_core.io.preprocess import TokenMap, prepare
from photon_core.io.volume import Limits, Volume, VolumeError, list_series, load_label_map, load_volume
from photon_core.model.budget import SCAN_TOKENS, Budget, describe, floor_note
from photon_core.organs import ORGANS, PAIRED, TOTALSEG_CLASSES, label_blocks, organs_in_question
from viz.scene import world_bounds

log = logging.getLogger(__name__)

# What a user of the embedded model must know when reading its answer and its kept blocks (measured
# in photon_core/demo_model/MODEL_CARD.md): it answers from priors, and where it looks is partly a
# place learned for the organ's name (on noise it still keeps two thirds of an abdominal organ's blocks).
DEMO_NOTICE = ("demo model trained on synthetic findings; its answers are priors and its kept blocks partly "
               "a place learned per organ name, not only what it found (see the model card) — not for "
               "clinical use")
COMPARE = [("Auto", "auto"), ("10%", "ratio:0.1"), ("25%", "ratio:0.25"), ("50%", "ratio:0.5"),
           ("Full", "full")]
LOW_RETENTION = 0.5                      # an asked organ keeping less than this share of its blocks warns


def volume_key(vol: Volume) -> str:
    """Content hash of a volume (the encoded-feature cache key): every voxel, read in place in its own
    memory order (0.24 s for 512 × 512 × 300 float32 on 2 cores; a NIfTI's Fortran-ordered array copied
    to C order first took 1.8 s). A key of every n-th byte, as before, gave a scan edited in a few voxels
    (a lesion painted in or out) the cached tokens, and so the answers, of the scan before."""
    hu = vol.hu
    order = "F" if hu.flags.f_contiguous and not hu.flags.c_contiguous else "C"   # a NIfTI's is F
    h = hashlib.sha256(f"{hu.dtype.str}{vol.shape}{order}".encode())
    h.update(memoryview(hu.T if order == "F" else np.ascontiguousarray(hu)).cast("B"))   # no copy
    h.update(np.ascontiguousarray(vol.affine, dtype=np.float64).tobytes())
    return h.hexdigest()


cases = samples.cases
case_by_title = samples.case


def budget_modes(has_its: bool) -> tuple[list[tuple[str, str]], str]:
    """The keep-budget modes a checkpoint supports, as (label, mode) choices for the UI, and a note.

    S2: Auto (the model's θ), Tokens, Percent, Threshold, Full. S1 has no learned threshold: Full
    (what S1 does), and Tokens / Percent ranked by the ITS layer's attention saliency ρ; Auto and
    Threshold need an S2 checkpoint."""
    if has_its:
        return [(m, m) for m in ("Auto", "Tokens", "Percent", "Threshold", "Full")], ""
    return ([("Full (S1: every visual token)", "Full"), ("Tokens (top-k by attention saliency ρ)", "Tokens"),
             ("Percent (by attention saliency ρ)", "Percent")],
            "S1 checkpoint: no learned threshold θ, so Auto and Threshold need an S2 checkpoint; "
            "Tokens and Percent rank tokens by the ITS layer's attention saliency.")


@dataclass
class Settings:
    model_dir: str | None = None           # checkpoint folder or hub id (None: the embedded demo model)
    subfolder: str | None = None           # the checkpoint's folder inside model_dir (a task's S2 weights)
    revision: str | None = None            # hub branch / tag / commit
    device: str = "auto"
    max_new_tokens: int = 32
    cache_volumes: int = 4                 # encoded volumes kept in memory (LRU, whole server)
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Audit:
    """What an answer kept, read against the scan's label map — computed once per answer."""

    retention: dict                        # structure name -> share of its token blocks kept
    asked: tuple                           # the label map's structures the question names
    asked_retention: dict                  # of those, the share kept
    warning: str                           # an asked structure kept below LOW_RETENTION, in words
    small: tuple                           # structures smaller than a block, counted by any overlap
    readable: bool                         # the answer parses for its question type
    probability: float | None              # exp(mean token log-prob), when the model reports it
    untrained: bool = False                # the demo model never saw a question of this kind
    outside: int = 0                       # kept tokens wholly in the padding around the scan (not on it)
    unlabelled: tuple = ()                 # structures the question names that the label map lacks


def unlabelled(question: str) -> tuple[str, ...]:
    """The structures a question names (the demo's organs, else TotalSegmentator's classes), a pair of
    sides as one ("kidney"): called when the scan's label map holds none of them."""
    found = organs_in_question(question, list(ORGANS)) or [
        n.replace("_", " ") for n in organs_in_question(question, list(TOTALSEG_CLASSES.values()))]
    for pair, sides in PAIRED.items():
        if set(sides) <= set(found):
            found = [pair] + [n for n in found if n not in sides]
    return tuple(found)


_LOADS = itertools.count(1)


class UploadPartError(VolumeError):
    """A file that came with the scan (label map, names table, prior scan) could not be used: the
    message names that file, not the scan."""

    def __init__(self, message: str, path):
        super().__init__(message)
        self.file_name = Path(str(path)).name


@contextlib.contextmanager
def _part(path):
    try:
        yield
    except UploadPartError:
        raise
    except (VolumeError, ValueError) as e:
        if path is None:
            raise
        raise UploadPartError(str(e), path) from None


@dataclass
class Session:
    """One loaded scan (a browser session's, or one API call's). Holds no patient identifiers."""

    key: str = ""                          # content hash of the volume (cache key)
    title: str = ""
    volume: Volume | None = None
    geometry: object = None
    token_index: TokenMap | None = None    # (I, J, K) flat token per original voxel (−1 outside)
    covered: np.ndarray | None = None      # (1000,) the tokens that cover some voxel of the scan
    labels: np.ndarray | None = None
    label_sizes: tuple | None = None       # (ids, voxel counts) of the label map (`organs.label_counts`)
    label_names: dict = field(default_factory=dict)        # {label id (str): name}
    label_note: str | None = None          # how the names were found, when not from the user's table
    blocks: dict = field(default_factory=dict)             # structure -> (1000,) bool blocks
    small_structures: list = field(default_factory=list)   # structures counted by any overlap
    warnings: list = field(default_factory=list)           # the loader's, for the user
    series: list = field(default_factory=list)             # DICOM series of the upload (SeriesInfo)
    series_uid: str | None = None          # the series loaded (None: the loader's default)
    upload: tuple = ()                     # the uploaded files it was loaded from (server paths, never shown)
    prior: Volume | None = None            # an earlier scan of the same patient (questions about change)
    prior_key: str = ""
    prior_series: list = field(default_factory=list)       # DICOM series of the prior's upload (SeriesInfo)
    prior_series_uid: str | None = None    # the prior's series loaded (None: the loader's default)
    answer: object = None                  # the last answer, its question, budget and audit
    question: str = ""
    budget: Budget | None = None
    audit: Audit | None = None
    compared: str | None = None            # the question the Compare table holds (None: no table)
    serial: int = field(default_factory=lambda: next(_LOADS))   # which load this is (the page shows it)
    # One ask, compare or export of this session at a time (`app.handlers` holds it): a browser can send
    # two at once (Enter and a click), and each reads the answer the other one writes.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    # A sample case's sessions share its scan, labels and token maps (the server's one copy, read-only as
    # every session's are) and this one dict, where `app.view` keeps the case's views; None: an upload's.
    shared: dict | None = field(default=None, repr=False, compare=False)
    used_at: float = field(default_factory=time.monotonic, repr=False, compare=False)   # its last request
    released: bool = False                 # its arrays were let go: its page was closed (`release`)

    def release(self) -> None:
        """Let go of the scan's arrays (the page that showed it was closed long ago: Gradio keeps a closed
        page's state an hour); the session then reads as no scan loaded. A sample case's arrays are the
        server's one copy and stay."""
        if self.shared is not None:
            return
        with self.lock:                    # after an ask, compare or export in flight
            self.volume = self.geometry = self.token_index = self.covered = self.prior = None
            self.labels = self.label_sizes = None
            self.answer = self.audit = self.compared = None
            self.released = True

    def ids_of(self, names) -> list[int]:
        """Label ids of structure names, in the order of the names."""
        return [int(i) for n in dict.fromkeys(names) for i, m in self.label_names.items() if m == n]

    def another(self) -> Session:
        """A new session of the same scan, nothing asked yet: the arrays are this one's, not copies."""
        return replace(self, label_names=dict(self.label_names), blocks=dict(self.blocks),
                       small_structures=list(self.small_structures), warnings=list(self.warnings),
                       series=list(self.series), prior_series=list(self.prior_series), answer=None,
                       question="", audit=None, compared=None,
                       serial=next(_LOADS), lock=threading.RLock(), used_at=time.monotonic())


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._predictor = None
        self._batcher = None
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, tuple] = OrderedDict()
        self._samples: dict[str, Session] = {}          # sample case title -> its loaded session, once

    def close(self) -> None:
        """Stop the ask batcher and drop the encoded volumes (the app is shutting down)."""
        with self._lock:
            if self._batcher is not None:
                self._batcher.close()
                self._batcher = None
            self._cache.clear()

    @property
    def predictor(self):
        with self._lock:
            if self._predictor is None:
                from photon_core.inference.predictor import Predictor

                st = self.settings
                pred = Predictor(st.model_dir, subfolder=st.subfolder, revision=st.revision, device=st.device)
                took = pred.warm_up(st.max_new_tokens)   # CUDA: compile and capture now, not at a first ask
                if took:
                    log.info("model warmed up on %s in %.1f s (compiled and captured for the CT grid)",
                             pred.device, took)
                self._predictor = pred
            return self._predictor

    def budget_modes(self) -> tuple[list[tuple[str, str]], str]:
        return budget_modes(self.predictor.checkpoint.has_its)

    def supports(self, budget: Budget) -> bool:
        return self.predictor.supports(budget) is None

    @property
    def batcher(self):
        with self._lock:
            if self._batcher is None:
                from photon_core.inference.batching import AskBatcher

                self._batcher = AskBatcher(self.predictor)
            return self._batcher

    @property
    def model_name(self) -> str:
        name = self.predictor.name
        return f"{name} — {DEMO_NOTICE}" if "demo" in name.lower() or "synthetic" in name.lower() else name

    @property
    def is_demo(self) -> bool:
        """The embedded demo model (or another synthetic-data one): its questions are those of its data."""
        return self.model_name != self.predictor.name

    def provenance(self) -> dict:
        """Where the weights come from: the checkpoint's record (source, repo, revision, stage, …)."""
        info = dict(self.predictor.checkpoint.to_dict())
        info["folder"] = info.pop("path", None)         # a "path" key reads as a file to Gradio's clients
        info["label"] = self.predictor.checkpoint.label()
        if self.is_demo:
            info["notice"] = DEMO_NOTICE
        return info

    # ------------------------------------------------------------------ loading
    def open_session(self, vol: Volume, title: str, labels_path: Path | None, label_names: dict | None,
                     progress=lambda *a, **k: None, label_table: str | None = None) -> Session:
        s = Session(title=title, volume=vol, warnings=list(vol.warnings))
        s.key = volume_key(vol)
        progress(0.2, desc="Preparing the volume (official Photon preprocessing)")
        s.geometry = self._encode(s.key, vol, progress)
        s.token_index = s.geometry.token_map()
        s.covered = s.token_index.covered(SCAN_TOKENS)
        if labels_path is not None:
            with _part(labels_path):
                s.labels, _ = load_label_map(labels_path, like=vol, limits=self.settings.limits)
            s.label_sizes = organs.label_counts(s.labels)     # counted once: names and the 3-D anatomy
            if label_names:
                s.label_names = {str(k): v for k, v in label_names.items()}
            else:
                with _part(label_table):
                    names, s.label_note = organs.label_names(s.label_sizes[0], label_table)
                s.label_names = {str(k): v for k, v in names.items()}
            s.blocks, s.small_structures = label_blocks(s.token_index, s.labels, s.label_names)
        return s

    def _encode(self, key: str, vol: Volume, progress=None):
        """Prepare + encode once per volume (LRU over the whole server); returns the Geometry.
        ``progress`` is told each prepared axis and each block of the vision tower on the CPU (a stopped
        load stops there)."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key][2]
            pred = self.predictor
            step = None if progress is None else (
                lambda done: progress(0.2 + 0.25 * done, desc="Preparing the volume (official Photon "
                                                              "preprocessing)"))
            prepared = prepare(vol, pred.device, step)
            encoding = None if progress is None else (
                lambda i, n: progress(0.5 + 0.25 * i / n,
                                      desc=f"Encoding the volume (Photon's vision tower): block {i + 1}/{n}"))
            if progress is not None:
                progress(0.5, desc="Encoding the volume (Photon's vision tower)")
            self._cache[key] = pred.encode(prepared, encoding)
            while len(self._cache) > self.settings.cache_volumes:
                self._cache.popitem(last=False)
            return self._cache[key][2]

    def _queries(self, s: Session, question: str, budgets: list[Budget]) -> list:
        """Rows for the batcher: the question under each budget on the session's encoded volume (and
        prior); encodes on first use (cached per volume)."""
        from photon_core.inference.predictor import Query

        with self._lock:
            prior = None
            if s.prior is not None:
                self._encode(s.prior_key, s.prior)
                prior = self._cache[s.prior_key][:2]
            self._encode(s.key, s.volume)
            volume = self._cache[s.key][:2]
        return [Query(question, b, volume, prior) for b in budgets]

    def load_case(self, title: str, progress=lambda *a, **k: None) -> Session:
        """A sample case, read and prepared once per server: every browser opening the page loads one, so
        each session of a case shares the case's arrays (≈ 20–40 MB a case) instead of holding its own."""
        c = case_by_title(title)
        with self._lock:
            first = self._samples.get(c["title"])
        if first is None:
            progress(0.05, desc=f"Loading {c['title']}")
            vol = load_volume(samples.path(c["file"]), self.settings.limits)
            lab = samples.path(c["label_map"]) if c.get("label_map") else None
            s = self.open_session(vol, c["title"], lab, c.get("labels"), progress)
            s.shared = {}
            with self._lock:
                first = self._samples.setdefault(c["title"], s)
        else:
            progress(0.2, desc="Preparing the volume (official Photon preprocessing)")
            self._encode(first.key, first.volume, progress)  # encoded again if the LRU let it go
        return first.another()

    def series(self, files: list[str]) -> list:
        """The DICOM series among uploaded files (empty for a NIfTI/NRRD file or a single series)."""
        files = [str(f) for f in files or []]
        if not files or (len(files) == 1 and not files[0].lower().endswith(".zip")):
            return []
        found = list_series(files if len(files) > 1 else files[0], self.settings.limits)
        return found if len(found) > 1 else []

    def load_upload(self, files: list[str], label_file: str | None, progress=lambda *a, **k: None,
                    prior_file: str | None = None, label_table: str | None = None,
                    series: str | None = None, prior_series: str | None = None) -> Session:
        """An uploaded scan (and, optionally, a prior scan of the same patient: every question is
        then asked with both, prior first, so questions about change can be answered). ``series`` and
        ``prior_series``: the DICOM series to load when the scan's or the prior's upload holds several
        (None: the loader's default)."""
        if not files:
            raise VolumeError("Choose a file to upload: NIfTI (.nii/.nii.gz), NRRD, or a DICOM series "
                              "(files or .zip).")
        if prior_series and not prior_file:
            raise ValueError("A series of the prior scan was chosen, but no prior scan was given.")
        progress(0.05, desc="Reading the upload")
        listed = self.series(files)
        source = files if len(files) > 1 else files[0]
        vol = load_volume(source, self.settings.limits, series=series or None,
                          step=lambda f, desc: progress(0.05 + 0.04 * f, desc=desc))
        prior, prior_listed = None, []
        if prior_file:
            progress(0.1, desc="Reading the prior scan")
            try:
                prior_listed = self.series([prior_file])
                prior = load_volume(prior_file, self.settings.limits, series=prior_series or None,
                                    step=lambda f, desc: progress(0.1 + 0.04 * f, desc=f"Prior scan: {desc}"))
            except VolumeError as e:
                raise UploadPartError(f"The prior scan could not be read: {e}", prior_file) from None
            prior.warnings = [w.replace(CHOOSE_SERIES, PRIOR_SERIES) for w in prior.warnings]
        s = self.open_session(vol, upload_title(vol), Path(label_file) if label_file else None, None,
                              progress, label_table)
        s.series = listed
        s.series_uid = series or (listed[0].uid if listed else None)   # the default is listed first
        if prior is not None:
            progress(0.9, desc="Encoding the prior scan")
            s.prior, s.prior_key = prior, volume_key(prior)
            s.prior_series = prior_listed
            s.prior_series_uid = prior_series or (prior_listed[0].uid if prior_listed else None)
            s.warnings += ([f"prior scan: {w}" for w in prior.warnings] + prior_coverage_warnings(vol, prior)
                           + ([SAME_PRIOR] if same_scan(vol, prior) else []))
            self._encode(s.prior_key, prior)
        return s

    # ------------------------------------------------------------------ asking
    def ask(self, s: Session, question: str, budget: Budget, max_new_tokens: int | None = None, tick=None):
        """The answer to the question about the session's scan; the session is left as it was. ``tick``:
        follows the ask while it waits, and gives it up by raising (`AskBatcher.ask`)."""
        if s is None or s.volume is None:
            raise ValueError("Load a sample case or upload a scan first.")
        question = clean_question(question)
        ans, = self.batcher.ask(self._queries(s, question, [budget]),
                                max_new_tokens=max_new_tokens or self.settings.max_new_tokens, tag=s.key[:8],
                                tick=tick)
        return ans

    def answer(self, s: Session, question: str, budget: Budget, max_new_tokens: int | None = None,
               tick=None):
        """Ask, then audit the answer once; the session keeps the answer, its question and its audit,
        set together once all three are known. Returns (answer, audit)."""
        why = self.predictor.supports(budget)
        if why:
            raise ValueError(why)
        question = clean_question(question)
        with s.lock:
            ans = self.ask(s, question, budget, max_new_tokens, tick)
            audit = self.audit(s, question, ans)
            s.answer, s.question, s.budget, s.audit = ans, question, budget, audit
            return ans, audit

    def compare(self, s: Session, question: str, budgets: list[Budget], tick=None):
        if s is None or s.volume is None:
            raise ValueError("Load a sample case or upload a scan first.")
        question = clean_question(question)
        return self.batcher.ask(self._queries(s, question, budgets),
                                max_new_tokens=self.settings.max_new_tokens, tag=s.key[:8], tick=tick)

    def compare_rows(self, s: Session, question: str, tick=None) -> list[dict]:
        """Auto / 10% / 25% / 50% / Full (those the checkpoint supports) in one batch, as table rows."""
        runs = [(name, Budget.parse(b)) for name, b in COMPARE if self.supports(Budget.parse(b))]
        answers = self.compare(s, question, [b for _, b in runs], tick)
        full = answers[-1]
        rows = []
        for (name, _), a in zip(runs, answers):
            ok = readable(question, a.text, list(s.blocks))
            rows.append(dict(budget=name, kept=a.kept, total=a.total, answer=a.text, readable=ok,
                             probability=probability(a), differs_from_full=a.text != full.text,
                             latency_ms=round(1000 * (a.prefill_s + a.decode_s))))
        return rows

    def audit(self, s: Session, question: str, ans) -> Audit:
        """Retention per structure (once), the structures the question names, and the warnings."""
        keep = np.asarray(ans.keep_grid, bool).ravel()
        retention = organ_retention(s.blocks, keep) if s.blocks else {}
        asked = tuple(organs_in_question(question, list(s.blocks))) if s.blocks else ()
        asked_ret = {n: retention[n] for n in asked if n in retention}
        low = [n for n, r in asked_ret.items() if r < LOW_RETENTION]
        warning = "; ".join(_kept_words(int((s.blocks[n] & keep).sum()), int(s.blocks[n].sum()),
                                        n.replace("_", " ")) for n in low)
        return Audit(retention=retention, asked=asked, asked_retention=asked_ret, warning=warning,
                     small=tuple(n for n in s.small_structures if n in retention),
                     readable=readable(question, ans.text, list(s.blocks)), probability=probability(ans),
                     untrained=self.is_demo and question_type(question) == "open",
                     outside=kept_outside(s.covered, keep) if s.covered is not None else 0,
                     unlabelled=unlabelled(question) if s.blocks and not asked else ())

    def export(self, s: Session, pngs: dict[str, bytes], folder: Path) -> list[Path]:
        """The audit of the session's last answer as files in ``folder`` (mask, report, PNG views)."""
        if s is None or s.answer is None:
            raise ValueError("Ask a question first; the export holds the audit of an answer.")
        audit = s.audit if s.audit is not None else self.audit(s, s.question, s.answer)
        a = s.answer
        cut = a.cut
        findings = {
            "answer_readable": bool(audit.readable),
            "answer_probability": None if audit.probability is None else round(audit.probability, 4),
            "budget_description": describe(a.budget) + floor_note(a.budget, cut),
            "cut_rho": None if cut is None else round(cut, 4),   # where the budget cut ρ (None: not by ρ)
            "asked_structures": list(audit.asked),
            "asked_retention": {n: round(float(r), 4) for n, r in audit.asked_retention.items()},
            "retention_warning": audit.warning or None,
            "load_warnings": list(s.warnings),
        }
        if s.prior is not None:
            findings["prior_scan"] = {"scan": prior_description(s.prior)}
        return export_audit(Path(folder), s.geometry, s.token_index.whole(), a, s.question, self.model_name,
                            audit.retention, pngs, s.title, findings)


def _kept_words(kept: int, total: int, name: str) -> str:
    """'none of the 12 urinary bladder blocks were kept' / 'only 3 of the 12 … blocks were kept (25%)'."""
    blocks = f"{total} {name} block{'s' * (total != 1)}"
    if kept == 0:
        return f"none of the {blocks} {'were' if total != 1 else 'was'} kept"
    return f"only {kept} of the {blocks} {'were' if kept != 1 else 'was'} kept ({100 * kept / total:.0f}%)"


def upload_title(vol: Volume) -> str:
    """What an upload is called on the page, the card and the export: its format, grid and the time it
    loaded ('NIfTI upload, 122×101×112 voxels of 3×3×3 mm, 14:32:05'), so that two uploads can be told
    apart. Never a file name or a DICOM description (either may hold a patient's name); a DICOM series'
    reconstruction kernel, so that two series of one acquisition (soft tissue, lung) are told apart."""
    fmt = vol.meta.get("format") or vol.source_format
    kernel = f"kernel {vol.meta['ConvolutionKernel']}, " if vol.meta.get("ConvolutionKernel") else ""
    shape = "×".join(str(n) for n in vol.shape)
    mm = "×".join(f"{v:.2g}" for v in vol.spacing)
    return f"{fmt} upload, {kernel}{shape} voxels of {mm} mm, {time.strftime('%H:%M:%S')}"


PRIOR_EXTENT_RATIO = 1.5       # a prior larger or smaller than this along an axis may show another region


def prior_coverage_warnings(current: Volume, prior: Volume) -> list[str]:
    """A warning when the prior scan covers a much larger or smaller region than the current one: each is
    prepared on its own, so a question about change can only compare what both show."""
    a, b = (np.ptp(world_bounds(v.shape, v.affine), axis=0) for v in (current, prior))   # size along R, A, S
    ratio = np.maximum(a, b) / np.maximum(np.minimum(a, b), 1e-6)
    if ratio.max() <= PRIOR_EXTENT_RATIO:
        return []
    size = lambda e: "×".join(f"{v:.0f}" for v in e)    # noqa: E731
    return [f"The prior scan covers {size(b)} mm, the current scan {size(a)} mm (right–left × front–back × "
            f"head–foot): they may not show the same region, so a question about change compares only "
            f"what both show."]


PRIOR_SERIES = "Choose another as the prior (“Prior series”) to compare with it instead."   # its own picker
SAME_PRIOR = ("The prior scan is the current scan itself (the same voxels): a question about change compares "
              "the scan with itself. Upload the earlier scan as the prior.")


def same_scan(current: Volume, prior: Volume) -> bool:
    """The prior holds the current scan's voxels at the same places (the same file uploaded twice, or a
    copy stored in another axis order)."""
    if sorted(current.shape) != sorted(prior.shape):
        return False
    moved, to_prior = reorient(prior.hu, prior.affine, current.affine)
    return (moved.shape == current.shape and np.allclose(prior.affine @ to_prior, current.affine, atol=1e-2)
            and np.array_equal(moved, current.hu))


def prior_description(prior: Volume) -> str:
    """The prior scan in words, as the status line, the card's export and the API name it: its format,
    a DICOM series' reconstruction kernel (two series of one study, told apart) and grid (never a file
    name)."""
    fmt = prior.meta.get("format") or prior.source_format
    kernel = f", kernel {prior.meta['ConvolutionKernel']}" if prior.meta.get("ConvolutionKernel") else ""
    return f"{fmt}{kernel} — {prior.summary()}"


def probability(ans) -> float | None:
    """exp(mean token log-prob) of an answer's tokens, None when it has none (shown as '—')."""
    p = ans.probability
    return None if p is None or not np.isfinite(p) else float(p)
