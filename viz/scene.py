"""The 3-D audit scene: anatomy surfaces, an orientation marker, and the kept region over them.

Built in two parts so that an answer only pays for its overlay:

* per scan, once: `anatomy_surfaces` (body, bone, the largest labelled organs) and `orientation_marker`
  (letters R/L/S/I facing the anterior viewer, A/P facing the lateral one, and an R/A/S axis triad),
  encoded once (`AnatomyScene`);
* per answer: `kept_region` — the outer faces of the kept token blocks only (no face between two kept
  blocks), translucent and coloured by saliency ρ, so the anatomy stays readable at any budget.

`AnatomyScene.glb(overlay, highlight)` assembles the GLB (milliseconds). `render_png` is the off-screen
VTK render (exports, reports) from the same anterior viewpoint, with the ρ colour bar. All
coordinates are world RAS mm. The viewer's camera for the anterior view is `ANTERIOR_CAMERA`.
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field

import numpy as np

from .glb import MeshPart, encode, glb

ORGAN_COLOURS = [(0.85, 0.37, 0.33), (0.36, 0.62, 0.85), (0.55, 0.78, 0.42), (0.93, 0.70, 0.30),
                 (0.65, 0.48, 0.80), (0.40, 0.80, 0.78), (0.90, 0.55, 0.70), (0.70, 0.70, 0.35),
                 (0.60, 0.40, 0.25), (0.20, 0.45, 0.55), (0.95, 0.85, 0.45), (0.45, 0.30, 0.60)]
# one colour for each of the (at most ``max_organs``) structures drawn: none repeats in the legend
AXIS_COLOURS = {"R": (0.90, 0.25, 0.25), "A": (0.30, 0.75, 0.35), "S": (0.35, 0.55, 1.0)}   # as in 3D Slicer
BACKGROUND = (0.10, 0.11, 0.13)
HIGHLIGHT = (1.0, 0.25, 0.85)            # the asked organ
RHO_BINS = 5
# gr.Model3D (Babylon, left-handed; its glTF loader mirrors z) puts the camera at (alpha, beta) degrees:
# alpha = −90 looks from the patient's anterior side with superior up, so the patient's right is on the
# viewer's left — as on radiological axial and coronal slices.
ANTERIOR_CAMERA = (-90.0, 90.0, None)

_RENDER_LOCK = threading.Lock()   # VTK rendering is not thread-safe; the app serves several users


def _pv():
    import pyvista as pv
    import pyvista.plotting  # noqa: F401  (pyvista loads this lazily, which is not thread-safe)

    pv.OFF_SCREEN = True
    return pv


def warm_up() -> None:
    """Import PyVista/VTK fully in the calling (main) thread before requests arrive."""
    pv = _pv()
    assert pv.Plotter is not None


def _contour(mask_or_hu: np.ndarray, level: float, affine: np.ndarray, max_dim: int = 128, smooth: int = 15,
             max_triangles: int = 40_000, values=None):
    """Iso-surface of a volume in world coordinates, computed on a volume strided to ≤ max_dim per axis;
    ``values``: a voxel-wise function applied to the strided volume (a label's mask: not made of the whole
    scan first)."""
    pv = _pv()
    step = [max(1, int(np.ceil(s / max_dim))) for s in mask_or_hu.shape]
    sub = mask_or_hu[::step[0], ::step[1], ::step[2]]
    sub = np.ascontiguousarray(sub if values is None else values(sub), dtype=np.float32)
    grid = pv.ImageData(dimensions=sub.shape, spacing=step, origin=(0, 0, 0))
    grid.point_data["v"] = sub.ravel(order="F")
    surf = grid.contour([level], scalars="v")
    if surf.n_points == 0:
        return surf
    if smooth:
        surf = surf.smooth(n_iter=smooth)
    if surf.n_cells > max_triangles:
        surf = surf.triangulate().decimate(1.0 - max_triangles / surf.n_cells)
    return surf.transform(np.asarray(affine, dtype=np.float64), inplace=False)


def anatomy_surfaces(hu: np.ndarray, affine: np.ndarray, labels: np.ndarray | None = None,
                     label_names: dict | None = None, max_organs: int = 10, first=(),
                     sizes: tuple | None = None, step=None) -> list[dict]:
    """Body (−300 HU), bone (+250 HU) and up to ``max_organs`` labelled structures: the label ids in
    ``first`` (those present, in that order), then the largest others. Each organ item's ``ids``: its
    labels. ``sizes``: the map's (ids, voxel counts) when already counted (`organs.label_counts`).
    ``step(name, fraction)``: called before each surface (progress; it may raise to stop)."""
    step = step or (lambda name, fraction: None)
    step("body", 0.0)
    items = [dict(name="body", mesh=_contour(hu, -300.0, affine, 96, max_triangles=20_000),
                  rgba=(0.85, 0.72, 0.62, 0.16), ids=())]
    step("bone", 0.35)
    items.append(dict(name="bone", mesh=_contour(hu, 250.0, affine, 128, max_triangles=30_000),
                      rgba=(0.95, 0.93, 0.86, 1.0), ids=()))
    if labels is not None:
        if sizes is None:
            from photon_core.organs import label_counts

            sizes = label_counts(labels)
        ids, counts = sizes
        ids, counts = ids[ids > 0], counts[ids > 0]
        present = {int(i) for i in ids}
        order = [int(i) for i in dict.fromkeys(first) if int(i) in present]
        order += [int(i) for i in ids[np.argsort(-counts)] if int(i) not in order]
        order = order[:max_organs]
        names = {str(k): v for k, v in (label_names or {}).items()}
        for n, lid in enumerate(order):
            name = names.get(str(int(lid)), f"label {int(lid)}")
            step(name, 0.7 + 0.3 * n / len(order))
            mesh = _contour(labels, 0.5, affine, 128, smooth=10, max_triangles=6_000,
                            values=lambda sub, lid=lid: sub == lid)
            items.append(dict(name=name, mesh=mesh, rgba=(*ORGAN_COLOURS[n % len(ORGAN_COLOURS)], 0.5),
                              ids=(int(lid),)))
    return [i for i in items if i["mesh"].n_points > 0]


def world_bounds(shape, affine: np.ndarray) -> np.ndarray:
    """(2, 3) RAS min/max of a volume's voxel-edge box."""
    ijk = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                    for k in (-0.5, shape[2] - 0.5)])
    xyz = ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return np.stack([xyz.min(0), xyz.max(0)])


