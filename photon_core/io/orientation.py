"""Reorienting a voxel array by axis permutation and flips only (no resampling), in one place.

    arr2, to_source = reorient(arr, affine, "RAS")   # closest RAS+ orientation of a scan
    arr2, to_source = reorient(labels, affine, like_affine)   # onto another grid's axis order

``target`` is axis codes ("RAS", ("R", "A", "I"), …) or another affine whose orientation to match.
Returns the reoriented array (a view where possible) and the 4×4 map from its voxel indices to the
SOURCE array's voxel indices (compose with the source affine for world coordinates). Oblique scans
take the nearest axis permutation, as a DICOM reorientation filter does.
"""
from __future__ import annotations

import numpy as np


def transform(affine: np.ndarray, target) -> np.ndarray:
    """nibabel orientation transform from ``affine``'s axes to ``target`` (codes or an affine)."""
    from nibabel import orientations as ornt

    dst = ornt.io_orientation(target) if isinstance(target, np.ndarray) else ornt.axcodes2ornt(tuple(target))
    return ornt.ornt_transform(ornt.io_orientation(affine), dst)


def reorient(arr: np.ndarray, affine: np.ndarray, target) -> tuple[np.ndarray, np.ndarray]:
    from nibabel import orientations as ornt

    t = transform(affine, target)
    return ornt.apply_orientation(arr, t), ornt.inv_ornt_aff(t, arr.shape[:3])

