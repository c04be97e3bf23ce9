"""What a browser session shows of its scan: caches built once per scan, files replaced per answer.

* `FileStore` / `Files` — every served file lives in a session's folder inside Gradio's cache, so Gradio
  serves it from there instead of copying it; one file per kind per session (scene, slices, export),
  each new one replacing the last; a session's folder goes when its browser leaves, all of them when
  the app stops.
* `View` — per scan: the anatomy scene (surfaces and marker encoded once), the token-block corners,
  the scan, token map and label map in RAS order for the slices, the crosshair point and the last
  tri-planar layout (to turn a click into a point). An answer only adds its overlay.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import itertools
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from photon_core.io.preprocess import TOKEN_GRID, TokenMap
from photon_core.model.budget import Budget
from photon_core.organs import ORGANS, organs_in_question
from viz.scene import (
    AnatomyScene,
    anatomy_surfaces,
    kept_region,
    orientation_marker,
    render_png,
    world_bounds,
)
from viz.slices import WINDOWS, Layout, to_ras, triplanar

from .service import Session

DEFAULT_WINDOW = "Soft tissue"
ENDED_MEMORY_S = 3600.0          # an ended session's key is remembered this long (longer than any load)
_serial = itertools.count(1)     # file names unique across sessions' `Files`, old and new


class FileStore:
    """The folders of every session's served files, under one root that `close` removes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._sessions: dict[str, Files] = {}
        self._ended: dict[str, float] = {}      # key -> when its session ended (a load may still be running)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, parent: str | Path | None = None) -> FileStore:
        """A fresh root inside ``parent`` (default: Gradio's cache folder), removed at exit."""
        if parent is None:
            from gradio.utils import get_upload_folder

            parent = get_upload_folder()
        Path(parent).mkdir(parents=True, exist_ok=True)
        store = cls(tempfile.mkdtemp(prefix="photon_ct_", dir=parent))
        atexit.register(store.close)
        return store

    @staticmethod
    def _safe(key: str | None) -> str:
        """A session key as a folder name: letters, digits, ``-`` and ``_`` only."""
        return "".join(ch for ch in (key or "local") if ch.isalnum() or ch in "-_")[:64] or "local"

    def session(self, key: str | None) -> Files:
        """The session's files. Asked by a request begun before its session ended (a load still running
        when its browser left), they are written and go shortly after, as `Files.remove` says."""
        key = self._safe(key)
        with self._lock:
            if key not in self._sessions or not self._sessions[key].folder.is_dir():
                ended = self._ended.pop(key, None)
                started = getattr(_request, "started", None)
                if ended is not None and started is not None and started < ended:
                    self._ended[key] = ended
                    return Files(self.root / key, removed_at=ended)     # not kept: nobody will ask again
                self._sessions[key] = Files(self.root / key)
            return self._sessions[key]

    def drop(self, key: str | None) -> None:
        """A session ended: its files go."""
        key = self._safe(key)
        with self._lock:
            f = self._sessions.pop(key, None)
            now = time.monotonic()
            self._ended = {k: t for k, t in self._ended.items() if now - t < ENDED_MEMORY_S}
            self._ended[key] = now
        if f is not None:
            f.remove()
        shutil.rmtree(self.root / key, ignore_errors=True)      # also a folder its View made again

    def usage_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        with self._lock:
            self._sessions.clear()


_request = threading.local()


def request_started() -> float | None:
    """When the request the calling handler serves began (`handling`), or None outside one."""
    return getattr(_request, "started", None)


@contextlib.contextmanager
def handling():
    """Marks the handler running in this thread with the time its request began (`handlers.bind` wraps
    every handler in it), so that `Files` can tell a write for a request begun before its session ended
    from a write for a browser that came back."""
    before = getattr(_request, "started", None)       # a handler called from another keeps its own
    _request.started = time.monotonic()
    try:
        yield
    finally:
        _request.started = before


