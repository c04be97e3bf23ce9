"""Axial / coronal / sagittal slices of the ORIGINAL scan with CT windows and the kept blocks overlaid.

The scan is shown in its own voxels, only permuted/flipped to the closest RAS orientation (no
resampling); the overlay is the kept-block mask on the same original grid. Display conventions:
axial and coronal radiological (patient right on the image left), anterior up on axial, superior
up on coronal/sagittal, anterior on the left of sagittal. Orientation letters are drawn on each image.
"""
from __future__ import annotations

import numpy as np

WINDOWS = {  # name: (width, level) in HU
    "Soft tissue": (400, 40), "Lung": (1500, -600), "Liver": (150, 90), "Bone": (2500, 480), "Brain": (80, 40),
}
LABELS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}


def to_ras(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip an array to the closest RAS orientation (a view, no copy); returns it and its spacing (mm)."""
    from nibabel import orientations as ornt

    t = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(("R", "A", "S")))
    out = ornt.apply_orientation(arr, t)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(t[:, 0])]   # output axis k <- input axis
    return out, spacing


def window(hu: np.ndarray, name_or_wl) -> np.ndarray:
    w, l = WINDOWS[name_or_wl] if isinstance(name_or_wl, str) else name_or_wl
    return np.clip((hu - (l - w / 2)) / w, 0, 1)


def _plane(vol: np.ndarray, view: str, index: int) -> np.ndarray:
    if view == "axial":
        return vol[:, :, index].T[::-1, ::-1]
    if view == "coronal":
        return vol[:, index, :].T[::-1, ::-1]
    if view == "sagittal":
        return vol[index, :, :].T[::-1, ::-1]
    raise ValueError(f"unknown view {view!r}")


def n_slices(shape, view: str) -> int:
    return shape[{"axial": 2, "coronal": 1, "sagittal": 0}[view]]


def slice_rgb(hu_ras: np.ndarray, spacing: np.ndarray, view: str, position: float, window_name="Soft tissue",
              overlay: np.ndarray | None = None, opacity: float = 0.35, colour=(0.1, 0.85, 0.3),
              out_px: int = 384) -> np.ndarray:
    """RGB uint8 image of one slice (position in [0, 1]) with the overlay mask blended in."""
    from PIL import Image, ImageDraw

    n = n_slices(hu_ras.shape, view)
    idx = int(round(np.clip(position, 0, 1) * (n - 1)))
    img = window(_plane(hu_ras, view, idx), window_name)
    rgb = np.repeat(img[..., None], 3, -1)
    if overlay is not None:
        m = _plane(overlay, view, idx).astype(bool)
        rgb[m] = (1 - opacity) * rgb[m] + opacity * np.asarray(colour)
        # outline the kept region so low opacity still reads
        edge = m ^ (np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        rgb[edge] = (1 - min(1.0, opacity * 2)) * rgb[edge] + min(1.0, opacity * 2) * np.asarray(colour)
    sx, sy = {"axial": (spacing[0], spacing[1]), "coronal": (spacing[0], spacing[2]),
              "sagittal": (spacing[1], spacing[2])}[view]
    h, w = rgb.shape[:2]
    scale = out_px / max(h * sy, w * sx)
    size = (max(1, int(round(w * sx * scale))), max(1, int(round(h * sy * scale))))
    im = Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    d = ImageDraw.Draw(im)
    top, bottom, left, right = LABELS[view]
    W, H = im.size
    for text, xy in ((top, (W // 2 - 4, 2)), (bottom, (W // 2 - 4, H - 14)), (left, (3, H // 2 - 6)),
                     (right, (W - 11, H // 2 - 6))):
        d.text(xy, text, fill=(255, 220, 0))
    d.text((3, 2), f"{view} {idx + 1}/{n}", fill=(255, 255, 255))
    return np.asarray(im)
