"""Plain functions behind the app: load a case, ask, compare, export. No Gradio in here.

One `Engine` per server holds the model (loaded lazily, once) and an LRU cache of encoded volumes;
each browser session holds a `Session` (in `gr.State`): its volume, geometry, label map, cached
surfaces and answers. A lock serialises model calls (the Predictor holds the current volume).
"""
from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from photon_core.inference.audit import export_audit, organ_retention
from photon_core.organs import label_blocks, organs_in_question
from photon_core.io import samples
from photon_core.io.preprocess import TOKEN_GRID, prepare
from photon_core.inference.prompt import clean_question
from photon_core.model.budget import Budget
from photon_core.io.volume import Limits, Volume, VolumeError, load_label_map, load_volume

# What a user of the embedded model must know when reading its answer and its kept blocks (measured
# in photon_core/demo_model/MODEL_CARD.md): it answers from priors, and where it looks is partly a
# place learned for the organ's name (on noise it still keeps two thirds of an abdominal organ's blocks).
DEMO_NOTICE = ("demo model trained on synthetic findings; its answers are priors and its kept blocks partly a "
               "place learned per organ name, not only what it found (see the model card) — not for clinical use")


def volume_key(vol: Volume) -> str:
    """Content hash of a volume (the encoded-feature cache key)."""
    return hashlib.sha1(vol.hu.tobytes()[:: max(1, vol.hu.nbytes // 4_000_000)] +
                        vol.affine.tobytes() + str(vol.shape).encode()).hexdigest()


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


@dataclass
class Session:
    """Everything one user has loaded. Lives in gr.State; holds no patient identifiers."""

    key: str = ""                          # content hash of the volume (cache key)
    title: str = ""
    volume: Volume | None = None
    geometry: object = None
    token_index: np.ndarray | None = None  # (I, J, K) flat token per original voxel
    labels: np.ndarray | None = None
    label_names: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)   # organ -> (1000,) bool blocks
    small_structures: list = field(default_factory=list)   # structures counted by any overlap
    surfaces: list = field(default_factory=list)
    corners: np.ndarray | None = None      # (1000, 8, 3) world corners of the token blocks
    hu_ras: np.ndarray | None = None
    labels_ras: np.ndarray | None = None
    token_ras: np.ndarray | None = None
    spacing_ras: np.ndarray | None = None
    answer: object = None
    question: str = ""
    workdir: str = ""
    prior: Volume | None = None            # an earlier scan of the same patient (questions about change)
    prior_key: str = ""

    def cleanup(self) -> None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._predictor = None
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, tuple] = OrderedDict()
        self._workroot: str | None = None      # every session's folder lives in it; close() removes it

    def _session_dir(self) -> str:
        with self._lock:
            if self._workroot is None or not Path(self._workroot).is_dir():
                self._workroot = tempfile.mkdtemp(prefix="photon_ct_")
                atexit.register(shutil.rmtree, self._workroot, ignore_errors=True)   # if close() is never called
            return tempfile.mkdtemp(prefix="session_", dir=self._workroot)

    def close(self) -> None:
        """Remove every session's files (scenes, slices, exports): the app is shutting down."""
        with self._lock:
            if self._workroot:
                shutil.rmtree(self._workroot, ignore_errors=True)
                self._workroot = None

    @property
    def predictor(self):
        with self._lock:
            if self._predictor is None:
                from photon_core.inference.predictor import Predictor

                st = self.settings
                self._predictor = Predictor(st.model_dir, subfolder=st.subfolder, revision=st.revision,
                                            device=st.device)
            return self._predictor

    def budget_modes(self) -> tuple[list[tuple[str, str]], str]:
        return budget_modes(self.predictor.checkpoint.has_its)

    def supports(self, budget: Budget) -> bool:
        return self.predictor.supports(budget) is None

    @property
    def model_name(self) -> str:
        p = self.predictor
        name = p.name
        return f"{name} — {DEMO_NOTICE}" if "demo" in name.lower() or "synthetic" in name.lower() else name

    # ------------------------------------------------------------------ loading
    def open_session(self, vol: Volume, title: str, labels_path: Path | None, label_names: dict | None,
                     progress=lambda *a, **k: None) -> Session:
        from viz.scene import anatomy_surfaces
        from viz.slices import to_ras

        s = Session(title=title, volume=vol, workdir=self._session_dir())
        s.key = volume_key(vol)
        progress(0.2, desc="Preparing the volume (official Photon preprocessing)")
        s.geometry = self._encode(s.key, vol)
        s.token_index = s.geometry.token_index_volume()
        if labels_path is not None:
            s.labels, _ = load_label_map(labels_path, like=vol, limits=self.settings.limits)
            s.label_names = label_names or {str(int(i)): f"label_{int(i)}" for i in np.unique(s.labels) if i}
            s.blocks, s.small_structures = label_blocks(s.token_index, s.labels, s.label_names)
        progress(0.7, desc="Building 3-D surfaces")
        s.surfaces = anatomy_surfaces(vol.hu, vol.affine, s.labels, s.label_names)
        s.corners = np.stack([s.geometry.token_block_corners(a, b, c) for a in range(TOKEN_GRID[0])
                              for b in range(TOKEN_GRID[1]) for c in range(TOKEN_GRID[2])])
        s.hu_ras, s.spacing_ras = to_ras(vol.hu, vol.affine)
        s.token_ras, _ = to_ras(s.token_index, vol.affine)
        if s.labels is not None:
            s.labels_ras, _ = to_ras(s.labels, vol.affine)
        return s

    def _encode(self, key: str, vol: Volume):
        """Prepare + encode once per volume (LRU over the whole server); returns the Geometry."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key][2]
            pred = self.predictor
            self._cache[key] = pred.encode(prepare(vol, pred.device))
            while len(self._cache) > self.settings.cache_volumes:
                self._cache.popitem(last=False)
            return self._cache[key][2]

    def _activate(self, s: Session) -> None:
        prior = None
        if s.prior is not None:
            self._encode(s.prior_key, s.prior)
            prior = self._cache[s.prior_key][:2]
        self._encode(s.key, s.volume)
        feats, grid, geom = self._cache[s.key]
        self.predictor.set_features(feats, grid, geom, prior=prior)

    def load_case(self, title: str, progress=lambda *a, **k: None) -> Session:
        c = case_by_title(title)
        progress(0.05, desc=f"Loading {c['title']}")
        vol = load_volume(samples.path(c["file"]), self.settings.limits)
        lab = samples.path(c["label_map"]) if c.get("label_map") else None
        return self.open_session(vol, c["title"], lab, c.get("labels"), progress)

    def load_upload(self, files: list[str], label_file: str | None, progress=lambda *a, **k: None,
                    prior_file: str | None = None) -> Session:
        """An uploaded scan (and, optionally, a prior scan of the same patient: every question is
        then asked with both, prior first, so questions about change can be answered)."""
        if not files:
            raise VolumeError("Choose a file to upload: NIfTI (.nii/.nii.gz), NRRD, or a DICOM series (files or .zip).")
        volumes = [f for f in files if str(f).lower().endswith((".nii", ".nii.gz", ".nrrd", ".zip", ".gz"))]
        if len(files) > 1 and volumes:
            raise VolumeError(f"{len(files)} files were uploaded, including {Path(volumes[0]).name}; upload one "
                              f"NIfTI/NRRD file or one .zip, or only the files of one DICOM series.")
        progress(0.05, desc="Reading the upload")
        vol = load_volume(files if len(files) > 1 else files[0], self.settings.limits)
        prior = None
        if prior_file:
            progress(0.1, desc="Reading the prior scan")
            try:
                prior = load_volume(prior_file, self.settings.limits)
            except VolumeError as e:
                raise VolumeError(f"The prior scan could not be read: {e}") from None
        s = self.open_session(vol, "uploaded scan", Path(label_file) if label_file else None, None, progress)
        if prior is not None:
            progress(0.9, desc="Encoding the prior scan")
            s.prior, s.prior_key = prior, volume_key(prior)
            self._encode(s.prior_key, prior)
        return s

    # ------------------------------------------------------------------ asking
    def ask(self, s: Session, question: str, budget: Budget, max_new_tokens: int | None = None):
        if s is None or s.volume is None:
            raise ValueError("Load a sample case or upload a scan first.")
        question = clean_question(question)
        with self._lock:
            self._activate(s)
            ans = self.predictor.ask(question, budget=budget,
                                     max_new_tokens=max_new_tokens or self.settings.max_new_tokens)
        s.answer, s.question = ans, question
        return ans

    def compare(self, s: Session, question: str, budgets: list[Budget]):
        if s is None or s.volume is None:
            raise ValueError("Load a sample case or upload a scan first.")
        question = clean_question(question)
        with self._lock:
            self._activate(s)
            return self.predictor.ask_many(question, budgets, max_new_tokens=self.settings.max_new_tokens)

    def retention(self, s: Session, ans) -> dict[str, float]:
        return organ_retention(s.blocks, ans.keep_grid.ravel()) if s.blocks else {}

    def asked_retention(self, s: Session, question: str, ans) -> dict[str, float]:
        """Share of each organ the question names (and the label map holds) whose blocks were kept."""
        if not s.blocks:
            return {}
        ret = self.retention(s, ans)
        return {n: ret[n] for n in organs_in_question(question, list(s.blocks)) if n in ret}

    def warning(self, s: Session, question: str, ans) -> str:
        """Visible warning when the asked organ kept less than half of its blocks."""
        low = [(n, r) for n, r in self.asked_retention(s, question, ans).items() if r < 0.5]
        return "; ".join(f"only {100 * r:.0f}% of the {n.replace('_', ' ')} blocks were kept" for n, r in low)

    def export(self, s: Session, pngs: dict[str, bytes]) -> list[Path]:
        if s is None or s.answer is None:
            raise ValueError("Ask a question first; the export holds the audit of an answer.")
        folder = Path(s.workdir) / f"export_{int(time.time() * 1000)}"
        return export_audit(folder, s.geometry, s.token_index, s.answer, s.question, self.model_name,
                            self.retention(s, s.answer), pngs, s.title)