class Files:
    """One session's served files: a new file of a kind replaces the previous one of that kind. The
    previous one is not removed at once but at a write of its kind ``grace_s`` later, or when a newer one
    replaces it in turn (at most two files of a kind, whatever the request rate): a browser told of it a
    moment before (crosshair values typed in quick succession) may still be fetching it.

    After `remove` (the browser left), a file written for a request begun before it (a render still
    running when its browser left) is still written, for the answer in flight to return, and removed
    ``late_s`` seconds later: nobody is left to fetch it, and nothing else would remove it before the
    app stops. A request begun after it is a browser that came back: its files stay, as before."""

    late_s = 10.0
    grace_s = 20.0

    def __init__(self, folder: Path, removed_at: float | None = None):
        self.folder = Path(folder)
        if removed_at is None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._current: dict[str, Path] = {}
        self._retired: dict[str, tuple[float, Path]] = {}  # kind -> (when replaced, the file replaced)
        self._lock = threading.Lock()
        self._removed_at = removed_at           # set: the session ended (see `remove`)

    def write(self, kind: str, suffix: str, data: bytes) -> Path:
        """A new file of ``kind`` (a fresh name, so browsers fetch it); the previous one is removed."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)   # again, if the session was ended meanwhile
            path = self.folder / f"{kind}_{next(_serial)}{suffix}"
            path.write_bytes(data)
            self._replace(kind, path)
        return path

    def new_folder(self, kind: str) -> Path:
        """An empty folder of ``kind`` (an export), replacing the previous one."""
        with self._lock:
            path = self.folder / f"{kind}_{next(_serial)}"
            path.mkdir(parents=True)
            self._replace(kind, path)
        return path

    def _replace(self, kind: str, path: Path) -> None:
        old = self._current.get(kind)
        self._current[kind] = path
        now = time.monotonic()
        if old is not None and old != path:
            before = self._retired.get(kind)
            if before is not None:                  # the one before: at most two files of a kind stay
                _delete(before[1])
            self._retired[kind] = (now, old)
        for k, (when, retired) in list(self._retired.items()):
            if now - when >= self.grace_s:
                _delete(retired)
                del self._retired[k]
        if self._removed_at is None:
            return
        started = getattr(_request, "started", None)
        if started is not None and started < self._removed_at:     # in flight when the session ended
            timer = threading.Timer(self.late_s, self._drop_late, (path,))
            timer.daemon = True
            timer.start()
        else:                                                       # the browser came back
            self._removed_at = None

    def _drop_late(self, path: Path) -> None:
        """Remove a file written after `remove`, and the folder if that left it empty (the files of a
        browser that came back keep it)."""
        with self._lock:
            _delete(path)
            self._current = {k: p for k, p in self._current.items() if p != path}
        try:
            self.folder.rmdir()
        except OSError:
            pass

    def forget(self, kind: str) -> None:
        """Remove the current file of a kind (e.g. an export that belongs to an earlier answer)."""
        with self._lock:
            old = self._current.pop(kind, None)
        if old is not None:
            _delete(old)

    def remove(self) -> None:
        """The session ended: its files go, and those its requests in flight write go ``late_s`` after."""
        with self._lock:
            self._removed_at = time.monotonic()
            shutil.rmtree(self.folder, ignore_errors=True)
            self._current.clear()
            self._retired.clear()


def _delete(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@dataclass
class View:
    """A session's view caches, built once per scan."""

    files: Files
    surfaces: list = field(default_factory=list)
    marker: list = field(default_factory=list)
    scene: AnatomyScene | None = None
    corners: np.ndarray | None = None      # (1000, 8, 3) world corners of the token blocks
    hu_ras: np.ndarray | None = None
    spacing_ras: np.ndarray | None = None
    token_ras: TokenMap | None = None      # the session's token map, reoriented (its lookups, not a copy)
    labels_ras: np.ndarray | None = None
    point: tuple = (0, 0, 0)               # crosshair: voxel (i, j, k) of the RAS-ordered scan
    focused: str | None = None             # the question the crosshair last opened at (`focus`)
    layout: Layout | None = None           # of the last tri-planar image
    centres: dict = field(default_factory=dict)   # ("organ", ids) or ("token", index) -> where `focus` opens
    build_s: float = 0.0

    def cleanup(self) -> None:
        self.files.remove()

    def release(self) -> None:
        """Let go of the arrays and meshes (with `Session.release`); the view then draws nothing."""
        self.surfaces, self.marker = [], []
        self.scene = self.corners = self.hu_ras = self.spacing_ras = self.token_ras = self.labels_ras = None
        self.layout, self.centres = None, {}


