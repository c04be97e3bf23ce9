"""The 3-D audit scene: body/bone (and organ) surfaces with the kept token blocks over them.

Surfaces are computed once per volume (`anatomy_surfaces`); only the blocks (`token_blocks`)
change with the budget. Outputs: a GLB for the browser (`scene_glb`) and a PNG render
(`render_png`, off-screen VTK) as fallback and for reports. All coordinates are world RAS mm.
"""
from __future__ import annotations

import io
import threading

import numpy as np

from .glb import meshes_to_glb

ORGAN_COLOURS = [(0.85, 0.37, 0.33), (0.36, 0.62, 0.85), (0.55, 0.78, 0.42), (0.93, 0.70, 0.30),
                 (0.65, 0.48, 0.80), (0.40, 0.80, 0.78), (0.90, 0.55, 0.70), (0.70, 0.70, 0.35)]


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
             max_triangles: int = 40_000):
    """Iso-surface of a volume in world coordinates, computed on a volume strided to ≤ max_dim per axis."""
    pv = _pv()
    step = [max(1, int(np.ceil(s / max_dim))) for s in mask_or_hu.shape]
    sub = np.ascontiguousarray(mask_or_hu[::step[0], ::step[1], ::step[2]], dtype=np.float32)
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
                     label_names: dict | None = None, max_organs: int = 8) -> list[dict]:
    """Body (−300 HU), bone (+250 HU) and up to ``max_organs`` largest labelled organs."""
    items = [dict(name="body", mesh=_contour(hu, -300.0, affine, 96), rgba=(0.85, 0.75, 0.68, 0.12)),
             dict(name="bone", mesh=_contour(hu, 250.0, affine, 128), rgba=(0.95, 0.93, 0.86, 0.9))]
    if labels is not None:
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        order = ids[np.argsort(-counts)][:max_organs]
        for n, lid in enumerate(order):
            name = (label_names or {}).get(str(int(lid)), f"label {int(lid)}")
            mesh = _contour((labels == lid).astype(np.float32), 0.5, affine, 128, smooth=10)
            items.append(dict(name=name, mesh=mesh, rgba=(*ORGAN_COLOURS[n % len(ORGAN_COLOURS)], 0.55)))
    return [i for i in items if i["mesh"].n_points > 0]


def saliency_colour(rho: float) -> tuple[float, float, float]:
    """ρ in [0, 1] → colour (blue → yellow → red)."""
    r = float(np.clip(rho, 0, 1))
    if r < 0.5:
        t = r / 0.5
        return (0.2 + 0.8 * t, 0.4 + 0.5 * t, 1.0 - 0.8 * t)
    t = (r - 0.5) / 0.5
    return (1.0, 0.9 - 0.7 * t, 0.2 - 0.1 * t)


def token_blocks(corners: np.ndarray, keep: np.ndarray, rho: np.ndarray, bins: int = 5,
                 opacity: float = 0.3) -> list[dict]:
    """Kept blocks as translucent boxes, one mesh per saliency bin.

    corners: (1000, 8, 3) world corners of every token block (Geometry.token_block_corners order);
    keep, rho: (1000,) flattened over the 10×10×10 grid.
    """
    pv = _pv()
    keep = np.asarray(keep, bool).ravel()
    rho = np.asarray(rho, float).ravel()
    items = []
    edges = np.linspace(0, 1, bins + 1)
    for b in range(bins):
        sel = np.flatnonzero(keep & (rho >= edges[b]) & ((rho < edges[b + 1]) | (b == bins - 1)))
        if len(sel) == 0:
            continue
        # corners are ordered by (x∈{lo,hi}) × (y) × (z): a VTK hexahedron wants 0,4,6,2,1,5,7,3
        order = [0, 4, 6, 2, 1, 5, 7, 3]
        pts = corners[sel][:, order].reshape(-1, 3)
        cells = np.hstack([np.full((len(sel), 1), 8), np.arange(len(sel) * 8).reshape(-1, 8)]).ravel()
        grid = pv.UnstructuredGrid(cells, np.full(len(sel), 12, np.uint8), pts)
        mid = 0.5 * (edges[b] + edges[b + 1])
        items.append(dict(name=f"kept ρ {edges[b]:.1f}-{edges[b + 1]:.1f}", mesh=grid.extract_surface(algorithm="dataset_surface"),
                          rgba=(*saliency_colour(mid), opacity)))
    return items


def scene_glb(surfaces: list[dict], blocks: list[dict]) -> bytes:
    return meshes_to_glb(list(surfaces) + list(blocks))


def render_png(surfaces: list[dict], blocks: list[dict], size=(640, 480), view: str = "iso") -> bytes:
    """Off-screen PNG of the scene (no depth peeling: it is unreliable off-screen)."""
    pv = _pv()
    with _RENDER_LOCK:
        return _render_png_locked(pv, surfaces, blocks, size, view)


def _render_png_locked(pv, surfaces, blocks, size, view) -> bytes:
    from PIL import Image

    p = pv.Plotter(off_screen=True, window_size=size)
    try:
        p.set_background("white")
        for item in list(surfaces) + list(blocks):
            r, g, b, a = item["rgba"]
            p.add_mesh(item["mesh"], color=(r, g, b), opacity=a, smooth_shading=True,
                       show_edges=item["name"].startswith("kept"), edge_color=(0.3, 0.3, 0.3))
        if view == "iso":
            p.view_vector((-1.0, -1.2, 0.6), viewup=(0, 0, 1))
        else:
            p.view_yz() if view == "sagittal" else p.view_xz()
        img = p.screenshot(return_img=True)
    finally:
        p.close()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
