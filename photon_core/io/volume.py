"""Loading a CT scan into one `Volume` value.

Supported inputs: NIfTI (.nii, .nii.gz), NRRD (.nrrd), a DICOM series (a folder, a list of files,
or a .zip of them; JPEG2000-compressed series decode through pylibjpeg).

Conventions
-----------
* ``Volume.hu`` is a float32 array indexed ``[i, j, k]`` in the file's own voxel order (nibabel
  convention: i is the fastest-varying index on disk). It holds Hounsfield units: DICOM rescale
  slope/intercept and NIfTI scl_slope/scl_inter are applied.
* ``Volume.affine`` maps voxel indices ``(i, j, k, 1)`` to world millimetres in **RAS+** (the
  NIfTI / nibabel / 3D Slicer convention: +x = Right, +y = Anterior, +z = Superior).
  DICOM and NRRD-LPS geometry (+x = Left, +y = Posterior) is converted by negating x and y.
* Patient-identifying DICOM attributes are never read into ``Volume``; only the fields listed in
  ``_SAFE_DICOM_FIELDS`` reach ``Volume.meta``.

Every rejection raises `VolumeError` (a `ValueError`) whose message says what was wrong and what
is expected, in words a clinician can act on.
"""
from __future__ import annotations

import gzip
import os
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np


class VolumeError(ValueError):
    """A file that cannot be used as a CT volume; the message is meant for the user."""


@dataclass(frozen=True)
class Limits:
    """Input limits; every value can be overridden (see README, "Limits")."""

    min_slices: int = 16                 # a CT volume needs at least this many voxels on every axis
    max_axis: int = 2048                 # voxels per axis
    max_bytes: int = 1_500_000_000       # float32 bytes of the decoded volume
    max_zip_bytes: int = 2_000_000_000   # sum of uncompressed member sizes in a .zip
    max_zip_files: int = 4000            # members in a .zip
    max_zip_ratio: float = 200.0         # uncompressed/compressed ratio that marks a zip bomb
    max_file_bytes: int = 1_000_000_000  # a single uploaded file


DEFAULT_LIMITS = Limits()