# Text basis (reading direction, up, normal towards the viewer) in RAS for the viewer who reads it:
_FACING_ANTERIOR = np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], float).T    # reads right→left of the patient
_FACING_LEFT = np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], float).T       # seen from the patient's left


def orientation_marker(bounds: np.ndarray) -> list[dict]:
    """Letters R/L/S/I (read from the anterior view), A/P (read from the left lateral view) just outside
    the scan's box, and an axis triad (R red, A green, S blue) at its right-posterior-inferior corner."""
    pv = _pv()
    lo, hi = np.asarray(bounds, float)
    mid, ext = (lo + hi) / 2, hi - lo
    h = max(12.0, 0.07 * float(ext.max()))
    front, side = _FACING_ANTERIOR, _FACING_LEFT
    places = {"R": ((hi[0] + h, mid[1], mid[2]), front), "L": ((lo[0] - h, mid[1], mid[2]), front),
              "S": ((mid[0], mid[1], hi[2] + h), front), "I": ((mid[0], mid[1], lo[2] - h), front),
              "A": ((lo[0] - h, hi[1] + h, mid[2]), side), "P": ((lo[0] - h, lo[1] - h, mid[2]), side)}
    axis_of = {"R": "R", "L": "R", "A": "A", "P": "A", "S": "S", "I": "S"}
    items = []
    for letter, (pos, basis) in places.items():
        m = pv.Text3D(letter, depth=0.15 * h, height=h)
        pts = np.asarray(m.points) - np.asarray(m.center)
        m.points = pts @ basis.T + np.asarray(pos)
        items.append(dict(name=f"marker {letter}", mesh=m, rgba=(*AXIS_COLOURS[axis_of[letter]], 1.0)))
    corner = np.array([hi[0] + 0.5 * h, lo[1] - 0.5 * h, lo[2] - 0.5 * h])
    for letter, direction in (("R", (1, 0, 0)), ("A", (0, 1, 0)), ("S", (0, 0, 1))):
        arrow = pv.Arrow(start=corner, direction=direction, scale=2.5 * h, tip_length=0.3, tip_radius=0.12,
                         shaft_radius=0.04)
        items.append(dict(name=f"axis {letter}", mesh=arrow, rgba=(*AXIS_COLOURS[letter], 1.0)))
    return items


