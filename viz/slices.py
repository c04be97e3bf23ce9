"""Slices of the ORIGINAL scan with CT windows and the kept blocks overlaid: one plane, or the tri-planar
view (axial, coronal, sagittal side by side, a linked crosshair).

The scan is shown in its own voxels, only permuted/flipped to the closest RAS orientation (no
resampling); the overlay is the kept-block mask on the same original grid. Display conventions:
axial and coronal radiological (patient right on the image left), anterior up on axial, superior
up on coronal/sagittal, anterior on the left of sagittal. Orientation letters are drawn on each image.

A point of the tri-planar view is a voxel index (i, j, k) of the RAS-ordered array: sagittal plane i,
coronal plane j, axial plane k. `pick` turns a click on the tri-planar image into a new point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WINDOWS = {  # name: (width, level) in HU
    "Soft tissue": (400, 40), "Lung": (1500, -600), "Liver": (150, 90), "Bone": (2500, 480),
    "Brain": (80, 40),
}
LABELS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
VIEWS = ("axial", "coronal", "sagittal")
_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}            # the RAS axis a view's slices run along
_IN_PLANE = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}   # RAS axes along image columns, rows
KEPT_COLOUR = (0.1, 0.85, 0.3)
ORGAN_COLOUR = (1.0, 0.25, 0.85)
CROSS_COLOUR = (0.2, 0.8, 1.0)


def to_ras(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip an array to the closest RAS orientation (a view, no copy); returns it and its spacing
    (mm)."""
    from photon_core.io.orientation import reorient

    out, to_source = reorient(arr, affine, "RAS")
    return out, np.linalg.norm(affine[:3, :3] @ to_source[:3, :3], axis=0)   # mm along the output axes


def window(hu: np.ndarray, name_or_wl) -> np.ndarray:
    """HU → [0, 1] under a named window or a (width, level) pair."""
    w, level = WINDOWS[name_or_wl] if isinstance(name_or_wl, str) else name_or_wl
    w = max(float(w), 1.0)
    hu = np.asarray(hu, np.float32)                  # a scan's int16 HU: the same float32 arithmetic
    return np.clip((hu - (float(level) - w / 2)) / w, 0, 1)


def _plane(vol: np.ndarray, view: str, index: int) -> np.ndarray:
    """The displayed 2-D plane (rows top→bottom, columns left→right) of a RAS-ordered volume."""
    if view == "axial":
        return vol[:, :, index].T[::-1, ::-1]
    if view == "coronal":
        return vol[:, index, :].T[::-1, ::-1]
    if view == "sagittal":
        return vol[index, :, :].T[::-1, ::-1]
    raise ValueError(f"unknown view {view!r}")


def n_slices(shape, view: str) -> int:
    return shape[_AXIS[view]]


def _blend(rgb: np.ndarray, mask: np.ndarray, colour, opacity: float, fill: bool = True) -> None:
    """Blend a mask into an RGB plane in place: a translucent fill (optional) and a stronger outline."""
    colour = np.asarray(colour)
    if fill and opacity > 0:
        rgb[mask] = (1 - opacity) * rgb[mask] + opacity * colour
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    a = min(1.0, max(opacity * 2, 0.6))
    rgb[edge] = (1 - a) * rgb[edge] + a * colour


def _plane_rgb(hu_ras, view, idx, wl, overlay, opacity, outline) -> np.ndarray:
    img = window(_plane(hu_ras, view, idx), wl)
    rgb = np.repeat(img[..., None], 3, -1)
    if overlay is not None:
        _blend(rgb, _plane(overlay, view, idx).astype(bool), KEPT_COLOUR, opacity)
    if outline is not None:
        _blend(rgb, _plane(outline, view, idx).astype(bool), ORGAN_COLOUR, 0.0, fill=False)
    return rgb


def _pixel_size(spacing, view) -> tuple[float, float]:
    """(mm per image column, mm per image row) of a view."""
    c, r = _IN_PLANE[view]
    return float(spacing[c]), float(spacing[r])