@dataclass
class Volume:
    """A CT volume in Hounsfield units with its voxel→world (RAS, mm) affine."""

    hu: np.ndarray                   # (I, J, K) float32, HU
    affine: np.ndarray               # (4, 4) float64, voxel index -> RAS mm
    source_format: str               # "nifti" | "dicom" | "nrrd" | "array"
    meta: dict = field(default_factory=dict)  # non-identifying metadata only

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore

    @property
    def orientation(self) -> str:
        """Axis codes, nibabel style: the RAS direction each voxel axis increases toward, e.g. 'LPS'."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def summary(self) -> str:
        sx, sy, sz = self.spacing
        i, j, k = self.shape
        return (f"{i}×{j}×{k} voxels, {sx:.2f}×{sy:.2f}×{sz:.2f} mm, orientation {self.orientation}, "
                f"HU [{float(self.hu.min()):.0f}, {float(self.hu.max()):.0f}]")


# DICOM attributes we keep (none identifies a patient).
_SAFE_DICOM_FIELDS = ("Modality", "Manufacturer", "SliceThickness", "KVP", "ConvolutionKernel",
                      "BodyPartExamined", "ContrastBolusAgent")


# --------------------------------------------------------------------------------------------
# Validation shared by every format
# --------------------------------------------------------------------------------------------

def _check_shape(shape: Sequence[int], limits: Limits, what: str = "This file") -> tuple[int, ...]:
    """Reject non-3-D shapes and absurd sizes *before* any voxel is read. Returns the 3-D shape."""
    shape = tuple(int(s) for s in shape)
    if any(s <= 0 for s in shape):
        raise VolumeError(f"{what} has an empty dimension (shape {shape}); a CT volume needs three "
                          f"non-empty axes.")
    core = list(shape)
    while len(core) > 3 and core[-1] == 1:  # (I, J, K, 1) is a 3-D volume stored as 4-D
        core.pop()
    if len(core) > 3:
        raise VolumeError(f"{what} is a {len(core)}-D series (shape {'×'.join(map(str, shape))}); "
                          f"load a single 3-D CT volume (one time point / one channel).")
    if len(core) < 3 or min(core) == 1:
        dims = "×".join(str(s) for s in core if s != 1)
        raise VolumeError(f"{what} is a 2-D image ({dims}); a CT volume needs at least "
                          f"{limits.min_slices} slices.")
    if min(core) < limits.min_slices:
        raise VolumeError(f"{what} has only {min(core)} slices along one axis (shape "
                          f"{'×'.join(map(str, core))}); a CT volume needs at least "
                          f"{limits.min_slices}.")
    if max(core) > limits.max_axis:
        raise VolumeError(f"{what} has {max(core)} voxels along one axis (shape "
                          f"{'×'.join(map(str, core))}); the limit is {limits.max_axis} per axis.")
    nbytes = 4 * int(np.prod(core, dtype=np.int64))
    if nbytes > limits.max_bytes:
        raise VolumeError(f"{what} would need {nbytes / 1e9:.1f} GB in memory (shape "
                          f"{'×'.join(map(str, core))}); the limit is {limits.max_bytes / 1e9:.1f} GB.")
    return tuple(core)


def _check_values(hu: np.ndarray) -> np.ndarray:
    hu = np.asarray(hu, dtype=np.float32)
    bad = ~np.isfinite(hu)
    if bad.any():
        raise VolumeError(f"The volume holds {int(bad.sum())} NaN/Inf voxels; a CT volume must hold "
                          f"finite Hounsfield units.")
    return hu


def _check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise VolumeError("The file's voxel-to-world transform is missing or not finite.")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing < 1e-3) or np.any(spacing > 50) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"The voxel spacing {np.round(spacing, 4).tolist()} mm is not plausible for "
                          f"a CT (expected between 0.001 and 50 mm per axis).")
    return affine


# --------------------------------------------------------------------------------------------
# NIfTI and NRRD
# --------------------------------------------------------------------------------------------

def _load_nifti(path: Path, limits: Limits) -> Volume:
    import nibabel as nib

    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(348)
        except (OSError, EOFError, zlib.error) as e:
            raise VolumeError(f"'{path.name}' is not a readable gzip file ({type(e).__name__}); "
                              f"expected a .nii.gz NIfTI volume.") from None
        if len(head) < 348:
            raise VolumeError(f"'{path.name}' is truncated or is not NIfTI (header has {len(head)} of "
                              f"348 bytes).")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for corrupt headers
        raise VolumeError(f"'{path.name}' is not a readable NIfTI file ({type(e).__name__}: "
                          f"{str(e)[:120]}).") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"'{path.name}' is not a NIfTI volume.")
    _check_shape(img.header.get_data_shape(), limits, f"'{path.name}'")
    try:
        data = np.asanyarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise VolumeError(f"'{path.name}' is truncated or corrupt: its voxel data could not be read "
                          f"({type(e).__name__}).") from None
    data = data.reshape(_check_shape(data.shape, limits, f"'{path.name}'"))
    affine = img.affine if img.affine is not None else np.eye(4)
    return Volume(hu=_check_values(data), affine=_check_affine(affine), source_format="nifti",
                  meta={"format": "NIfTI"})


def _load_nrrd(path: Path, limits: Limits) -> Volume:
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as e:
        raise VolumeError(f"'{path.name}' is not a readable NRRD file ({type(e).__name__}).") from None
    _check_shape(header.get("sizes", ()), limits, f"'{path.name}'")
    try:
        data, header = nrrd.read(str(path))
    except Exception as e:
        raise VolumeError(f"'{path.name}' is truncated or corrupt ({type(e).__name__}).") from None
    data = np.asarray(data, dtype=np.float32).reshape(_check_shape(data.shape, limits))
    directions = np.asarray(header.get("space directions", np.eye(3)), dtype=np.float64)
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # NRRD lists one direction vector per axis
    affine[:3, 3] = origin
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    elif space not in ("right-anterior-superior", "ras"):
        raise VolumeError(f"'{path.name}' uses the NRRD space '{space}'; expected LPS or RAS.")
    return Volume(hu=_check_values(data), affine=_check_affine(affine), source_format="nrrd",
                  meta={"format": "NRRD"})


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------

def _load_dicom_files(files: Sequence[Path], limits: Limits) -> Volume:
    import pydicom

    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=False, force=False)
        except Exception:
            continue  # not a DICOM file (README, DICOMDIR viewer files, ...): skip it
        if "PixelData" not in ds:
            continue
        slices.append(ds)
    if not slices:
        raise VolumeError("No DICOM images were found; expected the files (or a .zip) of one CT "
                          "series.")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in slices}
    if len(series) > 1:
        raise VolumeError(f"The files hold {len(series)} different DICOM series; upload one series "
                          f"at a time.")
    modality = str(getattr(slices[0], "Modality", "CT"))
    if modality != "CT":
        raise VolumeError(f"This DICOM series is modality '{modality}'; Photon reads CT only.")
    for ds in slices:
        if not hasattr(ds, "ImagePositionPatient") or not hasattr(ds, "ImageOrientationPatient"):
            raise VolumeError("A DICOM slice has no ImagePositionPatient/ImageOrientationPatient; "
                              "the series geometry cannot be rebuilt.")
    iop = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    for ds in slices:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=1e-4):
            raise VolumeError("The DICOM slices have different orientations; expected one series.")
    slices.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)))
    pos = np.array([np.dot(np.asarray(ds.ImagePositionPatient, float), normal) for ds in slices])
    gaps = np.diff(pos)
    if len(slices) >= 2 and np.any(gaps < 1e-3):
        raise VolumeError(f"The DICOM series has duplicate slices ({int(np.sum(gaps < 1e-3))} slice "
                          f"positions repeat); upload one copy of each slice.")
    if len(slices) >= 3:
        med = float(np.median(gaps))
        if np.any(np.abs(gaps - med) > 0.1 * med + 0.01):
            if np.any(gaps > 1.5 * med):
                raise VolumeError(f"The DICOM series has missing slices (a gap of {gaps.max():.2f} mm "
                                  f"where the spacing is {med:.2f} mm).")
            raise VolumeError(f"The DICOM slice spacing varies ({gaps.min():.2f}–{gaps.max():.2f} mm); "
                              f"expected a regularly spaced series.")
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    _check_shape((cols, rows, len(slices)), limits, "This DICOM series")
    hu = np.empty((cols, rows, len(slices)), dtype=np.float32)
    for n, ds in enumerate(slices):
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise VolumeError("The DICOM slices have different image sizes; expected one series.")
        try:
            px = ds.pixel_array.astype(np.float32)
        except Exception as e:
            raise VolumeError(f"A DICOM slice could not be decoded ({type(e).__name__}: "
                              f"{str(e)[:100]}).") from None
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        hu[:, :, n] = (px * slope + intercept).T  # pixel_array is (row, col); i runs along columns
    ps = [float(v) for v in slices[0].PixelSpacing]  # (row spacing, column spacing)
    dz = float(np.median(gaps)) if len(slices) > 1 else float(getattr(slices[0], "SliceThickness", 1))
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[1]   # i: along a row (next column)
    lps[:3, 1] = col_dir * ps[0]   # j: down a column (next row)
    lps[:3, 2] = normal * dz
    lps[:3, 3] = np.asarray(slices[0].ImagePositionPatient, dtype=np.float64)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    meta = {"format": "DICOM", "n_slices": len(slices)}
    for name in _SAFE_DICOM_FIELDS:
        if hasattr(slices[0], name):
            meta[name] = str(getattr(slices[0], name))
    return Volume(hu=_check_values(hu), affine=_check_affine(affine), source_format="dicom", meta=meta)


def _safe_extract_zip(path: Path, dest: Path, limits: Limits) -> list[Path]:
    """Extract a zip into ``dest`` refusing path escapes, links, bombs and oversize archives."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise VolumeError(f"'{path.name}' is not a readable .zip archive ({type(e).__name__}).") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > limits.max_zip_files:
            raise VolumeError(f"'{path.name}' holds {len(members)} files; the limit is "
                              f"{limits.max_zip_files}.")
        total = sum(m.file_size for m in members)
        packed = max(1, sum(m.compress_size for m in members))
        if total > limits.max_zip_bytes or (total > 50_000_000 and total / packed > limits.max_zip_ratio):
            raise VolumeError(f"'{path.name}' unpacks to {total / 1e6:.0f} MB from {packed / 1e6:.1f} MB; "
                              f"the limit is {limits.max_zip_bytes / 1e6:.0f} MB (and no zip bombs).")
        root = dest.resolve()
        out = []
        for m in members:
            name = m.filename.replace("\\", "/")
            mode = (m.external_attr >> 16) & 0o170000
            if mode == stat.S_IFLNK:
                raise VolumeError(f"'{path.name}' contains a symbolic link ('{name}'); links are not "
                                  f"accepted in uploads.")
            target = (root / name).resolve()
            if name.startswith("/") or ".." in Path(name).parts or root not in target.parents:
                raise VolumeError(f"'{path.name}' contains a path that escapes its folder ('{name}').")
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with zf.open(m) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > m.file_size or written > limits.max_zip_bytes:
                        raise VolumeError(f"'{path.name}' member '{name}' unpacks beyond its declared "
                                          f"size; the archive is refused.")
                    dst.write(chunk)
            out.append(target)
    return out


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def load_volume(source: str | os.PathLike | Sequence[str | os.PathLike],
                limits: Limits = DEFAULT_LIMITS) -> Volume:
    """Load a CT volume from a NIfTI/NRRD file, a DICOM folder, a DICOM .zip, or a list of DICOM files.

    Raises `VolumeError` with a user-readable message for anything that is not a usable CT volume.
    """
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        if len(paths) == 1:
            return load_volume(paths[0], limits)
        for p in paths:
            _check_file(p, limits)
        return _load_dicom_files(paths, limits)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        return _load_dicom_files(files, limits)
    _check_file(path, limits)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _load_nifti(path, limits)
    if name.endswith((".nrrd", ".nhdr")):
        return _load_nrrd(path, limits)
    if name.endswith(".zip") or zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(prefix="photon_zip_") as tmp:
            files = _safe_extract_zip(path, Path(tmp), limits)
            return _load_dicom_files(sorted(files), limits)
    if name.endswith(".gz"):
        return _load_nifti(path, limits)  # gives the gzip/NIfTI error message
    with open(path, "rb") as f:
        head = f.read(132)
    if len(head) >= 132 and head[128:132] == b"DICM":
        raise VolumeError(f"'{path.name}' is a single DICOM image; upload the whole series (all of its "
                          f"files, or a .zip of them).")
    raise VolumeError(f"'{path.name}' is not a supported CT file; expected NIfTI (.nii/.nii.gz), NRRD, "
                      f"or a DICOM series (folder or .zip).")