def saliency_colour(rho: float) -> tuple[float, float, float]:
    """ρ in [0, 1] → colour (blue → yellow → red)."""
    r = float(np.clip(rho, 0, 1))
    if r < 0.5:
        t = r / 0.5
        return (0.2 + 0.8 * t, 0.4 + 0.5 * t, 1.0 - 0.8 * t)
    t = (r - 0.5) / 0.5
    return (1.0, 0.9 - 0.7 * t, 0.2 - 0.1 * t)


def rho_bins(bins: int = RHO_BINS) -> list[tuple[float, float, tuple]]:
    """(low, high, colour) of each ρ bin the kept region is drawn in (the legend's steps)."""
    edges = np.linspace(0, 1, bins + 1)
    return [(float(edges[b]), float(edges[b + 1]), saliency_colour(0.5 * (edges[b] + edges[b + 1])))
            for b in range(bins)]


# Faces of a token block as corner indices (corners ordered (a∈{lo,hi}) × (b) × (c), see
# Geometry.token_block_corners), with the neighbour across each face.
_FACES = (((0, 1, 3, 2), (-1, 0, 0)), ((4, 5, 7, 6), (1, 0, 0)), ((0, 1, 5, 4), (0, -1, 0)),
          ((2, 3, 7, 6), (0, 1, 0)), ((0, 2, 6, 4), (0, 0, -1)), ((1, 3, 7, 5), (0, 0, 1)))


def kept_region(corners: np.ndarray, keep: np.ndarray, rho: np.ndarray, grid=(10, 10, 10),
                bins: int = RHO_BINS, opacity: float = 0.3) -> list[dict]:
    """The outer faces of the kept token blocks as translucent quads, one mesh per ρ bin.

    corners: (N, 8, 3) world corners of every token block (N = a·b·c, flat index a·(b·c) + b·c + c);
    keep, rho: (N,) flattened over the token grid. A face between two kept blocks is not drawn, so a
    large kept set reads as one hull over the anatomy instead of stacked boxes.
    """
    pv = _pv()
    keep = np.asarray(keep, bool).reshape(grid)
    rho = np.asarray(rho, float).reshape(grid)
    padded = np.pad(keep, 1)
    quads, colour_of = [], []
    for face, (da, db, dc) in _FACES:
        nb = padded[1 + da:1 + da + grid[0], 1 + db:1 + db + grid[1], 1 + dc:1 + dc + grid[2]]
        outer = np.flatnonzero((keep & ~nb).ravel())
        quads.append(corners[outer][:, list(face)])
        colour_of.append(rho.ravel()[outer])
    if not quads or sum(len(q) for q in quads) == 0:
        return []
    quads, rq = np.concatenate(quads), np.concatenate(colour_of)
    items = []
    for b, (low, high, colour) in enumerate(rho_bins(bins)):
        sel = (rq >= low) & ((rq < high) | (b == bins - 1))
        if not sel.any():
            continue
        pts = quads[sel].reshape(-1, 3)
        faces = np.hstack([np.full((int(sel.sum()), 1), 4), np.arange(len(pts)).reshape(-1, 4)]).ravel()
        items.append(dict(name=f"kept ρ {low:.1f}-{high:.1f}", mesh=pv.PolyData(pts, faces),
                          rgba=(*colour, opacity)))
    return items