_SHARED_LOCK = threading.Lock()


def build_view(s: Session, files: Files, progress=None) -> View:
    """Surfaces, marker and RAS arrays of a newly loaded scan; the crosshair at the scan's centre. A sample
    case's are built once per server and shared, read-only, by every session of the case (``s.shared``).
    ``progress(fraction, desc=...)`` is told each surface drawn (from 0.8 to 0.95 of the load)."""
    if s.shared is None:
        return _build_view(s, files, progress)
    with _SHARED_LOCK:
        first = s.shared.get("view")
    if first is None:
        first = _build_view(s, None, progress)
        with _SHARED_LOCK:
            first = s.shared.setdefault("view", first)
    return replace(first, files=files, layout=None)


def _build_view(s: Session, files: Files | None, progress=None) -> View:
    t = time.perf_counter()
    vol = s.volume
    v = View(files=files)

    def step(name: str, fraction: float) -> None:
        if progress is not None:
            progress(0.8 + 0.15 * fraction, desc=f"Drawing the 3-D anatomy: {name}")

    v.surfaces = anatomy_surfaces(vol.hu, vol.affine, s.labels, s.label_names, first=clinical_first(s),
                                  sizes=s.label_sizes, step=step)
    v.marker = orientation_marker(world_bounds(vol.shape, vol.affine))
    v.scene = AnatomyScene.build(v.surfaces, v.marker)
    v.corners = np.stack([s.geometry.token_block_corners(a, b, c) for a in range(TOKEN_GRID[0])
                          for b in range(TOKEN_GRID[1]) for c in range(TOKEN_GRID[2])])
    v.hu_ras, v.spacing_ras = to_ras(vol.hu, vol.affine)
    v.token_ras, _ = s.token_index.reoriented(vol.affine, "RAS")
    if s.labels is not None:
        v.labels_ras, _ = to_ras(s.labels, vol.affine)
    v.point = tuple(int(n) // 2 for n in v.hu_ras.shape)
    v.build_s = time.perf_counter() - t
    return v


def clinical_first(s: Session) -> list[int]:
    """Label ids of the organs questions name (liver, kidneys, lungs, …) — drawn before larger structures."""
    names = list(s.label_names.values())
    return s.ids_of([n for organ in ORGANS for n in organs_in_question(organ, names)])


def organ_legend(v: View) -> list[tuple[str, tuple]]:
    """(name, colour) of the organ surfaces shown."""
    return [(i["name"], i["rgba"]) for i in v.surfaces if i.get("ids")]


def highlighted(v: View, s: Session) -> list[str]:
    """The organ surfaces of the structures the question names."""
    asked = set(s.audit.asked) if s.audit is not None else set()
    return [n for n in v.scene.organ_ids if n in asked]


def _overlay(v: View, s: Session) -> list[dict]:
    if s.answer is None:
        return []
    return kept_region(v.corners, s.answer.keep_grid.ravel(), s.answer.rho.ravel(), TOKEN_GRID, opacity=0.25)


def scene_file(v: View, s: Session) -> str:
    """The GLB of the anatomy with the current answer's kept region (anatomy only before an answer)."""
    return str(v.files.write("scene", ".glb", v.scene.glb(_overlay(v, s), set(highlighted(v, s)))))


class Planes:
    """A 3-D mask read plane by plane, as `triplanar` reads it: each indexing maps the same plane of
    ``source`` through ``fn``. The whole masks of a 512 × 512 × 300 scan cost 0.2 s (kept blocks) and
    0.95 s (the asked organ, by np.isin) at every redraw of the three planes."""

    def __init__(self, source, fn):
        self.source, self.fn, self.shape = source, fn, source.shape     # source: an array or a TokenMap

    def __getitem__(self, index) -> np.ndarray:
        return self.fn(self.source[index])

    def whole(self) -> np.ndarray:
        return self.fn(self.source[:, :, :])


def kept_mask(v: View, s: Session) -> Planes | None:
    if s.answer is None:
        return None
    lut = np.concatenate([s.answer.keep_grid.ravel(), [False]])         # index −1 (outside): False
    return Planes(v.token_ras, lut.__getitem__)


def _asked_ids(v: View, s: Session) -> tuple[int, ...]:
    if v.labels_ras is None or s.audit is None or not s.audit.asked:
        return ()
    return tuple(s.ids_of(s.audit.asked))


def asked_mask(v: View, s: Session) -> Planes | None:
    ids = _asked_ids(v, s)
    return Planes(v.labels_ras, lambda labels: _in(labels, ids)) if ids else None


def _in(labels: np.ndarray, ids: tuple[int, ...]) -> np.ndarray:
    """``np.isin(labels, ids)`` for the few ids of an asked structure, by comparisons: np.isin copies and
    sorts a whole scan (512 × 512 × 300: 0.95 s, against 0.06 s an id)."""
    if len(ids) > 8:
        return np.isin(labels, ids)
    out = labels == ids[0]
    for i in ids[1:]:
        out |= labels == i
    return out


def focus(v: View, s: Session) -> tuple[int, int, int]:
    """Where the slices open for an answer: the asked structure's centre, else the most salient kept
    block's centre, else the crosshair stays. Each centre is found once per scan (`View.centres`)."""
    ids = _asked_ids(v, s)
    if ids:
        centre = _centre(v, ("organ", ids), lambda: np.argwhere(_in(v.labels_ras, ids)))
        if centre is not None:
            return centre
    if s.answer is not None and s.answer.keep_grid.any():
        keep, rho = s.answer.keep_grid.ravel(), s.answer.rho.ravel()
        best = int(np.flatnonzero(keep)[np.argmax(rho[keep])])
        centre = _centre(v, ("token", best), lambda: v.token_ras.voxels_of(best))
        if centre is not None:
            return centre
    return v.point


def _centre(v: View, key: tuple, voxels) -> tuple[int, int, int] | None:
    if key not in v.centres:
        where = voxels()
        v.centres[key] = _central_voxel(where) if len(where) else None
    return v.centres[key]


def _central_voxel(points: np.ndarray) -> tuple[int, int, int]:
    """The voxel of a set nearest its centroid (inside it, whatever its shape)."""
    c = points.mean(0)
    return tuple(int(x) for x in points[np.argmin(((points - c) ** 2).sum(1))])


def window_of(width, level) -> tuple[float, float]:
    return (float(width), float(level))


def slices_image(v: View, s: Session, width: float, level: float, opacity: float) -> np.ndarray:
    img, v.layout = triplanar(v.hu_ras, v.spacing_ras, v.point, window_of(width, level), kept_mask(v, s),
                              float(opacity), asked_mask(v, s))
    return img


def slices_file(v: View, s: Session, width: float, level: float, opacity: float) -> str:
    """The tri-planar image at the crosshair (PNG, replacing the session's previous one)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(slices_image(v, s, width, level, opacity)).save(buf, format="PNG", compress_level=3)
    return str(v.files.write("slices", ".png", buf.getvalue()))


def export_pngs(v: View, s: Session, width: float, level: float, opacity: float) -> dict[str, bytes]:
    """The images an export carries: the tri-planar slices and the anterior 3-D render."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(slices_image(v, s, width, level, opacity)).save(buf, format="PNG")
    pngs = {"slices_triplanar": buf.getvalue()}
    if s.answer is not None:
        a = s.answer
        auto = Budget.parse(a.budget).mode == "auto"
        pngs["view3d_anterior"] = render_png(v.surfaces + v.marker, _overlay(v, s), size=(800, 600),
                                               theta=a.cut,
                                               theta_label="theta" if auto else "cut")
    return pngs


def preset_window(name: str) -> tuple[float, float]:
    return tuple(float(x) for x in WINDOWS.get(name, WINDOWS[DEFAULT_WINDOW]))