def _check_file(path: Path, limits: Limits) -> None:
    if not path.exists():
        raise VolumeError(f"'{path.name}' does not exist.")
    size = path.stat().st_size
    if size == 0:
        raise VolumeError(f"'{path.name}' is empty (0 bytes).")
    if size > limits.max_file_bytes:
        raise VolumeError(f"'{path.name}' is {size / 1e9:.1f} GB; the upload limit is "
                          f"{limits.max_file_bytes / 1e9:.1f} GB.")


def load_label_map(path: str | os.PathLike, like: Volume | None = None,
                   limits: Limits = DEFAULT_LIMITS) -> tuple[np.ndarray, np.ndarray]:
    """Load an integer label map (NIfTI). If ``like`` is given its grid must match the scan's."""
    import nibabel as nib

    path = Path(path)
    _check_file(path, limits)
    try:
        img = nib.load(str(path))
        _check_shape(img.header.get_data_shape(), limits, f"'{path.name}'")
        labels = np.asanyarray(img.dataobj).astype(np.int16)
    except VolumeError:
        raise
    except Exception as e:
        raise VolumeError(f"'{path.name}' is not a readable NIfTI label map ({type(e).__name__}).") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if like is not None and not (labels.shape == like.shape and np.allclose(affine, like.affine, atol=1e-2)):
        # Same voxels stored in another axis order (e.g. LAS vs LPS): permute/flip onto the scan grid.
        from nibabel import orientations as ornt

        t = ornt.ornt_transform(ornt.io_orientation(affine), ornt.io_orientation(like.affine))
        moved = ornt.apply_orientation(labels, t)
        moved_aff = affine @ ornt.inv_ornt_aff(t, labels.shape)
        if moved.shape != like.shape or not np.allclose(moved_aff, like.affine, atol=1e-2):
            raise VolumeError(f"The label map grid ({'×'.join(map(str, labels.shape))}) does not match "
                              f"the scan ({'×'.join(map(str, like.shape))}); expected a label map "
                              f"on the same voxel grid.")
        labels, affine = np.ascontiguousarray(moved), moved_aff
    return labels, affine


def volume_from_array(hu: np.ndarray, affine: np.ndarray | None = None,
                      limits: Limits = DEFAULT_LIMITS) -> Volume:
    """Wrap an in-memory HU array (I, J, K) with an affine (identity = 1 mm RAS) as a Volume."""
    hu = np.asarray(hu)
    hu = hu.reshape(_check_shape(hu.shape, limits, "This array"))
    return Volume(hu=_check_values(hu), affine=_check_affine(np.eye(4) if affine is None else affine),
                  source_format="array", meta={"format": "array"})