def _letters(d, view, box, label: str, font=None) -> None:
    x0, y0, w, h = box
    top, bottom, left, right = LABELS[view]
    for text, xy in ((top, (x0 + w // 2 - 4, y0 + 2)), (bottom, (x0 + w // 2 - 4, y0 + h - 14)),
                     (left, (x0 + 3, y0 + h // 2 - 6)), (right, (x0 + w - 11, y0 + h // 2 - 6))):
        d.text(xy, text, fill=(255, 220, 0), font=font)
    d.text((x0 + 3, y0 + 2), label, fill=(255, 255, 255), font=font)


def slice_rgb(hu_ras: np.ndarray, spacing: np.ndarray, view: str, position: float, window_name="Soft tissue",
              overlay: np.ndarray | None = None, opacity: float = 0.35, colour=KEPT_COLOUR,
              out_px: int = 384) -> np.ndarray:
    """RGB uint8 image of one slice (position in [0, 1]) with the overlay mask blended in (exports)."""
    from PIL import Image, ImageDraw

    n = n_slices(hu_ras.shape, view)
    idx = int(round(np.clip(position, 0, 1) * (n - 1)))
    img = window(_plane(hu_ras, view, idx), window_name)
    rgb = np.repeat(img[..., None], 3, -1)
    if overlay is not None:
        _blend(rgb, _plane(overlay, view, idx).astype(bool), colour, opacity)
    sx, sy = _pixel_size(spacing, view)
    h, w = rgb.shape[:2]
    scale = out_px / max(h * sy, w * sx)
    size = (max(1, int(round(w * sx * scale))), max(1, int(round(h * sy * scale))))
    im = Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    _letters(ImageDraw.Draw(im), view, (0, 0, *im.size), f"{view} {idx + 1}/{n}")
    return np.asarray(im)


@dataclass(frozen=True)
class Panel:
    """Where one view sits in the tri-planar image and how its pixels map to voxels."""

    view: str
    x0: int
    y0: int
    w: int                 # drawn image size (px)
    h: int
    cols: int              # the plane's size in voxels
    rows: int


@dataclass(frozen=True)
class Layout:
    panels: tuple[Panel, ...]
    shape: tuple[int, int, int]
    size: tuple[int, int]  # (width, height) of the whole image


def clamp_point(point, shape) -> tuple[int, int, int]:
    return tuple(int(np.clip(round(float(p)), 0, s - 1)) for p, s in zip(point, shape))


def _to_pixel(panel: Panel, point) -> tuple[float, float]:
    """Image (x, y) of a point's in-plane coordinates in a panel (pixel centres)."""
    c_ax, r_ax = _IN_PLANE[panel.view]
    col = panel.cols - 1 - point[c_ax]          # planes are shown flipped (see _plane)
    row = panel.rows - 1 - point[r_ax]
    return panel.x0 + (col + 0.5) * panel.w / panel.cols, panel.y0 + (row + 0.5) * panel.h / panel.rows


def triplanar(hu_ras: np.ndarray, spacing: np.ndarray, point, wl=(400, 40), overlay: np.ndarray | None = None,
              opacity: float = 0.35, outline: np.ndarray | None = None, panel_px: int = 384,
              gap: int = 6) -> tuple[np.ndarray, Layout]:
    """Axial, coronal and sagittal planes through ``point`` side by side, with a crosshair at the point.

    hu_ras (I, J, K) in RAS order, spacing its voxel size (mm); wl = (width, level) in HU or a window
    name; overlay: kept-block mask on the same grid; outline: a structure drawn as a magenta contour
    (the asked organ). Each plane keeps its physical aspect inside a ``panel_px`` square.
    Returns the RGB uint8 image and the `Layout` that `pick` reads.
    """
    from PIL import Image, ImageDraw

    point = clamp_point(point, hu_ras.shape)
    W = 3 * panel_px + 2 * gap
    canvas = Image.new("RGB", (W, panel_px), (0, 0, 0))
    d = ImageDraw.Draw(canvas)
    panels = []
    wl = WINDOWS[wl] if isinstance(wl, str) else wl
    wl_text = f"W {wl[0]:.0f} L {wl[1]:.0f}"
    for n, view in enumerate(VIEWS):
        idx = point[_AXIS[view]]
        rgb = _plane_rgb(hu_ras, view, idx, wl, overlay, opacity, outline)
        rows, cols = rgb.shape[:2]
        sx, sy = _pixel_size(spacing, view)
        scale = panel_px / max(rows * sy, cols * sx)
        w, h = max(1, int(round(cols * sx * scale))), max(1, int(round(rows * sy * scale)))
        x0 = n * (panel_px + gap) + (panel_px - w) // 2
        y0 = (panel_px - h) // 2
        im = Image.fromarray((rgb * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        canvas.paste(im, (x0, y0))
        panel = Panel(view, x0, y0, w, h, cols, rows)
        panels.append(panel)
        px, py = _to_pixel(panel, point)
        cross = tuple(int(255 * c) for c in CROSS_COLOUR)
        d.line([(x0, py), (px - 6, py)], fill=cross)
        d.line([(px + 6, py), (x0 + w - 1, py)], fill=cross)
        d.line([(px, y0), (px, py - 6)], fill=cross)
        d.line([(px, py + 6), (px, y0 + h - 1)], fill=cross)
        _letters(d, view, (x0, y0, w, h), f"{view} {idx + 1}/{n_slices(hu_ras.shape, view)}")
        if n == 0:
            d.text((x0 + 3, y0 + h - 14), wl_text, fill=(200, 200, 200))
    return np.asarray(canvas), Layout(tuple(panels), tuple(int(s) for s in hu_ras.shape), (W, panel_px))


def pick(layout: Layout, x: float, y: float, point) -> tuple[int, int, int] | None:
    """The point a click at image (x, y) selects: the clicked plane's two in-plane coordinates change,
    the third (that plane's slice) stays. None when the click is outside every plane."""
    for p in layout.panels:
        if p.x0 <= x < p.x0 + p.w and p.y0 <= y < p.y0 + p.h:
            col = int((x - p.x0) * p.cols / p.w)
            row = int((y - p.y0) * p.rows / p.h)
            c_ax, r_ax = _IN_PLANE[p.view]
            new = list(point)
            new[c_ax] = p.cols - 1 - col
            new[r_ax] = p.rows - 1 - row
            return clamp_point(new, layout.shape)
    return None