@dataclass
class AnatomyScene:
    """A scan's anatomy and marker, encoded once; `glb` adds an answer's overlay to it."""

    items: list[tuple[str, MeshPart, tuple]] = field(default_factory=list)
    organ_ids: dict = field(default_factory=dict)          # surface name -> label ids

    @classmethod
    def build(cls, surfaces: list[dict], marker: list[dict]) -> AnatomyScene:
        s = cls()
        for item in list(surfaces) + list(marker):
            part = encode(item["mesh"])
            if part is not None:
                s.items.append((item["name"], part, tuple(item["rgba"])))
                if item.get("ids"):
                    s.organ_ids[item["name"]] = tuple(item["ids"])
        return s

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for _, p, _ in self.items)

    def glb(self, overlay: list[dict] = (), highlight: set | frozenset = frozenset()) -> bytes:
        """GLB of the anatomy (``highlight``: surface names drawn in the highlight colour) and the overlay."""
        items = [(n, p, (*HIGHLIGHT, 0.75) if n in highlight else rgba) for n, p, rgba in self.items]
        items += [(o["name"], encode(o["mesh"]), o["rgba"]) for o in overlay]
        return glb(items)


def render_png(surfaces: list[dict], blocks: list[dict], size=(640, 480), view: str = "anterior",
               colour_bar: bool = True, theta: float | None = None, theta_label: str = "theta") -> bytes:
    """Off-screen PNG of the scene (no depth peeling: it is unreliable off-screen). ``view``: 'anterior'
    (patient right on the image left, superior up), 'left' (left lateral) or 'iso'."""
    pv = _pv()
    with _RENDER_LOCK:
        img = _render_locked(pv, surfaces, blocks, size, view)
    from PIL import Image

    im = Image.fromarray(img)
    if colour_bar and blocks:
        im = _with_colour_bar(im, theta, theta_label)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _render_locked(pv, surfaces, blocks, size, view) -> np.ndarray:
    p = pv.Plotter(off_screen=True, window_size=size)
    try:
        p.set_background(BACKGROUND)
        for item in list(surfaces) + list(blocks):
            r, g, b, a = item["rgba"]
            p.add_mesh(item["mesh"], color=(r, g, b), opacity=a,
                       smooth_shading=not item["name"].startswith("kept"))
        if view == "anterior":
            p.view_vector((0.0, 1.0, 0.0), viewup=(0, 0, 1))
        elif view == "left":
            p.view_vector((-1.0, 0.0, 0.0), viewup=(0, 0, 1))
        else:
            p.view_vector((-1.0, 1.2, 0.6), viewup=(0, 0, 1))
        return p.screenshot(return_img=True)
    finally:
        p.close()


def _with_colour_bar(im, theta: float | None, label: str = "theta"):
    """The image with a vertical ρ colour bar (the kept region's bins, ``theta`` marked: the model's θ or
    where a budget cut, named by ``label``) on its right."""
    from PIL import Image, ImageDraw

    W, H = im.size
    out = Image.new("RGB", (W + 80, H), tuple(int(255 * c) for c in BACKGROUND))
    out.paste(im, (0, 0))
    d = ImageDraw.Draw(out)
    top, bottom, x0 = 30, H - 30, W + 12
    for low, high, colour in rho_bins():
        y1 = bottom - (bottom - top) * low
        y0 = bottom - (bottom - top) * high
        d.rectangle([x0, y0, x0 + 16, y1], fill=tuple(int(255 * c) for c in colour))
    d.text((x0 - 2, 10), "rho", fill=(235, 235, 235))
    for v in (0.0, 0.5, 1.0):
        d.text((x0 + 20, bottom - (bottom - top) * v - 6), f"{v:.1f}", fill=(235, 235, 235))
    if theta is not None and np.isfinite(theta):
        y = bottom - (bottom - top) * float(np.clip(theta, 0, 1))
        d.line([x0 - 4, y, x0 + 20, y], fill=(255, 255, 255), width=2)
        d.text((x0 + 20, y - 6), label, fill=(255, 255, 255))
    return out
